"""Issue 12, item 2: Ctrl-C. The first SIGINT stops dispatching, lets finished shards close, removes temp
files and exits non-zero with "interrupted: rerun the same command to resume"; a second exits at once.
Either way the rerun completes byte-identical."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from conftest import SMALL, demo_config, wait_for
from styledistill.pipeline.faults import Interrupted
from styledistill.pipeline.run import run_pipeline
from styledistill.schemas import manifest as mf
from test_resume import _assert_same_dataset, _cli

MESSAGE = "interrupted: rerun the same command to resume"


def _stats(out) -> list:
    return sorted((out / mf.SHARDS_DIR).glob("*_stats.json"))


def _no_temp_files(out) -> bool:
    return not [p for p in out.rglob("*") if ".tmp-" in p.name]


@pytest.mark.slow  # ~8-20 s: two inline runs of the small demo
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_inline_then_rerun_is_byte_identical(sample_data, tmp_path, reference_run, presses):
    out = tmp_path / "run"
    config = demo_config(sample_data, out, *SMALL)

    def press_after_first_shard(result):
        if result.shard == 0:
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)  # a real signal, taken by the run's handler

    expected = Interrupted if presses == 1 else KeyboardInterrupt
    with pytest.raises(expected) as caught:
        run_pipeline(config, inline=True, on_shard=press_after_first_shard, report=False)
    if presses == 1:
        assert str(caught.value).startswith(MESSAGE)
        assert [p.name for p in _stats(out)] == ["styledistill-000000_stats.json"]  # closed; no more begun
        assert _no_temp_files(out)
    total = len(_stats(reference_run))
    assert len(_stats(out)) < total
    outcome = run_pipeline(config, inline=True, report=False)
    assert outcome.skipped_shards >= 1
    _assert_same_dataset(out, reference_run)


@pytest.mark.slow
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_on_the_command_line_then_rerun_is_byte_identical(sample_data, tmp_path, reference_run, presses):
    """As a terminal does it: SIGINT to the whole foreground process group (driver and local Ray)."""
    out = tmp_path / "run"
    shards = out / mf.SHARDS_DIR
    proc = subprocess.Popen(_cli(sample_data, out), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (shards.exists() and any(shards.glob("*_stats.json"))) or proc.poll() is not None,
                  timeout=240)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        for _ in range(presses):
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(0.2)
        start = time.monotonic()
        _, stderr = proc.communicate(timeout=120)
        stopped_in = time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, stderr[-2000:]
    assert MESSAGE in stderr
    assert "Traceback" not in stderr, stderr[-2000:]
    if presses == 1:
        assert _no_temp_files(out)
    else:
        assert stopped_in < 30  # at once: no waiting for shards (Ray's own teardown takes a few seconds)
    assert len(_stats(out)) < len(_stats(reference_run))

    done = subprocess.run(_cli(sample_data, out), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same_dataset(out, reference_run)
    assert _no_temp_files(out)

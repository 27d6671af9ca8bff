"""Issue 12, items 3 and 4: an output that fills up, and flaky object storage (the `faulty://` test
filesystem in styledistill/io/faultfs.py; backoff set to 0, so no test sleeps)."""

from __future__ import annotations

import errno
import json

import pandas as pd
import pytest

from styledistill.io import faultfs
from conftest import SMALL, demo_config
from styledistill.io.retry import RetriesExhausted, is_retryable, retrying
from styledistill.io import uris
from styledistill.pipeline.faults import OutputWriteError
from styledistill.pipeline.run import run_pipeline
from styledistill.pipeline.scan import scan_sources
from styledistill.schemas import manifest as mf
from test_resume import _assert_same_dataset


@pytest.fixture(autouse=True)
def faulty(tmp_path, monkeypatch):
    faultfs.register()
    monkeypatch.setenv("FAULTYFS_STATE", str(tmp_path / "faults"))
    monkeypatch.setenv("STYLEDISTILL_IO_BACKOFF_S", "0")
    monkeypatch.setenv("STYLEDISTILL_IO_ATTEMPTS", "4")
    for name in ("FAULTYFS_READ_FAILS", "FAULTYFS_READ_BROKEN", "FAULTYFS_WRITE_FAILS", "FAULTYFS_WRITE_BUDGET"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# --- the retry policy -------------------------------------------------------------------------------------

def test_transient_errors_are_retried_with_growing_backoff(monkeypatch):
    monkeypatch.setenv("STYLEDISTILL_IO_BACKOFF_S", "1")
    calls, delays = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset")
        return "ok"

    assert retrying(flaky, sleep=delays.append) == "ok"
    assert len(calls) == 3 and len(delays) == 2 and delays[1] > delays[0] * 1.0  # doubled, with jitter
    assert all(0.5 <= d / base <= 1.0 for d, base in zip(delays, (1, 2)))


@pytest.mark.parametrize("err", [FileNotFoundError("x"), PermissionError("x"), OSError(errno.ENOSPC, "full"),
                                 ValueError("bad")])
def test_permanent_errors_are_not_retried(err):
    calls = []

    def broken():
        calls.append(1)
        raise err

    assert not is_retryable(err)
    with pytest.raises(type(err)):
        retrying(broken, sleep=lambda _: None)
    assert len(calls) == 1


def test_an_error_that_never_clears_names_its_cause_and_the_attempts():
    with pytest.raises(RetriesExhausted, match=r"ConnectionError: reset \(still failing after 4 attempts\)"):
        retrying(lambda: (_ for _ in ()).throw(ConnectionError("reset")), sleep=lambda _: None)


# --- flaky object storage (item 4) ------------------------------------------------------------------------

def test_reads_and_writes_that_fail_transiently_succeed(tmp_path, faulty):
    faulty.setenv("FAULTYFS_READ_FAILS", "2")
    faulty.setenv("FAULTYFS_WRITE_FAILS", "2")
    uri = f"faulty://{tmp_path}/a/b.bin"
    uris.write_bytes_atomic(uri, b"payload")
    assert uris.read_bytes(uri) == b"payload"
    assert uris.read_bytes(uri, max_bytes=3) == b"pay"
    assert faultfs.injected("read") == 2 and faultfs.injected("write") == 2
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.bin"]  # no temp file left by the failures


def test_a_source_that_keeps_failing_is_recorded_failed_with_its_cause(sample_data, tmp_path, faulty):
    faulty.setenv("FAULTYFS_READ_FAILS", "1")
    bad = sorted((sample_data / "realistic").iterdir())[0].name
    faulty.setenv("FAULTYFS_READ_BROKEN", bad)
    config = demo_config(sample_data, tmp_path / "run", f"sources.0.uri=faulty://{sample_data / 'realistic'}")
    uris.makedirs(str(tmp_path / "run"))
    scan_sources(config, str(tmp_path / "run"), use_ray=False)
    rows = pd.read_parquet(tmp_path / "run" / "sources.parquet")
    row = rows[rows.uri.str.endswith(bad)].iloc[0]
    assert row.status == "failed"
    assert "ConnectionError" in row.error and "still failing after 4 attempts" in row.error
    others = rows[~rows.uri.str.endswith(bad) & rows.uri.str.startswith("faulty://")]
    assert (others.status != "failed").sum() > 0 and faultfs.injected("read") > 0


@pytest.mark.slow
def test_a_run_on_flaky_storage_is_byte_identical_to_a_clean_one(sample_data, tmp_path, faulty):
    sources = (f"sources.0.uri=faulty://{sample_data / 'realistic'}", f"sources.1.uri=faulty://{sample_data / 'stylized'}")
    clean = tmp_path / "clean"
    run_pipeline(demo_config(sample_data, clean, *SMALL, *sources), inline=True, report=False)
    faulty.setenv("FAULTYFS_READ_FAILS", "2")
    faulty.setenv("FAULTYFS_WRITE_FAILS", "1")
    out = tmp_path / "flaky"
    outcome = run_pipeline(demo_config(sample_data, f"faulty://{out}", *SMALL, *sources), inline=True, report=False)
    assert outcome.counts["failed"] == len(pd.concat(map(pd.read_parquet, sorted(
        (clean / mf.SHARDS_DIR).glob("*.parquet")))).query("status == 'failed'"))
    assert faultfs.injected("read") > 10 and faultfs.injected("write") > 5
    _assert_same_dataset(out, clean)


# --- a full disk (item 3) ---------------------------------------------------------------------------------

def test_a_full_disk_fails_one_write_with_one_line(tmp_path, faulty):
    faulty.setenv("FAULTYFS_WRITE_BUDGET", "10")
    uri = f"faulty://{tmp_path}/x.json"
    with pytest.raises(OutputWriteError) as caught:
        uris.write_bytes_atomic(uri, b"x" * 100)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "x.json") in message and "No space left on device" in message
    assert "rerun the same command" in message
    assert not list(tmp_path.glob("x.json*"))  # neither the file nor its temp
    assert faultfs.injected("full") == 1  # ENOSPC is permanent: not retried


@pytest.mark.slow
def test_a_run_that_fills_the_disk_marks_nothing_complete_and_resumes_byte_identical(
        sample_data, tmp_path, faulty, reference_run):
    out = tmp_path / "run"
    config = demo_config(sample_data, f"faulty://{out}", *SMALL)
    first_shard = sum(p.stat().st_size for p in (reference_run / mf.SHARDS_DIR).glob("*-000000*"))
    faulty.setenv("FAULTYFS_WRITE_BUDGET", str(300_000 + first_shard * 2))  # scan + a shard or two, not all
    with pytest.raises(OutputWriteError) as caught:
        run_pipeline(config, inline=True, report=False)
    message = str(caught.value)
    assert "\n" not in message and "No space left on device" in message and str(out) in message
    shards = out / mf.SHARDS_DIR
    done = sorted(shards.glob("*_stats.json"))
    assert len(done) < len(list((reference_run / mf.SHARDS_DIR).glob("*_stats.json")))
    for stats in done:  # whatever is marked complete is complete
        stem = stats.name.removesuffix("_stats.json")
        assert pd.read_parquet(shards / f"{stem}.parquet").shape[0] == json.loads(stats.read_text())["planned"]
    assert not [p for p in out.rglob("*") if uris.TEMP_MARKER in p.name]

    faulty.delenv("FAULTYFS_WRITE_BUDGET")  # space freed
    run_pipeline(config, inline=True, report=False)
    _assert_same_dataset(out, reference_run)

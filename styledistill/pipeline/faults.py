"""What the run does when the world misbehaves: Ctrl-C, an output that refuses writes.

Every fault ends the same way: each planned sample is accounted for (in a finished shard, or in a shard the
rerun redoes), no shard is marked complete that is not, and the user gets one line saying what happened
and what to do.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable

from styledistill.io.retry import OutputWriteError, output_write_error, retrying
from styledistill.io import uris
from styledistill.schemas import manifest as mf
from styledistill.schemas.records import ShardResult

__all__ = ["Interrupted", "InterruptGuard", "OutputWriteError", "RERUN", "write_shard"]

RERUN = "rerun the same command to resume"


class Interrupted(RuntimeError):
    """The user pressed Ctrl-C: finished shards are closed, the rest is redone by the rerun."""

    def __init__(self, detail: str = ""):
        super().__init__(f"interrupted: {RERUN}" + (f" ({detail})" if detail else ""))


def write_shard(writer, shard: int, batches: Callable[[], Iterable]) -> ShardResult:
    """`writer.write(shard, batches())`, the whole shard retried on a transient storage error (`batches`
    is called again: the work is re-read from the object store or memory). A write that fails for good
    raises OutputWriteError: one line naming the path and the cause; the shard has no stats file, so the
    rerun redoes it."""
    try:
        return retrying(lambda: writer.write(shard, batches()), f"writing shard {shard}")
    except OSError as err:
        name = mf.shard_name(writer.config.output.shard_prefix, shard)
        default = uris.join(writer.run_uri, mf.SHARDS_DIR, f"{name}.tar")
        raise output_write_error(_failed_path(err) or default, err) from None


def _failed_path(err: BaseException) -> str | None:
    while err is not None:
        if getattr(err, "filename", None):
            return str(err.filename).split(uris.TEMP_MARKER)[0]
        err = err.__cause__
    return None


class InterruptGuard:
    """First SIGINT: `requested` turns true and the executor stops dispatching, lets the shards being
    written close, and returns. Second SIGINT: KeyboardInterrupt at once. Outside the main thread (where
    Python cannot take signals) it does nothing."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("interrupt: no new work is dispatched; closing the shards being written "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __call__(self) -> bool:
        return self.requested


# --- failpoints: faults injected on purpose, for the fault-injection tests and `styledistill chaos` ----------

FAULTS_ENV = "STYLEDISTILL_FAULTS"


def inject(stage: str, groups: Iterable[str]) -> None:
    """Called by a stage actor before each batch. Does nothing unless STYLEDISTILL_FAULTS is set (in the
    environment Ray workers inherit) to JSON like

        {"state_dir": "/tmp/x", "rules": [{"stage": "generate", "group": "<group_id>", "fault": "crash",
                                          "times": 1}]}

    `fault`: "crash" (the worker process is SIGKILLed, as by a segfault or the OOM killer) or "hang" (the
    call never returns). `times`: how often it fires across all processes (0: every time, a permanent
    fault). Every firing is counted in `state_dir` (see `injected_faults`)."""
    spec = os.environ.get(FAULTS_ENV)
    if not spec:
        return
    if not spec.lstrip().startswith("{"):  # a path: the spec can change between runs of one Ray session
        with open(spec) as f:
            spec = f.read()
    spec = json.loads(spec)
    ids = set(groups)
    for n, rule in enumerate(spec["rules"]):
        if rule["stage"] != stage or rule["group"] not in ids:
            continue
        fired = _bump(spec["state_dir"], f"rule-{n}")
        if rule.get("times", 0) and fired >= rule["times"]:
            continue
        _bump(spec["state_dir"], f"injected-{rule['fault']}")
        _where(spec["state_dir"], f"{stage}-{rule['fault']}")
        if rule["fault"] == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        elif rule["fault"] == "hang":
            threading.Event().wait()


def injected_faults(state_dir: str) -> dict[str, int]:
    """How many faults of each kind fired, in every process."""
    if not os.path.isdir(state_dir):
        return {}
    return {name.removeprefix("injected-"): os.path.getsize(os.path.join(state_dir, name))
            for name in sorted(os.listdir(state_dir)) if name.startswith("injected-")}


def _bump(state_dir: str, name: str) -> int:
    """Add one to a counter shared by all processes (a file's size, appended with O_APPEND); the count before."""
    os.makedirs(state_dir, exist_ok=True)
    fd = os.open(os.path.join(state_dir, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, b".")
        return os.fstat(fd).st_size - 1
    finally:
        os.close(fd)


def _where(state_dir: str, name: str) -> None:
    """Note the Ray node the fault fired on (tests remove that node)."""
    try:
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - only a hint for tests
        node = ""
    with open(os.path.join(state_dir, f"node-{name}"), "w") as f:
        f.write(node)

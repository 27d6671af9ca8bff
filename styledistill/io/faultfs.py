"""`faulty://` - a local filesystem that misbehaves on purpose, for the fault-injection tests and
`styledistill chaos` (never used by a normal run).

`faulty:///abs/path` is `/abs/path` on disk. The faults come from the environment (so Ray workers started
by the test's driver see the same ones) and are counted in a state folder on disk (so they are counted
across processes):

    FAULTYFS_STATE        folder for the counters (required when any fault is set)
    FAULTYFS_READ_FAILS   the first N reads of every file raise a retryable ConnectionError
    FAULTYFS_READ_BROKEN  comma-separated substrings: reads of matching paths always fail (ConnectionError)
    FAULTYFS_WRITE_FAILS  the first N write-opens of every file (by final name) raise a ConnectionError
    FAULTYFS_WRITE_BUDGET total bytes that can be written (all files, all processes); the write that goes
                          past it raises OSError(ENOSPC), as a full disk does

Call `register()` in every process that opens a `faulty://` URL (fsspec's registry is per process; Ray
workers: `runtime_env={"worker_process_setup_hook": "styledistill.io.faultfs.register"}`).
"""

from __future__ import annotations

import errno
import hashlib
import os

import fsspec
from fsspec.implementations.local import LocalFileSystem

TEMP_MARKER = ".tmp-"


def register() -> None:
    fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)


def _counter(kind: str, key: str) -> int:
    """Count one more event of `kind` for `key`; returns the count before it (cross-process, O_APPEND)."""
    state = os.environ["FAULTYFS_STATE"]
    os.makedirs(state, exist_ok=True)
    name = os.path.join(state, f"{kind}-{hashlib.sha1(key.encode()).hexdigest()[:16]}")
    fd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, b".")
        return os.fstat(fd).st_size - 1
    finally:
        os.close(fd)


def injected(kind: str) -> int:
    """How many faults of `kind` ("read", "write", "broken", "full") were raised, in all processes."""
    state = os.environ.get("FAULTYFS_STATE")
    path = os.path.join(state, f"injected-{kind}") if state else None
    return os.path.getsize(path) if path and os.path.exists(path) else 0


def _note(kind: str) -> None:
    os.makedirs(os.environ["FAULTYFS_STATE"], exist_ok=True)
    with open(os.path.join(os.environ["FAULTYFS_STATE"], f"injected-{kind}"), "ab") as f:
        f.write(b".")


def _bytes_written(n: int) -> int:
    """Add n bytes to the global tally; returns the tally before."""
    state = os.environ["FAULTYFS_STATE"]
    os.makedirs(state, exist_ok=True)
    fd = os.open(os.path.join(state, "bytes"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, b"." * n)  # the file's size is the tally: atomic across processes
        return os.fstat(fd).st_size - n
    finally:
        os.close(fd)


class _BudgetedFile:
    """A write file that raises ENOSPC once the budget is spent, like a full disk."""

    def __init__(self, inner, path: str, budget: int):
        self._inner, self._path, self._budget = inner, path, budget

    def write(self, data) -> int:
        n = len(data)
        if "FAULTYFS_STATE" not in os.environ:  # a late flush from a finaliser, after the test ended
            return self._inner.write(data)
        if _bytes_written(n) + n > self._budget:
            _note("full")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)
        return self._inner.write(data)

    def __getattr__(self, item):
        if item.startswith("_"):  # never recurse looking for _inner itself (e.g. from a finaliser)
            raise AttributeError(item)
        return getattr(self._inner, item)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._inner.close()


class FaultyFileSystem(LocalFileSystem):
    protocol = ("faulty",)

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        path = self._strip_protocol(path)
        env = os.environ
        if "r" in mode:
            broken = [s for s in env.get("FAULTYFS_READ_BROKEN", "").split(",") if s]
            if any(s in path for s in broken):
                _note("broken")
                raise ConnectionError(f"connection reset by peer reading {path}")
            fails = int(env.get("FAULTYFS_READ_FAILS", "0"))
            if fails and _counter("read", path) < fails:
                _note("read")
                raise ConnectionError(f"connection reset by peer reading {path}")
        elif "w" in mode:
            final = path.split(TEMP_MARKER)[0]
            fails = int(env.get("FAULTYFS_WRITE_FAILS", "0"))
            if fails and _counter("write", final) < fails:
                _note("write")
                raise ConnectionError(f"503 slow down writing {final}")
        f = super()._open(path, mode, block_size=block_size, **kwargs)
        budget = env.get("FAULTYFS_WRITE_BUDGET")
        if "w" in mode and budget is not None:
            return _BudgetedFile(f, path, int(budget))
        return f

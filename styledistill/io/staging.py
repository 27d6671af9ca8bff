"""Model weights at a remote URL (s3://, gs://, memory://, ...), copied once per node to a local cache.

Every actor that loads a model resolves its weight paths through `staged`; on a cluster, several actors on
one node then share one copy: the first takes a file lock, copies and writes a completion marker, the others
wait on the lock and find the marker. A copy without its marker (a killed actor, a full disk) is deleted and
redone. The cache key is the URL, so weights at a URL must never change: publish a new version at a new path.

    $STYLEDISTILL_CACHE/<sha256 of the URL>/<file or folder name>   (default ~/.cache/styledistill/weights)

Local paths (and file:// URLs) are used where they are, never copied.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from pathlib import Path

import fsspec

CACHE_ENV = "STYLEDISTILL_CACHE"
COMPLETE_MARKER = ".styledistill-complete"
LOCAL_PROTOCOLS = ("file", "local")


def cache_root() -> Path:
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "styledistill" / "weights"


def is_remote(uri: str) -> bool:
    protocol, sep, _ = uri.partition("://")
    return bool(sep) and protocol not in LOCAL_PROTOCOLS


def local_copy(uri: str, what: str) -> Path:
    """A local path holding `uri`'s file or folder: the path itself when local, else the node's cached copy."""
    if not is_remote(uri):
        return Path(uri.removeprefix("file://")).expanduser()
    entry = cache_root() / hashlib.sha256(uri.encode()).hexdigest()
    target = entry / (uri.rstrip("/").rsplit("/", 1)[-1] or "weights")
    marker = entry / COMPLETE_MARKER
    if marker.is_file():
        return target
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_suffix(".lock"), "w") as lock:
        # flock, not lockf: it also excludes threads of one process, each holding its own open file.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file():  # another actor copied it while we waited
            return target
        if entry.exists():
            shutil.rmtree(entry)  # a copy that never completed
        entry.mkdir()
        _copy(uri, target, what)
        marker.write_text(uri)
    return target


def staged(name: str, what: str) -> str:
    """`name` as a backend resolves it: a remote URL becomes its local copy, anything else is unchanged
    (a local path, or a hub id that the backend looks up in the local Hugging Face cache)."""
    return str(local_copy(name, what)) if is_remote(name) else name


def _copy(uri: str, target: Path, what: str) -> None:
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise FileNotFoundError(f"{what}: weights not found at {uri}")
    if not fs.isdir(root):
        fs.get_file(root, str(target))
        return
    files = fs.find(root, withdirs=False)
    if not files:
        raise FileNotFoundError(f"{what}: {uri} is an empty folder")
    for path in files:
        local = target / path[len(root):].lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(local))

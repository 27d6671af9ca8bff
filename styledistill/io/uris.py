"""Local paths and object-store URLs behind one small API (fsspec), so any input or output can live anywhere.

A plain path stays a plain path in every result (made absolute); a URL ("s3://", "gs://", "file://",
"memory://") stays a URL with its scheme. Writes are atomic: data goes to a unique temp name beside the target and is moved into
place only when complete, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs

from styledistill.io.retry import output_write_error, retrying

TEMP_MARKER = ".tmp-"


def is_url(uri: str) -> bool:
    return "://" in uri


def filesystem(uri: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem for `uri` and the path inside it (what fsspec methods take)."""
    return url_to_fs(uri)


def _to_uri(like: str, fs: AbstractFileSystem, path: str) -> str:
    """Turn a path returned by `fs` back into the same kind of reference the caller passed in."""
    return fs.unstrip_protocol(path) if is_url(like) else path


def join(base: str, *parts: str) -> str:
    if is_url(base):
        cleaned = [p.strip("/") for p in parts if p]
        return "/".join([base.rstrip("/"), *cleaned])
    return os.path.join(base, *parts)


def parent(uri: str) -> str:
    """The folder holding `uri` (for URLs, the part before the last slash)."""
    if is_url(uri):
        return posixpath.dirname(uri.rstrip("/"))
    return os.path.dirname(uri)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.isdir(path)


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The file's bytes; with `max_bytes`, at most that many (so a huge file is never read whole)."""
    fs, path = filesystem(uri)

    def read() -> bytes:
        if max_bytes is None:
            return fs.cat_file(path)
        with fs.open(path, "rb") as f:
            return f.read(max_bytes)

    return retrying(read, f"reading {uri}")  # object stores fail transiently: retried with backoff


def open_for_read(uri: str) -> IO[bytes]:
    """A seekable binary file object, for readers that stream (parquet row groups, CSV chunks)."""
    fs, path = filesystem(uri)
    return retrying(lambda: fs.open(path, "rb"), f"opening {uri}")


@contextmanager
def open_for_write_atomic(uri: str) -> Iterator[IO[bytes]]:
    """Yield a binary file; on success it is moved to `uri`, on error the temp file is deleted."""
    fs, path = filesystem(uri)
    folder = posixpath.dirname(path)
    if folder:
        fs.makedirs(folder, exist_ok=True)
    # The suffix goes last so globs for the final name ("*.tar", "*.parquet") never match a temp file.
    tmp = f"{path}{TEMP_MARKER}{uuid.uuid4().hex}"
    try:
        # Opening and the final move are retried on transient errors; a write that fails mid-stream is
        # retried by the caller that can replay it (the shard writer redoes the whole shard).
        with retrying(lambda: fs.open(tmp, "wb"), f"opening {uri} for writing") as f:
            yield f
        retrying(lambda: fs.mv(tmp, path), f"moving {uri} into place")
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def remove_temp_files(uri: str) -> int:
    """Delete the temp files a killed writer left anywhere below the folder `uri`; returns how many."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return 0
    stale = [p for p in fs.find(path) if TEMP_MARKER in posixpath.basename(p)]
    for p in stale:
        fs.rm(p)
    return len(stale)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    def write() -> None:
        with open_for_write_atomic(uri) as f:
            f.write(data)

    try:
        retrying(write, f"writing {uri}")
    except OSError as err:  # full disk, no permission, a store that keeps failing: one line, path named
        raise output_write_error(uri, err) from err


def write_text_atomic(uri: str, text: str) -> None:
    write_bytes_atomic(uri, text.encode("utf-8"))


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


def listdir(uri: str) -> list[str]:
    """Sorted names (not paths) of the folder's children; FileNotFoundError if there is no such folder."""
    fs, path = filesystem(uri)
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def find_files(uri: str) -> list[str]:
    """Every file below the folder `uri`, recursively, sorted."""
    fs, path = filesystem(uri)
    return sorted(_to_uri(uri, fs, p) for p in fs.find(path))


def glob(pattern: str) -> list[str]:
    """Paths matching `pattern` ("**" crosses folders), sorted, in the same form as `pattern`."""
    fs, path = filesystem(pattern)
    return sorted(_to_uri(pattern, fs, p) for p in fs.glob(path))

"""Reading WebDataset tars as bytes in memory: never extracted to disk, member names never used as paths.

Safe on untrusted tars. The reader streams (one sample in memory at a time) and is bounded:

- a member's bytes are read only when it is a regular file with a safe name, within `max_member_bytes`, and
  not a pickle; anything else is recorded as a *problem* of its sample (by member extension) or, for
  directories, only counted;
- a member name with `..`, an absolute path, or NUL/control characters makes its whole sample unusable, as
  does a key seen earlier in the same tar (non-adjacent) or the same member twice in one sample;
- the decompressed stream of a `.tar.gz` / `.tar.bz2` / `.tar.xz` is cut at `max_tar_bytes` (a gzip bomb
  ends the read with an error, never fills memory or disk);
- an extended (pax / GNU long-name) header over 1 MiB ends the read (tarfile would hold it in memory);
- a truncated or corrupt tar ends the read with an error that says where; the samples read before it are
  kept. Python's tarfile ends quietly on a bad header after the first member, so the end of the stream is
  checked here: the bytes after the last member must be the zero end-of-archive blocks.

A sample is the run of adjacent members sharing a key (the member name up to the first dot of its last path
component, as webdataset groups them).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from styledistill.io import uris

BLOCK = 512
DEFAULT_MAX_MEMBER_BYTES = 256 * 1024**2
DEFAULT_MAX_TAR_BYTES = 64 * 1024**3
# Extensions whose bytes are pickles (or may hold them): never read, never unpickled.
PICKLE_EXTENSIONS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "npy", "npz", "joblib", "ckpt"})

# Reasons, as recorded per sample (problems, error) and counted per tar.
UNSAFE_NAME = "unsafe member name"
DUPLICATE_KEY = "duplicate key in tar"
DUPLICATE_MEMBER = "duplicate member in sample"
NOT_REGULAR = "not a regular file"
DIRECTORY = "directory"
TOO_LARGE = "member over max_member_bytes"
PICKLED = "pickled member (never read)"
NO_EXTENSION = "member without an extension"


class TarReadError(ValueError):
    """The tar could not be read to its end; the message says why."""


@dataclass
class TarSkips:
    """What a read left out, by reason, and why it stopped early (`error`), so a caller can report it."""

    counts: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    error: str | None = None

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n


@dataclass
class TarSample:
    key: str  # as found in the tar: only ever a string, never a path
    members: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes
    problems: dict[str, str] = field(default_factory=dict)  # extension -> why its bytes were not read
    error: str | None = None  # why the whole sample is unusable


@dataclass(frozen=True)
class TarLimits:
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    max_tar_bytes: int = DEFAULT_MAX_TAR_BYTES  # decompressed bytes of one tar stream


def split_member_name(name: str) -> tuple[str, str]:
    """("dir/key", "ext.more") from "dir/key.ext.more", as webdataset splits it."""
    folder, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext


def unsafe_name(name: str) -> str | None:
    """Why a member name must not be trusted, or None."""
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        return "NUL or control characters"
    if any(0xDC80 <= ord(ch) <= 0xDCFF for ch in name):  # tarfile's surrogateescape of undecodable bytes
        return "not valid UTF-8"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "path traversal (..)"
    return None


def _member_type(info: tarfile.TarInfo) -> str:
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hardlink"
    if info.ischr() or info.isblk():
        return "device file"
    if info.isfifo():
        return "FIFO"
    return "special member"


class _BoundedStream:
    """A read-only stream that fails past `limit` bytes and remembers its last few chunks with their offsets,
    so the bytes after the last member can be checked once tarfile has stopped."""

    def __init__(self, raw, limit: int):
        self.raw, self.limit, self.total = raw, limit, 0
        self.recent: deque[tuple[int, bytes]] = deque(maxlen=8)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = 1 << 20
        data = self.raw.read(min(size, self.limit - self.total + 1))
        if data:
            self.recent.append((self.total, data))
            self.total += len(data)
        if self.total > self.limit:
            raise TarReadError(f"decompressed size over max_tar_bytes ({self.limit}): a compression bomb?")
        return data

    def tail_from(self, offset: int) -> bytes | None:
        """The bytes read from `offset` on, if still remembered."""
        chunks = [(start, data) for start, data in self.recent if start + len(data) > offset]
        if not chunks or chunks[0][0] > offset:
            return None
        joined = b"".join(data for _, data in chunks)
        return joined[offset - chunks[0][0]:]


MAX_HEADER_BYTES = 1024**2  # pax / GNU long-name headers: tarfile reads them whole into memory


class _SafeTarInfo(tarfile.TarInfo):
    """Refuses an extended header (pax, GNU long name) larger than MAX_HEADER_BYTES before tarfile reads it."""

    def _proc_member(self, tarfile_):
        extended = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                    tarfile.GNUTYPE_LONGLINK)
        if self.type in extended and self.size > MAX_HEADER_BYTES:
            raise tarfile.SubsequentHeaderError(f"extended header of {self.size} bytes (over {MAX_HEADER_BYTES})")
        return super()._proc_member(tarfile_)


def _decompressed(raw):
    head = raw.read(6)
    raw.seek(0)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if head[:3] == b"BZh":
        return bz2.BZ2File(raw, mode="rb")
    if head == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(raw, mode="rb")
    return raw


def iter_tar_samples(uri: str, limits: TarLimits = TarLimits(), report: TarSkips | None = None
                     ) -> Iterator[TarSample]:
    """Every sample of the tar at `uri`, in tar order, one in memory at a time; never raises for what is in
    the tar: skips are counted in `report.counts`, a tar that cannot be read to its end sets `report.error`
    (the samples read before it are still yielded)."""
    report = report if report is not None else TarSkips()
    seen: set[str] = set()
    current: TarSample | None = None

    def start(key: str) -> TarSample:
        sample = TarSample(key)
        if key in seen:
            sample.error = f"{DUPLICATE_KEY}: {key!r} appears earlier in this tar"
            report.add(DUPLICATE_KEY)
        seen.add(key)
        return sample

    try:
        raw_file = uris.open_for_read(uri)
    except (OSError, ValueError) as err:
        report.error = f"cannot open: {type(err).__name__}: {err}"
        return
    with raw_file as raw:
        try:
            stream = _BoundedStream(_decompressed(raw), limits.max_tar_bytes)
            with tarfile.open(fileobj=stream, mode="r|", tarinfo=_SafeTarInfo) as tar:
                for info in tar:
                    if info.isdir():
                        report.add(DIRECTORY)
                        continue
                    key, ext = split_member_name(info.name)
                    if current is None or key != current.key:
                        if current is not None:
                            report.samples += 1
                            yield current
                        current = start(key)
                    why = unsafe_name(info.name)
                    if why is not None:
                        current.error = current.error or f"{UNSAFE_NAME} {info.name!r}: {why}"
                        report.add(f"{UNSAFE_NAME}: {why}")
                        continue
                    if not ext:
                        report.add(NO_EXTENSION)
                        continue
                    if ext in current.members or ext in current.problems:
                        current.error = current.error or f"{DUPLICATE_MEMBER}: {key}.{ext} twice"
                        report.add(DUPLICATE_MEMBER)
                        continue
                    if not info.isfile():
                        kind = _member_type(info)
                        current.problems[ext] = f"{key}.{ext} is a {kind}, not read"
                        report.add(f"{NOT_REGULAR}: {kind}")
                        continue
                    if ext.rsplit(".", 1)[-1].lower() in PICKLE_EXTENSIONS:
                        current.problems[ext] = f"{key}.{ext}: {PICKLED}"
                        report.add(PICKLED)
                        continue
                    if info.size > limits.max_member_bytes:
                        current.problems[ext] = (f"{key}.{ext}: {TOO_LARGE} ({info.size} > "
                                                 f"{limits.max_member_bytes} bytes), not read")
                        report.add(TOO_LARGE)
                        continue
                    data = tar.extractfile(info)
                    current.members[ext] = data.read() if data is not None else b""
                end = tar.offset
            report.error = _check_end(stream, end)
        except TarReadError as err:
            report.error = str(err)
        except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, ValueError) as err:
            report.error = f"truncated or corrupt tar ({type(err).__name__}: {err})"
    if current is not None:
        report.samples += 1
        yield current


def _check_end(stream: _BoundedStream, end: int) -> str | None:
    """After tarfile stopped at offset `end`: the rest of the stream must be zero end-of-archive blocks."""
    zeros, garbage = 0, False
    tail = stream.tail_from(end)  # what tarfile already pulled past `end` (at most a record or two)
    for chunk in ([tail] if tail else []):
        garbage |= bool(chunk.strip(b"\x00"))
        zeros += len(chunk)
    while chunk := stream.read(1 << 20):  # drain, bounded by max_tar_bytes
        garbage |= bool(chunk.strip(b"\x00"))
        zeros += len(chunk)
    if stream.total < end:
        return f"truncated tar: the stream ends at byte {stream.total}, inside a member that runs to {end}"
    if garbage:
        return f"truncated or corrupt tar: unreadable header at byte {end}"
    if zeros < BLOCK:
        return f"truncated tar: no end-of-archive marker after byte {end}"
    return None


def iter_samples(uri: str, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                 skips: TarSkips | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per usable sample of a tar we trust to be whole (our own shards): unusable
    samples are counted in `skips`; a tar that cannot be read to its end raises `TarReadError`."""
    skips = skips if skips is not None else TarSkips()
    for sample in iter_tar_samples(uri, TarLimits(max_member_bytes=max_member_bytes), skips):
        if sample.error is None:
            yield sample.key, sample.members
    if skips.error is not None:
        raise TarReadError(f"{uri}: {skips.error}")


def read_samples(uri: str) -> dict[str, dict[str, bytes]]:
    """Every sample of a (bounded, e.g. one shard's) tar by key."""
    return dict(iter_samples(uri))

"""Reading WebDataset tars as bytes in memory: never extracted to disk, member names never used as paths.

A sample is the run of adjacent members sharing a key (the member name up to the first dot of its last path
component, as webdataset groups them). Anything that is not a regular file is skipped and counted, as is a
member over the size limit; a truncated or corrupt tar ends the iteration with `TarReadError`.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from styledistill.io import uris


class TarReadError(ValueError):
    """The tar could not be read to its end; the message says why."""


@dataclass
class TarSkips:
    """What a read left out, by reason, so a caller can report it."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1


def split_member_name(name: str) -> tuple[str, str]:
    """("dir/key", "ext.more") from "dir/key.ext.more", as webdataset splits it."""
    folder, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext


def iter_samples(uri: str, max_member_bytes: int = 256 * 1024**2,
                 skips: TarSkips | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, in tar order, streaming (one sample in memory at a time)."""
    skips = skips if skips is not None else TarSkips()
    key, members = None, {}
    with uris.open_for_read(uri) as raw:
        try:
            with tarfile.open(fileobj=raw, mode="r|*") as tar:
                for info in tar:
                    if not info.isfile():
                        skips.add("not a regular file")
                        continue
                    if info.size > max_member_bytes:
                        skips.add("member over the size limit")
                        continue
                    member_key, ext = split_member_name(info.name)
                    if not ext:
                        skips.add("member without an extension")
                        continue
                    if member_key != key:
                        if key is not None:
                            yield key, members
                        key, members = member_key, {}
                    data = tar.extractfile(info)
                    members[ext] = data.read() if data is not None else b""
        except (tarfile.TarError, EOFError, OSError) as err:
            raise TarReadError(f"{uri}: unreadable tar ({type(err).__name__}: {err})") from None
    if key is not None:
        yield key, members


def read_samples(uri: str) -> dict[str, dict[str, bytes]]:
    """Every sample of a (bounded, e.g. one shard's) tar by key."""
    return dict(iter_samples(uri))

"""Duplicate detection: exact (same file bytes) and perceptual (64-bit pHash within a Hamming distance).

`PerceptualIndex` uses multi-index hashing: the 64 bits are split into `max_distance + 1` bands and each
band value is a dict key. Two hashes within `max_distance` differ in at most `max_distance` bits, so by the
pigeonhole principle at least one band is identical; looking up each band of the query therefore finds every
match, and only those candidates are compared bit by bit. No pass over all stored hashes is ever made.
"""

from __future__ import annotations

from collections.abc import Hashable

HASH_BITS = 64


def _bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, mask) of each band; the 64 bits split as evenly as possible into max_distance+1 bands."""
    count = max_distance + 1
    base, extra = divmod(HASH_BITS, count)
    bands, shift = [], 0
    for i in range(count):
        width = base + (1 if i < extra else 0)
        bands.append((shift, (1 << width) - 1))
        shift += width
    return bands



def hamming(a: int, b: int) -> int:
    """Bits that differ between two 64-bit perceptual hashes."""
    return (a ^ b).bit_count()


class TripletDeduper:
    """Exact triplet duplicates within a shard: the same three encoded images as an earlier sample.

    Only within a shard, so a shard's content never depends on which other shards finished first."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.first: dict[tuple, str] = {}  # (content, style, target sha256) -> key of its first sample

    def check(self, key: str, signature: tuple) -> str | None:
        """The key this sample duplicates, or None (and remember it)."""
        first = self.first.setdefault(signature, key)
        return first if self.enabled and first != key else None


class PerceptualIndex:
    """Stored (id, hash) pairs; `find` returns the closest stored id within `max_distance`, or None."""

    def __init__(self, max_distance: int):
        if not 0 <= max_distance < HASH_BITS:
            raise ValueError(f"max_distance must be 0..{HASH_BITS - 1}, got {max_distance}")
        self.max_distance = max_distance
        self._bands = _bands(max_distance)
        self._tables: list[dict[int, list[int]]] = [{} for _ in self._bands]
        self._ids: list[Hashable] = []  # insertion order: the tie-break, so results are deterministic
        self._hashes: list[int] = []

    def __len__(self) -> int:
        return len(self._ids)

    def find(self, h: int) -> Hashable | None:
        best: tuple[int, int] | None = None  # (distance, position)
        seen: set[int] = set()
        for (shift, mask), table in zip(self._bands, self._tables):
            for pos in table.get((h >> shift) & mask, ()):
                if pos in seen:
                    continue
                seen.add(pos)
                distance = hamming(self._hashes[pos], h)
                if distance <= self.max_distance and (best is None or (distance, pos) < best):
                    best = (distance, pos)
        return None if best is None else self._ids[best[1]]

    def add(self, id: Hashable, h: int) -> None:
        pos = len(self._ids)
        self._ids.append(id)
        self._hashes.append(h)
        for (shift, mask), table in zip(self._bands, self._tables):
            table.setdefault((h >> shift) & mask, []).append(pos)


class Deduplicator:
    """The first image seen is kept; a later one with the same sha256, or a pHash within the distance,
    is a duplicate of it. Either check can be off (`exact=False`, `phash_max_distance=None`)."""

    def __init__(self, exact: bool, phash_max_distance: int | None):
        self._by_sha256: dict[str, Hashable] | None = {} if exact else None
        self._perceptual = PerceptualIndex(phash_max_distance) if phash_max_distance is not None else None

    def check(self, id: Hashable, sha256: str, phash: int) -> Hashable | None:
        """The kept id this image duplicates, or None (then it is registered as a kept image)."""
        if self._by_sha256 is not None and sha256 in self._by_sha256:
            return self._by_sha256[sha256]
        if self._perceptual is not None:
            kept = self._perceptual.find(phash)
            if kept is not None:
                return kept
            self._perceptual.add(id, phash)
        if self._by_sha256 is not None:
            self._by_sha256[sha256] = id
        return None

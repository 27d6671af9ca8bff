import random

import pytest

from styledistill.filters.dedup import Deduplicator, PerceptualIndex


def _near(rng: random.Random, h: int, flips: int) -> int:
    for bit in rng.sample(range(64), flips):
        h ^= 1 << bit
    return h


def _brute_force(stored: list[tuple[int, int]], h: int, max_distance: int):
    """Closest stored id within the distance, earliest added on ties."""
    matches = [((s ^ h).bit_count(), pos, i) for pos, (i, s) in enumerate(stored)]
    matches = [m for m in matches if m[0] <= max_distance]
    return min(matches)[2] if matches else None


@pytest.mark.parametrize("max_distance", [0, 1, 4, 8, 16])
def test_matches_brute_force(max_distance):
    rng = random.Random(max_distance)
    index, stored = PerceptualIndex(max_distance), []
    bases = [rng.getrandbits(64) for _ in range(40)]
    for i in range(600):
        # Mostly near-copies of a few bases, at distances around the threshold, plus unrelated hashes.
        if i % 3:
            h = _near(rng, rng.choice(bases), rng.randint(0, 2 * max_distance + 2))
        else:
            h = rng.getrandbits(64)
        assert index.find(h) == _brute_force(stored, h, max_distance)
        if rng.random() < 0.5:
            index.add(i, h)
            stored.append((i, h))
    assert len(index) == len(stored)


def test_distance_edge():
    index = PerceptualIndex(4)
    index.add("a", 0)
    assert index.find(0b1111) == "a"  # distance 4
    assert index.find(0b11111) is None  # distance 5
    assert index.find(0xF000_0000_0000_000F) is None  # 8 bits apart, spread over bands


def test_lookup_is_not_a_scan():
    # 20,000 unrelated hashes: each lookup must touch only same-band candidates, not every stored hash.
    rng = random.Random(0)
    index = PerceptualIndex(4)
    for i in range(20_000):
        index.add(i, rng.getrandbits(64))
    probe = rng.getrandbits(64)
    candidates = {
        pos
        for (shift, mask), table in zip(index._bands, index._tables)
        for pos in table.get((probe >> shift) & mask, ())
    }
    assert len(candidates) < 200


def test_deduplicator_policies():
    both = Deduplicator(exact=True, phash_max_distance=2)
    assert both.check("a", "sha-a", 0b0) is None
    assert both.check("copy", "sha-a", 0xFFFF) == "a"  # same bytes, whatever the pixels hash to
    assert both.check("resized", "sha-r", 0b11) == "a"  # different bytes, pHash 2 bits away
    assert both.check("other", "sha-o", 0b111) is None  # 3 bits away: kept

    exact_only = Deduplicator(exact=True, phash_max_distance=None)
    assert exact_only.check("a", "sha-a", 0) is None
    assert exact_only.check("resized", "sha-r", 0) is None

    phash_only = Deduplicator(exact=False, phash_max_distance=0)
    assert phash_only.check("a", "sha-a", 5) is None
    assert phash_only.check("copy", "sha-a", 5) == "a"

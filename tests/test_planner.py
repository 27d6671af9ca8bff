"""The planner on source lists built in code: determinism, triplet structure, recipe mix, shards, streaming."""

from __future__ import annotations

import hashlib
import itertools
import re
import time
import tracemalloc
from collections import Counter
from collections.abc import Sequence

import pytest

from styledistill.pipeline.planner import PlanError, Planner
from styledistill.schemas.config import parse_config
from styledistill.schemas.recipes import RECIPE_NAMES as RECIPES
from styledistill.schemas.records import SourceImage

KEY = re.compile(r"^[a-z]+_[0-9a-f]+$")


def source(label: str, i: int) -> SourceImage:
    sha = hashlib.sha256(f"{label}-{i}".encode()).hexdigest()
    return SourceImage(f"/data/{label}/{i:07d}.jpg", label, sha, 640, 480)


def pool(label: str, n: int, start: int = 0) -> list[SourceImage]:
    return [source(label, i) for i in range(start, start + n)]


class LazyPool(Sequence):
    """A huge pool whose items are made on access: the planner must index it, never copy it."""

    def __init__(self, label: str, n: int, budget: int = 100_000):
        self.label, self.n = label, n
        self.accessed, self.budget = 0, budget

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            raise TypeError("the planner should not slice the pool")
        if not -self.n <= i < self.n:
            raise IndexError(i)
        self.accessed += 1
        if self.accessed > self.budget:  # fail fast instead of walking the whole pool
            raise RuntimeError(f"the planner read more than {self.budget} items of a lazy pool")
        return source(self.label, i % self.n)


def config(*overrides: str):
    return parse_config({"sources": [{"uri": "/data", "label": "realistic"}]}, list(overrides))


def plan(cfg, realistic, stylized) -> list:
    return list(Planner(cfg, realistic, stylized).groups())


def summary(groups) -> list[tuple]:
    return [(g.group_id, g.shard, g.seed,
             tuple((s, src.sha256) for s, src in sorted(g.sources.items())),
             tuple((x.gen_id, x.slot, x.style_slot, x.seed) for x in g.generations),
             tuple((t.key, t.recipe, t.content_ref, t.style_ref, t.target) for t in g.triplets))
            for g in groups]


REALISTIC = pool("realistic", 60)
STYLIZED = pool("stylized", 12)


def test_same_inputs_give_the_same_plan():
    cfg = config("plan.seed=5", "plan.samples_per_shard=10")
    first = plan(cfg, REALISTIC, STYLIZED)
    second = plan(config("plan.seed=5", "plan.samples_per_shard=10"), list(REALISTIC), list(STYLIZED))
    assert len(first) == 60
    assert summary(first) == summary(second)
    assert first == second


def test_another_seed_gives_other_keys_and_seeds():
    a = plan(config("plan.seed=0"), REALISTIC, STYLIZED)
    b = plan(config("plan.seed=1"), REALISTIC, STYLIZED)
    keys_a = {t.key for g in a for t in g.triplets}
    keys_b = {t.key for g in b for t in g.triplets}
    assert keys_a and keys_b and not keys_a & keys_b
    assert not {g.group_id for g in a} & {g.group_id for g in b}
    assert [g.seed for g in a] != [g.seed for g in b]


def test_keys_are_unique_and_webdataset_safe_across_a_large_plan():
    cfg = config("plan.styles_per_photo=3", "plan.triplets_per_photo=6")
    groups = plan(cfg, pool("realistic", 2000), pool("stylized", 40))
    keys = [t.key for g in groups for t in g.triplets]
    assert len(keys) == 2000 * 6
    assert len(set(keys)) == len(keys)
    for key in keys:
        assert KEY.match(key), key
        assert key.split("_")[0] in RECIPES
    assert len({g.group_id for g in groups}) == 2000
    gen_ids = [x.gen_id for g in groups for x in g.generations]
    assert len(set(gen_ids)) == len(gen_ids)


@pytest.mark.parametrize("k,per_photo", [(2, 4), (3, 8), (4, 3)])
def test_every_triplet_has_its_recipe_structure(k, per_photo):
    cfg = config(f"plan.styles_per_photo={k}", f"plan.triplets_per_photo={per_photo}")
    groups = plan(cfg, REALISTIC, STYLIZED)
    seen = Counter()
    assert [g.sources["c"] for g in groups] == REALISTIC[:len(groups)]  # photos in pool order
    for g in groups:
        styles = [g.sources[f"s{i}"] for i in range(k)]
        assert all(s.label == "stylized" for s in styles)
        assert len({s.sha256 for s in styles}) == k  # k distinct references
        partners = sorted(s for s in g.sources if s.startswith("p"))
        assert partners == [f"p{n}" for n in range(len(partners))]
        assert set(g.sources) == {"c", *(f"s{i}" for i in range(k)), *partners}
        used_partners = []
        for t in g.triplets:
            seen[t.recipe] += 1
            roles = (t.content_ref, t.style_ref, t.target)
            if t.recipe == "rns":
                i = int(t.style_ref[1:])
                assert roles == ("c", f"s{i}", f"r{i}") and i < k
            elif t.recipe == "sns":
                j, i = int(t.content_ref[1:]), int(t.target[1:])
                assert roles == (f"r{j}", f"s{i}", f"r{i}")
                assert i != j and i < k and j < k
            elif t.recipe == "snr":
                i = int(t.content_ref[1:])
                assert t.content_ref == f"r{i}" and i < k
                assert re.fullmatch(r"p\d+", t.style_ref) and t.target == "c"
                used_partners.append(t.style_ref)
            else:
                assert t.recipe == "rnr"
                assert t.content_ref == "c" and re.fullmatch(r"p\d+", t.style_ref) and t.target == "c"
                used_partners.append(t.style_ref)
        # One fresh partner per SnR/RnR triplet: realistic, and never the content photo itself.
        assert sorted(used_partners) == partners
        for slot in partners:
            assert g.sources[slot].label == "realistic"
            assert g.sources[slot].sha256 != g.sources["c"].sha256
        gen_roles = [(t.content_ref, t.style_ref, t.target) for t in g.triplets if t.recipe in ("rns", "sns")]
        assert len(set(gen_roles)) == len(gen_roles)  # no RnS/SnS candidate is drawn twice
    assert set(seen) == set(RECIPES)


def test_generations_are_exactly_those_the_triplets_use():
    cfg = config("plan.styles_per_photo=4", "plan.triplets_per_photo=2")
    groups = plan(cfg, REALISTIC, STYLIZED)
    unused_somewhere = False
    for g in groups:
        referenced = {s for t in g.triplets for s in (t.content_ref, t.style_ref, t.target) if s.startswith("r")}
        slots = [x.slot for x in g.generations]
        assert len(slots) == len(set(slots))
        assert set(slots) == referenced
        assert slots == sorted(slots, key=lambda s: int(s[1:]))
        unused_somewhere |= len(slots) < 4
        for x in g.generations:
            assert x.content_slot == "c" and x.style_slot == "s" + x.slot[1:]
            assert x.prompt == cfg.prompt.instruction
        assert len({x.seed for x in g.generations}) == len(g.generations)
    assert unused_somewhere  # with 2 triplets out of k=4 styles, some r_i are not needed and not planned


def test_recipe_shares_hold_on_average():
    cfg = config("plan.styles_per_photo=4", "plan.recipes={rns: 0.4, sns: 0.3, snr: 0.15, rnr: 0.15}")
    groups = plan(cfg, pool("realistic", 3000), STYLIZED)
    counts = Counter(t.recipe for g in groups for t in g.triplets)
    total = sum(counts.values())
    assert total == 3000 * 4
    for recipe, share in cfg.plan.recipes.items():
        assert counts[recipe] / total == pytest.approx(share, abs=0.03), counts


def test_a_zero_share_recipe_never_appears_and_one_draw_per_photo_follows_the_shares():
    cfg = config("plan.triplets_per_photo=1", "plan.recipes={rns: 0.5, sns: 0.3, snr: 0.2, rnr: 0}")
    groups = plan(cfg, pool("realistic", 3000), STYLIZED)
    counts = Counter(t.recipe for g in groups for t in g.triplets)
    assert sum(counts.values()) == 3000
    assert counts["rnr"] == 0
    assert counts["rns"] / 3000 == pytest.approx(0.5, abs=0.03)
    assert counts["sns"] / 3000 == pytest.approx(0.3, abs=0.03)
    assert counts["snr"] / 3000 == pytest.approx(0.2, abs=0.03)


def test_only_listed_recipes_are_planned():
    cfg = config("plan.triplets_per_photo=10", "plan.recipes={sns: 1}")
    groups = plan(cfg, REALISTIC, STYLIZED)
    # k=2 gives exactly two SnS candidates, (r1, s0, r0) and (r0, s1, r1): the group stops there.
    for g in groups:
        assert [t.recipe for t in g.triplets] == ["sns", "sns"]
        assert not any(s.startswith("p") for s in g.sources)


def _check_shards(groups, per_shard):
    shards = [g.shard for g in groups]
    assert shards[0] == 0
    assert all(b - a in (0, 1) for a, b in zip(shards, shards[1:])), shards  # consecutive, no gaps
    by_shard: dict[int, list] = {}
    for g in groups:
        by_shard.setdefault(g.shard, []).append(g)
    sizes = {s: sum(len(g.triplets) for g in members) for s, members in by_shard.items()}
    for s, members in by_shard.items():
        assert sizes[s] <= per_shard or len(members) == 1, (s, sizes[s])
        if s + 1 in by_shard:  # a shard is closed only when the next group does not fit
            assert sizes[s] + len(by_shard[s + 1][0].triplets) > per_shard
    return sizes


@pytest.mark.parametrize("per_photo,per_shard,expected_groups", [(4, 10, 2), (4, 8, 2), (3, 16, 5), (1, 1, 1)])
def test_shards_are_packed_consecutively_without_splitting_groups(per_photo, per_shard, expected_groups):
    cfg = config(f"plan.triplets_per_photo={per_photo}", f"plan.samples_per_shard={per_shard}")
    groups = plan(cfg, REALISTIC, STYLIZED)
    sizes = _check_shards(groups, per_shard)
    counts = Counter(g.shard for g in groups)
    assert all(n == expected_groups for s, n in counts.items() if s != max(counts))
    assert sum(sizes.values()) == 60 * per_photo


def test_a_group_bigger_than_a_shard_gets_a_shard_of_its_own():
    cfg = config("plan.triplets_per_photo=4", "plan.samples_per_shard=3")
    groups = plan(cfg, REALISTIC, STYLIZED)
    _check_shards(groups, 3)
    assert [g.shard for g in groups] == list(range(60))


def test_uneven_groups_still_pack_within_the_shard_size():
    # SnS-only groups are capped at k*(k-1) = 2 triplets; mixed with others sizes vary per photo.
    cfg = config("plan.styles_per_photo=2", "plan.triplets_per_photo=7", "plan.samples_per_shard=9",
                 "plan.recipes={rns: 0.5, sns: 0.5}")
    groups = plan(cfg, REALISTIC, STYLIZED)
    assert {len(g.triplets) for g in groups} == {4}
    _check_shards(groups, 9)


def test_max_photos_limits_the_plan():
    groups = plan(config("plan.max_photos=7"), REALISTIC, STYLIZED)
    assert [g.sources["c"] for g in groups] == REALISTIC[:7]
    assert Planner(config("plan.max_photos=7"), REALISTIC, STYLIZED).photo_count() == 7
    assert Planner(config("plan.max_photos=700"), REALISTIC, STYLIZED).photo_count() == 60


def test_groups_stream_from_a_million_photos():
    realistic, stylized = LazyPool("realistic", 1_000_000), LazyPool("stylized", 1_000_000)
    start = time.perf_counter()
    planner = Planner(config(), realistic, stylized)
    first = list(itertools.islice(planner.groups(), 10))
    assert time.perf_counter() - start < 1.0
    assert [g.sources["c"] for g in first] == [source("realistic", i) for i in range(10)]
    assert realistic.accessed < 100 and stylized.accessed < 100  # 10 photos, their partners and styles
    assert planner.photo_count() == 1_000_000

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        groups = Planner(config(), realistic, stylized).groups()  # construction counts too
        taken = sum(1 for _ in itertools.islice(groups, 1000))
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert taken == 1000
    # Anything proportional to the pool (one byte per photo) would be >= 1 MB; a group is a few kB.
    assert peak - before < 1_000_000, peak - before
    assert current - before < 200_000, current - before


def test_memory_does_not_depend_on_the_pool_size():
    def peak_for(n: int) -> int:
        tracemalloc.start()
        try:
            groups = Planner(config(), LazyPool("realistic", n), LazyPool("stylized", n)).groups()
            for _ in itertools.islice(groups, 200):
                pass
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak_for(1_000), peak_for(1_000_000)
    assert large < small + 200_000, (small, large)


def _keys_by_group(groups, recipes=RECIPES):
    return {g.group_id: [t.key for t in g.triplets if t.recipe in recipes] for g in groups}


def test_a_group_does_not_depend_on_photos_before_it_for_rns_and_sns():
    cfg = config("plan.samples_per_shard=10")
    before = plan(cfg, REALISTIC, STYLIZED)
    after = plan(cfg, [source("realistic", 10_000), *REALISTIC], STYLIZED)[1:]
    assert [g.shard for g in before] != [g.shard for g in after]  # the shard numbers do move
    assert _keys_by_group(before, ("rns", "sns")) == _keys_by_group(after, ("rns", "sns"))
    for a, b in zip(before, after):
        assert (a.group_id, a.seed, a.generations) == (b.group_id, b.seed, b.generations)
        assert {s: a.sources[s] for s in a.sources if not s.startswith("p")} == \
               {s: b.sources[s] for s in b.sources if not s.startswith("p")}


def test_recipes_without_partners_do_not_depend_on_other_photos_at_all():
    cfg = config("plan.recipes={rns: 0.6, sns: 0.4}")
    before = plan(cfg, REALISTIC, STYLIZED)
    after = plan(cfg, [source("realistic", 10_000), *REALISTIC[:30], source("realistic", 10_001),
                       *REALISTIC[30:]], STYLIZED)
    after = [g for g in after if g.sources["c"] in REALISTIC]
    assert _keys_by_group(before) == _keys_by_group(after)


def test_keys_are_unique_within_a_group_when_many_triplets_need_partners():
    cfg = config("plan.styles_per_photo=4", "plan.triplets_per_photo=4", "plan.recipes={rnr: 1}")
    groups = plan(cfg, pool("realistic", 20), STYLIZED)
    for g in groups:
        assert len({t.key for t in g.triplets}) == len(g.triplets) == 4, g.group_id
        assert len({g.sources[s].sha256 for s in g.sources if s.startswith("p")}) == 4, g.group_id


def test_too_few_stylized_images_is_a_plan_error():
    with pytest.raises(PlanError, match="styles_per_photo is 3 .* 2 usable"):
        Planner(config("plan.styles_per_photo=3"), REALISTIC, STYLIZED[:2])
    Planner(config("plan.styles_per_photo=3"), REALISTIC, STYLIZED[:3])  # exactly k is enough


def test_a_single_realistic_photo_is_a_plan_error_only_when_partners_are_needed():
    for recipes in ("{rns: 1, snr: 0.1}", "{sns: 1, rnr: 0.1}"):
        with pytest.raises(PlanError, match="second realistic photo"):
            Planner(config(f"plan.recipes={recipes}"), REALISTIC[:1], STYLIZED)
    groups = plan(config("plan.recipes={rns: 1, sns: 1, snr: 0, rnr: 0}"), REALISTIC[:1], STYLIZED)
    assert len(groups) == 1 and {t.recipe for t in groups[0].triplets} <= {"rns", "sns"}
    # Two photos are enough: each is the other's partner.
    for index, g in enumerate(plan(config("plan.recipes={snr: 1, rnr: 1}"), REALISTIC[:2], STYLIZED)):
        partners = {g.sources[s].sha256 for s in g.sources if s.startswith("p")}
        assert partners == {REALISTIC[1 - index].sha256}

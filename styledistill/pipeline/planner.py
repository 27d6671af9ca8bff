"""The deterministic, streaming planner: sources + config + seed -> groups of triplets, assigned to shards.

For each content photo `c` (in scan order) it draws `k` style references, decides which triplets to build
(the recipe mix), the V1 generations those triplets need and the realistic partners `p` of SnR/RnR. Every
random choice comes from a generator seeded by (run seed, the photo's bytes hash), so a group's plan depends
only on its photo and the pools it draws from (not on the order photos are planned in), and the same inputs
always give the same keys and seeds. Nothing is materialised beyond the source lists: the planner yields
one group at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence

import numpy as np

from styledistill.schemas.config import RunConfig
from styledistill.schemas.recipes import PARTNER, RECIPES
from styledistill.schemas.records import (
    CONTENT_SLOT,
    Generation,
    Group,
    SourceImage,
    Triplet,
    is_result_slot,
    partner_slot,
    style_slot,
)


class PlanError(ValueError):
    pass


def stable_hash(*parts: object, length: int = 20) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:length]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts; stable across processes and Python versions."""
    return int(stable_hash(*parts, length=16), 16) >> 1


class Planner:
    def __init__(self, config: RunConfig, realistic: Sequence[SourceImage], stylized: Sequence[SourceImage]):
        self.config = config
        self.plan = config.plan
        self.realistic = realistic
        self.stylized = stylized
        self.shares = {r: self.plan.recipes.get(r, 0.0) for r in RECIPES}
        # The generator's identity is part of each output's id: another model or option set is another r_i.
        self.generator_id = stable_hash(config.generator.model_dump_json(), config.resolution.model_dump_json())
        k = self.plan.styles_per_photo
        if len(stylized) < k:
            raise PlanError(f"plan.styles_per_photo is {k} but the stylized pool has {len(stylized)} usable images")
        partnered = [RECIPES[r].title for r, share in self.shares.items() if share > 0 and RECIPES[r].needs_partner]
        if partnered and len(realistic) < 2:
            raise PlanError(f"{'/'.join(partnered)} need a second realistic photo as the style reference; "
                            "the realistic pool has one")

    def photo_count(self) -> int:
        total = len(self.realistic)
        return total if self.plan.max_photos is None else min(self.plan.max_photos, total)

    def groups(self) -> Iterator[Group]:
        shard, in_shard = 0, 0
        for index in range(self.photo_count()):
            group = self._plan_group(index)
            size = len(group.triplets)
            if in_shard and in_shard + size > self.plan.samples_per_shard:
                shard, in_shard = shard + 1, 0
            in_shard += size
            yield dataclasses.replace(group, shard=shard)

    def _plan_group(self, index: int) -> Group:
        content = self.realistic[index]
        seed = derive_seed(self.plan.seed, content.sha256)
        rng = np.random.default_rng(seed)
        k = self.plan.styles_per_photo
        style_idx = rng.choice(len(self.stylized), size=k, replace=False)
        sources = {CONTENT_SLOT: content}
        sources.update({style_slot(i): self.stylized[int(j)] for i, j in enumerate(style_idx)})

        # Partners are distinct within a group (two RnR triplets with one partner would be one triplet).
        chosen = self._choose_triplets(rng, k, max_partners=len(self.realistic) - 1)
        gen_seeds = [derive_seed(seed, "gen", i) for i in range(k)]
        instruction = self.config.prompt.instruction
        generations = {}
        for _, roles in chosen:
            for slot in roles:
                if is_result_slot(slot) and slot not in generations:
                    i = int(slot[1:])
                    gen_id = "g" + stable_hash(content.sha256, sources[style_slot(i)].sha256, gen_seeds[i],
                                               instruction, self.generator_id)
                    generations[slot] = Generation(gen_id, slot, CONTENT_SLOT, style_slot(i), gen_seeds[i],
                                                   instruction)

        triplets = []
        used_partners: set[int] = {index}
        for recipe, roles in chosen:
            if PARTNER in roles:
                slot = partner_slot(len(used_partners) - 1)
                sources[slot] = self.realistic[self._draw_partner(rng, used_partners)]
                roles = tuple(slot if r == PARTNER else r for r in roles)
            ident = [self._identity(slot, sources, generations) for slot in roles]
            key = f"{recipe}_{stable_hash(recipe, *ident, self.plan.seed)}"
            triplets.append(Triplet(key, recipe, roles[0], roles[1], roles[2], instruction))
        gens = tuple(generations[s] for s in sorted(generations, key=lambda s: int(s[1:])))
        return Group(f"grp_{stable_hash(content.sha256, self.plan.seed)}", 0, sources, gens, tuple(triplets), seed)

    def _choose_triplets(self, rng: np.random.Generator, k: int, max_partners: int) -> list[tuple[str, tuple]]:
        """Draw `triplets_per_photo` triplets: a recipe by its share, then one of its unused candidates."""
        pools = {name: recipe.candidates(k) for name, recipe in RECIPES.items() if self.shares[name] > 0}
        chosen = []
        partners = 0
        for _ in range(self.plan.triplets_per_photo):
            if partners >= max_partners:  # no distinct realistic photo left for another partnered triplet
                pools = {name: c for name, c in pools.items() if not RECIPES[name].needs_partner}
            open_recipes = [r for r in RECIPES if pools.get(r)]
            if not open_recipes:
                break
            weights = np.array([self.shares[r] for r in open_recipes])
            recipe = open_recipes[rng.choice(len(open_recipes), p=weights / weights.sum())]
            roles = pools[recipe].pop(int(rng.integers(len(pools[recipe]))))
            partners += PARTNER in roles
            chosen.append((recipe, roles))
        return chosen

    def _draw_partner(self, rng: np.random.Generator, used: set[int]) -> int:
        """A realistic photo not yet in the group (the content photo is in `used` from the start)."""
        while True:
            j = int(rng.integers(len(self.realistic)))
            if j not in used:
                used.add(j)
                return j

    @staticmethod
    def _identity(slot: str, sources: dict[str, SourceImage], generations: dict[str, Generation]) -> str:
        return generations[slot].gen_id if slot in generations else sources[slot].sha256

"""The shard writer: every planned sample of a shard decided (filters/decide.py) and written through the
shard sink (pipeline/sink.py), whole or not at all. A rerun redoes any shard without its stats file and never
touches one with it, so no sample is ever written twice.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable

from styledistill.filters.decide import decide
from styledistill.filters.dedup import TripletDeduper
from styledistill.pipeline.sink import ShardSink, sample_record
from styledistill.schemas import manifest as mf
from styledistill.schemas.config import RunConfig
from styledistill.schemas.records import Group, GroupWork, ShardResult, Triplet, is_result_slot


def _lineage(work: GroupWork, slot: str) -> dict:
    group = work.group
    if slot in group.sources:
        src = group.sources[slot]
        return {"slot": slot, "source": {"uri": src.uri, "sha256": src.sha256, "label": src.label}}
    gen = next(g for g in group.generations if g.slot == slot)
    return {
        "slot": slot,
        "generation": {"gen_id": gen.gen_id, "seed": gen.seed,
                       "content": _lineage(work, gen.content_slot), "style": _lineage(work, gen.style_slot)},
    }


class ShardWriter:
    def __init__(self, config: RunConfig, run_uri: str, run_meta: dict):
        self.config = config
        self.run_uri = run_uri
        self.run_meta = run_meta  # config hash, model ids, library versions: stored with every sample

    @classmethod
    def for_run(cls, config: RunConfig, run_uri: str, meta: dict, models: dict[str, dict[str, str]]) -> ShardWriter:
        """The writer of a run folder opened with `meta` (run.open_run_folder), its stages' model ids known."""
        return cls(config, run_uri, {"config_hash": meta["config_hash"], "versions": meta["versions"],
                                     "models": models})

    def write(self, shard: int, batches: Iterable[tuple[list[Group], list[GroupWork] | str]]) -> ShardResult:
        """`batches` yields, in plan order, each batch's groups with their finished work or an error."""
        stage_seconds: Counter = Counter()
        # Which Ray nodes ran each stage for this shard. Kept out of the samples: their bytes must not
        # depend on placement, so a resumed run reproduces them exactly.
        nodes: dict[str, set[str]] = {}
        dedup = TripletDeduper(self.config.filters.dedup.exact)
        n_groups = 0
        with ShardSink(self.run_uri, self.config.output, shard) as sink:
            for groups, result in batches:
                works = result if isinstance(result, list) else [GroupWork(g) for g in groups]
                batch_error = None if isinstance(result, list) else result
                n_groups += len(works)
                for work in works:
                    stage_seconds.update(work.timings)
                    for stage, node in work.nodes.items():
                        nodes.setdefault(stage, set()).add(node)
                    for triplet in work.group.triplets:
                        sink.add(*self._decide(work, triplet, dedup, batch_error))
            return sink.finish(n_groups, dict(stage_seconds), {stage: sorted(ids) for stage, ids in nodes.items()})

    def _decide(self, work: GroupWork, triplet: Triplet, dedup: TripletDeduper, batch_error: str | None):
        slots = (triplet.content_ref, triplet.style_ref, triplet.target)
        scores = work.triplet_scores.get(triplet.key, {})
        notes = work.annotations.get(triplet.key, {})
        error = None
        missing = [s for s in slots if s not in work.encoded]
        if batch_error is not None:
            error = batch_error
        elif missing:
            error = "; ".join(dict.fromkeys(work.errors.get(s, f"{s} unavailable") for s in missing))
        elif notes.get("scorer_errors"):
            error = "; ".join(f"scorer {k}: {v}" for k, v in notes["scorer_errors"].items())
        duplicate_of = None
        if error is None:
            duplicate_of = dedup.check(triplet.key, tuple(work.image_sha256[s] for s in slots))
        parents = {s: work.generation_scores.get(s, {}) for s in dict.fromkeys(slots) if is_result_slot(s)}
        decision = decide(self.config.filters, triplet.recipe, scores, parents, duplicate_of=duplicate_of,
                          error=error)
        status, reasons = decision.status, decision.texts

        instruction = self._instruction(triplet, notes.get("prompts"))
        lineage = {role: _lineage(work, s) for role, s in zip(("content", "style", "target"), slots)}
        row = {
            "key": triplet.key, "shard": work.group.shard, "group_id": work.group.group_id,
            "recipe": triplet.recipe, "status": status, "reasons": reasons,
            "reason_details": [r.as_row() for r in decision.reasons], "error": error,
            "instruction": instruction, "content_slot": slots[0], "style_slot": slots[1], "target_slot": slots[2],
            "content_sha256": work.image_sha256.get(slots[0]), "style_sha256": work.image_sha256.get(slots[1]),
            "target_sha256": work.image_sha256.get(slots[2]), "seed": work.group.seed,
            "lineage": json.dumps(lineage, sort_keys=True),
            "generation_scores": json.dumps(parents, sort_keys=True),
            "notes": json.dumps({k: v for k, v in notes.items() if k != "scorer_errors"}, sort_keys=True),
            **{f"{mf.SCORE_PREFIX}{k}": v for k, v in scores.items()},
        }
        if status == mf.FAILED:
            return row, None
        meta = {
            "key": triplet.key, "recipe": triplet.recipe, "status": status, "reasons": reasons,
            "instruction": instruction, "prompts": notes.get("prompts"), "scores": scores,
            "generation_scores": parents,
            "lineage": lineage, "group_id": work.group.group_id, "seed": work.group.seed, **self.run_meta,
        }
        images = tuple(work.encoded[s] for s in slots)
        sample = sample_record(triplet.key, self.config.output.image_format, images, instruction, meta)
        return row, sample

    def _instruction(self, triplet: Triplet, prompts: dict | None) -> str:
        if not prompts or not self.config.prompt.append_enhanced:  # an audit has neither
            return triplet.instruction
        from styledistill.generation.enhancer import enhanced_instruction

        return enhanced_instruction(triplet.instruction, prompts.get("content_prompt"), prompts.get("style_prompt"))

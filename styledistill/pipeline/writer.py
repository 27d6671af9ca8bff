"""The shard writer: decisions, then the tar, the manifest, thumbnails and, last, the stats file.

A shard is written whole or not at all: each file goes to a temp name and is renamed when complete, and
`<shard>_stats.json` comes last, so its presence is the only proof a shard is done (as in img2dataset). A
rerun redoes any shard without it and never touches one with it, so no sample is ever written twice.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from styledistill.filters.rules import failing_rules, generation_reasons
from styledistill.pipeline import uris
from styledistill.schemas import manifest as mf
from styledistill.schemas.config import RunConfig
from styledistill.schemas.records import Group, GroupWork, ShardResult, Triplet

THUMB_HEIGHT = 96
THUMBS_PER_STATUS = 3  # per shard: enough for the report's grids, small enough to never matter


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

    def write(self, shard: int, batches: Iterable[tuple[list[Group], list[GroupWork] | str]]) -> ShardResult:
        """`batches` yields, in plan order, each batch's groups with their finished work or an error."""
        name = mf.shard_name(self.config.output.shard_prefix, shard)
        shards_dir = uris.join(self.run_uri, mf.SHARDS_DIR)
        rows: list[dict] = []
        thumbs: dict[str, dict] = {}
        stage_seconds: Counter = Counter()
        # Which Ray nodes ran each stage for this shard. Kept out of the samples: their bytes must not
        # depend on placement, so a resumed run reproduces them exactly.
        nodes: dict[str, set[str]] = {}
        seen: dict[tuple, str] = {}
        counts: Counter = Counter()
        n_groups = 0
        rejects_uri = uris.join(self.run_uri, mf.REJECTS_DIR, f"{name}.tar")
        with uris.open_for_write_atomic(uris.join(shards_dir, f"{name}.tar")) as tar_file, \
                _maybe_open(rejects_uri if self.config.output.write_rejects else None) as rejects_file, \
                contextlib.ExitStack() as stack:
            tar = wds.TarWriter(tar_file, encoder=False, mtime=0.0, user="styledistill", group="styledistill")
            rejects = rejects_file and wds.TarWriter(rejects_file, encoder=False, mtime=0.0,
                                                     user="styledistill", group="styledistill")
            # A failed write (full disk, ...) closes the tar streams now, not in a finaliser that writes
            # to a file already gone; the temp files are removed by open_for_write_atomic.
            stack.callback(_close_quietly, tar, rejects)
            for groups, result in batches:
                works = result if isinstance(result, list) else [GroupWork(g) for g in groups]
                batch_error = None if isinstance(result, list) else result
                n_groups += len(works)
                for work in works:
                    stage_seconds.update(work.timings)
                    for stage, node in work.nodes.items():
                        nodes.setdefault(stage, set()).add(node)
                    for triplet in work.group.triplets:
                        row, sample = self._decide(work, triplet, seen, batch_error)
                        rows.append(row)
                        counts[row["status"]] += 1
                        if sample is not None:
                            writer = tar if row["status"] == mf.ACCEPTED else rejects
                            if writer:
                                writer.write(sample)
                            self._maybe_thumb(thumbs, row, work, triplet)
            tar.close()
            if rejects:
                rejects.close()
        fs, tar_path = uris.filesystem(uris.join(shards_dir, f"{name}.tar"))
        tar_bytes = fs.size(tar_path)
        uris.write_bytes_atomic(uris.join(shards_dir, f"{name}.parquet"), _manifest_bytes(rows))
        uris.write_text_atomic(uris.join(self.run_uri, mf.THUMBS_DIR, f"{name}.json"), json.dumps(thumbs))
        result = ShardResult(shard=shard, name=name, groups=n_groups, planned=len(rows), accepted=counts[mf.ACCEPTED],
                             rejected=counts[mf.REJECTED], failed=counts[mf.FAILED], tar_bytes=tar_bytes,
                             stage_seconds=dict(stage_seconds),
                             nodes={stage: sorted(ids) for stage, ids in nodes.items()})
        uris.write_text_atomic(uris.join(shards_dir, mf.stats_name(name)), json.dumps(asdict(result), indent=1))
        return result

    def _decide(self, work: GroupWork, triplet: Triplet, seen: dict, batch_error: str | None):
        slots = (triplet.content_ref, triplet.style_ref, triplet.target)
        scores = work.triplet_scores.get(triplet.key, {})
        notes = work.annotations.get(triplet.key, {})
        reasons: list[str] = []
        error = None
        missing = [s for s in slots if s not in work.encoded]
        if batch_error is not None:
            error = batch_error
        elif missing:
            error = "; ".join(dict.fromkeys(work.errors.get(s, f"{s} unavailable") for s in missing))
        elif notes.get("scorer_errors"):
            error = "; ".join(f"scorer {k}: {v}" for k, v in notes["scorer_errors"].items())
        if error is not None:
            status, reasons = mf.FAILED, [error]
        else:
            reasons = failing_rules(self.config.filters.rules, triplet.recipe, scores)
            if triplet.recipe != "rns":  # an RnS triplet *is* its generation's view, judged above
                for slot in dict.fromkeys(s for s in slots if s.startswith("r")):
                    parent = generation_reasons(self.config.filters, work.generation_scores.get(slot, {}))
                    reasons += [f"parent {slot}: {r}" for r in parent]
            signature = tuple(work.image_sha256[s] for s in slots)
            if self.config.filters.dedup.exact and signature in seen:
                reasons.append(f"duplicate of {seen[signature]}")
            seen.setdefault(signature, triplet.key)
            status = mf.REJECTED if reasons else mf.ACCEPTED

        instruction = self._instruction(triplet, notes.get("prompts"))
        lineage = {role: _lineage(work, s) for role, s in zip(("content", "style", "target"), slots)}
        row = {
            "key": triplet.key, "shard": work.group.shard, "group_id": work.group.group_id,
            "recipe": triplet.recipe, "status": status, "reasons": reasons, "error": error,
            "instruction": instruction, "content_slot": slots[0], "style_slot": slots[1], "target_slot": slots[2],
            "content_sha256": work.image_sha256.get(slots[0]), "style_sha256": work.image_sha256.get(slots[1]),
            "target_sha256": work.image_sha256.get(slots[2]), "seed": work.group.seed,
            "lineage": json.dumps(lineage, sort_keys=True),
            "notes": json.dumps({k: v for k, v in notes.items() if k != "scorer_errors"}, sort_keys=True),
            **{f"{mf.SCORE_PREFIX}{k}": v for k, v in scores.items()},
        }
        if status == mf.FAILED:
            return row, None
        meta = {
            "key": triplet.key, "recipe": triplet.recipe, "status": status, "reasons": reasons,
            "instruction": instruction, "prompts": notes.get("prompts"), "scores": scores,
            "generation_scores": {s: work.generation_scores.get(s, {}) for s in slots if s.startswith("r")},
            "lineage": lineage, "group_id": work.group.group_id, "seed": work.group.seed, **self.run_meta,
        }
        ext = self.config.output.image_format
        sample = {
            "__key__": triplet.key,
            f"{mf.CONTENT_MEMBER}.{ext}": work.encoded[slots[0]],
            f"{mf.STYLE_MEMBER}.{ext}": work.encoded[slots[1]],
            f"{mf.TARGET_MEMBER}.{ext}": work.encoded[slots[2]],
            mf.TEXT_MEMBER: instruction.encode(),
            mf.META_MEMBER: json.dumps(meta, sort_keys=True).encode(),
        }
        return row, sample

    def _instruction(self, triplet: Triplet, prompts: dict | None) -> str:
        if not (self.config.prompt.append_enhanced and prompts):
            return triplet.instruction
        from styledistill.generation.enhancer import enhanced_instruction

        return enhanced_instruction(triplet.instruction, prompts.get("content_prompt"), prompts.get("style_prompt"))

    def _maybe_thumb(self, thumbs: dict, row: dict, work: GroupWork, triplet: Triplet) -> None:
        if sum(t["status"] == row["status"] for t in thumbs.values()) >= THUMBS_PER_STATUS:
            return
        panels = [Image.open(io.BytesIO(work.encoded[s])).convert("RGB")
                  for s in (triplet.content_ref, triplet.style_ref, triplet.target)]
        panels = [p.resize((max(1, round(p.width * THUMB_HEIGHT / p.height)), THUMB_HEIGHT)) for p in panels]
        strip = Image.new("RGB", (sum(p.width for p in panels) + 8, THUMB_HEIGHT), "white")
        x = 0
        for panel in panels:
            strip.paste(panel, (x, 0))
            x += panel.width + 4
        buf = io.BytesIO()
        strip.save(buf, format="JPEG", quality=80)
        thumbs[row["key"]] = {"recipe": row["recipe"], "status": row["status"], "reasons": row["reasons"],
                              "jpeg_b64": base64.b64encode(buf.getvalue()).decode()}


def _close_quietly(*tars) -> None:
    for tar in tars:
        if tar:
            with contextlib.suppress(Exception):
                tar.close()  # a no-op once closed


def _maybe_open(uri: str | None):
    return uris.open_for_write_atomic(uri) if uri else contextlib.nullcontext()


def _manifest_bytes(rows: list[dict]) -> bytes:
    score_columns = sorted({k for row in rows for k in row if k.startswith(mf.SCORE_PREFIX)})
    schema = mf.MANIFEST_COLUMNS
    for column in score_columns:
        schema = schema.append(pa.field(column, pa.float64()))
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()

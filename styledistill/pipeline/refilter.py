"""Re-decide a finished run with other filters, from its stored scores: no model, no Ray.

Each shard of the source run is read once (its manifest, its accepted tar and, when the run kept them, its
rejects tar), every sample is decided again by the same `decide` the writer uses, and the shard is written
through the same sink into a new run folder. The shards, manifests and indexes are byte-identical to a full
run made with the new filters, as long as every sample that becomes accepted has its images: a run made
without `output.write_rejects` can only tighten, and the samples it cannot promote are listed.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from styledistill.backends import check_rules
from styledistill.filters.decide import Reason, decide
from styledistill.filters.dedup import TripletDeduper
from styledistill.io import uris
from styledistill.io.tars import read_samples
from styledistill.pipeline.run import finished_shards, write_indexes
from styledistill.pipeline.sink import ShardSink, sample_images, sample_record
from styledistill.schemas import manifest as mf
from styledistill.schemas.config import ConfigError, RunConfig, parse_config
from styledistill.schemas.records import ShardResult

REFILTER_FILE = "refilter.json"
NOT_KEPT = "not_kept"


@dataclass
class RefilterOutcome:
    run_uri: str
    shards: int = 0
    skipped_shards: int = 0
    counts: Counter = field(default_factory=Counter)  # new statuses over every shard
    transitions: Counter = field(default_factory=Counter)  # (recipe, old status, new status) -> samples
    by_rule: dict[str, Counter] = field(default_factory=dict)  # rule group -> {"now_rejects", "no_longer"}
    not_promoted: list[str] = field(default_factory=list)  # keys that pass but have no stored images

    def as_json(self) -> dict:
        return {
            "counts": dict(self.counts),
            "transitions": [{"recipe": r, "from": a, "to": b, "samples": n}
                            for (r, a, b), n in sorted(self.transitions.items())],
            "by_rule": {rule: dict(c) for rule, c in sorted(self.by_rule.items())},
            "not_promoted": self.not_promoted,
        }


def refiltered_config(source: RunConfig, out_uri: str, filters: dict | None, overrides: list[str]) -> RunConfig:
    """The source run's config with new filters (a whole `filters` mapping and/or `filters.` overrides)."""
    bad = [o for o in overrides if not o.strip().startswith("filters.")]
    if bad:
        raise ConfigError(f"refilter changes filters only; {bad[0]!r} sets something else (rerun for that)")
    data = source.model_dump(mode="json")
    if filters is not None:
        data["filters"] = filters
    data["output"]["uri"] = out_uri
    return parse_config(data, overrides)


def refilter_run(source_uri: str, config: RunConfig,
                 on_shard: Callable[[ShardResult], None] | None = None) -> RefilterOutcome:
    """Write `config.output.uri` as a full run with `config.filters` would, from the run at `source_uri`."""
    source_meta = json.loads(uris.read_bytes(uris.join(source_uri, mf.RUN_FILE)))
    source_config = parse_config(source_meta["config"])
    check_rules(config)
    out_uri = config.output.uri
    meta = _open_output(source_uri, source_meta, config)
    done = finished_shards(out_uri)
    outcome = RefilterOutcome(out_uri, skipped_shards=len(done))
    source_shards = finished_shards(source_uri)
    if not source_shards:
        raise ConfigError(f"{source_uri} has no finished shards to refilter")
    outcome.shards = max(source_shards) + 1
    missing = sorted(set(range(outcome.shards)) - set(source_shards))
    if missing:  # checked before any work: an unfinished run is finished by rerunning it, not refiltered
        raise ConfigError(f"{source_uri} is not complete (shards {missing[:5]} unfinished): finish it first")
    for shard in sorted(source_shards):
        stats = source_shards[shard]
        if shard in done:
            outcome.counts.update({k: done[shard][k] for k in (mf.ACCEPTED, mf.REJECTED, mf.FAILED)})
            continue
        result = _refilter_shard(source_uri, source_config, stats, config, meta["config_hash"], outcome)
        outcome.counts.update({mf.ACCEPTED: result.accepted, mf.REJECTED: result.rejected, mf.FAILED: result.failed})
        if on_shard is not None:
            on_shard(result)
    write_indexes(config, out_uri, outcome.shards)
    uris.write_text_atomic(uris.join(out_uri, REFILTER_FILE), json.dumps(
        {"source": source_uri, "filters_before": source_config.filters.model_dump(mode="json"),
         "filters_after": config.filters.model_dump(mode="json"), **outcome.as_json()}, indent=1))
    return outcome


def _open_output(source_uri: str, source_meta: dict, config: RunConfig) -> dict:
    """run.json of the new folder (the new config, the source's versions) and a copy of its scan."""
    out_uri = config.output.uri
    run_file = uris.join(out_uri, mf.RUN_FILE)
    if uris.exists(run_file):  # a resumed refilter: same filters, same source
        existing = json.loads(uris.read_bytes(run_file))
        if existing["config_hash"] != config.content_hash() or existing.get("refiltered_from") != source_uri:
            raise ConfigError(f"{out_uri} holds another run; choose a new --out")
        uris.remove_temp_files(out_uri)
        return existing
    meta = {"config": config.model_dump(mode="json"), "config_hash": config.content_hash(),
            "versions": source_meta["versions"], "started": source_meta.get("started"),
            "refiltered_from": source_uri}
    uris.makedirs(out_uri)
    uris.write_text_atomic(run_file, json.dumps(meta, indent=1))
    for name in (mf.SOURCES_FILE, mf.METRICS_FILE):  # the scan, and how the scores were computed
        if uris.exists(uris.join(source_uri, name)):
            uris.write_bytes_atomic(uris.join(out_uri, name), uris.read_bytes(uris.join(source_uri, name)))
    return meta


def _refilter_shard(source_uri: str, source_config: RunConfig, stats: dict, config: RunConfig, config_hash: str,
                    outcome: RefilterOutcome) -> ShardResult:
    name = stats["name"]
    rows = pq.read_table(uris.join(source_uri, mf.SHARDS_DIR, f"{name}.parquet")).to_pylist()
    samples = read_samples(uris.join(source_uri, mf.SHARDS_DIR, f"{name}.tar"))
    rejects_uri = uris.join(source_uri, mf.REJECTS_DIR, f"{name}.tar")
    if source_config.output.write_rejects and uris.exists(rejects_uri):
        samples.update(read_samples(rejects_uri))
    ext = config.output.image_format
    dedup = TripletDeduper(config.filters.dedup.exact)
    with ShardSink(config.output.uri, config.output, stats["shard"]) as sink:
        for row in rows:
            old_status, old_reasons = row["status"], row["reason_details"] or []
            if old_status == mf.FAILED:  # nothing to re-decide: it has no scores
                sink.add(row, None)
                outcome.transitions[(row["recipe"], old_status, old_status)] += 1
                continue
            scores = {k.removeprefix(mf.SCORE_PREFIX): v for k, v in row.items()
                      if k.startswith(mf.SCORE_PREFIX) and v is not None}
            signature = (row["content_sha256"], row["style_sha256"], row["target_sha256"])
            decision = decide(config.filters, row["recipe"], scores, json.loads(row["generation_scores"]),
                              duplicate_of=dedup.check(row["key"], signature))
            reasons = list(decision.reasons)
            stored = samples.get(row["key"])
            if decision.status == mf.ACCEPTED and stored is None:
                reasons.append(Reason(NOT_KEPT, "would be accepted, but its images were not kept "
                                                "(the source run had output.write_rejects: false)"))
                outcome.not_promoted.append(row["key"])
            status = mf.REJECTED if reasons else mf.ACCEPTED
            row = {**row, "status": status, "reasons": [r.text for r in reasons],
                   "reason_details": [r.as_row() for r in reasons]}
            sink.add(row, _sample(stored, row, ext, config_hash) if stored is not None else None)
            outcome.transitions[(row["recipe"], old_status, status)] += 1
            _count_rule_changes(outcome, old_reasons, reasons, old_status != status)
        return sink.finish(stats["groups"], stats.get("stage_seconds") or {}, stats.get("nodes") or {})


def _sample(stored: dict[str, bytes], row: dict, ext: str, config_hash: str) -> dict:
    """The stored sample with its new verdict, exactly as the writer would have made it."""
    meta = json.loads(stored[mf.META_MEMBER])
    meta.update(status=row["status"], reasons=row["reasons"], config_hash=config_hash)
    images = sample_images(stored, ext)  # stored members are named as the sample's: "content.png", ...
    return sample_record(row["key"], ext, images, stored[mf.TEXT_MEMBER].decode(), meta)


def _count_rule_changes(outcome: RefilterOutcome, old: list[dict], new: list[Reason], changed: bool) -> None:
    """Per rule: samples whose status changed that it now rejects, or no longer rejects."""
    if not changed:
        return
    before = {Reason(**r).group for r in old}
    after = {r.group for r in new}
    for rule in after - before:
        outcome.by_rule.setdefault(rule, Counter())["now_rejects"] += 1
    for rule in before - after:
        outcome.by_rule.setdefault(rule, Counter())["no_longer_rejects"] += 1

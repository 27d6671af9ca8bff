"""`styledistill audit`: score (and optionally filter) any style-transfer triplet dataset on the stages of a run.

An audit is a plan whose groups carry their three images instead of generations: one group per input sample,
its roles in slots `c` (content ref), `s0` (style ref) and `t` (target), one triplet (c, s0, t) keyed by a
stable hash of (input uri, sample key). A reader per input kind (img2dataset-style) turns an input into
samples:

- `webdataset`: tars read as bytes in memory (io/tars.py), roles mapped from member extensions; the bytes
  travel in the group to the load stage, which decodes them defensively and drops them;
- `manifest`: a parquet/CSV file with one column per role (paths or URLs); the load stage reads each path;
- `run`: one of our own run folders (accepted shards and kept rejects), roles and recipes known.

Every input sample ends in a shard manifest, scored or failed with its reason (a missing role, an unsafe
member name, a member over the size limit, an undecodable image ...); a tar that cannot be read to its end
adds one failed row saying so. `inputs.json` records, per input tar, what was read and what was skipped.
The stages, executor, writer (filters, sink), indexes and report are the ones `run` uses; rerunning the same
command resumes (the inputs are read again, finished shards are skipped).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import braceexpand

from styledistill.backends import check_backends
from styledistill.io import uris
from styledistill.io.tars import TarLimits, TarSample, TarSkips, iter_tar_samples
from styledistill.pipeline.planner import stable_hash
from styledistill.pipeline.run import RunOutcome, execute_plan, finished_shards, open_run_folder
from styledistill.pipeline.sources import GLOB_CHARS, _manifest_chunks, _manifest_columns
from styledistill.schemas import manifest as mf
from styledistill.schemas.audit import UNKNOWN_RECIPE, AuditConfig, AuditInput, AuditRoles, normalise_recipe
from styledistill.schemas.config import ConfigError
from styledistill.schemas.records import Group, ShardResult, SourceImage, Triplet

INPUTS_FILE = mf.AUDIT_INPUTS_FILE
CONTENT, STYLE, TARGET = "c", "s0", "t"  # "t" is not a generation slot: no parent verdict is inherited
ROLE_SLOTS = {"content": CONTENT, "style": STYLE, "target": TARGET}
UNKNOWN_LABEL = "unknown"
MAX_INSTRUCTION_CHARS = 4096
EXTRA_MEMBER = "extra member (ignored)"


@dataclass
class AuditSample:
    """One input sample as its reader found it."""

    source: str  # the input file it came from (tar, manifest)
    key: str  # its key there (tar key, manifest key or row number)
    images: dict[str, bytes | str] = field(default_factory=dict)  # slot -> bytes (tar) or uri (manifest)
    problems: dict[str, str] = field(default_factory=dict)  # slot -> why it is unusable
    recipe: str = UNKNOWN_RECIPE
    instruction: str = ""
    names: dict[str, str] = field(default_factory=dict)  # slot -> where it was, for the lineage


@dataclass
class InputReport:
    """What was read from one input file (a tar or a manifest), for inputs.json and the report."""

    input: int
    kind: str
    uri: str
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> members (tars) or cells (manifests)
    error: str | None = None

    def as_json(self) -> dict:
        return {"input": self.input, "kind": self.kind, "uri": self.uri, "samples": self.samples,
                "skipped": dict(sorted(self.skipped.items())), "error": self.error}


def expand_uris(patterns: list[str]) -> list[str]:
    """Brace patterns ("shard-{000..009}.tar"), globs and plain uris, in the order given (globs sorted)."""
    out: list[str] = []
    for pattern in patterns:
        for uri in braceexpand.braceexpand(pattern):
            out += uris.glob(uri) if any(c in uri for c in GLOB_CHARS) else [uri]
    return list(dict.fromkeys(out))  # a file listed twice is read once


# ----------------------------------------------------------------------------------------------------------
# Readers: one per input kind


class WebDatasetReader:
    """Samples of webdataset tars, roles mapped from member extensions."""

    def __init__(self, index: int, spec: AuditInput, config: AuditConfig, roles: AuditRoles | None = None,
                 recipe_field: str | None = None, tars: list[str] | None = None):
        self.index, self.spec, self.config = index, spec, config
        self.roles = roles or spec.roles
        self.recipe_field = recipe_field if recipe_field is not None else spec.recipe_field
        self.tars = tars if tars is not None else expand_uris(spec.all_uris)
        self.limits = TarLimits(config.max_member_bytes, config.max_tar_bytes)

    def read(self, reports: list[InputReport]) -> Iterator[AuditSample]:
        for tar_uri in self.tars:
            report = InputReport(self.index, self.spec.kind, tar_uri)
            reports.append(report)
            skips = TarSkips()
            for sample in iter_tar_samples(tar_uri, self.limits, skips):
                yield self._sample(tar_uri, sample, report)
            report.samples = skips.samples
            report.skipped.update(skips.counts)
            report.error = skips.error
            if skips.error is not None:  # one failed row, so the manifests say the tar was not read whole
                yield AuditSample(tar_uri, f"<tar {tar_uri}>",
                                  problems=dict.fromkeys(ROLE_SLOTS.values(),
                                                         f"{tar_uri}: {skips.error} (after {skips.samples} samples)"))

    def _sample(self, tar_uri: str, sample: TarSample, report: InputReport) -> AuditSample:
        out = AuditSample(tar_uri, sample.key)
        roles = self.roles
        wanted = {ROLE_SLOTS[role]: getattr(roles, role) for role in ROLE_SLOTS}
        used = set(wanted.values()) | {roles.instruction, _member_of(self.recipe_field)} - {None}
        extra = [ext for ext in sample.members if ext not in used]
        if extra:
            report.skipped[EXTRA_MEMBER] += len(extra)
        if sample.error is not None:
            out.problems = dict.fromkeys(wanted, f"{tar_uri}: {sample.error}")
            return out
        for slot, ext in wanted.items():
            out.names[slot] = f"{tar_uri}#{sample.key}.{ext}"
            if ext in sample.members:
                out.images[slot] = sample.members[ext]
            elif ext in sample.problems:
                out.problems[slot] = f"{tar_uri}: {sample.problems[ext]}"
            else:
                present = ", ".join(sorted(sample.members) + sorted(sample.problems)) or "none"
                out.problems[slot] = (f"{tar_uri}: sample {sample.key!r} has no {_role_of(slot)} member "
                                      f"{ext!r} (members: {present})")
        if roles.instruction and roles.instruction in sample.members:
            out.instruction = _text(sample.members[roles.instruction])
        out.recipe = self._recipe(sample)
        return out

    def _recipe(self, sample: TarSample) -> str:
        if self.spec.recipe is not None:
            return normalise_recipe(self.spec.recipe)
        if self.recipe_field is None:
            return UNKNOWN_RECIPE
        member, _, json_field = self.recipe_field.partition(":")
        data = sample.members.get(member)
        if data is None:
            return UNKNOWN_RECIPE
        if not json_field:
            return normalise_recipe(_text(data))
        try:
            value = json.loads(data)
        except ValueError:
            return UNKNOWN_RECIPE
        return normalise_recipe(value.get(json_field)) if isinstance(value, dict) else UNKNOWN_RECIPE


def _member_of(recipe_field: str | None) -> str | None:
    return recipe_field.partition(":")[0] if recipe_field else None


def _role_of(slot: str) -> str:
    return next(role for role, s in ROLE_SLOTS.items() if s == slot)


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").strip()[:MAX_INSTRUCTION_CHARS]


class RunFolderReader(WebDatasetReader):
    """One of our own run folders: its finished shards (accepted, then kept rejects), in our layout."""

    def __init__(self, index: int, spec: AuditInput, config: AuditConfig, run_uri: str):
        meta_uri = uris.join(run_uri, mf.RUN_FILE)
        if not uris.exists(meta_uri):
            raise ConfigError(f"input {index} ({run_uri}): not a run folder (no {mf.RUN_FILE})")
        run_config = json.loads(uris.read_bytes(meta_uri))["config"]
        ext = run_config["output"]["image_format"]
        roles = AuditRoles(content=f"{mf.CONTENT_MEMBER}.{ext}", style=f"{mf.STYLE_MEMBER}.{ext}",
                           target=f"{mf.TARGET_MEMBER}.{ext}", instruction=mf.TEXT_MEMBER)
        tars = []
        shards = sorted(finished_shards(run_uri).values(), key=lambda s: s["shard"])
        for folder in (mf.SHARDS_DIR, mf.REJECTS_DIR):
            for stats in shards:
                tar = uris.join(run_uri, folder, f"{stats['name']}.tar")
                if folder == mf.SHARDS_DIR or uris.exists(tar):
                    tars.append(tar)
        super().__init__(index, spec, config, roles, f"{mf.META_MEMBER}:recipe", tars)


class ManifestReader:
    """A parquet/CSV manifest with one column per role (paths or URLs, relative to the manifest)."""

    def __init__(self, index: int, spec: AuditInput, config: AuditConfig, uri: str):
        self.index, self.spec, self.uri = index, spec, uri
        roles = spec.roles
        self.columns = {slot: getattr(roles, role) for role, slot in ROLE_SLOTS.items()}
        extra = [roles.instruction, spec.recipe_field, spec.key_column]
        self.wanted = list(dict.fromkeys([*self.columns.values(), *(c for c in extra if c)]))

    def read(self, reports: list[InputReport]) -> Iterator[AuditSample]:
        report = InputReport(self.index, self.spec.kind, self.uri)
        reports.append(report)
        present = _manifest_columns(self.uri)
        missing = [c for c in self.wanted if c not in present]
        if missing:
            raise ConfigError(f"input {self.index} ({self.uri}): no column {missing[0]!r}; columns: "
                              f"{', '.join(present)}")
        base = uris.parent(self.uri)
        row = 0
        for chunk in _manifest_chunks(self.uri, self.wanted):
            for n in range(len(chunk[self.wanted[0]])):
                yield self._sample(chunk, n, row, base, report)
                row += 1
        report.samples = row

    def _sample(self, chunk: dict, n: int, row: int, base: str, report: InputReport) -> AuditSample:
        spec = self.spec
        key = str(chunk[spec.key_column][n]) if spec.key_column else str(row)
        out = AuditSample(self.uri, key)
        for slot, column in self.columns.items():
            value = chunk[column][n]
            path = str(value).strip() if value is not None else ""
            if not path:
                out.problems[slot] = f"{self.uri}: row {row} has no {_role_of(slot)} (column {column!r} empty)"
                report.skipped[f"empty {_role_of(slot)} cell"] += 1
                continue
            uri = path if uris.is_url(path) or os.path.isabs(path) else uris.join(base, path)
            out.images[slot] = out.names[slot] = uri
        if spec.roles.instruction:
            value = chunk[spec.roles.instruction][n]
            out.instruction = str(value).strip()[:MAX_INSTRUCTION_CHARS] if value is not None else ""
        if spec.recipe is not None:
            out.recipe = normalise_recipe(spec.recipe)
        elif spec.recipe_field:
            out.recipe = normalise_recipe(chunk[spec.recipe_field][n])
        return out


def readers(config: AuditConfig) -> Iterator:
    for index, spec in enumerate(config.inputs):
        if spec.kind == "webdataset":
            yield WebDatasetReader(index, spec, config)
        elif spec.kind == "run":
            for run_uri in spec.all_uris:
                yield RunFolderReader(index, spec, config, run_uri)
        else:
            for uri in expand_uris(spec.all_uris):
                yield ManifestReader(index, spec, config, uri)


# ----------------------------------------------------------------------------------------------------------
# The plan


class AuditPlanner:
    """One group per input sample, in input order, `samples_per_shard` to a shard: deterministic, so a rerun
    plans the same shards and resumes."""

    def __init__(self, config: AuditConfig):
        self.config = config
        self.reports: list[InputReport] = []

    def groups(self) -> Iterator[Group]:
        n = 0
        self.reports = []
        seen: set[str] = set()  # keys of the current input file: a repeated key gets an ordinal
        source = None
        for reader in readers(self.config):
            for sample in reader.read(self.reports):
                if sample.source != source:
                    source, seen = sample.source, set()
                occurrence = 0
                while (sample.key, occurrence) in seen:
                    occurrence += 1
                seen.add((sample.key, occurrence))
                yield to_group(sample, n // self.config.samples_per_shard, occurrence)
                n += 1

    def inputs_json(self) -> dict:
        totals: Counter = Counter()
        for report in self.reports:
            totals.update(report.skipped)
        return {"inputs": [spec.model_dump(mode="json") for spec in self.config.inputs],
                "files": [r.as_json() for r in self.reports],
                "samples": sum(r.samples for r in self.reports),
                "unreadable_files": sum(r.error is not None for r in self.reports),
                "skipped": dict(sorted(totals.items()))}


def to_group(sample: AuditSample, shard: int, occurrence: int = 0) -> Group:
    ident = stable_hash(sample.source, sample.key) if occurrence == 0 else stable_hash(sample.source, sample.key,
                                                                                        occurrence)
    key = f"a{ident}"  # hex: no dots, whatever the input's key was
    sources, payload = {}, {}
    for slot in ROLE_SLOTS.values():
        value = sample.images.get(slot)
        name = sample.names.get(slot, f"{sample.source}#{sample.key}")
        if isinstance(value, bytes):
            payload[slot] = value
            sources[slot] = SourceImage(name, UNKNOWN_LABEL, _sha256(value), 0, 0)
        else:  # a path to read (manifest), or where the missing image should have been (the problem says why)
            sources[slot] = SourceImage(value if isinstance(value, str) else name, UNKNOWN_LABEL, "", 0, 0)
    triplet = Triplet(key, sample.recipe, CONTENT, STYLE, TARGET, sample.instruction)
    return Group(f"grp_{ident}", shard, sources, (), (triplet,), 0, payload=payload, problems=dict(sample.problems))


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Running it


def audit_pipeline(config: AuditConfig, *, ray_address: str | None = None, inline: bool = False,
                   on_shard: Callable[[ShardResult], None] | None = None, report: bool = True) -> RunOutcome:
    """Audit (or resume auditing) the inputs of `config` into `config.output.uri`: the run's execution, with
    the audit's plan (walked once: it reads the input tars, so it is not surveyed first)."""
    check_backends(config)
    meta = open_run_folder(config, config.output.uri)
    planner = AuditPlanner(config)
    outcome = execute_plan(config, meta, planner.groups, finished_shards(config.output.uri), None,
                           ray_address=ray_address, inline=inline, on_shard=on_shard)
    uris.write_text_atomic(uris.join(outcome.run_uri, INPUTS_FILE), json.dumps(planner.inputs_json(), indent=1))
    if report:
        from styledistill.report import write_report

        _, outcome.report_path = write_report(outcome.run_uri)
    return outcome

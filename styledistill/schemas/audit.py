"""The audit configuration: score (and optionally filter) any style-transfer triplet dataset with the stages
of a run, minus generation. One YAML file, validated here, with `--set a.b=value` overrides as for `run`.

    name: vendor-x
    inputs:
      - kind: webdataset                       # tars: brace patterns, globs or a list; local or s3:// gs:// ...
        uris: ["s3://bucket/vendor/shard-{000000..000099}.tar"]
        roles: {content: src.jpg, style: ref.png, target: out.jpg, instruction: txt}
        recipe_field: json:recipe              # a member ("cls") or a JSON member's field; or `recipe: rns`
      - kind: manifest                         # parquet / CSV, one column per role (paths or URLs)
        uri: data/triplets.parquet
        roles: {content: content_path, style: style_path, target: target_path}
        key_column: id
      - kind: run                              # one of our own run folders: roles and recipes are known
        uri: runs/demo
    scorers: [{backend: effnet}, ...]
    filters: {rules: [...]}                    # optional: filtered shards in our layout
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from styledistill.schemas.config import (
    DecodeLimits,
    FilterConfig,
    ModelSpec,
    OutputConfig,
    RayConfig,
    Resolution,
    Strict,
    parse_model,
    read_yaml_mapping,
)
from styledistill.schemas.stages import StagesConfig

UNKNOWN_RECIPE = "unknown"
RECIPE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
# Role members must be images or text, never anything that would be unpickled.
PICKLE_SUFFIXES = (".pyd", ".pickle", ".pkl", ".pth", ".pt", ".npy", ".npz", ".joblib", ".ckpt")


def normalise_recipe(value: object) -> str:
    """A recipe name as given ("RnS" -> "rns"), or `unknown` for anything that is not a short plain name."""
    text = str(value).strip().lower() if value is not None else ""
    return text if RECIPE_PATTERN.match(text) else UNKNOWN_RECIPE


class AuditRoles(Strict):
    """Where each role is: a member extension of a webdataset sample ("src.jpg") or a manifest column."""

    content: str
    style: str
    target: str
    instruction: str | None = None

    @model_validator(mode="after")
    def _no_pickles(self) -> "AuditRoles":
        for role in ("content", "style", "target", "instruction"):
            value = getattr(self, role)
            if value is not None and ("." + value).lower().endswith(PICKLE_SUFFIXES):
                raise ValueError(f"role {role} is {value!r}: pickled members are never read")
        return self


class AuditInput(Strict):
    kind: Literal["webdataset", "manifest", "run"]
    uri: str | None = None
    uris: list[str] = []
    roles: AuditRoles | None = None  # required for webdataset and manifest; a run folder's are known
    recipe: str | None = None  # a fixed recipe for every sample
    recipe_field: str | None = None  # member ext, "json:<field>" (webdataset) or column (manifest)
    key_column: str | None = None  # manifest: the column naming each sample (else its row number)

    @model_validator(mode="after")
    def _check(self) -> "AuditInput":
        if not self.all_uris:
            raise ValueError("set uri or uris")
        if self.kind != "run" and self.roles is None:
            raise ValueError(f"a {self.kind} input needs roles: {{content: ..., style: ..., target: ...}}")
        if self.kind == "run" and self.roles is not None:
            raise ValueError("a run input has its own roles; remove roles")
        if self.recipe is not None and self.recipe_field is not None:
            raise ValueError("set recipe (fixed) or recipe_field, not both")
        return self

    @property
    def all_uris(self) -> list[str]:
        return ([self.uri] if self.uri else []) + list(self.uris)

    def label(self) -> str:
        return ", ".join(self.all_uris)


class AuditConfig(Strict):
    RUN_KIND: ClassVar[str] = "audit"  # which stages run (schemas/stages.py): no generation

    name: str = "audit"
    inputs: list[AuditInput]
    decode: DecodeLimits = DecodeLimits()
    # None: images are scored as stored. Set it to size them as a run sizes its sources before scoring.
    resolution: Resolution | None = None
    max_member_bytes: int = Field(64 * 1024**2, ge=1)  # a tar member above it is not read
    max_tar_bytes: int = Field(64 * 1024**3, ge=1)  # decompressed bytes of one input tar (bomb guard)
    samples_per_shard: int = Field(64, ge=1)
    scorers: list[ModelSpec] = []
    filters: FilterConfig = FilterConfig()
    stages: StagesConfig = StagesConfig()
    output: OutputConfig = OutputConfig(uri="runs/audit", shard_prefix="audit")
    ray: RayConfig = RayConfig()

    @field_validator("inputs")
    @classmethod
    def _some_inputs(cls, v: list[AuditInput]) -> list[AuditInput]:
        if not v:
            raise ValueError("at least one input is needed")
        return v

    def content_hash(self) -> str:
        """Hash of everything that decides the audit's output (not where it goes or how Ray is sized)."""
        data = self.model_dump(mode="json", exclude={"output": {"uri", "thumbnails_in_report"}, "ray": True,
                                                      "stages": True})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def parse_audit_config(data: dict, overrides: list[str] | None = None) -> AuditConfig:
    return parse_model(AuditConfig, data, overrides)


def load_audit_config(path: str | Path, overrides: list[str] | None = None) -> AuditConfig:
    """Relative input paths are relative to the config file, as in a run config."""
    data = read_yaml_mapping(path)
    base = Path(path).parent
    for item in data.get("inputs", []) or []:
        if not isinstance(item, dict):
            continue
        for field_name in ("uri", "uris"):
            value = item.get(field_name)
            if isinstance(value, str):
                item[field_name] = _relative_to(base, value)
            elif isinstance(value, list):
                item[field_name] = [_relative_to(base, v) if isinstance(v, str) else v for v in value]
    return parse_audit_config(data, overrides)


def _relative_to(base: Path, uri: str) -> str:
    return uri if "://" in uri or Path(uri).is_absolute() else str(base / uri)

"""The run configuration: one YAML file, validated here, with `--set a.b=value` overrides.

Everything a run does is decided by this object and the sources; its hash goes into every sample so a
dataset can always be traced to the exact settings that made it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from styledistill.schemas.recipes import RECIPE_NAMES
from styledistill.schemas.stages import StagesConfig

V1_INSTRUCTION = (
    "Style Transfer the style of Figure 2 to Figure 1, and keep the content and characteristics of Figure 1."
)
Recipe = Literal[RECIPE_NAMES]  # type: ignore[valid-type]  # the names of the recipe table
Label = Literal["realistic", "stylized"]


M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourcePool(Strict):
    """A pool of images: a folder, a glob, or a parquet/CSV manifest, local or an fsspec URL."""

    uri: str
    # `column`: the manifest's `label_column` says realistic/stylized per row; `classify`: ask the labeler.
    label: Literal["realistic", "stylized", "column", "classify"]
    path_column: str = "path"
    label_column: str = "label"
    extensions: list[str] = [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"]


class DecodeLimits(Strict):
    """What a source image must satisfy; anything else is recorded as failed with the reason."""

    min_side: int = 64
    max_side: int = 16384
    max_pixels: int = 64_000_000  # decompression-bomb guard, checked before pixels are decoded
    max_file_bytes: int = 100 * 1024 * 1024


class Resolution(Strict):
    """How images are sized before generation. The stored images are exactly what the generator saw."""

    content_min_edge: int | None = None  # TeleStyle V1: short edge set to 1024
    content_max_edge: int | None = 384  # the embedded Magenta transform works at 384 on the long side
    multiple_of: int = 16
    # square: centre square crop, then style_edge x style_edge; resize: the whole image resized to
    # style_edge x style_edge, aspect not kept (TeleStyle V1's demo); keep_aspect: short edge style_edge.
    style_mode: Literal["square", "resize", "keep_aspect"] = "square"
    style_edge: int = 256

    @model_validator(mode="after")
    def _one_rule(self) -> "Resolution":
        if self.content_min_edge is None and self.content_max_edge is None:
            raise ValueError("set content_min_edge or content_max_edge")
        return self


class PlanConfig(Strict):
    seed: int = 0
    styles_per_photo: int = Field(2, ge=2)  # k >= 2 so SnS has another V1 output to use
    triplets_per_photo: int = Field(4, ge=1)
    recipes: dict[Recipe, float] = {"rns": 0.4, "sns": 0.3, "snr": 0.15, "rnr": 0.15}
    max_photos: int | None = None
    samples_per_shard: int = Field(64, ge=1)

    @field_validator("recipes")
    @classmethod
    def _shares(cls, v: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
            raise ValueError("recipe shares must be >= 0 and not all zero")
        return v


class PromptConfig(Strict):
    instruction: str = V1_INSTRUCTION
    # Append the enhancer's content/style words (TeleStyle V2) when an enhancer is configured.
    append_enhanced: bool = False


class ModelSpec(Strict):
    """A model backend by registry name, with its own options (validated by the backend)."""

    backend: str
    options: dict[str, Any] = {}


class Rule(Strict):
    """A band on one score; `per_recipe` replaces the band for the named recipes, `recipes` limits it."""

    score: str
    min: float | None = None
    max: float | None = None
    recipes: list[Recipe] | None = None
    per_recipe: dict[Recipe, dict[Literal["min", "max"], float | None]] = {}
    # A missing score (scorer failed or skipped) rejects unless allowed.
    allow_missing: bool = False

    @model_validator(mode="after")
    def _band(self) -> "Rule":
        if self.min is None and self.max is None and not self.per_recipe:
            raise ValueError(f"rule on {self.score!r} needs min, max or per_recipe")
        return self


class DedupConfig(Strict):
    exact: bool = True
    phash_max_distance: int | None = Field(4, ge=0, le=16)


class FilterConfig(Strict):
    # Applied to each V1 output r_i = G(c, s_i) as its RnS triplet; triplets built on a failing r_i inherit it.
    generation_rules: list[Rule] = []
    rules: list[Rule] = []
    dedup: DedupConfig = DedupConfig()


class OutputConfig(Strict):
    uri: str = "runs/demo"
    shard_prefix: str = "styledistill"
    image_format: Literal["png", "jpg", "webp"] = "png"
    image_quality: int = Field(95, ge=1, le=100)
    write_rejects: bool = False
    thumbnails_in_report: int = 12


class AutoscaleConfig(Strict):
    """When a stage whose actors autoscale (min_actors < max_actors) grows or shrinks (pipeline/autoscale.py)."""

    backlog_s: float = Field(2.0, gt=0)  # grow a stage whose queue would take its actors this long to drain
    idle_s: float = Field(5.0, gt=0)  # retire an actor that has had nothing to do this long (to min_actors)


class RayConfig(Strict):
    address: str | None = None  # None: start local Ray; "auto" or HOST:PORT: join a cluster
    num_cpus: int | None = None  # local Ray only
    max_shards_in_flight: int = Field(4, ge=1)
    groups_per_batch: int = Field(2, ge=1)
    batch_retries: int = Field(2, ge=0)
    autoscale: AutoscaleConfig = AutoscaleConfig()


class RunConfig(Strict):
    name: str = "styledistill"
    sources: list[SourcePool]
    decode: DecodeLimits = DecodeLimits()
    resolution: Resolution = Resolution()
    plan: PlanConfig = PlanConfig()
    prompt: PromptConfig = PromptConfig()
    generator: ModelSpec = ModelSpec(backend="magenta")
    scorers: list[ModelSpec] = []
    labeler: ModelSpec | None = None
    enhancer: ModelSpec | None = None
    filters: FilterConfig = FilterConfig()
    stages: StagesConfig = StagesConfig()
    output: OutputConfig = OutputConfig()
    ray: RayConfig = RayConfig()

    @field_validator("sources")
    @classmethod
    def _some_sources(cls, v: list[SourcePool]) -> list[SourcePool]:
        if not v:
            raise ValueError("at least one source pool is needed")
        return v

    def content_hash(self) -> str:
        """Hash of everything that decides the dataset (not where it is written or how Ray is sized)."""
        data = self.model_dump(mode="json", exclude={"output": {"uri", "thumbnails_in_report"}, "ray": True,
                                                      "stages": True})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """An invalid config, with the failing field named in one line."""


def _set_path(data: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        if isinstance(node, list):
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
    value = yaml.safe_load(raw)  # "3" -> 3, "true" -> True, "[a, b]" -> list
    if isinstance(node, list):
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value


def parse_model(cls: type[M], data: dict, overrides: list[str] | None = None) -> M:
    """Validate `data` (plus KEY=VALUE overrides) as `cls`; any problem is one ConfigError line naming it."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. plan.seed=3")
        key, raw = item.split("=", 1)
        try:
            _set_path(data, key.strip(), raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)})") from None
        except (KeyError, IndexError, ValueError, TypeError, AttributeError) as err:
            raise ConfigError(f"override {item!r}: no such field path ({type(err).__name__}: {err})") from None
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise ConfigError(f"config field {where}: {first['msg']}{more}") from None


def parse_config(data: dict, overrides: list[str] | None = None) -> RunConfig:
    return parse_model(RunConfig, data, overrides)


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file's top-level mapping, or a one-line ConfigError."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's message in one line: the problem and where, without the quoted source snippet."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    data = read_yaml_mapping(path)
    base = Path(path).parent
    for pool in data.get("sources", []) or []:
        # Relative source paths are relative to the config file, so a config can travel with its data.
        if isinstance(pool, dict) and "uri" in pool and "://" not in str(pool["uri"]):
            if not Path(pool["uri"]).is_absolute():
                pool["uri"] = str(base / pool["uri"])
    return parse_config(data, overrides)

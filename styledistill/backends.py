"""Model backends: their common base, and the registry by name.

Every generator, scorer, labeler and enhancer is a `Backend`: options validated in the constructor (no
weights yet, so a typo fails in a second), weights loaded once in `setup()` (once per Ray actor),
`model_info()` stored with every sample. The registry maps a config's `backend:` name to the class's import
path; classes are imported lazily, so a CPU-only run never imports diffusers or open_clip. A backend's module
imports no model library itself (torch, onnxruntime, diffusers, open_clip...): its model code lives in a
module that `setup()` imports (effnet.py, clip_model.py, telestyle_pipeline.py), so the driver checks every
option in a second while only the actors load the libraries (tested in the contract battery). A scorer's
registry key is also the prefix of the scores it writes (`clip` writes `clip.content_cos`, ...).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from styledistill.schemas.config import ModelSpec, RunConfig


class BackendOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


def parse_options(cls: type[BackendOptions], options: dict[str, Any], where: str) -> Any:
    try:
        return cls.model_validate(options)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{where} option {field}: {first['msg']}") from None


class Backend(ABC):
    """Subclasses set `kind`, `name` (their registry key) and `Options`, and implement `setup`."""

    kind: ClassVar[str] = "backend"
    name: ClassVar[str] = ""
    Options: ClassVar[type[BackendOptions]] = BackendOptions

    def __init__(self, options: dict[str, Any], device: str = "cpu", threads: int = 1):
        self.options = parse_options(self.Options, options, f"{self.kind} {self.name}")
        self.device = device
        self.threads = threads

    @abstractmethod
    def setup(self) -> None:
        """Load weights once; raise a clear error naming a missing path or model id."""

    def model_info(self) -> dict[str, str]:
        """Model ids, weight hashes and library versions, stored in every sample's metadata."""
        return {}

GENERATORS = {
    "magenta": "styledistill.generation.magenta:MagentaGenerator",
    "telestyle": "styledistill.generation.telestyle:TeleStyleGenerator",
    # Benchmarks only (named so a config cannot mistake it for a model): fixed latency, no CPU, output = content.
    "benchmark_sleep": "styledistill.generation.sleep:SleepGenerator",
}
SCORERS = {
    "effnet": "styledistill.scoring.content:EffNetContentScorer",
    "edges": "styledistill.scoring.content:EdgeStructureScorer",
    "magenta": "styledistill.scoring.style:MagentaStyleScorer",
    "gram": "styledistill.scoring.style:GramStyleScorer",
    "noop": "styledistill.scoring.detectors:NoOpScorer",
    "nsfw": "styledistill.scoring.nsfw:NSFWScorer",
    "clip": "styledistill.scoring.clip:ClipScorer",
    "csd": "styledistill.scoring.csd:CSDScorer",
    "dino": "styledistill.scoring.dino:DinoScorer",
    "judge": "styledistill.scoring.vlm_judge:VLMJudgeScorer",
}
LABELERS = {
    "clip": "styledistill.scoring.clip:ClipLabeler",
}
ENHANCERS = {
    "qwen_vl": "styledistill.generation.enhancer:PromptEnhancer",
}
TABLES = {"generator": GENERATORS, "scorer": SCORERS, "labeler": LABELERS, "enhancer": ENHANCERS}


class BackendError(ValueError):
    pass


def import_object(path: str) -> Any:
    """`module:attr` -> the object, importing the module only now."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def backend_class(kind: str, name: str) -> type:
    table = TABLES[kind]
    if name not in table:
        raise BackendError(f"unknown {kind} backend {name!r}; known: {', '.join(sorted(table))}")
    return import_object(table[name])


def build(kind: str, spec: ModelSpec, device: str = "cpu", threads: int = 1) -> Backend:
    """Instantiate a backend; its constructor validates `spec.options` (it loads no weights yet)."""
    return backend_class(kind, spec.backend)(spec.options, device=device, threads=threads)


def check_backends(config: RunConfig) -> None:
    """Every configured backend exists and accepts its options, and every filter rule reads a score some
    configured scorer writes. Run before any work, so a typo fails in a second, not after the GPU hours.
    Loads no weights."""
    # An audit config has scorers and filters only (no generator, enhancer or labeler).
    specs = [(kind, getattr(config, kind, None)) for kind in ("generator", "enhancer", "labeler")]
    specs = [*((k, s) for k, s in specs[:1] if s), *(("scorer", spec) for spec in config.scorers),
             *((k, s) for k, s in specs[1:] if s)]
    for kind, spec in specs:
        _checked_build(kind, spec)
    check_rules(config)


def _checked_build(kind: str, spec: ModelSpec) -> Backend:
    try:
        return build(kind, spec)
    except ImportError as err:
        raise BackendError(f"{kind} backend {spec.backend!r} cannot be imported here: {err}") from None
    except ValueError as err:
        raise BackendError(str(err)) from None


def declared_scores(config: RunConfig) -> set[str]:
    """Every score name ("<scorer>.<name>") the configured scorers write: what filters may read."""
    scorers = [_checked_build("scorer", spec) for spec in config.scorers]
    return {f"{scorer.name}.{score}" for scorer in scorers for score in scorer.declared_scores()}


def check_rules(config: RunConfig) -> None:
    """Each rule reads a score some configured scorer writes; else one line naming the rule and the scores."""
    written = declared_scores(config)
    filters = config.filters
    for level, rules in (("filters.generation_rules", filters.generation_rules), ("filters.rules", filters.rules)):
        for n, rule in enumerate(rules):
            if rule.score not in written:
                raise BackendError(f"{level}.{n} reads score {rule.score!r}, which no configured scorer writes; "
                                   f"scores: {', '.join(sorted(written)) or 'none (no scorers configured)'}")

"""Model backends by name. Imported lazily, so a CPU-only run never imports diffusers or open_clip."""

from __future__ import annotations

import importlib
from typing import Any

from styledistill.schemas.config import ModelSpec, RunConfig

GENERATORS = {
    "magenta": "styledistill.generation.magenta:MagentaGenerator",
    "telestyle": "styledistill.generation.telestyle:TeleStyleGenerator",
}
SCORERS = {
    "effnet_content": "styledistill.scoring.content:EffNetContentScorer",
    "edge_structure": "styledistill.scoring.content:EdgeStructureScorer",
    "magenta_style": "styledistill.scoring.style:MagentaStyleScorer",
    "gram_style": "styledistill.scoring.style:GramStyleScorer",
    "noop": "styledistill.scoring.detectors:NoOpScorer",
    "nsfw": "styledistill.scoring.nsfw:NSFWScorer",
    "clip": "styledistill.scoring.clip:ClipScorer",
    "csd": "styledistill.scoring.csd:CSDScorer",
    "dino": "styledistill.scoring.dino:DinoScorer",
    "vlm_judge": "styledistill.scoring.vlm_judge:VLMJudgeScorer",
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


def backend_class(kind: str, name: str) -> type:
    table = TABLES[kind]
    if name not in table:
        raise BackendError(f"unknown {kind} backend {name!r}; known: {', '.join(sorted(table))}")
    module, _, attr = table[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def build(kind: str, spec: ModelSpec, device: str = "cpu", threads: int = 1) -> Any:
    """Instantiate a backend; its constructor validates `spec.options` (it loads no weights yet)."""
    return backend_class(kind, spec.backend)(spec.options, device=device, threads=threads)


def check_backends(config: RunConfig) -> None:
    """Every configured backend exists and accepts its options; run before any work so a typo in a model
    option fails in a second, not after the scan when the actors start. Loads no weights."""
    specs = [("generator", config.generator), *(("scorer", spec) for spec in config.scorers)]
    specs += [(kind, spec) for kind, spec in (("enhancer", config.enhancer), ("labeler", config.labeler)) if spec]
    for kind, spec in specs:
        try:
            build(kind, spec)
        except ImportError as err:
            raise BackendError(f"{kind} backend {spec.backend!r} cannot be imported here: {err}") from None
        except ValueError as err:
            raise BackendError(str(err)) from None

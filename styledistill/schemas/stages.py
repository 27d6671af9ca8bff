"""The pipeline's stages, declared once: this table feeds the config schema (`stages.<name>`), the
executor (which stages run, in which order) and the report (the order of its stage table).

A stage's code lives in `impl` ("module:Class", imported only when the stage is built, so the schema never
imports the pipeline). Adding a stage is one entry here plus its class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

if TYPE_CHECKING:
    from styledistill.schemas.config import RunConfig


class StageResources(BaseModel):
    """What one actor of a stage asks Ray for, and how many actors the stage runs."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_gb: float | None = None
    # Ray custom resources a node must offer, e.g. {"h100": 1} to pin the generator to one node type.
    resources: dict[str, float] = {}
    # Actors of the stage in the whole cluster: `concurrency: N` runs exactly N. With `min_actors` and/or
    # `max_actors` the pool autoscales (as Ray Data's actor pools do): it starts with min_actors, grows while
    # its queue backs up and the cluster has room for another actor, and shrinks actors idle for a while.
    # An unset bound defaults to `concurrency`.
    concurrency: int = Field(1, ge=1)
    min_actors: int | None = Field(None, ge=1)
    max_actors: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)  # items per model call inside the stage
    max_in_flight: int = Field(2, ge=1)  # batches queued per actor, so it never idles between batches
    # A batch running longer than this (a hung model call) gets its actor restarted and is retried; after
    # ray.batch_retries its samples are failed with "timed out after N s". None: no limit.
    timeout_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _actor_bounds(self) -> StageResources:
        low, high = self.actor_range
        if low > high:
            raise ValueError(f"min_actors ({low}) must be <= max_actors ({high})")
        return self

    @property
    def actor_range(self) -> tuple[int, int]:
        """(min, max) actors: (concurrency, concurrency) unless min_actors / max_actors are set."""
        if self.min_actors is None and self.max_actors is None:
            return self.concurrency, self.concurrency
        low = self.min_actors if self.min_actors is not None else min(self.concurrency, self.max_actors)
        high = self.max_actors if self.max_actors is not None else max(self.concurrency, low)
        return low, high

    @property
    def autoscaled(self) -> bool:
        low, high = self.actor_range
        return low < high


@dataclass(frozen=True)
class StageSpec:
    name: str
    impl: str | None  # "module:Class" of a per-batch stage; None for the actors outside the batch chain
    defaults: StageResources
    # The RunConfig field that must be set for the stage to run (None: it always runs).
    needs: str | None = None
    doc: str = ""
    # The kinds of job it runs in: "run" (RunConfig) and "audit" (AuditConfig: scores existing triplets).
    kinds: tuple[str, ...] = ("run", "audit")

    def enabled(self, config: RunConfig) -> bool:
        if getattr(config, "RUN_KIND", "run") not in self.kinds:
            return False
        return self.needs is None or getattr(config, self.needs, None) is not None


# The batch chain, in pipeline order.
PIPELINE_STAGES: tuple[StageSpec, ...] = (
    StageSpec("load", "styledistill.pipeline.stages:LoadStage", StageResources(num_cpus=0.25),
              doc="read and size the source images"),
    StageSpec("generate", "styledistill.pipeline.stages:GenerateStage", StageResources(num_cpus=1.0),
              kinds=("run",), doc="r_i = G(c, s_i)"),
    StageSpec("enhance", "styledistill.pipeline.stages:EnhanceStage", StageResources(num_cpus=1.0),
              needs="enhancer", doc="TeleStyle V2's prompt enhancer"),
    StageSpec("score", "styledistill.pipeline.stages:ScoreStage", StageResources(num_cpus=1.0),
              doc="every scorer on every view"),
    StageSpec("encode", "styledistill.pipeline.stages:EncodeStage", StageResources(num_cpus=0.25),
              doc="encode images, drop pixels"),
)
# Actors outside the batch chain, placed by the same resources block.
SIDE_STAGES: tuple[StageSpec, ...] = (
    StageSpec("write", None, StageResources(num_cpus=0.25), doc="the shard writer"),
    StageSpec("label", None, StageResources(num_cpus=1.0), needs="labeler",
              doc="the scan's labeler, for `classify` pools"),
)
STAGES: dict[str, StageSpec] = {spec.name: spec for spec in PIPELINE_STAGES + SIDE_STAGES}
STAGE_ORDER: tuple[str, ...] = tuple(STAGES)


def active_stages(config: RunConfig) -> list[StageSpec]:
    """The batch chain of this config, in order."""
    return [spec for spec in PIPELINE_STAGES if spec.enabled(config)]


def held_cpus(config: RunConfig) -> float:
    """CPUs the actors of this config hold from their start (each stage at its minimum actor count; the writer
    and the labeler included): what a local Ray is sized for and what the scan must find left beside them."""
    return sum(getattr(config.stages, spec.name).num_cpus * getattr(config.stages, spec.name).actor_range[0]
               for spec in STAGES.values() if spec.enabled(config))


def stage_by_impl(cls: type) -> StageSpec:
    """The declaration whose `impl` is this class."""
    path = f"{cls.__module__}:{cls.__qualname__}"
    for spec in PIPELINE_STAGES:
        if spec.impl == path:
            return spec
    raise KeyError(f"{path} is not declared in styledistill.schemas.stages.PIPELINE_STAGES")


StagesConfig = create_model(
    "StagesConfig",
    __config__=ConfigDict(extra="forbid"),
    __doc__="Ray resources per stage: one field per entry of STAGES, with its defaults.",
    **{spec.name: (StageResources, Field(default_factory=spec.defaults.model_copy, description=spec.doc))
       for spec in STAGES.values()},
)

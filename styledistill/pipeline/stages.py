"""The pipeline's stages. Each has a lifecycle (`setup` once per actor, `process` per batch of groups) and
declares its resources; none knows about Ray, so the same code runs in Ray actors or in one process.

A stage never raises for one bad sample: it records the failure on the group's slot (or triplet) and goes
on, so every planned sample ends accepted, rejected or failed with a reason.
"""

from __future__ import annotations

import hashlib
import logging
import time
from abc import ABC, abstractmethod

import numpy as np

from styledistill import backends
from styledistill.generation.base import GenerationRequest
from styledistill.pipeline import images
from styledistill.schemas.config import ModelSpec, RunConfig
from styledistill.schemas.recipes import GENERATION_RECIPE
from styledistill.schemas.stages import StageResources, active_stages, stage_by_impl
from styledistill.schemas.records import CONTENT_SLOT, GroupWork
from styledistill.scoring.base import ViewScores

logger = logging.getLogger(__name__)


def _device(resources: StageResources) -> str:
    if resources.num_gpus > 0:
        import torch

        if torch.cuda.is_available():
            return "cuda"
        # Ray gave this actor a GPU but torch sees none (a CPU-only torch on a GPU node, or Ray's logical
        # GPUs in a test cluster): say so loudly, the run goes on at CPU speed and samples record "cpu".
        logger.warning("stage given %s GPU but torch sees no CUDA device: running on the CPU", resources.num_gpus)
    return "cpu"


def _threads(resources: StageResources) -> int:
    return max(1, int(resources.num_cpus))


def build_backend(kind: str, spec: ModelSpec, resources: StageResources):
    """A model backend placed by its stage's resources: CUDA when given a GPU, threads from num_cpus."""
    return backends.build(kind, spec, _device(resources), _threads(resources))


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


class Stage(ABC):
    """A stage of the batch chain; its name and default resources are its entry in schemas/stages.py."""

    def __init__(self, config: RunConfig, name: str | None = None):
        self.config = config
        self.name = name or stage_by_impl(type(self)).name
        self.resources: StageResources = getattr(config.stages, self.name)

    def setup(self) -> None:
        """Load models; runs once per actor before the first batch."""

    @abstractmethod
    def process(self, batch: list[GroupWork]) -> list[GroupWork]:
        ...

    def model_info(self) -> dict[str, dict[str, str]]:
        return {}


class ModelStage(Stage):
    """A stage that runs model backends: built from the config (`specs`), placed by the stage's resources,
    set up once per actor, and their ids reported under `<kind>.<name>`."""

    @abstractmethod
    def specs(self) -> list[tuple[str, ModelSpec]]:
        """(backend kind, spec) of each backend this stage runs."""

    def setup(self):
        self.backends = [build_backend(kind, spec, self.resources) for kind, spec in self.specs()]
        for backend in self.backends:
            backend.setup()

    def model_info(self):
        return {f"{b.kind}.{b.name}": b.model_info() for b in self.backends}


class LoadStage(Stage):
    """Read and normalise each source image of a group, sized by the resolution rules."""

    def process(self, batch):
        res = self.config.resolution  # an audit without `resolution` scores its images as stored
        for work in batch:
            group = work.group
            for slot, reason in group.problems.items():  # what an audit's reader found wrong
                work.fail(slot, reason)
            for slot, source in group.sources.items():
                if slot in work.errors:
                    continue
                try:
                    if slot in group.payload:  # an audited sample's bytes, read from its tar
                        array = images.decode_image(group.payload[slot], self.config.decode)
                    else:
                        loaded = images.load_image(source.uri, self.config.decode)
                        if source.sha256 and loaded.sha256 != source.sha256:
                            raise images.ImageError(f"file changed since the scan: {source.uri}")
                        array = loaded.array
                    if res is not None:
                        prepare = images.prepare_content if slot == CONTENT_SLOT else images.prepare_style
                        array = prepare(array, res)
                    work.images[slot] = array
                except Exception as err:  # noqa: BLE001 - any failure of one file is recorded, never raised
                    work.fail(slot, f"{slot} ({source.uri}): {err}")
            work.group = group.without_payload()  # decoded: the bytes need not travel further
        return batch


class GenerateStage(ModelStage):
    """r_i = G(c, s_i) for each planned generation, batched across groups."""

    def specs(self):
        return [("generator", self.config.generator)]

    @property
    def generator(self):
        return self.backends[0]

    def process(self, batch):
        todo = []
        for work in batch:
            for gen in work.group.generations:
                missing = [s for s in (gen.content_slot, gen.style_slot) if s not in work.images]
                if missing:  # carry the root cause, so a derived triplet's error says what really broke
                    work.fail(gen.slot, work.errors.get(missing[0], f"{gen.slot}: input {missing[0]} unavailable"))
                else:
                    todo.append((work, gen))
        size = self.resources.batch_size
        for start in range(0, len(todo), size):
            self._generate(todo[start:start + size])
        return batch

    def _generate(self, chunk):
        requests = [GenerationRequest(w.images[g.content_slot], w.images[g.style_slot], g.seed, g.prompt)
                    for w, g in chunk]
        try:
            outputs = self.generator.generate(requests)
        except Exception:  # noqa: BLE001 - retry one by one so one bad request fails alone
            outputs = None
        for n, (work, gen) in enumerate(chunk):
            try:
                out = outputs[n] if outputs is not None else self.generator.generate([requests[n]])[0]
                if isinstance(out, Exception):
                    raise out
                expected = requests[n].content.shape
                if out.shape != expected or out.dtype != np.uint8:
                    raise ValueError(f"generator returned {out.shape} {out.dtype}, expected {expected} uint8")
                work.images[gen.slot] = out
            except Exception as err:  # noqa: BLE001
                work.fail(gen.slot, f"{gen.slot}: generation failed: {_error(err)}")


class EnhanceStage(ModelStage):
    """TeleStyle V2's prompt enhancer: content and style words for each triplet's two references."""

    def specs(self):
        return [("enhancer", self.config.enhancer)]

    @property
    def enhancer(self):
        return self.backends[0]

    def process(self, batch):
        todo = [(w, t) for w in batch for t in w.group.triplets
                if t.content_ref in w.images and t.style_ref in w.images]
        try:
            answers = self.enhancer.describe([w.images[t.content_ref] for w, t in todo],
                                             [w.images[t.style_ref] for w, t in todo])
        except Exception as err:  # noqa: BLE001 - prompts stay unenhanced, with the reason noted
            answers = [{"content_prompt": None, "style_prompt": None, "error": _error(err)}] * len(todo)
        for (work, triplet), answer in zip(todo, answers):
            work.annotations.setdefault(triplet.key, {})["prompts"] = answer
        return batch


class ScoreStage(ModelStage):
    """Every configured scorer on every generation view (c, s_i, r_i) and every triplet view."""

    def specs(self):
        return [("scorer", spec) for spec in self.config.scorers]

    @property
    def scorers(self):
        return self.backends

    def process(self, batch):
        # One view per distinct (content, style, target) slot triple: an RnS triplet is its generation's view.
        views: dict[tuple[str, str, str, str], dict[str, str]] = {}
        for work in batch:
            gid = work.group.group_id
            # A slot triple has one recipe (a generation is an RnS view); the VLM judge asks per recipe.
            triples = [(g.content_slot, g.style_slot, g.slot, GENERATION_RECIPE) for g in work.group.generations]
            triples += [(t.content_ref, t.style_ref, t.target, t.recipe) for t in work.group.triplets]
            for c, s, t, recipe in triples:
                if all(slot in work.images for slot in (c, s, t)):
                    views[(gid, c, s, t)] = {"content": f"{gid}/{c}", "style": f"{gid}/{s}", "target": f"{gid}/{t}",
                                             "recipe": recipe}  # fmt: skip
        keys = list(views)
        image_table = {f"{w.group.group_id}/{slot}": arr for w in batch for slot, arr in w.images.items()}
        merged: list[dict[str, float]] = [{} for _ in keys]
        notes: list[dict[str, str]] = [{} for _ in keys]
        failures: list[dict[str, str]] = [{} for _ in keys]  # per view: scorer name -> error
        for scorer in self.scorers:
            results = self._score(scorer, [views[k] for k in keys], image_table, merged, failures)
            for n, result in enumerate(results):
                merged[n].update({f"{scorer.name}.{k}": float(v) for k, v in result.scores.items()})
                notes[n].update({f"{scorer.name}.{k}": v for k, v in result.notes.items()})
        by_view = {k: (merged[n], notes[n], failures[n]) for n, k in enumerate(keys)}
        for work in batch:
            gid = work.group.group_id
            for gen in work.group.generations:
                found = by_view.get((gid, gen.content_slot, gen.style_slot, gen.slot))
                if found:
                    work.generation_scores[gen.slot] = found[0]
            for triplet in work.group.triplets:
                found = by_view.get((gid, triplet.content_ref, triplet.style_ref, triplet.target))
                if found:
                    scores, view_notes, view_failures = found
                    work.triplet_scores[triplet.key] = scores
                    work.annotations.setdefault(triplet.key, {})["notes"] = view_notes
                    if view_failures:
                        work.annotations[triplet.key]["scorer_errors"] = view_failures
        return batch

    @staticmethod
    def _score(scorer, views, images, prior, failures) -> list[ViewScores]:
        """The scorer on the whole batch; if that raises, view by view, so only the views it cannot score
        fail (with the scorer named), never a guess and never the whole batch for one bad image."""
        try:
            return scorer.score_views(views, images, prior)
        except Exception:  # noqa: BLE001
            pass
        results = []
        for n, view in enumerate(views):
            try:
                results += scorer.score_views([view], images, [prior[n]])
            except Exception as err:  # noqa: BLE001
                failures[n][scorer.name] = _error(err)
                results.append(ViewScores())
        return results


class EncodeStage(Stage):
    """Encode each image a triplet uses, once, and drop the pixels: the writer needs only bytes."""

    def process(self, batch):
        out = self.config.output
        for work in batch:
            used = {s for t in work.group.triplets for s in (t.content_ref, t.style_ref, t.target)}
            for slot in sorted(used & set(work.images)):
                data = images.encode_image(work.images[slot], out.image_format, out.image_quality)
                work.encoded[slot] = data
                work.image_sha256[slot] = hashlib.sha256(data).hexdigest()
            work.images.clear()
        return batch


def build_stages(config: RunConfig) -> list[Stage]:
    """The batch chain of this config, from its declaration (schemas/stages.py), in order."""
    return [backends.import_object(spec.impl)(config, spec.name) for spec in active_stages(config)]


def run_stage(stage: Stage, batch: list[GroupWork]) -> list[GroupWork]:
    """Process a batch and charge each group its share of the stage's time."""
    start = time.perf_counter()
    batch = stage.process(batch)
    share = (time.perf_counter() - start) / max(1, len(batch))
    for work in batch:
        work.timings[stage.name] = work.timings.get(stage.name, 0.0) + share
    return batch

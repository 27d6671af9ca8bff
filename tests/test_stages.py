"""Failure isolation inside the stages: one bad request or image fails alone, never its batch."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import demo_config
from styledistill.pipeline.executor import InlineExecutor
from styledistill.pipeline.planner import Planner
from styledistill.pipeline.stages import GenerateStage, ScoreStage, Stage
from styledistill.pipeline.writer import ShardWriter
from styledistill.schemas import manifest as mf
from styledistill.schemas.records import GroupWork, SourceImage
from styledistill.scoring.base import EmbeddingScorer

POISON = 255  # an all-white image makes the test doubles below raise


def source(label: str, n: int) -> SourceImage:
    sha = f"{label}{n:04d}".encode().hex().ljust(64, "0")
    return SourceImage(f"/data/{label}/{n}.jpg", label, sha, 64, 64)


def planned_batch(tmp_path, photos: int = 2) -> list[GroupWork]:
    config = demo_config(tmp_path, tmp_path / "run", "plan.recipes={rns: 0.5, sns: 0.5}")
    planner = Planner(config, [source("realistic", i) for i in range(photos)],
                      [source("stylized", i) for i in range(4)])
    works = [GroupWork(g) for g in planner.groups()]
    rng = np.random.default_rng(0)
    for work in works:
        for slot in work.group.sources:
            work.images[slot] = rng.integers(0, 200, (32, 32, 3), dtype=np.uint8)
    return works


class PoisonSensitiveScorer(EmbeddingScorer):
    name = "fragile"

    def setup(self):
        pass

    def embed(self, images):
        if any((image == POISON).all() for image in images):
            raise ValueError("cannot score a blank image")
        return [float(image.mean()) for image in images]

    def compare(self, features):
        return {"mean_gap": abs(features["content"] - features["target"])}


def test_a_scorer_failing_on_one_image_fails_only_the_views_that_use_it(tmp_path):
    works = planned_batch(tmp_path)
    stage = ScoreStage(demo_config(tmp_path, tmp_path / "run"))
    stage.backends = [PoisonSensitiveScorer({})]
    bad, good = works
    for work in works:
        for gen in work.group.generations:
            work.images[gen.slot] = np.full((32, 32, 3), 9, np.uint8)
    poisoned = bad.group.generations[0].slot
    bad.images[poisoned] = np.full((32, 32, 3), POISON, np.uint8)
    stage.process(works)

    for triplet in good.group.triplets:
        assert "fragile.mean_gap" in good.triplet_scores[triplet.key]
        assert "scorer_errors" not in good.annotations[triplet.key]
    for triplet in bad.group.triplets:
        uses_poison = poisoned in (triplet.content_ref, triplet.style_ref, triplet.target)
        errors = bad.annotations[triplet.key].get("scorer_errors", {})
        assert bool(errors) == uses_poison, triplet
        if uses_poison:
            assert errors == {"fragile": "ValueError: cannot score a blank image"}
        else:
            assert "fragile.mean_gap" in bad.triplet_scores[triplet.key]


class CrashingStage(Stage):
    def process(self, batch):
        raise MemoryError("out of memory")


def test_inline_batch_crash_becomes_failed_rows(tmp_path, sample_data):
    import pandas as pd

    config = demo_config(sample_data, tmp_path / "run", "plan.max_photos=1")
    planner = Planner(config, [source("realistic", i) for i in range(2)], [source("stylized", i) for i in range(4)])
    executor = InlineExecutor(config, [CrashingStage(config, "score")])
    executor.start()
    executor.run(planner.groups(), lambda shard: False, lambda result: None,
                 lambda models: ShardWriter(config, str(tmp_path / "run"), {}))
    rows = pd.read_parquet(tmp_path / "run" / mf.SHARDS_DIR / "styledistill-000000.parquet")
    assert len(rows) == 4 and (rows.status == mf.FAILED).all()
    assert (rows.error == "batch failed in stage score: MemoryError: out of memory").all()



class PoisonSensitiveGenerator:
    """With `raises`, a bad request fails the whole call (the stage must then retry one by one); without,
    it is reported in the results, as the real backends do."""

    def __init__(self, raises: bool):
        self.raises, self.calls = raises, 0

    def generate(self, requests):
        self.calls += 1
        bad = [(r.content == POISON).all() for r in requests]
        if self.raises and any(bad):
            raise ValueError("blank content")
        return [ValueError("blank content") if b else np.full_like(r.content, 7) for r, b in zip(requests, bad)]


@pytest.mark.parametrize("raises", [True, False])
def test_a_failing_generation_fails_only_its_output(tmp_path, raises):
    works = planned_batch(tmp_path)
    stage = GenerateStage(demo_config(tmp_path, tmp_path / "run", "stages.generate.batch_size=8"))
    stage.backends = [PoisonSensitiveGenerator(raises)]
    bad, good = works
    bad.images["c"] = np.full((32, 32, 3), POISON, np.uint8)
    stage.process(works)
    requests = sum(len(w.group.generations) for w in works)
    # Reported per request: one call, the good requests are not generated again.
    assert stage.generator.calls == (1 + requests if raises else 1)
    assert all(gen.slot in good.images for gen in good.group.generations)
    for gen in bad.group.generations:
        assert gen.slot not in bad.images
        assert bad.errors[gen.slot] == f"{gen.slot}: generation failed: ValueError: blank content"

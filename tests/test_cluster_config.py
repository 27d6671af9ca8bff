"""The shipped cluster configuration validates, down to every backend's options (no weights are loaded)."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest

import styledistill
from styledistill import backends
from styledistill.schemas.config import load_config
from styledistill.scoring.nsfw import NSFWScorer

CLUSTER_YAML = Path(styledistill.__file__).parent / "configs" / "cluster.yaml"


def test_cluster_config_validates_with_every_backend():
    config = load_config(CLUSTER_YAML)
    # Backend constructors validate their options without loading weights.
    backends.build("generator", config.generator)
    for spec in config.scorers:
        backends.build("scorer", spec)
    backends.build("enhancer", config.enhancer)
    backends.build("labeler", config.labeler)

    assert [s.backend for s in config.scorers] == ["clip", "csd", "dino", "nsfw", "judge"]
    assert config.scorers[-1].options["route"]["score"] == "clip.content_cos"  # routes on an earlier scorer
    assert config.resolution.content_min_edge == 1024 and config.resolution.style_edge == 1024
    assert config.prompt.append_enhanced and any(pool.label == "classify" for pool in config.sources)
    [stylized] = [rule for rule in config.filters.rules if rule.score == "clip.target_stylized_prob"]
    assert stylized.per_recipe == {"rns": {"min": 0.5}, "sns": {"min": 0.5}, "snr": {"max": 0.5},
                                   "rnr": {"max": 0.5}}
    # The GPU stages fill the two 8-GPU nodes the comments size them for, and nothing else asks for a GPU.
    stages = config.stages
    gpus = {name: getattr(stages, name).num_gpus * getattr(stages, name).concurrency
            for name in ("load", "generate", "enhance", "score", "encode", "write")}
    assert gpus == {"load": 0, "generate": 14, "enhance": 0, "score": 2, "encode": 0, "write": 0}


def test_nsfw_can_stay_on_the_cpu_inside_a_gpu_actor():
    if "CUDAExecutionProvider" not in ort.get_available_providers():  # the CPU build, as in many GPU images
        with pytest.raises(RuntimeError, match="no CUDA provider"):
            NSFWScorer({}, device="cuda").setup()
    scorer = NSFWScorer({"device": "cpu"}, device="cuda")
    scorer.setup()
    assert scorer.model_info()["nsfw_providers"] == "CPUExecutionProvider"


def test_cluster_style_reference_keeps_the_whole_image_like_v1():
    import numpy as np

    from styledistill.pipeline.images import prepare_style

    config = load_config(CLUSTER_YAML)
    assert config.resolution.style_mode == "resize"
    # A 2:1 painting: left half black, right half white. V1 squashes it to the square, keeping both halves;
    # a centre crop would keep only the middle.
    wide = np.zeros((512, 1024, 3), dtype=np.uint8)
    wide[:, 512:] = 255
    style = prepare_style(wide, config.resolution)
    assert style.shape == (1024, 1024, 3)
    assert style[:, :400].max() < 10 and style[:, -400:].min() > 245  # both halves, each half the width
    cropped = prepare_style(wide, config.resolution.model_copy(update={"style_mode": "square"}))
    assert cropped[:, :400].mean() < 10 and cropped[:, -400:].mean() > 245  # the crop keeps only the middle
    assert cropped.shape == (1024, 1024, 3)


# Scores of triplets that are valid by construction, as the scorers would give them. SnR: content ref r_i
# (stylized), style ref p and target c both photos, so the target is closer to the style ref than to the
# content in CLIP/DINO space; RnR: content ref == target.
VALID_BY_CONSTRUCTION = {
    "rns": {"clip.content_cos": 0.8, "clip.leakage": -0.1, "dino.leakage": -0.1,
            "clip.target_stylized_prob": 0.9, "csd.style_cos": 0.55, "csd.style_gain": 0.2,
            "clip.aesthetic": 5.5, "nsfw.prob": 0.01},
    "sns": {"clip.content_cos": 0.8, "clip.leakage": -0.05, "dino.leakage": -0.05,
            "clip.target_stylized_prob": 0.9, "csd.style_cos": 0.5, "csd.style_gain": 0.1,
            "clip.aesthetic": 5.0, "nsfw.prob": 0.01},
    "snr": {"clip.content_cos": 0.8, "clip.leakage": 0.08, "dino.leakage": 0.05,
            "clip.target_stylized_prob": 0.05, "csd.style_cos": 0.2, "csd.style_gain": -0.3,
            "clip.aesthetic": 4.0, "nsfw.prob": 0.01},
    "rnr": {"clip.content_cos": 1.0, "clip.leakage": -0.4, "dino.leakage": -0.5,
            "clip.target_stylized_prob": 0.05, "csd.style_cos": 0.2, "csd.style_gain": -0.6,
            "clip.aesthetic": 4.0, "nsfw.prob": 0.01},
}  # fmt: skip


@pytest.mark.parametrize("recipe", sorted(VALID_BY_CONSTRUCTION))
def test_no_cluster_rule_rejects_a_recipe_by_construction(recipe):
    from styledistill.filters.decide import rule_reasons

    def failing_rules(rules, recipe, scores):
        return [r.text for r in rule_reasons(rules, "rules", recipe, scores)]

    rules = load_config(CLUSTER_YAML).filters.rules
    scores = VALID_BY_CONSTRUCTION[recipe]
    assert failing_rules(rules, recipe, scores) == []
    # Judged SnR: the judge may well see "objects of image 2" in a photo target; that is no leakage there.
    judged = {**scores, "judge.answered": 1.0, "judge.overall": 7.0, "judge.leakage": 1.0}
    failing = failing_rules(rules, recipe, judged)
    assert bool(failing) == (recipe in ("rns", "sns")) and all("judge.leakage" in r for r in failing)
    # The leakage rules still apply where they mean something.
    if recipe in ("rns", "sns"):
        leaking = {**scores, "clip.leakage": 0.05}
        assert any("clip.leakage" in r for r in failing_rules(rules, recipe, leaking))

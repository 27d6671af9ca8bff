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

"""One test battery every registered backend runs, as diffusers runs one over every pipeline.

A backend gets these tests by registering (styledistill/backends.py) and adding how to build a test instance
to `SCORER_OPTIONS` / `GENERATOR_OPTIONS` below (a registered backend without an entry fails the first test).
Embedded backends run with their real weights; the big ones with tiny random models (see tiny_vision.py,
tiny_qwen.py) and the judge against a scripted local endpoint: these check the contract, not quality.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import model_libraries_after
from fake_openai import ScriptedServer, always
from styledistill import backends
from styledistill.generation.base import GenerationRequest
from styledistill.pipeline.stages import ScoreStage
from tiny_vision import TINY_CLIP, TINY_CSD

JUDGE_ANSWER = '{"style_consistency": 7, "content_preservation": 6, "image_quality": 8, "content_leakage": false}'

# backend name -> options, from the fixtures' paths (`models`)
SCORER_OPTIONS = {
    "effnet": lambda m: {},
    "edges": lambda m: {},
    "magenta": lambda m: {},
    "gram": lambda m: {},
    "noop": lambda m: {},
    "nsfw": lambda m: {},
    "clip": lambda m: {"model": "ViT-L-14", "pretrained": m["clip"], "model_cfg": TINY_CLIP, "batch_size": 2},
    "csd": lambda m: {"weights": m["csd"], "batch_size": 2, **TINY_CSD},
    "dino": lambda m: {"model": m["dino"], "batch_size": 2},
    "judge": lambda m: {"vlm": {"backend": "openai", "base_url": m["judge"], "model": "judge", "backoff_s": 0}},
}
GENERATOR_OPTIONS = {
    "magenta": lambda m: {},
    "telestyle": lambda m: {"model": m["qwen"], "condition_image_size": 28},
    "benchmark_sleep": lambda m: {"latency_s": 0.01},
}


@pytest.fixture(scope="module")
def judge_server():
    with ScriptedServer(always(JUDGE_ANSWER)) as server:
        yield server


@pytest.fixture(scope="module")
def models(tiny_clip_weights, tiny_csd_weights, tiny_dino_dir, tiny_qwen_pipeline, judge_server) -> dict:
    return {"clip": tiny_clip_weights, "csd": tiny_csd_weights, "dino": tiny_dino_dir,
            "qwen": str(tiny_qwen_pipeline), "judge": judge_server.base_url}


def image(seed: int, shape=(48, 64, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


IMAGES = {"a": image(0), "b": image(1, (64, 40, 3)), "c": image(2), "d": image(3, (32, 32, 3)),
          "bad": np.zeros((0, 0, 3), np.uint8)}
VIEWS = [{"content": "a", "style": "b", "target": "c", "recipe": "rns"},
         {"content": "a", "style": "d", "target": "b", "recipe": "snr"},
         {"content": "c", "style": "b", "target": "d", "recipe": "sns"}]


def test_every_registered_backend_is_in_the_battery():
    assert set(backends.SCORERS) == set(SCORER_OPTIONS)
    assert set(backends.GENERATORS) == set(GENERATOR_OPTIONS)


def test_backends_import_no_model_library_before_setup():
    """Every registered backend's class imports, and its options validate, without torch, diffusers, open_clip or
    onnxruntime: the driver checks options (while Ray starts) and only the actors load models. Model code goes
    in a module the backend imports in `setup` (as effnet.py, clip_model.py, telestyle_pipeline.py)."""
    assert model_libraries_after(
        "from styledistill import backends\n"
        "for kind, table in backends.TABLES.items():\n"
        "    for name in table:\n"
        "        backends.backend_class(kind, name)"
    ) == []


def _set_up(kind: str, name: str, models: dict):
    """The registered backend `name`, built from its battery options and set up (weights loaded)."""
    options = (SCORER_OPTIONS if kind == "scorer" else GENERATOR_OPTIONS)[name](models)
    built = backends.build(kind, backends.ModelSpec(backend=name, options=options))
    built.setup()
    return built


@pytest.fixture(scope="module", params=sorted(SCORER_OPTIONS))
def scorer(request, models):
    return _set_up("scorer", request.param, models)


@pytest.mark.parametrize("name", sorted(SCORER_OPTIONS))
def test_scorer_registry_key_is_its_score_prefix(name):
    cls = backends.backend_class("scorer", name)
    assert cls.name == name and cls.kind == "scorer" and cls.scores


# Weights are read in setup(), never in the constructor: options naming paths that do not exist build.
NOWHERE = {"clip": "/nonexistent/clip.pt", "csd": "/nonexistent/csd.bin", "dino": "/nonexistent/dino",
           "qwen": "/nonexistent/qwen", "judge": "http://127.0.0.1:9/v1"}


@pytest.mark.parametrize("name", sorted(SCORER_OPTIONS))
def test_scorer_options_are_validated_before_any_weights_load(name):
    options = SCORER_OPTIONS[name](NOWHERE)
    backends.build("scorer", backends.ModelSpec(backend=name, options=options))
    with pytest.raises(ValueError, match=f"^scorer {name} option no_such_option: "):
        backends.build("scorer", backends.ModelSpec(backend=name, options={**options, "no_such_option": 1}))


def test_scorer_writes_exactly_its_declared_finite_scores(scorer):
    results = scorer.score_views(VIEWS, IMAGES, [{} for _ in VIEWS])
    assert len(results) == len(VIEWS)
    for result in results:
        assert set(result.scores) == set(scorer.declared_scores())
        assert all(isinstance(v, float) and math.isfinite(v) for v in result.scores.values()), result.scores


def test_scorer_is_deterministic(scorer):
    first = [r.scores for r in scorer.score_views(VIEWS, IMAGES, [{} for _ in VIEWS])]
    again = [r.scores for r in scorer.score_views(VIEWS[::-1], IMAGES, [{} for _ in VIEWS])][::-1]
    assert first == pytest.approx(again, rel=1e-5, abs=1e-6)


def test_one_bad_view_fails_alone(scorer):
    views = [VIEWS[0], {**VIEWS[1], "target": "bad"}, VIEWS[2]]
    prior = [{} for _ in views]
    failures = [{} for _ in views]
    results = ScoreStage._score(scorer, views, IMAGES, prior, failures)
    assert set(results[0].scores) == set(results[2].scores) == set(scorer.declared_scores())
    assert failures[0] == failures[2] == {}
    if failures[1]:
        assert scorer.name in failures[1] and not results[1].scores
    else:  # the VLM judge answers per request: an unusable view is `answered` 0 with the error noted
        assert results[1].scores == {"answered": 0.0} and results[1].notes["judge_error"]


@pytest.fixture(scope="module", params=sorted(GENERATOR_OPTIONS))
def generator(request, models):
    return _set_up("generator", request.param, models)


@pytest.mark.parametrize("name", sorted(GENERATOR_OPTIONS))
def test_generator_options_are_validated_before_any_weights_load(name):
    cls = backends.backend_class("generator", name)
    assert cls.name == name and cls.kind == "generator"
    options = GENERATOR_OPTIONS[name](NOWHERE)
    backends.build("generator", backends.ModelSpec(backend=name, options=options))
    with pytest.raises(ValueError, match=f"^generator {name} option no_such_option: "):
        backends.build("generator", backends.ModelSpec(backend=name, options={**options, "no_such_option": 1}))


def _requests() -> list[GenerationRequest]:
    return [GenerationRequest(image(5, (32, 48, 3)), image(6, (32, 32, 3)), seed=1, prompt="style transfer"),
            GenerationRequest(image(7, (48, 32, 3)), image(8, (32, 32, 3)), seed=2, prompt="style transfer")]


def test_generator_returns_content_sized_uint8_images_deterministically(generator):
    requests = _requests()
    first = generator.generate(requests)
    assert [out.shape for out in first] == [r.content.shape for r in requests]
    assert all(out.dtype == np.uint8 for out in first)
    again = generator.generate(requests[::-1])[::-1]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert generator.model_info()


def test_generator_one_bad_request_fails_alone(generator):
    good = _requests()[0]
    bad = GenerationRequest(np.zeros((0, 0, 3), np.uint8), good.style, seed=1, prompt="style transfer")
    outputs = generator.generate([good, bad])
    assert isinstance(outputs[1], Exception)
    assert isinstance(outputs[0], np.ndarray) and outputs[0].shape == good.content.shape

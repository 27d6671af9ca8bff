"""The embedded default models with their real weights, on CPU, on small skimage photos."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from skimage import data, filters, transform

from styledistill.generation.base import GenerationRequest
from styledistill.generation.magenta import MagentaGenerator
from styledistill.scoring.content import EdgeStructureScorer, EffNetContentScorer
from styledistill.scoring.detectors import NoOpScorer
from styledistill.scoring.effnet import EfficientNetLite0, convert_state_dict
from styledistill.scoring.nsfw import NSFWScorer
from styledistill.scoring.style import GramStyleScorer, MagentaStyleScorer

IMAGENET_CAT_IDS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _sized(image: np.ndarray, long_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = long_side / max(h, w)
    resized = transform.resize(image, (round(h * scale), round(w * scale)), anti_aliasing=True)
    return (resized * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {name: _sized(getattr(data, name)(), 192) for name in ("astronaut", "chelsea", "coffee", "rocket")}


@pytest.fixture(scope="module")
def generator() -> MagentaGenerator:
    gen = MagentaGenerator({}, threads=1)
    gen.setup()
    return gen


@pytest.fixture(scope="module")
def images(photos, generator) -> dict[str, np.ndarray]:
    """The photos plus two stylised outputs and a mildly blurred copy, addressed by id as the pipeline does."""
    out = dict(photos)
    out["astronaut_as_coffee"], out["chelsea_as_rocket"] = generator.generate(
        [
            GenerationRequest(photos["astronaut"], photos["coffee"], seed=0, prompt=""),
            GenerationRequest(photos["chelsea"], photos["rocket"], seed=0, prompt=""),
        ]
    )
    blurred = filters.gaussian(photos["chelsea"], sigma=1.0, channel_axis=-1)
    out["chelsea_blurred"] = (blurred * 255).round().astype(np.uint8)
    return out


def _score(scorer, images, views):
    return [result.scores for result in scorer.score_views(views, images, [{} for _ in views])]


# --- generator --------------------------------------------------------------------------------------------


def test_magenta_output_is_content_sized_deterministic_and_styled(photos, generator):
    content = photos["astronaut"][:, :150]  # a non-square content image
    request = GenerationRequest(content, photos["coffee"], seed=1, prompt="ignored")
    first, second = generator.generate([request, request])
    assert first.shape == content.shape and first.dtype == np.uint8
    assert first.tobytes() == second.tobytes()

    # A fresh instance (a resumed run in a new actor) reproduces the bytes, and the seed has no effect.
    fresh = MagentaGenerator({}, threads=1)
    fresh.setup()
    (again,) = fresh.generate([GenerationRequest(content, photos["coffee"], seed=99, prompt="")])
    assert again.tobytes() == first.tobytes()

    assert np.abs(first.astype(int) - content).mean() > 10  # style was applied
    (other_style,) = generator.generate([GenerationRequest(content, photos["rocket"], seed=1, prompt="")])
    assert np.abs(other_style.astype(int) - first).mean() > 5  # and it depends on the style image


def test_magenta_strength_and_model_info(photos, generator):
    weak = MagentaGenerator({"strength": 0.3})
    weak.setup()
    request = GenerationRequest(photos["astronaut"], photos["coffee"], seed=0, prompt="")
    (full,) = generator.generate([request])
    (partial,) = weak.generate([request])
    content = photos["astronaut"].astype(int)
    assert np.abs(partial.astype(int) - content).mean() < np.abs(full.astype(int) - content).mean()

    info = generator.model_info()
    assert info["backend"] == "magenta" and "deterministic" in info["seed"]
    assert all(len(info[f"sha256:{n}"]) == 16 for n in ("arbitrary_predict.onnx", "arbitrary_transform.onnx"))
    with pytest.raises(ValueError, match="strength"):
        MagentaGenerator({"strength": 1.5})


# --- EfficientNet-Lite0 -----------------------------------------------------------------------------------


def test_effnet_weights_are_real_imagenet_weights(photos):
    net = EfficientNetLite0(threads=1)
    logits = net.logits([photos["chelsea"], photos["coffee"]])
    assert int(logits[0].argmax()) in IMAGENET_CAT_IDS
    assert int(logits[1].argmax()) in (967, 968)  # espresso, cup
    features = net.pooled([photos["chelsea"]])
    assert features.shape == (1, 1280) and np.isclose(np.linalg.norm(features[0]), 1.0, atol=1e-5)


def test_effnet_key_mapping_fails_loudly_on_a_foreign_checkpoint():
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    source = {
        "_conv_stem.weight": torch.zeros(32, 3, 3, 3),
        "_blocks.1._expand_conv.weight": torch.zeros(96, 16, 1, 1),
    }
    with pytest.raises(KeyError, match="lacks"):  # a partial checkpoint
        convert_state_dict(source, model)
    with pytest.raises(ValueError, match="shape"):
        convert_state_dict({"_blocks.1._expand_conv.weight": torch.zeros(96, 24, 1, 1)}, model)
    with pytest.raises(KeyError, match="unexpected"):
        convert_state_dict({"_blocks.1._se_reduce.weight": torch.zeros(4, 96, 1, 1)}, model)


# --- scorers ----------------------------------------------------------------------------------------------


def test_content_scorer_cosine_and_leakage(images):
    scorer = EffNetContentScorer({"batch_size": 2}, threads=1)
    scorer.setup()
    blurred, unrelated, leaked = _score(
        scorer,
        images,
        [
            {"content": "chelsea", "style": "coffee", "target": "chelsea_blurred"},
            {"content": "chelsea", "style": "coffee", "target": "rocket"},
            {"content": "chelsea", "style": "coffee", "target": "coffee"},  # the target is the style reference
        ],
    )
    assert blurred["content_cos"] > unrelated["content_cos"] + 0.3
    assert leaked["leakage"] > 0 > blurred["leakage"]


def test_edge_ssim_is_one_for_a_copy_and_lower_for_a_stylised_output(images):
    scorer = EdgeStructureScorer({}, threads=1)
    scorer.setup()
    copy, styled, unrelated = _score(
        scorer,
        images,
        [
            {"content": "astronaut", "style": "coffee", "target": "astronaut"},
            {"content": "astronaut", "style": "coffee", "target": "astronaut_as_coffee"},
            {"content": "astronaut", "style": "coffee", "target": "rocket"},
        ],
    )
    assert copy["ssim"] == pytest.approx(1.0)
    assert 1.0 > styled["ssim"] > unrelated["ssim"]


def test_style_scorers_prefer_the_style_reference(images):
    views = [
        {"content": "astronaut", "style": "coffee", "target": "astronaut_as_coffee"},
        {"content": "chelsea", "style": "rocket", "target": "chelsea_as_rocket"},
        {"content": "astronaut", "style": "coffee", "target": "astronaut"},  # style not applied
    ]
    magenta = MagentaStyleScorer({}, threads=1)
    magenta.setup()
    gram = GramStyleScorer({"size": 128}, threads=1)
    gram.setup()
    for scores in (_score(magenta, images, views), _score(gram, images, views)):
        assert scores[0]["style_gain"] > 0 and scores[1]["style_gain"] > 0
        assert scores[2]["style_gain"] < 0
    same = _score(gram, images, [{"content": "chelsea", "style": "coffee", "target": "coffee"}])[0]
    assert same["distance"] == pytest.approx(0.0, abs=1e-9)


def test_noop_detects_unchanged_outputs(images):
    scorer = NoOpScorer({}, threads=1)
    scorer.setup()
    unchanged, styled = _score(
        scorer,
        images,
        [
            {"content": "astronaut", "style": "coffee", "target": "astronaut"},
            {"content": "astronaut", "style": "coffee", "target": "astronaut_as_coffee"},
        ],
    )
    assert unchanged["pixel_diff"] == pytest.approx(0.0, abs=1e-9)
    assert styled["pixel_diff"] > 0.05


def test_nsfw_probability_is_low_on_benign_photos_and_follows_the_target(images):
    """No image that the model *should* flag can be made honestly here, so: every benign photo and stylised
    output scores low, yet the scores are the model's own (they differ across targets by far more than noise,
    so neither a constant nor an always-0 scorer passes), and only the target is read."""
    scorer = NSFWScorer({}, threads=1)
    scorer.setup()
    targets = sorted(images)  # 4 photos, 2 stylised outputs, a blurred photo
    scores = [s["prob"] for s in _score(scorer, images,
                                        [{"content": "chelsea", "style": "coffee", "target": t} for t in targets])]
    assert all(0.0 <= p < 0.2 for p in scores), dict(zip(targets, scores))
    assert len({round(p, 6) for p in scores}) >= 4 and max(scores) - min(scores) > 1e-3, dict(zip(targets, scores))
    assert max(scores) > 0.0
    # Another content and style around the same targets: the same scores (the target alone is scored).
    swapped = [s["prob"] for s in _score(scorer, images,
                                         [{"content": "rocket", "style": "astronaut", "target": t} for t in targets])]
    assert swapped == pytest.approx(scores, abs=1e-6)
    assert scorer.model_info()["sha256:open-nsfw.onnx"]


def test_embedding_scorer_embeds_each_distinct_image_once(images):
    class CountingContentScorer(EffNetContentScorer):
        def embed(self, batch):
            self.embedded.append(len(batch))
            return super().embed(batch)

    scorer = CountingContentScorer({}, threads=1)
    scorer.setup()
    scorer.embedded = []
    # Six views over five distinct images: content and style are shared by all, targets by two each.
    targets = ["astronaut_as_coffee", "chelsea", "astronaut_as_coffee", "rocket", "chelsea", "rocket"]
    views = [{"content": "astronaut", "style": "coffee", "target": t} for t in targets]
    scores = _score(scorer, images, views)
    assert scorer.embedded == [5]
    assert scores[0] == scores[2] and scores[1] == scores[4]
    # The same view scored alone gives the same numbers as inside the shared batch.
    alone = _score(scorer, images, views[:1])[0]
    assert alone["content_cos"] == pytest.approx(scores[0]["content_cos"], abs=1e-5)

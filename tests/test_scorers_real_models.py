"""CLIP, CSD and DINOv2 scorers on tiny randomly initialised models (conftest builds CLIP and DINOv2).

The models are random: these tests check loading, batching, wiring and the score arithmetic, never that a
score means anything. Every test runs with outgoing connections blocked, so any hidden hub access fails.
"""

from __future__ import annotations

import shutil
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from open_clip.transformer import QuickGELU
from PIL import Image
from safetensors.torch import save_file

from styledistill.scoring.clip import ClipLabeler, ClipScorer, label_for
from styledistill.scoring.clip_model import AestheticMLP, stylized_probability
from styledistill.scoring.csd import CSDScorer
from styledistill.scoring.dino import DinoScorer
from tiny_vision import TINY_CLIP, TINY_CSD, tiny_csd_state, write_csd_checkpoint

@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def image(seed: int, shape=(40, 52, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def clip_options(weights: str, **extra) -> dict:
    return {"model": "ViT-L-14", "pretrained": weights, "model_cfg": TINY_CLIP, "batch_size": 2, **extra}


@pytest.fixture(scope="module")
def csd_state() -> dict[str, torch.Tensor]:
    return tiny_csd_state()


@pytest.fixture(scope="module")
def csd_weights(tiny_csd_weights) -> str:
    return tiny_csd_weights


def fake_hf_cache(cache, repo_id: str):
    """The Hugging Face cache layout: refs/main names the snapshot folder that holds the files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


def build(kind: str, tiny_clip_weights: str, csd_weights: str, tiny_dino_dir: str, dtype: str = "float32"):
    if kind == "clip":
        scorer = ClipScorer(clip_options(tiny_clip_weights, dtype=dtype))
    elif kind == "csd":
        scorer = CSDScorer({"weights": csd_weights, "batch_size": 2, "dtype": dtype, **TINY_CSD})
    else:
        scorer = DinoScorer({"model": tiny_dino_dir, "batch_size": 2, "dtype": dtype})
    scorer.setup()
    return scorer


# --- shared behaviour ------------------------------------------------------------------------------------


SCORE_KEYS = {
    "clip": {"content_cos", "leakage", "target_stylized_prob"},
    "csd": {"style_cos", "style_gain"},
    "dino": {"content_cos", "leakage"},
}


@pytest.mark.parametrize("kind", ["clip", "csd", "dino"])
def test_scores_and_embedding_shapes(kind, tiny_clip_weights, csd_weights, tiny_dino_dir):
    scorer = build(kind, tiny_clip_weights, csd_weights, tiny_dino_dir)
    images = {"c": image(0), "s": image(1, (64, 48, 3)), "t": image(2)}
    features = scorer.embed([images["c"], images["s"]])
    assert len(features) == 2
    vector = features[0].embedding if kind == "clip" else features[0]
    assert vector.shape == ({"clip": 16, "csd": 8, "dino": 32}[kind],)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)

    views = [{"content": "c", "style": "s", "target": "t"}, {"content": "t", "style": "s", "target": "t"}]
    first, identical = scorer.score_views(views, images, [{}, {}])
    assert set(first.scores) == SCORE_KEYS[kind]
    assert all(np.isfinite(value) for value in first.scores.values())
    # Target == content: the content similarity is 1 and a "leak" can only be <= 0.
    similarity, leak = {"clip": ("content_cos", "leakage"), "dino": ("content_cos", "leakage")}.get(
        kind, (None, "style_gain")
    )
    if similarity:
        assert identical.scores[similarity] == pytest.approx(1.0, abs=1e-5)
    assert identical.scores[leak] <= 1e-6


@pytest.mark.parametrize("kind", ["clip", "csd", "dino"])
def test_each_distinct_image_embedded_once_in_batches(kind, tiny_clip_weights, csd_weights, tiny_dino_dir):
    scorer = build(kind, tiny_clip_weights, csd_weights, tiny_dino_dir)
    # Patch the model call that sees pixels, to count the images that reach it and how they are batched.
    if kind == "clip":
        owner, attribute = scorer.clip.model, "encode_image"
    elif kind == "csd":
        owner, attribute = scorer.encoder.model, "style_embedding"
    else:
        owner, attribute = scorer.model, "forward"
    original = getattr(owner, attribute)
    batch_sizes = []

    def counting(*args, **kwargs):
        pixels = args[0] if args else kwargs["pixel_values"]
        batch_sizes.append(pixels.shape[0])
        return original(*args, **kwargs)

    setattr(owner, attribute, counting)
    images = {name: image(seed) for seed, name in enumerate("abcde")}
    views = [
        {"content": "a", "style": "b", "target": "c"},
        {"content": "a", "style": "d", "target": "e"},
        {"content": "c", "style": "b", "target": "a"},
    ]
    scores = scorer.score_views(views, images, [{}] * 3)
    assert len(scores) == 3
    assert batch_sizes == [2, 2, 1]  # 5 distinct images, batch_size 2, each embedded once


@pytest.mark.parametrize("kind", ["clip", "csd", "dino"])
def test_bfloat16_embeddings_match_float32(kind, tiny_clip_weights, csd_weights, tiny_dino_dir):
    full = build(kind, tiny_clip_weights, csd_weights, tiny_dino_dir)
    half = build(kind, tiny_clip_weights, csd_weights, tiny_dino_dir, dtype="bfloat16")
    pictures = [image(0), image(1)]
    for a, b in zip(full.embed(pictures), half.embed(pictures)):
        a, b = (a.embedding, b.embedding) if kind == "clip" else (a, b)
        assert b.dtype == np.float32
        assert float(a @ b) > 0.98


# --- CLIP --------------------------------------------------------------------------------------------------


def test_clip_aesthetic_uses_the_public_checkpoint_layout(tmp_path, tiny_clip_weights):
    torch.manual_seed(3)
    mlp = AestheticMLP(input_size=16)
    assert set(mlp.state_dict()) == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    torch.save(mlp.state_dict(), tmp_path / "aesthetic.pth")
    scorer = ClipScorer(clip_options(tiny_clip_weights, aesthetic_weights=str(tmp_path / "aesthetic.pth")))
    scorer.setup()

    images = {"c": image(0), "s": image(1), "t": image(2)}
    [scores] = scorer.score_views([{"content": "c", "style": "s", "target": "t"}], images, [{}])
    with torch.no_grad():
        expected = mlp.eval()(scorer.clip.encode_images([images["t"]]))
    assert scores.scores["aesthetic"] == pytest.approx(float(expected[0]), abs=1e-5)
    assert "aesthetic_weights_sha256" in scorer.model_info()


def test_clip_aesthetic_rejects_an_mlp_for_another_embedding_size(tmp_path, tiny_clip_weights):
    torch.save(AestheticMLP(input_size=768).state_dict(), tmp_path / "l14.pth")
    scorer = ClipScorer(clip_options(tiny_clip_weights, aesthetic_weights=str(tmp_path / "l14.pth")))
    with pytest.raises(ValueError, match="l14.pth"):
        scorer.setup()


def test_stylized_probability_with_fixed_embeddings():
    realistic, stylized = torch.eye(4)[0], torch.eye(4)[1]
    images = torch.stack([stylized, realistic, F.normalize(realistic + stylized, dim=0)])
    probs = stylized_probability(images, realistic, stylized, logit_scale=100.0)
    assert probs[0] > 0.999 and probs[1] < 0.001
    assert probs[2] == pytest.approx(0.5)


def test_label_for_abstains_inside_the_band():
    band = (0.35, 0.65)
    assert label_for(0.2, band) == "realistic"
    assert label_for(0.9, band) == "stylized"
    assert label_for(0.35, band) is None and label_for(0.5, band) is None and label_for(0.65, band) is None


def test_labeler_with_injected_embeddings(tiny_clip_weights):
    labeler = ClipLabeler(clip_options(tiny_clip_weights, abstain=[0.35, 0.65]))
    labeler.setup()
    assert labeler.clip.realistic_text.shape == (16,)
    # Replace the learned text and image embeddings so the expected labels are known.
    realistic, stylized = torch.eye(16)[0], torch.eye(16)[1]
    labeler.clip.realistic_text, labeler.clip.stylized_text, labeler.clip.logit_scale = realistic, stylized, 10.0
    fixed = torch.stack(
        [
            stylized,  # p = sigmoid(10) -> stylized
            realistic,  # p = sigmoid(-10) -> realistic
            F.normalize(realistic + stylized, dim=0),  # p = 0.5 -> abstain
            F.normalize(realistic + 1.05 * stylized, dim=0),  # p ~ 0.58 -> abstain
        ]
    )
    labeler.clip.encode_images = lambda images: fixed[: len(images)]
    results = labeler.label([image(i) for i in range(4)])
    assert [label for label, _ in results] == ["stylized", "realistic", None, None]
    assert results[2][1] == pytest.approx(0.5)
    assert 0.5 < results[3][1] < 0.65


def test_labeler_rejects_an_inverted_band():
    with pytest.raises(ValueError, match="labeler clip option abstain"):
        ClipLabeler({"abstain": [0.7, 0.3]})


def test_labeler_on_real_pixels_gives_the_sample_images_their_true_labels(tiny_clip_weights, sample_data):
    """The tiny CLIP is random, so its prompt embeddings mean nothing: they are replaced by the embeddings of
    one photo and one stylized image of the sample set, and the labeler, reading those images again from their
    pixels (in batches shared with the other class), must give each its folder's label."""
    labeler = ClipLabeler(clip_options(tiny_clip_weights))  # default band: abstain on 0.35..0.65; batches of 2
    labeler.setup()
    assert labeler.label([]) == []
    for label, prob in labeler.label([image(0), image(1)]):  # the random prompts: a probability, some answer
        assert 0.0 <= prob <= 1.0 and label in ("realistic", "stylized", None)

    truth = {"realistic": sample_data / "realistic" / "chelsea.jpg",
             "stylized": sorted((sample_data / "stylized").glob("*.jpg"))[0]}
    pixels = {label: np.asarray(Image.open(path).convert("RGB")) for label, path in truth.items()}
    with torch.no_grad():
        exemplar = {label: labeler.clip.encode_images([pixels[label]])[0] for label in truth}
    labeler.clip.realistic_text, labeler.clip.stylized_text = exemplar["realistic"], exemplar["stylized"]
    labeler.clip.logit_scale = 100.0  # CLIP's trained value; the random model's is 1/0.07
    order = ["stylized", "realistic", "realistic", "stylized", "realistic"]
    results = labeler.label([pixels[label] for label in order])
    assert [label for label, _ in results] == order
    for expected, (_, prob) in zip(order, results):
        assert prob > 0.65 if expected == "stylized" else prob < 0.35


def test_clip_missing_weights_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "clip.pt"
    scorer = ClipScorer(clip_options(str(missing)))
    with pytest.raises(FileNotFoundError, match=str(missing)):
        scorer.setup()


def test_clip_tag_only_from_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    scorer = ClipScorer({"model": "ViT-L-14", "pretrained": "openai"})
    with pytest.raises(FileNotFoundError, match="timm/vit_large_patch14_clip_224.openai"):
        scorer.setup()


def test_clip_tag_resolves_from_the_cache_with_the_tags_settings(tmp_path, monkeypatch, tiny_clip_weights):
    """open_clip's `openai` tag lives in a timm repo and was trained with QuickGELU; both must be honoured."""
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    snapshot = fake_hf_cache(tmp_path, "timm/vit_large_patch14_clip_224.openai")
    save_file(torch.load(tiny_clip_weights), snapshot / "open_clip_model.safetensors")
    scorer = ClipScorer(clip_options("openai"))
    scorer.setup()
    assert isinstance(scorer.clip.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert scorer.score_views([{"content": "a", "style": "a", "target": "a"}], {"a": image(0)}, [{}])


def test_clip_rejects_open_clip_hub_schemas():
    with pytest.raises(ValueError, match="scorer clip option model"):
        ClipScorer({"model": "hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K"})


# --- CSD ---------------------------------------------------------------------------------------------------


def test_csd_uses_the_style_head_by_name(csd_weights, csd_state):
    scorer = CSDScorer({"weights": csd_weights, **TINY_CSD})
    scorer.setup()
    picture = image(5)
    [embedding] = scorer.embed([picture])

    with torch.no_grad():
        feature = scorer.encoder.model.backbone(scorer.encoder.preprocess(Image.fromarray(picture))[None])
    by_style = F.normalize(feature @ csd_state["last_layer_style"], dim=-1)[0].numpy()
    by_content = F.normalize(feature @ csd_state["last_layer_content"], dim=-1)[0].numpy()
    np.testing.assert_allclose(embedding, by_style, atol=1e-5)
    assert not np.allclose(embedding, by_content, atol=1e-2)


def test_csd_preprocess_is_224_centre_crop(csd_weights):
    scorer = CSDScorer({"weights": csd_weights, **TINY_CSD})
    scorer.setup()
    pixels = scorer.encoder.preprocess(Image.fromarray(image(0, (300, 500, 3))))
    assert pixels.shape == (3, 224, 224)


def test_csd_rejects_missing_and_unexpected_keys(tmp_path, csd_state):
    without_style = {k: v for k, v in csd_state.items() if k != "last_layer_style"}
    write_csd_checkpoint(tmp_path / "broken.bin", {**without_style, "extra_head": torch.zeros(2)})
    scorer = CSDScorer({"weights": str(tmp_path / "broken.bin"), **TINY_CSD})
    with pytest.raises(ValueError, match=r"last_layer_style.*extra_head"):
        scorer.setup()


def test_csd_rejects_unprefixed_keys(tmp_path, csd_state):
    torch.save({"model_state_dict": csd_state}, tmp_path / "plain.bin")
    scorer = CSDScorer({"weights": str(tmp_path / "plain.bin"), **TINY_CSD})
    with pytest.raises(ValueError, match="'module.' prefix"):
        scorer.setup()


def test_csd_rejects_a_tower_of_another_size(csd_weights):
    scorer = CSDScorer({"weights": csd_weights, **{**TINY_CSD, "width": 64, "heads": 4}})
    with pytest.raises(ValueError, match="does not fit the configured tower"):
        scorer.setup()


def test_csd_missing_weights_names_the_path(tmp_path, monkeypatch):
    missing = tmp_path / "csd.bin"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        CSDScorer({"weights": str(missing), **TINY_CSD}).setup()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tomg-group-umd/CSD-ViT-L/pytorch_model.bin"):
        CSDScorer({}).setup()


# --- DINOv2 ------------------------------------------------------------------------------------------------


def test_dino_embedding_is_the_normalised_cls_token(tiny_dino_dir):
    scorer = DinoScorer({"model": tiny_dino_dir})
    scorer.setup()
    picture = image(7)
    [embedding] = scorer.embed([picture])
    with torch.no_grad():
        pixels = scorer.processor(images=[picture], return_tensors="pt")["pixel_values"]
        cls = scorer.model(pixel_values=pixels).last_hidden_state[:, 0]
    np.testing.assert_allclose(embedding, F.normalize(cls, dim=-1)[0].numpy(), atol=1e-5)


def test_dino_missing_directory_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        DinoScorer({"model": str(missing)}).setup()


def test_dino_repo_id_resolves_from_the_offline_cache(tmp_path, monkeypatch, tiny_dino_dir):
    """With HF_HUB_OFFLINE=1 a cached repo id loads and an uncached one fails at once, naming the id."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    shutil.copytree(tiny_dino_dir, fake_hf_cache(tmp_path, "styledistill-test/tiny-dinov2"), dirs_exist_ok=True)

    scorer = DinoScorer({"model": "styledistill-test/tiny-dinov2"})
    scorer.setup()
    assert scorer.embed([image(0)])[0].shape == (32,)

    with pytest.raises(FileNotFoundError, match="styledistill-test/not-cached"):
        DinoScorer({"model": "styledistill-test/not-cached"}).setup()

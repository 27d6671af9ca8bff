"""The real model backends inside the pipeline, end to end, inline: TeleStyle (tiny random Qwen-Image-Edit),
CLIP and DINOv2 (tiny random), and a VLM judge and prompt enhancer behind a scripted OpenAI-compatible server.

The models are random: this checks that the backends are wired into the stages, that their scores, notes and
model ids reach the manifest and the samples, and that routing and the enhanced instruction work; no score
here means anything about quality.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fake_openai import ScriptedServer, endpoint
from sample_images import write_photos, write_stylized
from styledistill.generation.enhancer import CONTENT_INSTRUCTION, STYLE_INSTRUCTION
from styledistill.pipeline.run import run_pipeline
from styledistill.schemas import manifest as mf
from styledistill.schemas.config import V1_INSTRUCTION, parse_config
from styledistill.scoring.vlm_judge import JUDGE_PROMPTS
from tiny_vision import TINY_CLIP

VALID_JUDGEMENT = json.dumps(
    {"style_consistency": 7, "content_preservation": 4, "image_quality": 9, "content_leakage": False}
)
UNPARSEABLE_JUDGEMENT = "The style transfer looks good, I would say 8/10."
CONTENT_WORDS, STYLE_WORDS = "Tabby cat", "Oil painting, thick strokes."


def respond(index: int, body: dict) -> tuple[int, str, float]:
    """Enhancer requests get fixed words; judge requests alternate a valid and an unparseable answer."""
    content = body["messages"][0]["content"]
    text = content[-1]["text"]
    if text == CONTENT_INSTRUCTION:
        return 200, CONTENT_WORDS, 0.0
    if text == STYLE_INSTRUCTION:
        return 200, STYLE_WORDS, 0.0
    assert text in JUDGE_PROMPTS.values() and len(content) == 4  # the question follows the recipe
    return 200, VALID_JUDGEMENT if index % 2 == 0 else UNPARSEABLE_JUDGEMENT, 0.0


@pytest.fixture(scope="module")
def models(tiny_qwen_pipeline, tiny_clip_weights, tiny_dino_dir) -> dict[str, str]:
    return {"generator": str(tiny_qwen_pipeline), "clip": tiny_clip_weights, "dino": tiny_dino_dir}


def pipeline_config(tmp_path: Path, models: dict[str, str], server: ScriptedServer) -> dict:
    return {
        "name": "real-backends",
        "sources": [{"uri": str(tmp_path / "photos"), "label": "realistic"},
                    {"uri": str(tmp_path / "stylized"), "label": "stylized"}],
        "resolution": {"content_max_edge": 64, "multiple_of": 16, "style_mode": "square", "style_edge": 64},
        "plan": {"styles_per_photo": 2, "triplets_per_photo": 4, "samples_per_shard": 8,
                 "recipes": {"rns": 0.4, "sns": 0.2, "snr": 0.2, "rnr": 0.2}},
        "prompt": {"append_enhanced": True},
        "generator": {"backend": "telestyle", "options": {"model": models["generator"], "condition_image_size": 28}},
        "scorers": [
            {"backend": "clip", "options": {"model": "ViT-L-14", "pretrained": models["clip"],
                                            "model_cfg": TINY_CLIP, "batch_size": 8}},
            {"backend": "dino", "options": {"model": models["dino"], "batch_size": 8}},
            # An RnR triplet's target is its content photo, so its clip.content_cos is 1: the band below
            # sends every other view to the judge and never that one.
            {"backend": "judge", "options": {"vlm": endpoint(server),
                                                 "route": {"score": "clip.content_cos", "low": -1.0,
                                                           "high": 0.9999}}},
        ],
        "enhancer": {"backend": "qwen_vl", "options": {"vlm": endpoint(server)}},
        # A missing judgement rejects (RnR is never judged): an unparseable answer never passes as a score.
        "filters": {"rules": [{"score": "judge.overall", "min": 5.0, "recipes": ["rns", "sns", "snr"]}]},
        "output": {"uri": str(tmp_path / "run")},
    }


def read_manifest(run: Path) -> list[dict]:
    rows = []
    for path in sorted((run / mf.SHARDS_DIR).glob("*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return rows


def read_samples(run: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted((run / mf.SHARDS_DIR).glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.mark.slow
def test_real_backends_end_to_end(tmp_path, models):
    write_photos(tmp_path / "photos")
    write_stylized(tmp_path / "stylized")
    with ScriptedServer(respond) as server:
        config = parse_config(pipeline_config(tmp_path, models, server))
        outcome = run_pipeline(config, inline=True, report=False)
    run = tmp_path / "run"
    rows = read_manifest(run)

    # Every planned sample ends with a status; TeleStyle's outputs made it through (nothing failed).
    assert len(rows) == sum(r.planned for r in outcome.written) == 16
    assert {row["status"] for row in rows} == {mf.ACCEPTED, mf.REJECTED}
    for status in (mf.ACCEPTED, mf.REJECTED):
        assert outcome.counts[status] == sum(row["status"] == status for row in rows)

    for name in ("clip.content_cos", "clip.leakage", "clip.target_stylized_prob", "dino.content_cos",
                 "dino.leakage"):
        assert all(np.isfinite(row[f"score.{name}"]) for row in rows), name

    # Routing: RnR views (target = content) never reach the judge; every other view does.
    judged, skipped = [], []
    for row in rows:
        notes = json.loads(row["notes"])
        if row["recipe"] == "rnr":
            assert row["score.clip.content_cos"] == pytest.approx(1.0, abs=1e-4)
            assert notes["notes"]["judge.judge_skipped"].startswith("not routed: clip.content_cos=")
            skipped.append(row)
        else:
            judged.append(row)
    assert skipped and judged

    # A judge answer is either the scripted scores or missing, with the raw text kept; never a guess.
    unparsed = 0
    for row in judged:
        notes = json.loads(row["notes"])["notes"]
        if "judge.judge_raw" in notes:
            unparsed += 1
            assert notes["judge.judge_raw"] == UNPARSEABLE_JUDGEMENT
            assert notes["judge.judge_error"] == "no JSON object in the answer"
            assert all(row[f"score.judge.{k}"] is None for k in ("style", "content", "quality", "overall"))
            assert row["status"] == mf.REJECTED and "judge.overall missing" in row["reasons"]
        else:
            assert (row["score.judge.style"], row["score.judge.content"], row["score.judge.quality"]) == (7, 4, 9)
            assert row["score.judge.overall"] == pytest.approx(6.0)
    assert 0 < unparsed < len(judged)
    assert all(row["score.judge.style"] is None for row in skipped)
    assert all(row["status"] == mf.ACCEPTED for row in skipped)  # the judge rule does not apply to RnR

    # The enhanced words are appended to the instruction in the tar; the models are the tiny ones.
    samples = read_samples(run)
    assert set(samples) == {row["key"] for row in rows if row["status"] == mf.ACCEPTED}
    expected = f"{V1_INSTRUCTION},Tabby cat,Oil painting, thick strokes"  # V2's raw answers, tidied
    for key, sample in samples.items():
        assert sample["txt"].decode() == expected
        meta = json.loads(sample["json"])
        assert meta["prompts"] == {"content_prompt": "Tabby cat", "style_prompt": "Oil painting, thick strokes",
                                   "error": None, "dropped": {}}
        models_meta = meta["models"]
        assert models_meta["generator.telestyle"]["backend"] == "telestyle"
        assert models_meta["generator.telestyle"]["model"] == models["generator"]
        assert models_meta["scorer.clip"]["clip_pretrained"] == models["clip"]
        assert models_meta["scorer.dino"]["dino_model"] == models["dino"]
        assert models_meta["scorer.judge"]["vlm_endpoint"] == server.base_url
        assert models_meta["enhancer.qwen_vl"]["vlm_endpoint"] == server.base_url
        target = Image.open(io.BytesIO(sample["target.png"]))
        assert max(target.size) <= 64 and target.size[0] % 16 == 0 and target.size[1] % 16 == 0

    metrics = json.loads((run / mf.METRICS_FILE).read_text())
    assert {"load", "generate", "enhance", "score", "encode"} <= set(metrics["stages"])


@pytest.mark.slow
def test_classify_pool_is_labelled_by_a_labeler_actor_on_ray(tmp_path, models, local_ray):
    """An unlabelled pool goes through the CLIP labeler (tiny, random: labels here mean nothing) in its
    own Ray actor during the scan; every file of the pool ends labelled, or unlabelled with the reason."""
    from styledistill.pipeline.scan import scan_sources
    from styledistill.pipeline.run import build_labeler, start_ray

    write_photos(tmp_path / "photos")
    write_stylized(tmp_path / "mixed")
    config = parse_config({
        "sources": [{"uri": str(tmp_path / "photos"), "label": "realistic"},
                    {"uri": str(tmp_path / "mixed"), "label": "classify"}],
        "labeler": {"backend": "clip", "options": {"model": "ViT-L-14", "pretrained": models["clip"],
                                                    "model_cfg": TINY_CLIP, "abstain": [0.4999, 0.5001]}},
        "stages": {"label": {"num_cpus": 0.5}},
        "output": {"uri": str(tmp_path / "run")},
    })
    start_ray(config, None)
    labeler = build_labeler(config, inline=False)
    assert type(labeler).__name__ == "RemoteLabeler"
    scan_sources(config, config.output.uri, labeler)
    import pandas as pd

    rows = pd.read_parquet(tmp_path / "run" / mf.SOURCES_FILE)
    mixed = rows[rows.pool == 1]
    assert len(mixed) == 3
    for row in mixed.itertuples():
        assert (row.status == "ok" and row.label in ("realistic", "stylized")) or \
               (row.status == "unlabelled" and "abstained" in row.error)

"""The pipeline/trainer contract: a real (small, inline) pipeline run, read by the trainer's loader."""

from __future__ import annotations

import itertools
import math
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from conftest import demo_config
from styledistill.jobs.train.config import DataConfig, SFTConfig
from styledistill.jobs.train.data import TripletLoader
from styledistill.jobs.train.sft import SFTTrainer
from styledistill.pipeline.run import run_pipeline
from styledistill.schemas import manifest as mf

pytestmark = pytest.mark.slow  # a pipeline run read by the trainer, end to end


@pytest.fixture(scope="module")
def run(sample_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("contract") / "run"
    # Rejects are written too (under rejects/): they are on disk and the trainer must still not see them.
    config = demo_config(sample_data, out, "plan.max_photos=2", "plan.samples_per_shard=4", "output.write_rejects=true")
    run_pipeline(config, inline=True, report=False)
    return out


def _manifest(run: Path) -> pd.DataFrame:
    parts = sorted((run / mf.SHARDS_DIR).glob("*.parquet"))
    return pd.concat([pd.read_parquet(p, columns=["key", "status"]) for p in parts])


def _tar_texts(run: Path) -> dict[str, str]:
    texts = {}
    for path in sorted((run / mf.SHARDS_DIR).glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, name = member.name.split(".", 1)
                if name == mf.TEXT_MEMBER:
                    texts[key] = tar.extractfile(member).read().decode("utf-8")
    return texts


@pytest.mark.parametrize("use_wids", [False, True])
def test_loader_reads_exactly_the_accepted_samples(run, use_wids):
    manifest = _manifest(run)
    accepted = set(manifest.key[manifest.status == mf.ACCEPTED])
    assert accepted and (manifest.status == mf.REJECTED).any()
    assert any((run / mf.REJECTS_DIR).glob("*.tar"))
    texts = _tar_texts(run)
    assert set(texts) == accepted

    loader = TripletLoader(DataConfig(run=str(run), area=100 * 100, shuffle_buffer=0, use_wids=use_wids))
    items = list(itertools.islice(iter(loader), len(accepted)))  # one epoch
    assert sorted(it["key"] for it in items) == sorted(accepted)
    assert loader.skipped == {}
    for item in items:
        for role in (mf.CONTENT_MEMBER, mf.STYLE_MEMBER, mf.TARGET_MEMBER):
            channels, height, width = item[role].shape
            assert channels == 3 and height % 16 == 0 and width % 16 == 0, (item["key"], role, item[role].shape)
        assert item["instruction"] == texts[item["key"]]


def test_one_sft_step_on_pipeline_output(run, tmp_path, tiny_qwen_pipeline):
    pipe = tiny_qwen_pipeline
    trainer = SFTTrainer(SFTConfig.model_validate(dict(
        output_dir=str(tmp_path / "out"), data={"run": str(run), "area": 64 * 64, "shuffle_buffer": 0},
        model={"path": str(pipe), "dtype": "float32", "condition_area": 64 * 64},
        lora={"rank": 4, "alpha": 4}, max_steps=1, mixed_precision="no", cpu=True,
    )))  # fmt: skip
    metrics = trainer.train_step(iter(trainer.loader))
    assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0
    assert math.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    assert trainer.step == 1 and trainer.loader.skipped == {}

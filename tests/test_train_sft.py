import json

import pytest
import torch
from diffusers import QwenImageEditPlusPipeline
from tiny_train_models import write_run

from styledistill.jobs.train import flow
from styledistill.jobs.train.config import SFTConfig
from styledistill.jobs.train.model import predict_velocity
from styledistill.jobs.train.sft import ADAPTER, SFTTrainer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_qwen_pipeline):
    root = tmp_path_factory.mktemp("sft")
    return tiny_qwen_pipeline, write_run(root / "run", shards=1, per_shard=1, size=(32, 32))


def _config(tiny, out, **kw):
    pipe, run = tiny
    base = dict(
        output_dir=str(out),
        data={"run": str(run), "area": 32 * 32, "shuffle_buffer": 0},
        model={"path": str(pipe), "dtype": "float32", "cache_conditioning": True},
        lora={"rank": 4, "alpha": 8},  # alpha != rank: the saved LoRA must keep its scale
        optim={"lr": 1e-2},
        flow={"sampling": "uniform", "shift": 1.0},
        max_steps=30, mixed_precision="no", cpu=True, log_every=1, checkpoint_every=1000,
    )  # fmt: skip
    return SFTConfig.model_validate({**base, **kw})


@torch.no_grad()
def _fixed_loss(trainer, batch):
    """The SFT loss on fixed noise and sigmas, so before/after compare without sampling noise."""
    g = torch.Generator().manual_seed(7)
    total = 0.0
    for sigma in (0.2, 0.4, 0.6, 0.8):
        noise = torch.randn(batch.x0.shape, generator=g)
        s = torch.tensor([sigma])
        v = predict_velocity(trainer.transformer, flow.add_noise(batch.x0, noise, s), s, batch)
        total += float(flow.flow_loss(v, batch.x0, noise, torch.ones(1)))
    return total / 4


def test_overfit_only_lora_changes_and_saved_lora_reloads(tiny, tmp_path):
    trainer = SFTTrainer(_config(tiny, tmp_path / "out"))
    before = {k: v.clone() for k, v in trainer.transformer.state_dict().items()}
    for module in (trainer.pipe.vae, trainer.pipe.text_encoder):
        assert not any(p.requires_grad for p in module.parameters())
    batch = trainer.conditioner(next(iter(trainer.loader)))
    start_loss = _fixed_loss(trainer, batch)
    lora_dir = trainer.train()
    trainer.transformer.eval()
    assert _fixed_loss(trainer, batch) < 0.7 * start_loss
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 30

    after = trainer.transformer.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(f"lora_B.{ADAPTER}" in k or f"lora_A.{ADAPTER}" in k for k in changed)
    assert any("lora_B" in k for k in changed)

    # A fresh pipeline with the saved LoRA predicts what the trained transformer predicts.
    x = torch.randn(batch.x0.shape, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.6])
    with torch.no_grad():
        trained = predict_velocity(trainer.transformer, x, sigma, batch)
        fresh = QwenImageEditPlusPipeline.from_pretrained(tiny[0], local_files_only=True)
        base = predict_velocity(fresh.transformer, x, sigma, batch)
        fresh.load_lora_weights(lora_dir)
        reloaded = predict_velocity(fresh.transformer, x, sigma, batch)
    assert not torch.allclose(base, trained, atol=1e-4)
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=1e-4)


def test_resume_continues_identically_and_ema_is_saved(tiny, tmp_path):
    full = SFTTrainer(_config(tiny, tmp_path / "a", max_steps=3, checkpoint_every=2, ema_decay=0.9))
    full.train()
    resumed = SFTTrainer(_config(tiny, tmp_path / "a", max_steps=4, checkpoint_every=2, ema_decay=0.9))
    assert resumed.step == 3
    # Restart from step 2 in another folder: step 3 must repeat exactly.
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    (tmp_path / "a" / "checkpoints" / "step-00000002").rename(tmp_path / "b" / "checkpoints" / "step-00000002")
    again = SFTTrainer(_config(tiny, tmp_path / "b", max_steps=3, checkpoint_every=2, ema_decay=0.9))
    assert again.step == 2
    again.train()
    loss = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()][-1]["loss"]
    assert loss("b") == loss("a")
    ema = {k: v.clone() for k, v in zip(range(len(again.params)), again.ema.shadow_params)}
    saved = QwenImageEditPlusPipeline.lora_state_dict(tmp_path / "b" / "lora")
    saved = saved[0] if isinstance(saved, tuple) else saved
    assert len(saved) == len(ema)  # EMA weights are what gets saved
    assert any(not torch.equal(e, p) for e, p in zip(again.ema.shadow_params, again.params))

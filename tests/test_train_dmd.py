import json
import shutil

import pytest
import torch
from tiny_train_models import write_run

from styledistill.jobs.train.config import DMDConfig
from styledistill.jobs.train.dmd import CRITIC, STUDENT, TEACHER, DMDTrainer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_qwen_pipeline):
    root = tmp_path_factory.mktemp("dmd")
    return tiny_qwen_pipeline, write_run(root / "run", shards=1, per_shard=3, size=(32, 32))


def _config(tiny, out, **kw):
    pipe, run = tiny
    base = dict(
        output_dir=str(out),
        data={"run": str(run), "area": 32 * 32, "use_wids": True},
        model={"path": str(pipe), "dtype": "float32", "cache_conditioning": True},
        student_lora={"rank": 4, "alpha": 4}, critic_lora={"rank": 4, "alpha": 4},
        generator_optim={"lr": 1e-2}, critic_optim={"lr": 1e-2},
        cfg_scale=1.0, student_steps=2, generator_every=1,
        max_steps=3, mixed_precision="no", cpu=True, log_every=1, checkpoint_every=1000,
    )  # fmt: skip
    return DMDConfig.model_validate({**base, **kw})


def _snapshot(trainer):
    return {role: {k: v.clone() for k, v in m.state_dict().items()} for role, m in trainer.roles.modules.items()}


def _changed(before, trainer, role):
    after = trainer.roles.modules[role].state_dict()
    return {k for k, v in before[role].items() if not torch.equal(v, after[k])}


def _batches(trainer, n=1):
    samples = iter(trainer.loader)
    return [trainer.conditioner(next(samples)) for _ in range(n)]


@pytest.mark.parametrize("shared", [True, False])
def test_fake_equals_teacher_gives_zero_generator_gradient(tiny, tmp_path, shared):
    trainer = DMDTrainer(_config(tiny, tmp_path, shared_base=shared))
    (batch,) = _batches(trainer)
    loss, dmd_grad = trainer.generator_loss(batch)  # critic LoRA B = 0: fake score == real score
    loss.backward()
    assert loss.item() == 0.0 and dmd_grad == 0.0
    # None: the last block's text-stream outputs never reach the image tokens.
    grads = [p.grad for p in trainer.roles.params[STUDENT] if p.grad is not None]
    assert len(grads) > len(trainer.roles.params[STUDENT]) // 2 and all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("shared", [True, False])
def test_updates_touch_only_their_role(tiny, tmp_path, shared):
    trainer = DMDTrainer(_config(tiny, tmp_path, shared_base=shared))
    batches = _batches(trainer)
    trainer.critic_update(batches)  # makes fake != real so the generator gets a gradient
    for update, role in ((trainer.generator_update, STUDENT), (trainer.critic_update, CRITIC)):
        before = _snapshot(trainer)
        update(batches)
        changed = _changed(before, trainer, role)
        assert changed and all(f".{role}." in k for k in changed), role
        if not shared:  # separate copies: the other roles' weights stay bit-identical
            assert not any(_changed(before, trainer, other) for other in {STUDENT, CRITIC, TEACHER} - {role})


def test_two_time_scale_counts(tiny, tmp_path):
    trainer = DMDTrainer(_config(tiny, tmp_path, max_steps=6, generator_every=3, checkpoint_every=6))
    trainer.train()
    assert trainer.updates == {STUDENT: 2, CRITIC: 6}
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "generator_loss" in r] == [3, 6]
    assert all("critic_loss" in r for r in rows)
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()


def test_resume_gives_the_same_next_step(tiny, tmp_path):
    kw = dict(max_steps=3, checkpoint_every=2, cfg_scale=2.0, backward_simulation=True)
    DMDTrainer(_config(tiny, tmp_path / "a", **kw)).train()
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-00000002", tmp_path / "b" / "checkpoints" / "step-00000002")
    resumed = DMDTrainer(_config(tiny, tmp_path / "b", **kw))
    assert resumed.step == 2 and resumed.updates == {STUDENT: 2, CRITIC: 2}
    resumed.train()
    last = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()][-1]
    a, b = last("a"), last("b")
    assert a["step"] == b["step"] == 3
    assert a["generator_loss"] == b["generator_loss"] and a["critic_loss"] == b["critic_loss"]
    assert a["generator_loss"] > 0

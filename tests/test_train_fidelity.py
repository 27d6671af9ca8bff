"""The trainer trains what the generator runs: the student's sigmas, the critic's noise levels, a verified
teacher LoRA, and a clear error when the base model is missing. Tiny random models built in code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_qwen import build_tiny_pipeline
from tiny_train_models import write_run
from typer.testing import CliRunner

from styledistill.generation.lora import LoraLoadError
from styledistill.generation.qwen_edit import QWEN_IMAGE_EDIT_2509_SCHEDULER, edit_sigmas
from styledistill.jobs.train.cli import train_app
from styledistill.jobs.train.config import DMDConfig
from styledistill.jobs.train.dmd import CRITIC, STUDENT, DMDTrainer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    pipe = build_tiny_pipeline(root / "pipe")
    # The real model's sampler config, as in the Qwen-Image-Edit-2509 folder.
    (pipe / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", **QWEN_IMAGE_EDIT_2509_SCHEDULER})
    )
    return pipe, write_run(root / "run", shards=1, per_shard=2, size=(48, 32))


def _config(tiny, out, **kw) -> DMDConfig:
    pipe, run = tiny
    base = dict(
        output_dir=str(out), data={"run": str(run), "area": 48 * 32, "use_wids": True},
        model={"path": str(pipe), "dtype": "float32", "cache_conditioning": True},
        student_lora={"rank": 4, "alpha": 4}, critic_lora={"rank": 4, "alpha": 4},
        cfg_scale=1.0, student_steps=4, max_steps=1, mixed_precision="no", cpu=True, checkpoint_every=1000,
    )  # fmt: skip
    return DMDConfig.model_validate({**base, **kw})


def _record_sigmas(trainer) -> dict[str, list[float]]:
    seen = {STUDENT: [], CRITIC: []}
    velocity = trainer.roles.velocity

    def spy(role, x, sigma, batch, negative=False):
        if role in seen:
            seen[role].extend(sigma.tolist())
        return velocity(role, x, sigma, batch, negative=negative)

    trainer.roles.velocity = spy
    return seen


def test_student_trains_on_the_pipelines_sigmas(tiny, tmp_path):
    trainer = DMDTrainer(_config(tiny, tmp_path / "dmd"))
    batch = trainer.conditioner(next(iter(trainer.loader)))
    tokens = batch.x0.shape[1]
    expected = edit_sigmas(QWEN_IMAGE_EDIT_2509_SCHEDULER, 4, tokens)  # what TeleStyleEditPipeline steps through
    torch.testing.assert_close(trainer.schedule(tokens), expected)
    assert expected[-1] == pytest.approx(0.02, abs=1e-6)  # shift_terminal: not a fixed-shift schedule

    seen = _record_sigmas(trainer)
    for _ in range(12):
        trainer.student_x0(batch, with_grad=False)
    assert set(round(s, 6) for s in seen[STUDENT]) == set(round(s, 6) for s in expected.tolist())


def test_critic_is_trained_on_the_noise_levels_it_is_queried_at(tiny, tmp_path):
    trainer = DMDTrainer(_config(tiny, tmp_path / "dmd", sigma_min=0.3, sigma_max=0.6, backward_simulation=False))
    batch = trainer.conditioner(next(iter(trainer.loader)))
    seen = _record_sigmas(trainer)
    for _ in range(6):
        trainer.critic_loss(batch)
    trained = list(seen[CRITIC])
    seen[CRITIC].clear()
    for _ in range(6):
        trainer.generator_loss(batch)
    queried = list(seen[CRITIC])
    for sigmas in (trained, queried):
        assert len(sigmas) == 6 and all(0.3 <= s <= 0.6 for s in sigmas)


def test_teacher_lora_matching_nothing_fails(tiny, tmp_path):
    lora = tmp_path / "teacher.safetensors"
    # A LoRA for another model: a well-formed file whose modules do not exist in this transformer.
    save_file({"single_blocks.0.linear1.lora_A.weight": torch.zeros(4, 16),
               "single_blocks.0.linear1.lora_B.weight": torch.zeros(16, 4)}, str(lora))  # fmt: skip
    with pytest.raises(LoraLoadError, match="none of its 1 target modules"):
        DMDTrainer(_config(tiny, tmp_path / "dmd", teacher_lora=str(lora)))


@pytest.mark.parametrize("command", ["sft", "dmd"])
def test_missing_base_model_is_one_line(tiny, tmp_path, command):
    _, run = tiny
    config = Path(__file__).parents[1] / "styledistill" / "configs" / f"train_{command}.yaml"
    missing = tmp_path / "no-such-model"
    result = CliRunner().invoke(train_app, [
        command, str(config), "--set", f"data.run={run}", "--set", f"model.path={missing}",
        "--set", f"output_dir={tmp_path / 'out'}", "--set", "cpu=true",
        "--set", "data.num_workers=0",
    ])  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "model.path" in lines[0]
    assert "Traceback" not in result.output

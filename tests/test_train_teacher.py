import torch
from diffusers import QwenImageEditPlusPipeline
from tiny_train_models import write_run

from styledistill.jobs.train.config import DMDConfig, SFTConfig
from styledistill.jobs.train.dmd import STUDENT, DMDTrainer
from styledistill.jobs.train.model import predict_velocity
from styledistill.jobs.train.sft import SFTTrainer


def test_dmd_teacher_is_base_plus_fused_sft_lora(tmp_path, tiny_qwen_pipeline):
    pipe, run = tiny_qwen_pipeline, write_run(tmp_path / "run", shards=1, per_shard=1, size=(32, 32))
    common = dict(data={"run": str(run), "area": 32 * 32, "shuffle_buffer": 0},
                  model={"path": str(pipe), "dtype": "float32", "cache_conditioning": True},
                  max_steps=3, mixed_precision="no", cpu=True, checkpoint_every=1000)  # fmt: skip
    sft_lora = SFTTrainer(SFTConfig.model_validate(
        {**common, "output_dir": str(tmp_path / "sft"), "optim": {"lr": 1e-2}, "lora": {"rank": 4, "alpha": 8}}
    )).train()  # fmt: skip
    dmd = DMDTrainer(DMDConfig.model_validate(
        {**common, "output_dir": str(tmp_path / "dmd"), "teacher_lora": str(sft_lora), "cfg_scale": 1.0,
         "student_lora": {"rank": 4, "alpha": 4}, "critic_lora": {"rank": 4, "alpha": 4}}
    ))  # fmt: skip
    batch = dmd.conditioner(next(iter(dmd.loader)))
    x, sigma = torch.randn(batch.x0.shape, generator=torch.Generator().manual_seed(3)), torch.tensor([0.5])
    reference = QwenImageEditPlusPipeline.from_pretrained(pipe, local_files_only=True)
    with torch.no_grad():
        base = predict_velocity(reference.transformer, x, sigma, batch)
        reference.load_lora_weights(sft_lora)
        with_lora = predict_velocity(reference.transformer, x, sigma, batch)
        teacher = dmd.teacher_velocity(x, sigma, batch)
        student = dmd.roles.velocity(STUDENT, x, sigma, batch)  # zero-initialised: starts as the teacher
    assert not torch.allclose(base, with_lora, atol=1e-4)
    torch.testing.assert_close(teacher, with_lora, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(student, teacher, atol=1e-6, rtol=0)

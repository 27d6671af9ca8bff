import socket

import pytest
import torch
import torch.multiprocessing as mp
from tiny_train_models import write_run

from styledistill.jobs.train.config import SFTConfig
from styledistill.jobs.train.model import lora_state_dict
from styledistill.jobs.train.sft import ADAPTER, SFTTrainer


def _worker(rank: int, world: int, port: int, pipe: str, run: str, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    cfg = SFTConfig.model_validate(dict(
        output_dir=out, data={"run": run, "area": 32 * 32, "shuffle_buffer": 0},
        model={"path": pipe, "dtype": "float32", "cache_conditioning": True}, lora={"rank": 4, "alpha": 4},
        optim={"lr": 1e-2}, max_steps=3, checkpoint_every=2, mixed_precision="no", cpu=True,
    ))  # fmt: skip
    trainer = SFTTrainer(cfg)
    assert trainer.acc.num_processes == world and torch.distributed.get_backend() == "gloo"
    trainer.train()
    keys = {s["key"] for s in [next(iter(trainer.loader)) for _ in range(2)]}
    torch.save({"lora": lora_state_dict(trainer.transformer, ADAPTER), "keys": keys}, f"{out}/rank{rank}-result.pt")


@pytest.mark.slow  # two training processes, end to end
def test_two_process_gloo_sft_keeps_ranks_in_sync(tmp_path, tiny_qwen_pipeline):
    pipe, run = tiny_qwen_pipeline, write_run(tmp_path / "run", shards=2, per_shard=2, size=(32, 32))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(pipe), str(run), str(tmp_path / "out")), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / "out" / f"rank{r}-result.pt", weights_only=False) for r in (0, 1))
    assert not r0["keys"] & r1["keys"]  # each rank reads its own shard
    assert r0["lora"].keys() == r1["lora"].keys()
    assert all(torch.equal(r0["lora"][k], r1["lora"][k]) for k in r0["lora"])  # averaged gradients
    assert any(torch.count_nonzero(v) for k, v in r0["lora"].items() if "lora_B" in k)
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    assert (tmp_path / "out" / "lora" / "pytorch_lora_weights.safetensors").exists()

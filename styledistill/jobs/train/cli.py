"""`styledistill train sft|dmd CONFIG [--set key=value ...]`: train on a run folder's accepted triplets.

One process per GPU, launched by accelerate (the trainer reads RANK / WORLD_SIZE from it; the data
loader splits shards by rank and DataLoader worker, so give it at least ranks x workers shards):

    accelerate launch --num_processes 8 -m styledistill.jobs.train.cli sft styledistill/configs/train_sft.yaml
    accelerate launch --num_machines 2 --machine_rank $RANK --main_process_ip $HEAD --num_processes 16 \\
        -m styledistill.jobs.train.cli dmd train_dmd.yaml --set data.run=/data/runs/v2

On a Ray cluster, submit the same command as a Ray job; the entrypoint runs on one node, so use
`--num_machines 1` per job or run accelerate on every node (e.g. via a Ray placement group / TorchTrainer):

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        accelerate launch --num_processes 8 -m styledistill.jobs.train.cli sft configs/train_sft.yaml

Restarting the same command with the same `output_dir` resumes from its latest checkpoint. The result
is `<output_dir>/lora/pytorch_lora_weights.safetensors`, loadable with
`QwenImageEditPlusPipeline.load_lora_weights`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from styledistill.jobs.train.config import DMDConfig, SFTConfig, load_train_config
from styledistill.schemas.config import ConfigError

train_app = typer.Typer(help="Train a style LoRA (SFT) or distil a few-step student (DMD) on a run's shards.")

SetOption = typer.Option(None, "--set", help="Override a config field, e.g. --set max_steps=10 (repeatable).")


def _load(config: Path, kind, overrides: list[str] | None):
    try:
        return load_train_config(config, kind, overrides)
    except ConfigError as err:  # one line, no traceback, as for `styledistill run`
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


def _run(train, cfg):
    """Missing or unusable weights end in one line naming the path and how to provide it, as for `run`."""
    from styledistill.generation.lora import LoraLoadError

    try:
        return train(cfg)
    except (FileNotFoundError, LoraLoadError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


@train_app.command()
def sft(config: Path, overrides: list[str] = SetOption) -> None:
    """Supervised LoRA fine-tuning (flow matching) on accepted triplets."""
    from styledistill.jobs.train.sft import train_sft

    _setup_logging()
    out = _run(train_sft, _load(config, SFTConfig, overrides))
    typer.echo(f"LoRA written to {out}")


@train_app.command()
def dmd(config: Path, overrides: list[str] = SetOption) -> None:
    """DMD2-style distillation of a few-step student LoRA from the (SFT) teacher."""
    from styledistill.jobs.train.dmd import train_dmd

    _setup_logging()
    out = _run(train_dmd, _load(config, DMDConfig, overrides))
    typer.echo(f"student LoRA written to {out}")


if __name__ == "__main__":
    train_app()

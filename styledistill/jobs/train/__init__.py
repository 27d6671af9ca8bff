"""The downstream trainer: SFT of a style LoRA and DMD2-style few-step distillation on a run's shards."""

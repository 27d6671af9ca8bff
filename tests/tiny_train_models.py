"""Fixtures for trainer tests: a tiny random QwenImageEditPlusPipeline on disk, and small shards.

Configs follow diffusers' own qwenimage tests; the tokenizer is byte-level and made in code with the Qwen
special tokens in their real order, so the pipeline's prompt template and image placeholders work.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPlusPipeline,
    QwenImageTransformer2DModel,
)
from PIL import Image
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_symbols() -> list[str]:
    """GPT-2's byte-to-printable-character map, so every byte has a token (byte-level BPE, no merges)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _tokenizer() -> Qwen2Tokenizer:
    vocab = {ch: i for i, ch in enumerate(_byte_symbols())}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>")  # fmt: skip
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    return tok


def build_tiny_pipeline(out_dir: str | Path, seed: int = 0) -> Path:
    """Build, save and return the folder of a tiny random pipeline (about 17 MB)."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )  # fmt: skip
    vae = AutoencoderKLQwenImage(
        base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )  # fmt: skip
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default",
            "type": "default"}, "rope_theta": 1000000.0, "vocab_size": len(tokenizer),
            "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": 16, "fullatt_block_indexes": [1]},
        vocab_size=len(tokenizer), image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )  # fmt: skip
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE,
    )  # fmt: skip
    pipe = QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, processor=processor, transformer=transformer,
    )  # fmt: skip
    pipe.save_pretrained(out_dir)
    return out_dir


def _png(rng: np.random.Generator, width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_run(run_dir: str | Path, shards: int = 2, per_shard: int = 3, rejected_every: int = 0,
              corrupt_keys: tuple[str, ...] = (), size: tuple[int, int] = (48, 32), seed: int = 0) -> Path:
    """A run folder in the manifest's layout: shards/*.tar, sizes.json and wids-index.json.

    Keys are `s{shard}k{i}`; every `rejected_every`-th sample has status "rejected" (a writer bug the
    loader must survive) and samples in `corrupt_keys` get undecodable target bytes.
    """
    run_dir = Path(run_dir)
    (run_dir / "shards").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes, index = {}, []
    for s in range(shards):
        path = run_dir / "shards" / f"test-{s:06d}.tar"
        with wds.TarWriter(str(path), mtime=0) as sink:
            for i in range(per_shard):
                key = f"s{s}k{i}"
                status = "rejected" if rejected_every and (s * per_shard + i) % rejected_every == 0 else "accepted"
                meta = {"recipe": "rns", "status": status, "prompts": {"content_prompt": "cat", "style_prompt": "oil paint", "error": None},
                        "scores": {}, "lineage": {}}
                sink.write({
                    "__key__": key,
                    "content.png": _png(rng, *size),
                    "style.png": _png(rng, size[1], size[1]),
                    "target.png": b"not a png" if key in corrupt_keys else _png(rng, *size),
                    "txt": "Style Transfer the style of Figure 2 to Figure 1.",
                    "json": json.dumps(meta),
                })  # fmt: skip
        sizes[path.name] = per_shard
        index.append({"url": f"shards/{path.name}", "nsamples": per_shard, "filesize": path.stat().st_size})
    (run_dir / "sizes.json").write_text(json.dumps(sizes))
    (run_dir / "wids-index.json").write_text(
        json.dumps({"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": index})
    )
    return run_dir

"""Vision-language model clients; see base.py. Backends are imported lazily (torch only when needed)."""

from __future__ import annotations

from styledistill.vlm.base import (
    ChatRequest,
    ChatResult,
    OpenAIVLMOptions,
    TransformersVLMOptions,
    VLMClient,
    VLMOptions,
)

__all__ = [
    "ChatRequest",
    "ChatResult",
    "OpenAIVLMOptions",
    "TransformersVLMOptions",
    "VLMClient",
    "VLMOptions",
    "build_client",
]


def build_client(
    options: TransformersVLMOptions | OpenAIVLMOptions, device: str = "cpu", threads: int = 1
) -> VLMClient:
    if isinstance(options, TransformersVLMOptions):
        from styledistill.vlm.transformers_backend import TransformersVLM

        return TransformersVLM(options, device=device, threads=threads)
    from styledistill.vlm.openai_backend import OpenAIChatVLM

    return OpenAIChatVLM(options)

"""Vision-language model clients; see base.py. Backends are imported lazily (torch only when needed)."""

from __future__ import annotations


from styledistill.backends import import_object
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


# The chat backends by the options' `backend:` name; imported lazily (torch only for `transformers`).
CLIENTS = {
    "transformers": "styledistill.vlm.transformers_backend:TransformersVLM",
    "openai": "styledistill.vlm.openai_backend:OpenAIChatVLM",
}


def build_client(
    options: TransformersVLMOptions | OpenAIVLMOptions, device: str = "cpu", threads: int = 1
) -> VLMClient:
    return import_object(CLIENTS[options.backend])(options, device=device, threads=threads)

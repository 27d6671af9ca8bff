"""One chat interface for vision-language models: images + text in, text (or an error) out.

Two backends share it: `transformers` runs Qwen2.5-VL in-process from local weights; `openai` calls an
OpenAI-compatible chat-completions endpoint (e.g. a vLLM server the user runs). Both decode greedily, so
the same request gives the same answer. A failed request yields a `ChatResult` with `error` set and never
raises, so one bad sample cannot fail a batch.

The options live here, apart from the backends, so a config can be validated without importing torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Annotated, Literal, Union

import numpy as np
from pydantic import Field, field_validator

from styledistill.backends import BackendOptions


@dataclass(frozen=True)
class ChatRequest:
    images: list[np.ndarray]  # HxWx3 uint8 RGB, shown to the model in this order, before the text
    text: str
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        for i, image in enumerate(self.images):
            if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                    and image.shape[2] == 3):
                raise ValueError(f"chat request image {i}: expected an HxWx3 uint8 array")
        if self.max_new_tokens < 1:
            raise ValueError("chat request max_new_tokens must be >= 1")


@dataclass(frozen=True)
class ChatResult:
    text: str | None = None
    error: str | None = None  # set when the model could not answer; `text` is then None


class TransformersVLMOptions(BackendOptions):
    backend: Literal["transformers"]
    model_path: str  # a local checkpoint folder, or a hub id already in the local Hugging Face cache
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 on GPU, else float32
    max_pixels: int | None = Field(None, ge=28 * 28)  # per-image pixel cap for the vision tower


class OpenAIVLMOptions(BackendOptions):
    backend: Literal["openai"]
    base_url: str  # e.g. http://gpu-host:8000/v1 ; requests go to {base_url}/chat/completions
    model: str  # the name the server serves the model under
    api_key_env: str | None = None  # name of the environment variable holding the key, never the key
    timeout_s: float = Field(60.0, gt=0)  # per attempt
    attempts: int = Field(3, ge=1)
    backoff_s: float = Field(1.0, ge=0)  # wait before retry n is backoff_s * 2**(n-1), capped
    max_backoff_s: float = Field(30.0, ge=0)
    concurrency: int = Field(4, ge=1)  # requests in flight at once

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return v


VLMOptions = Annotated[Union[TransformersVLMOptions, OpenAIVLMOptions], Field(discriminator="backend")]


class VLMClient(ABC):
    @abstractmethod
    def setup(self) -> None:
        """Load weights or check credentials once; raise a clear error on a missing path or key."""

    @abstractmethod
    def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        """One result per request, in order; per-request failures are results with `error`."""

    @abstractmethod
    def model_info(self) -> dict[str, str]:
        """What answered: backend, model and library versions."""

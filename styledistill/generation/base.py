"""The generator interface: a batch of (content, style, seed, prompt) in, one image per request out.

Backends load weights once in `setup()` (once per Ray actor) and never per sample. Images arrive already
sized by the resolution rules (pipeline/images.py), so what the dataset stores is what the model saw.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError


@dataclass(frozen=True)
class GenerationRequest:
    content: np.ndarray  # HxWx3 uint8 RGB
    style: np.ndarray  # HxWx3 uint8 RGB
    seed: int
    prompt: str


class BackendOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


def parse_options(cls: type[BackendOptions], options: dict[str, Any], where: str) -> Any:
    try:
        return cls.model_validate(options)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{where} option {field}: {first['msg']}") from None


class Generator(ABC):
    """Subclasses set `Options` and implement `setup`, `generate` and `model_info`."""

    Options: type[BackendOptions] = BackendOptions

    def __init__(self, options: dict[str, Any], device: str = "cpu", threads: int = 1):
        self.options = parse_options(self.Options, options, f"generator {type(self).__name__}")
        self.device = device
        self.threads = threads

    @abstractmethod
    def setup(self) -> None:
        """Load weights. Raise a clear error naming the missing path or model id."""

    @abstractmethod
    def generate(self, requests: list[GenerationRequest]) -> list[np.ndarray | Exception]:
        """Per request, an HxWx3 uint8 image the size of its content image, or the exception that request
        raised (it fails alone; the others are kept). Raising fails the whole call: the stage then retries
        the requests one at a time."""

    @abstractmethod
    def model_info(self) -> dict[str, str]:
        """Model ids, weight hashes and library versions, stored in every sample's metadata."""

"""The generator interface: a batch of (content, style, seed, prompt) in, one image per request out.

Backends load weights once in `setup()` (once per Ray actor) and never per sample. Images arrive already
sized by the resolution rules (pipeline/images.py), so what the dataset stores is what the model saw.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import numpy as np

from styledistill.backends import Backend


@dataclass(frozen=True)
class GenerationRequest:
    content: np.ndarray  # HxWx3 uint8 RGB
    style: np.ndarray  # HxWx3 uint8 RGB
    seed: int
    prompt: str


class Generator(Backend):
    """Subclasses set `name` and `Options` and implement `setup`, `generate` and `model_info`."""

    kind = "generator"

    @abstractmethod
    def generate(self, requests: list[GenerationRequest]) -> list[np.ndarray | Exception]:
        """Per request, an HxWx3 uint8 image the size of its content image, or the exception that request
        raised (it fails alone; the others are kept). Raising fails the whole call: the stage then retries
        the requests one at a time."""

    @abstractmethod
    def model_info(self) -> dict[str, str]:
        """Model ids, weight hashes and library versions, stored in every sample's metadata."""

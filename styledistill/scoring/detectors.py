"""Cheap failure detectors."""

from __future__ import annotations

import numpy as np
from skimage.color import rgb2gray
from skimage.transform import resize

from styledistill.scoring.base import EmbeddingScorer

NOOP_SIZE = 64  # small enough to ignore resampling noise and JPEG artefacts, large enough to see any restyle


class NoOpScorer(EmbeddingScorer):
    """`pixel_diff`: mean absolute difference in [0, 1] of content and target as 64x64 grayscale.

    About 0 means the generator returned the content photo unchanged (style not applied).
    """

    name = "noop"
    scores = ("pixel_diff",)
    roles = ("content", "target")

    def setup(self) -> None:
        """Nothing to load: plain image processing."""

    def embed(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return [resize(rgb2gray(image), (NOOP_SIZE, NOOP_SIZE), anti_aliasing=True) for image in images]

    def compare(self, features: dict[str, np.ndarray]) -> dict[str, float]:
        return {"pixel_diff": float(np.abs(features["content"] - features["target"]).mean())}

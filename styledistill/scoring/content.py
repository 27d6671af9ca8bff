"""Content preservation: EfficientNet-Lite0 feature cosine (with a content-leakage margin) and edge-map SSIM."""

from __future__ import annotations

import numpy as np
from pydantic import Field
from skimage.color import rgb2gray
from skimage.filters import sobel
from skimage.metrics import structural_similarity
from skimage.transform import resize

from styledistill.backends import BackendOptions
from styledistill.scoring.base import EmbeddingScorer, reference_cosines


class EffNetContentScorer(EmbeddingScorer):
    """`content_cos`: cosine of pooled ImageNet features, content vs target.

    `leakage` = cos(style, target) - cos(content, target): above 0 the target looks more like what the
    style reference depicts than like the content photo, i.e. the style reference's content leaked in.
    """

    name = "effnet"
    scores = ("content_cos", "leakage")

    class Options(BackendOptions):
        batch_size: int = Field(16, ge=1)

    def setup(self) -> None:
        from styledistill.scoring.effnet import shared_effnet  # torch and timm: in the actor only

        self.net = shared_effnet(self.device, self.threads, self.options.batch_size)

    def embed(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return list(self.net.pooled(images))

    def compare(self, features: dict[str, np.ndarray]) -> dict[str, float]:
        content_cos, style_cos = reference_cosines(features)  # features are L2-normalised
        return {"content_cos": content_cos, "leakage": style_cos - content_cos}

    def model_info(self) -> dict[str, str]:
        return self.net.info()


class EdgeStructureScorer(EmbeddingScorer):
    """`ssim`: SSIM between the Sobel edge maps of content and target (grayscale, `size` px on the long side).

    Meant as a band, not a threshold: near 1 the target kept every edge (maybe no style at all), very low means
    the layout was lost; line-art styles legitimately rewrite edges.
    """

    name = "edges"
    scores = ("ssim",)
    roles = ("content", "target")

    class Options(BackendOptions):
        size: int = Field(256, ge=32)

    def setup(self) -> None:
        """Nothing to load: plain image processing."""

    def embed(self, images: list[np.ndarray]) -> list[np.ndarray]:
        edges = []
        for image in images:
            h, w = image.shape[:2]
            scale = self.options.size / max(h, w)
            gray = resize(rgb2gray(image), (max(1, round(h * scale)), max(1, round(w * scale))), anti_aliasing=True)
            edges.append(sobel(gray))
        return edges

    def compare(self, features: dict[str, np.ndarray]) -> dict[str, float]:
        content, target = features["content"], features["target"]
        if target.shape != content.shape:
            # A generator may round the output size differently: compare on the content's grid.
            target = resize(target, content.shape, anti_aliasing=True)
        # skimage's Sobel magnitude of a [0, 1] image lies in [0, 1].
        return {"ssim": float(structural_similarity(content, target, data_range=1.0))}

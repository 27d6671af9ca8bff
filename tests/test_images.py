import hashlib
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from styledistill.filters.dedup import hamming
from styledistill.io import uris
from styledistill.pipeline.images import (
    ImageError,
    decode_image,
    encode_image,
    load_image,
    phash,
    prepare_content,
    prepare_style,
)
from styledistill.schemas.config import DecodeLimits, Resolution

LIMITS = DecodeLimits()


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height over a tiny IDAT: the shape of a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _photo(h: int = 120, w: int = 160, seed: int = 0) -> np.ndarray:
    """A smooth random colour picture (upsampled noise), so hashes and resizes behave like a photo."""
    small = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


def _reason(data: bytes, limits: DecodeLimits = LIMITS) -> str:
    with pytest.raises(ImageError) as err:
        decode_image(data, limits)
    return str(err.value)


# --- bad inputs: each fails with its own clear reason -----------------------------------------------------


def test_empty_file():
    assert _reason(b"") == "empty file (0 bytes)"


def test_truncated_jpeg():
    whole = _save(Image.fromarray(_photo(200, 200)), "JPEG", quality=90)
    assert _reason(whole[: len(whole) // 2]).startswith("truncated or corrupt:")


def test_text_named_png():
    assert _reason(b"this is a text file, not a picture\n") == "not an image (unrecognised format)"


def test_too_small():
    data = _save(Image.new("RGB", (10, 10), "red"), "PNG")
    assert _reason(data) == "too small (10x10, min side 64)"


def test_pillow_decompression_bomb_header():
    # 10^10 pixels: Pillow refuses it while reading the header; no pixel buffer is ever allocated.
    assert _reason(_png_header_only(100_000, 100_000)).startswith("too large")


def test_max_pixels_checked_before_decoding():
    # 81M pixels is under Pillow's own limit but over our max_pixels; decoding it would need 243 MB.
    expected = "too large (9000x9000; max side 16384, max pixels 64000000)"
    assert _reason(_png_header_only(9000, 9000)) == expected
    assert _reason(_png_header_only(200, 100), DecodeLimits(max_side=150)).startswith("too large (200x100")


def test_file_too_large():
    data = _save(Image.fromarray(_photo()), "PNG")
    assert _reason(data, DecodeLimits(max_file_bytes=100)).startswith("file too large")


def test_name_prefixes_reason():
    with pytest.raises(ImageError, match=r"^photo\.jpg: empty file"):
        decode_image(b"", LIMITS, name="photo.jpg")


# --- normalisation to HxWx3 uint8 RGB ---------------------------------------------------------------------


def test_cmyk_jpeg():
    cmyk = Image.new("CMYK", (80, 64), (0, 255, 255, 0))  # pure red in CMYK
    assert Image.open(io.BytesIO(_save(cmyk, "JPEG", quality=95))).mode == "CMYK"
    out = decode_image(_save(cmyk, "JPEG", quality=95), LIMITS)
    assert out.shape == (64, 80, 3) and out.dtype == np.uint8
    assert np.abs(out.reshape(-1, 3).mean(0) - [255, 0, 0]).max() < 4


def test_16bit_grayscale_png_is_scaled_not_clipped():
    values = np.tile(np.linspace(0, 65535, 128).astype(np.uint16), (64, 1))
    data = _save(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data, LIMITS)
    assert out.shape == (64, 128, 3)
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])
    expected = np.round(values / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(out[:, :, 0], expected)
    assert out[0, 64, 0] == 129  # mid-grey, where clipping would give 255


def test_float_tiff_in_unit_range():
    values = np.tile(np.linspace(0.0, 1.0, 100, dtype=np.float32), (70, 1))
    out = decode_image(_save(Image.fromarray(values), "TIFF"), LIMITS)
    np.testing.assert_array_equal(out[:, :, 1], np.round(values * 255).astype(np.uint8))


def test_rgba_png_composited_on_white():
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:, :32] = (255, 0, 0, 255)  # opaque red
    rgba[:, 32:48] = (0, 0, 0, 0)  # fully transparent
    rgba[:, 48:] = (0, 0, 255, 128)  # half-transparent blue
    out = decode_image(_save(Image.fromarray(rgba, "RGBA"), "PNG"), LIMITS)
    assert out.shape == (64, 64, 3)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 40]) == (255, 255, 255)
    assert np.abs(out[0, 60].astype(int) - [127, 127, 255]).max() <= 1


def test_exif_orientation_is_applied():
    stored = np.zeros((80, 120, 3), np.uint8)
    stored[:, :60] = (255, 0, 0)  # left half red
    stored[:, 60:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    data = _save(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(data, LIMITS)
    assert out.shape == (120, 80, 3)  # portrait after rotation
    # Turning clockwise brings the stored left edge to the top.
    assert out[10, 40, 0] > 200 and out[10, 40, 2] < 60
    assert out[110, 40, 2] > 200 and out[110, 40, 0] < 60


def test_palette_gif_first_frame():
    frames = [Image.new("RGB", (64, 64), colour).quantize(4) for colour in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 2
    out = decode_image(buf.getvalue(), LIMITS)
    assert out.shape == (64, 64, 3)
    assert tuple(out[32, 32]) == (255, 0, 0)


def test_grayscale_and_transparent_palette():
    gray = decode_image(_save(Image.new("L", (64, 64), 77), "JPEG", quality=100), LIMITS)
    assert gray.shape == (64, 64, 3) and abs(int(gray[5, 5, 0]) - 77) <= 1
    pal = Image.new("P", (64, 64), 0)
    pal.putpalette([0, 255, 0] * 256)
    out = decode_image(_save(pal, "PNG", transparency=0), LIMITS)
    assert tuple(out[0, 0]) == (255, 255, 255)


# --- load_image -------------------------------------------------------------------------------------------


def test_load_image_local_and_memory(tmp_path):
    data = _save(Image.fromarray(_photo()), "PNG")
    for uri in (str(tmp_path / "a.png"), "memory://images-test/a.png"):
        uris.write_bytes_atomic(uri, data)
        loaded = load_image(uri, LIMITS)
        assert loaded.sha256 == hashlib.sha256(data).hexdigest()
        np.testing.assert_array_equal(loaded.array, _photo())
    with pytest.raises(ImageError, match="^file not found: .*missing.png"):
        load_image(str(tmp_path / "missing.png"), LIMITS)
    with pytest.raises(ImageError, match="^file too large"):
        load_image(str(tmp_path / "a.png"), DecodeLimits(max_file_bytes=50))


# --- resolution rules -------------------------------------------------------------------------------------


def test_content_min_edge_rule():
    res = Resolution(content_min_edge=1024, content_max_edge=None, multiple_of=16)
    assert prepare_content(_photo(300, 451), res).shape == (1024, 1536, 3)  # 1539 wide, cropped to 1536
    assert prepare_content(_photo(2000, 1500), res).shape == (1360, 1024, 3)  # downscaled, 1365 -> 1360


def test_content_max_edge_rule_never_upscales():
    res = Resolution(content_max_edge=384, multiple_of=16)
    assert prepare_content(_photo(300, 451), res).shape == (240, 384, 3)  # 255 high, cropped to 240
    small = _photo(80, 100)
    out = prepare_content(small, res)
    assert out.shape == (80, 96, 3)
    np.testing.assert_array_equal(out, small[:, 2:98])  # centre crop, no resampling


def test_content_both_rules_cap_the_long_edge():
    res = Resolution(content_min_edge=1024, content_max_edge=1200, multiple_of=16)
    assert prepare_content(_photo(300, 451), res).shape == (784, 1200, 3)


def test_style_square_and_keep_aspect():
    wide = np.zeros((300, 451, 3), np.uint8)
    wide[:, 75:376] = 255  # a white centre square between black bands
    square = prepare_style(wide, Resolution(style_mode="square", style_edge=256))
    assert square.shape == (256, 256, 3)
    assert square.min() >= 250  # the bands were cropped away, not squeezed in
    res = Resolution(style_mode="keep_aspect", style_edge=256, multiple_of=16)
    assert prepare_style(_photo(300, 451), res).shape == (256, 384, 3)  # 385 wide, cropped to 384


# --- encoding and hashes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_encode_is_deterministic(fmt):
    arr = _photo()
    first, second = encode_image(arr, fmt, 90), encode_image(arr.copy(), fmt, 90)
    assert first == second
    decoded = np.asarray(Image.open(io.BytesIO(first)).convert("RGB"))
    assert decoded.shape == arr.shape
    if fmt == "png":
        np.testing.assert_array_equal(decoded, arr)
        assert b"tIME" not in first and b"tEXt" not in first
    else:
        assert np.abs(decoded.astype(int) - arr).mean() < 4
    assert b"Exif" not in first


def test_phash_and_hamming():
    assert hamming(0b1011, 0b0001) == 2
    photo = _photo(240, 320, seed=1)
    resized = np.asarray(Image.fromarray(photo).resize((200, 150), Image.Resampling.LANCZOS))
    assert 0 <= phash(photo) < 2**64
    assert hamming(phash(photo), phash(resized)) <= 4
    assert hamming(phash(photo), phash(_photo(240, 320, seed=2))) > 12

"""Small source images for pipeline tests: real photos from scikit-image and flat-colour patterns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def write_photos(folder: Path) -> None:
    """Four real photos from scikit-image, downscaled to 96 px on the long side."""
    folder.mkdir()
    for name in PHOTOS:
        image = Image.fromarray(getattr(skimage.data, name)())
        image.thumbnail((96, 96))
        image.save(folder / f"{name}.png")


def write_stylized(folder: Path) -> None:
    """Three flat-colour, hard-edged patterns: stripes, a checkerboard and concentric rings."""
    folder.mkdir()
    y, x = np.mgrid[0:80, 0:80]
    masks = {"stripes": (x // 10) % 2 == 0, "checker": ((x // 16) + (y // 16)) % 2 == 0,
             "rings": (np.hypot(x - 40, y - 40) // 8) % 2 == 0}
    palettes = {"stripes": ((230, 60, 40), (250, 220, 90)), "checker": ((30, 40, 120), (240, 240, 230)),
                "rings": ((20, 120, 60), (200, 90, 200))}
    for name, mask in masks.items():
        on, off = palettes[name]
        image = np.where(mask[..., None], np.array(on, np.uint8), np.array(off, np.uint8)).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{name}.png")

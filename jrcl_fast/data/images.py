"""Decoding one image file with PIL, for the torchvision path and the data check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from jrcl_fast.data.long_tailed_dataset import MISSING


class ImageError(Exception):
    """An image file that does not decode; `problem` is MISSING or 'corrupt (why)'.
    Callers that know the split entry turn it into Split.bad_entry's message."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem


def load_rgb(path: Path, grayscale: bool = False) -> Image.Image:
    """Decode fully into 8-bit RGB; grayscale is replicated to three channels and
    16-bit grayscale is rescaled, not clipped. With `grayscale` (X-rays), a colour
    file is reduced to its luma first, as the DALI path decodes X-rays."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float64)
                top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
                img = Image.fromarray(np.rint(arr * (255.0 / top)).clip(0, 255).astype(np.uint8), mode="L")
            return (img.convert("L") if grayscale else img).convert("RGB")
    except FileNotFoundError:
        raise ImageError(MISSING) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"corrupt ({err})") from None

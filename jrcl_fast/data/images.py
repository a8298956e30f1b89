"""Decoding one image file with PIL, for the torchvision path and the data check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from jrcl_fast.errors import UserError


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
        raise UserError(f"image {path} does not exist; fix the list file or data.root") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(
            f"image {path} is unreadable or corrupt ({err}); run 'jrcl-fast check-data' to list every bad file"
        ) from None

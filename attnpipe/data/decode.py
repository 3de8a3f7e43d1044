"""Decode + resize on CPU workers: raw rows -> ``uint8`` pixels ``(N, S, S, 3)`` plus ``status`` / ``error``.

Pixels stay ``uint8`` until the encoder (4x less object-store traffic than float32); normalization happens on the
encoder's device. Images are resized to ``S x S`` without cropping, so normalized object boxes keep their meaning.
Every failure (empty, not an image, truncated, over the pixel cap) becomes ``status="error"`` with the reason.

Example::

    pixels = decode_image(open("cat.jpg", "rb").read(), size=224, max_pixels=64_000_000)  # (224, 224, 3) uint8
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class DecodeError(ValueError):
    """An image that cannot become pixels; the message is the row's ``error``."""


def decode_image(data: bytes | None, size: int, max_pixels: int) -> np.ndarray:
    """Bytes -> RGB ``uint8`` array ``(size, size, 3)``.

    Raises:
        DecodeError: empty input, unknown format, a header over ``max_pixels``, or corrupt/truncated data.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap is checked next
            img: Image.Image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DecodeError(f"not an image: format not recognized ({len(data)} bytes starting {data[:8]!r})") from None
    except Image.DecompressionBombError as exc:  # over PIL's own hard cap (2 x Image.MAX_IMAGE_PIXELS)
        raise DecodeError(f"possible decompression bomb, refused from its header: {exc}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise DecodeError(
            f"image declares {w}x{h} = {w * h} pixels, over data.max_pixels={max_pixels} (possible decompression bomb)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale still >= size (much faster)
            img = ImageOps.exif_transpose(img).convert("RGB")
            img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as exc:
        raise DecodeError(f"corrupt or truncated image data ({img.format or 'unknown'}): {exc}") from None
    return np.asarray(img, dtype=np.uint8)


def decode_batch(batch: dict[str, np.ndarray], size: int, max_pixels: int) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: decodes ``data``, drops it, adds ``pixels``/``status`` and fills ``error``."""
    n = len(batch["id"])
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    errors = list(batch["error"])
    for i in range(n):
        if errors[i] is not None:
            continue
        try:
            pixels[i] = decode_image(batch["data"][i], size, max_pixels)
        except DecodeError as exc:
            errors[i] = str(exc)
    out = {k: v for k, v in batch.items() if k not in ("data", "error")}
    out["error"] = np.array(errors, dtype=object)
    out["status"] = np.array(["ok" if e is None else "error" for e in errors], dtype=object)
    out["pixels"] = pixels
    return out

"""Decode + resize on CPU workers: raw rows -> ``uint8`` pixels ``(N, S, S, 3)`` plus ``status`` / ``error``.

Pixels stay ``uint8`` until the encoder (4x less object-store traffic than float32); normalization happens on the
encoder's device. Images are resized to ``S x S`` without cropping, so normalized object boxes keep their meaning.
Input is hostile: only the formats in :data:`FORMATS` are decoded (Pillow's in-process decoders; nothing is ever
handed to an external program such as Ghostscript), and every failure of a member (empty, not an allowed image,
truncated, over the pixel cap, or any exception a decoder raises) becomes ``status="error"`` with the reason, so a
bad member costs its row and never the batch.

Example::

    pixels = decode_image(open("cat.jpg", "rb").read(), size=224, max_pixels=64_000_000)  # (224, 224, 3) uint8
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

# Pillow format ids decoded; GIF/WEBP/TIFF give their first frame (camera JPEGs with extra pictures open as MPO
# through the JPEG plugin).
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# Leading bytes of formats refused by name (the error says which); anything else unrecognized is "not an image".
_REFUSED_MAGIC = (
    (b"%!PS", "EPS/PostScript"),
    (b"\xc5\xd0\xd3\xc6", "EPS (DOS binary)"),
    (b"8BPS", "PSD (Photoshop)"),
    (b"%PDF", "PDF"),
    (b"<svg", "SVG"),
    (b"<?xml", "XML/SVG"),
    (b"<!doctype html", "HTML"),
    (b"<html", "HTML"),
    (b"\x00\x00\x00\x0cjp2", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
)

# EXIF orientation -> the transpose that undoes it (as ImageOps.exif_transpose does)
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class DecodeError(ValueError):
    """An image that cannot become pixels; the message is the row's ``error``."""


def decode_image(data: bytes | None, size: int, max_pixels: int) -> np.ndarray:
    """Bytes -> RGB ``uint8`` array ``(size, size, 3)``.

    Raises:
        DecodeError: empty input, a format outside :data:`FORMATS`, a header over ``max_pixels``, or data that a
            decoder rejects (the decoder's exception type and message are kept).
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    img = _open(bytes(data))
    w, h = img.size
    if w * h > max_pixels:
        raise DecodeError(
            f"image declares {w}x{h} = {w * h} pixels, over data.max_pixels={max_pixels} (possible decompression bomb)"
        )
    try:
        orientation = int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block costs the orientation, not the image
        orientation = 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale still >= size (much faster)
            img = _to_rgb(img)
            if orientation in _ORIENTATION:
                img = img.transpose(_ORIENTATION[orientation])
            img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
            return np.asarray(img, dtype=np.uint8)
    except DecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure (OSError, SyntaxError, struct.error, ...)
        raise DecodeError(f"corrupt or truncated image data ({img.format or 'unknown'}): {_describe(exc)}") from None


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: our own cap is checked next
            return Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:  # over PIL's own hard cap (2 x Image.MAX_IMAGE_PIXELS)
        raise DecodeError(f"possible decompression bomb, refused from its header: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a plugin may raise anything on a hostile header
        refused = _refused_format(data)
        if refused:
            raise DecodeError(
                f"image format {refused} is not allowed (decoded: {', '.join(FORMATS)}); convert it first"
            ) from None
        if isinstance(exc, Image.UnidentifiedImageError):
            raise DecodeError(
                f"not an image: format not recognized as one of {', '.join(FORMATS)} "
                f"({len(data)} bytes starting {data[:8]!r})"
            ) from None
        raise DecodeError(f"corrupt image header: {_describe(exc)}") from None


def _refused_format(data: bytes) -> str | None:
    head = data[:64].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    for magic, name in _REFUSED_MAGIC:
        if head.startswith(magic.lower()):
            return name
    return None


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with 16-bit, 32-bit and float greyscale scaled to 0..255 (``convert`` would clip them: white images)."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img).astype(np.float64)  # (H, W)
        lo, hi = _value_range(img.mode, a)
        scaled = np.clip((a - lo) * (255.0 / (hi - lo)), 0, 255) if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.rint(scaled).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def _value_range(mode: str, a: np.ndarray) -> tuple[float, float]:
    """The range mapped onto 0..255: the pixel type's, or the data's own when values fall outside it."""
    finite = a[np.isfinite(a)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if mode.startswith("I;16"):
        return 0.0, 65535.0
    if mode == "I" and lo >= 0 and hi <= 65535:  # 16-bit PNGs and TIFFs often open as 32-bit "I"
        return 0.0, 65535.0
    if mode == "F" and lo >= 0 and hi <= 1:  # float images in [0, 1]
        return 0.0, 1.0
    return lo, hi


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def decode_batch(batch: dict[str, np.ndarray], size: int, max_pixels: int) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: decodes ``data``, drops it, adds ``pixels``/``status`` and fills ``error``.

    Never raises for a member: whatever happens while decoding one becomes that row's ``error``.
    """
    n = len(batch["id"])
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    errors = list(batch["error"])
    for i in range(n):
        if errors[i] is not None:
            continue
        try:
            pixels[i] = decode_image(batch["data"][i], size, max_pixels)
        except DecodeError as exc:
            errors[i] = str(exc) or "undecodable image"
        except Exception as exc:  # noqa: BLE001 - the member boundary: a member never fails the batch (or Ray task)
            pixels[i] = 0
            errors[i] = f"image could not be decoded: {_describe(exc)}"
    out = {k: v for k, v in batch.items() if k not in ("data", "error")}
    out["error"] = np.array(errors, dtype=object)
    out["status"] = np.array(["ok" if e is None else "error" for e in errors], dtype=object)
    out["pixels"] = pixels
    return out

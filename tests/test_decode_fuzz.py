"""Decoding hostile bytes: seeded mutations of real JPEG/PNG/WEBP files never raise out of ``decode_batch``; high
bit-depth images are scaled, EXIF orientation is applied, formats outside the allow-list are error rows."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from attnpipe.data.decode import FORMATS, DecodeError, decode_batch, decode_image

SIZE = 32


def _encoded(fmt: str, rng: np.random.Generator) -> bytes:
    img = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 80} if fmt != "PNG" else {}))
    return buf.getvalue()


def _mutations(data: bytes, rng: np.random.Generator) -> list[bytes]:
    """Header truncations at every offset of the first 600 bytes, random cuts, bit flips, byte scribbles, chunks of
    garbage after a valid prefix (the magic and more), and duplicated/dropped ranges."""
    out = [data[:cut] for cut in range(min(len(data), 600))]
    out += [data[: int(rng.integers(len(data)))] for _ in range(150)]
    for _ in range(700):  # 1-16 bit flips
        b = bytearray(data)
        for pos in rng.integers(0, len(b), int(rng.integers(1, 17))):
            b[pos] ^= 1 << int(rng.integers(8))
        out.append(bytes(b))
    for _ in range(400):  # a run of random bytes written over the file, biased to the header
        b = bytearray(data)
        start = int(rng.integers(0, min(len(b), 400) if rng.random() < 0.6 else len(b)))
        run = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        b[start : start + len(run)] = run
        out.append(bytes(b))
    for _ in range(250):  # valid prefix (at least the magic) + garbage
        keep = int(rng.integers(4, min(len(data), 300)))
        out.append(data[:keep] + rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes())
    for _ in range(150):  # a range dropped or repeated (length fields now lie)
        i, j = sorted(int(v) for v in rng.integers(0, len(data), 2))
        out.append(data[:i] + data[j:] if rng.random() < 0.5 else data[:j] + data[i:])
    return out


def _batch(items: list) -> dict[str, np.ndarray]:
    n = len(items)
    data = np.empty(n, dtype=object)
    data[:] = items
    return {"id": np.array([f"f/{i}" for i in range(n)], dtype=object), "data": data, "error": np.full(n, None)}


def test_seeded_mutations_never_escape_decode_batch():
    rng = np.random.default_rng(20240611)
    cases = [m for fmt in ("JPEG", "PNG", "WEBP") for m in _mutations(_encoded(fmt, rng), rng)]
    assert len(cases) > 6000
    statuses: list[str] = []
    for start in range(0, len(cases), 64):  # the encode pipeline's decode batches
        out = decode_batch(_batch(cases[start : start + 64]), size=SIZE, max_pixels=4_000_000)
        assert out["pixels"].shape == (len(out["id"]), SIZE, SIZE, 3)
        for status, error in zip(out["status"], out["error"]):
            assert status in ("ok", "error")
            if status == "error":
                assert isinstance(error, str) and error.strip(), error
            else:
                assert error is None
        statuses += list(out["status"])
    # the mutations reach both outcomes (decoders shrug off some flips, reject many truncations)
    assert 0.05 < statuses.count("ok") / len(statuses) < 0.95


def test_decode_batch_turns_any_member_exception_into_its_row():
    png = _encoded("PNG", np.random.default_rng(0))
    out = decode_batch(_batch([png, "not bytes at all", None, b""]), size=SIZE, max_pixels=10**6)
    assert list(out["status"]) == ["ok", "error", "error", "error"]
    assert out["error"][1].startswith("image could not be decoded: TypeError")
    assert out["error"][2] == out["error"][3] == "empty file (0 bytes)"


def _gray16(a: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


def test_16bit_png_is_scaled_not_clipped_to_white():
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))  # (16, 64), left dark -> right bright
    data = _gray16(ramp)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    px = decode_image(data, size=64, max_pixels=10**6).astype(int)
    row = px[32, :, 0]
    assert (np.diff(row) >= 0).all() and row[0] <= 3 and row[-1] >= 252  # a gradient over the whole range
    assert 110 < px.mean() < 145 and (px[..., 0] == px[..., 2]).all()


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.full((8, 8), 0.5, dtype=np.float32), 128),  # float in [0, 1]: scaled by 255
        (np.full((8, 8), 32768, dtype=np.int32), 128),  # 32-bit "I" holding 16-bit values
    ],
)
def test_float_and_32bit_tiff_are_scaled(array, expected):
    px = decode_image(_gray16(array, "TIFF"), size=8, max_pixels=10**6)
    assert abs(int(px.mean()) - expected) <= 1


def test_exif_orientation_is_applied():
    img = np.zeros((20, 40, 3), dtype=np.uint8)
    img[:, :20] = (255, 0, 0)  # left half red, right half blue
    img[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: displayed after a 90 degree clockwise turn, left half -> top
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95, exif=exif)
    px = decode_image(buf.getvalue(), size=32, max_pixels=10**6).astype(int)
    top, bottom = px[:12].mean((0, 1)), px[-12:].mean((0, 1))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    broken = buf.getvalue().replace(b"Exif\x00\x00MM", b"Exif\x00\x00XX").replace(b"Exif\x00\x00II", b"Exif\x00\x00XX")
    assert decode_image(broken, size=32, max_pixels=10**6).shape == (32, 32, 3)  # a bad EXIF costs no image


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP", "JPEG", "PNG"])
def test_allowed_formats_decode(fmt):
    assert fmt in FORMATS
    px = decode_image(_encoded(fmt, np.random.default_rng(1)), size=SIZE, max_pixels=10**6)
    assert px.shape == (SIZE, SIZE, 3) and px.std() > 10


@pytest.mark.parametrize(
    "data, name",
    [
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "EPS"),
        (b"8BPS\x00\x01" + b"\x00" * 6 + b"\x00\x03\x00\x00\x00\x10\x00\x00\x00\x10\x00\x08\x00\x03", "PSD"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "SVG"),
        (b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"></svg>', "SVG"),
        (b"<!DOCTYPE html>\n<html><body><img src=x></body></html>", "HTML"),
        (b"\n  <html><head></head></html>", "HTML"),
    ],
)
def test_refused_formats_are_error_rows_naming_the_format(data, name):
    with pytest.raises(DecodeError, match=f"image format .*{name}.* is not allowed"):
        decode_image(data, size=SIZE, max_pixels=10**6)
    out = decode_batch(_batch([data]), size=SIZE, max_pixels=10**6)
    assert out["status"][0] == "error" and name in out["error"][0]


def test_formats_pillow_knows_but_we_do_not_allow_are_refused():
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(buf, format="PCX")  # Pillow reads PCX; the allow-list does not
    with pytest.raises(DecodeError, match="not recognized as one of JPEG, PNG"):
        decode_image(buf.getvalue(), size=SIZE, max_pixels=10**6)

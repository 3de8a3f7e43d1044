"""The torch JPEG decoder (nvJPEG on CUDA) against PIL's CPU path: its CPU twin always runs, the CUDA run is gpu-marked.

Tolerance, stated once: per image, mean |torch - PIL| < 2/255 and max <= 40/255. The two paths differ by design: PIL
decodes JPEGs at a reduced DCT scale (``draft``) before its resize, torch resizes the full decode (antialiased
bilinear); measured mean differences are 0.0-1.1/255, the largest single-pixel ones at sharp object edges.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from attnpipe.data.decode import decode_image
from attnpipe.data.gpu_decode import TorchDecoder, jpeg_info, resolve_decode
from attnpipe.data.sample import make_broken_shard

MAX_PIXELS = 64_000_000
MEAN_TOL, MAX_TOL = 2.0, 40


def _image(w: int, h: int, seed: int) -> Image.Image:
    """A smooth gradient with a hard-edged, off-centre rectangle: orientation mistakes show up as big differences."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 127 // (w + h)], -1)
    a[h // 8 : h // 3, w // 10 : w // 2] = rng.integers(0, 255, 3)
    return Image.fromarray(a.astype(np.uint8))


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _close_to_pil(datas: list[bytes], size: int, device: str = "cpu") -> TorchDecoder:
    dec = TorchDecoder(size, MAX_PIXELS, device)
    pixels, errors = dec.decode(datas, [None] * len(datas))
    assert errors == [None] * len(datas)
    assert pixels.shape == (len(datas), size, size, 3) and pixels.dtype == torch.uint8
    ref = np.stack([decode_image(d, size, MAX_PIXELS) for d in datas]).astype(int)
    diff = np.abs(pixels.cpu().numpy().astype(int) - ref)
    means = diff.mean((1, 2, 3))
    assert (means < MEAN_TOL).all() and (diff.max((1, 2, 3)) <= MAX_TOL).all(), (means, diff.max((1, 2, 3)))
    return dec


@pytest.mark.parametrize("size", [64, 224])
def test_cpu_twin_matches_pil_across_shapes_and_kinds(size):
    imgs = [_image(w, h, s) for s, (w, h) in enumerate([(256, 256), (640, 480), (300, 500), (97, 131), (224, 224)])]
    datas = [_jpeg(im) for im in imgs]
    datas.append(_jpeg(imgs[1], progressive=True))  # SOF2
    datas.append(_jpeg(imgs[2].convert("L")))  # one component -> RGB
    datas.append(_jpeg(imgs[0], subsampling=0))  # 4:4:4
    dec = _close_to_pil(datas, size)
    assert dec.stats == {"torch": len(datas), "fallback": 0}


def test_exif_orientations_match_pil():
    base = _image(120, 80, 3)  # non-square: a wrong rotation changes the squashed content a lot
    datas = []
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        datas.append(_jpeg(base, exif=exif.tobytes()))
        assert jpeg_info(datas[-1]).orientation == orientation  # type: ignore[union-attr]
    tiff_be = b"MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00"
    big_endian = _jpeg(base, exif=b"Exif\x00\x00" + tiff_be)
    assert jpeg_info(big_endian).orientation == 6  # type: ignore[union-attr]
    datas.append(big_endian)
    _close_to_pil(datas, 96)
    # the orientation really is applied: the rotated decodes differ from the upright one
    pixels, _ = TorchDecoder(96, MAX_PIXELS).decode(datas[:2] + datas[5:6], [None] * 3)
    assert (pixels[0].int() - pixels[1].int()).abs().float().mean() > 20
    assert (pixels[0].int() - pixels[2].int()).abs().float().mean() > 20


def test_non_jpeg_and_broken_members_fall_back_to_cpu_decoder_with_its_errors(tmp_path):
    good = _jpeg(_image(200, 150, 1))
    png = io.BytesIO()
    _image(90, 70, 2).save(png, "PNG")
    cmyk = io.BytesIO()
    _image(90, 70, 4).convert("CMYK").save(cmyk, "JPEG")
    make_broken_shard(str(tmp_path), fmt="folder", image_size=64)
    broken = {}
    for path in (tmp_path / "shard-broken").rglob("bad-*"):
        if path.suffix != ".json":
            broken[path.stem] = path.read_bytes()
    truncated = good[: len(good) // 2]
    datas: list[bytes | None] = [good, png.getvalue(), cmyk.getvalue(), truncated, None, *broken.values()]
    errors: list[str | None] = [None] * len(datas)
    errors[4] = "no image member for this key"  # set by the reader: kept, not decoded
    dec = TorchDecoder(64, MAX_PIXELS)
    pixels, out = dec.decode(datas, errors)
    expected = []
    for d, e in zip(datas, errors):
        if e is not None:
            expected.append(e)
            continue
        try:
            decode_image(d, 64, MAX_PIXELS)
            expected.append(None)
        except ValueError as exc:
            expected.append(str(exc))
    assert out == expected  # the same rows fail, with the CPU decoder's messages
    assert out[:4] == [None, None, None, out[3]] and "truncated" in out[3]
    assert any(e and "bomb" in e for e in out)
    assert pixels.shape[0] == out.count(None)
    assert dec.stats["torch"] == 1 and dec.stats["fallback"] == 2  # the good JPEG; PNG + CMYK via PIL
    ref = decode_image(png.getvalue(), 64, MAX_PIXELS)
    np.testing.assert_array_equal(pixels[1].numpy(), ref)  # fallback rows are the CPU decoder's pixels


def test_header_parser_rejects_what_the_torch_path_should_not_take():
    good = _jpeg(_image(40, 30, 0))
    assert jpeg_info(good) == type(jpeg_info(good))(30, 40, 3, 1)  # type: ignore[misc]
    assert jpeg_info(None) is None and jpeg_info(b"") is None
    assert jpeg_info(good[:-2]) is None  # no EOI: truncated
    assert jpeg_info(b"\x89PNG\r\n\x1a\n" + good) is None
    assert jpeg_info(good[:2] + b"\xff\xc3\x00\x0b" + bytes(9) + good[2:]) is None  # lossless frame first
    rng = np.random.default_rng(0)
    for _ in range(300):  # fuzz: random corruptions never raise, and never pass with impossible dimensions
        b = bytearray(good)
        for p in rng.integers(2, len(b) - 2, rng.integers(1, 6)):
            b[p] = rng.integers(0, 256)
        info = jpeg_info(bytes(b))
        assert info is None or (info.height > 0 and info.width > 0)


def test_over_max_pixels_goes_to_cpu_decoder_message():
    data = _jpeg(_image(300, 200, 0))
    dec = TorchDecoder(32, max_pixels=300 * 200 - 1)
    pixels, errors = dec.decode([data], [None])
    assert pixels.shape[0] == 0 and "over data.max_pixels" in errors[0]


def test_chunks_yield_ok_rows_and_fill_errors():
    datas = [_jpeg(_image(64, 48, s)) for s in range(5)]
    datas[2] = b"not an image"
    errors: list[str | None] = [None] * 5
    got = list(TorchDecoder(32, MAX_PIXELS).chunks(datas, errors, rows=2))
    assert [rows.tolist() for rows, _ in got] == [[0, 1], [3], [4]]
    assert [p.shape[0] for _, p in got] == [2, 1, 1]
    assert errors[2] is not None and "not an image" in errors[2] and errors.count(None) == 4


def test_resolve_decode():
    assert resolve_decode("auto", "cpu") == "cpu" and resolve_decode("cpu", "cpu") == "cpu"
    with pytest.raises(ValueError, match="data.decode=gpu needs a CUDA encoder"):
        resolve_decode("gpu", "cpu")
    with pytest.raises(ValueError, match="allowed: auto, cpu, gpu"):
        resolve_decode("nvjpeg", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nvjpeg_matches_pil():
    assert resolve_decode("auto", "cuda") == "gpu"
    imgs = [_image(w, h, s) for s, (w, h) in enumerate([(256, 256), (640, 480), (300, 500), (97, 131)])]
    exif = Image.Exif()
    exif[0x0112] = 6
    datas = [_jpeg(im) for im in imgs] + [_jpeg(imgs[1], exif=exif.tobytes()), _jpeg(imgs[2], progressive=True)]
    dec = _close_to_pil(datas, 224, device="cuda")
    assert dec.stats["torch"] >= len(imgs)
    pixels, errors = dec.decode([datas[0], datas[0][:-40] + b"\xff\xd9", b"junk"], [None] * 3)
    assert errors[0] is None and errors[2] is not None  # a bad member never fails the batch
    assert pixels.shape[0] == errors.count(None)

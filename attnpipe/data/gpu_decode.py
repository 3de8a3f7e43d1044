"""Batched JPEG decode + resize in torch: nvJPEG on the encoder's GPU, the same code on CPU as its tested twin.

With ``data.decode=gpu`` (or ``auto`` on a GPU cluster) the encoder actor receives raw rows and decodes here:
JPEG members are checked from their header (SOI/EOI, frame type, components, ``data.max_pixels``), decoded in
batches by ``torchvision.io.decode_jpeg(list, device="cuda")``, resized on the device with the CPU path's squash
resize (antialiased bilinear to ``S x S``) and rotated by their EXIF orientation (nvJPEG ignores it, so it is
parsed from the header and applied here, on the small resized image). Anything else -- PNG/WebP, CMYK,
lossless/arithmetic JPEG, a truncated file, a member nvJPEG rejects -- goes to the CPU decoder
(:func:`attnpipe.data.decode.decode_image`) member by member, so error rows read exactly as on the CPU path and no
exception escapes. On CPU (``device="cpu"``) the same code runs with libjpeg-turbo: that is the twin the tests
compare with PIL's path (mean abs difference < 3/255 per pixel, see ``tests/test_gpu_decode.py``).

This module imports neither Ray nor faiss, so ``bench/encode_gpu.py`` runs on a box with only torch + torchvision.

Example::

    dec = TorchDecoder(size=224, max_pixels=64_000_000, device="cuda")
    pixels, errors = dec.decode(list_of_bytes, [None] * n)   # uint8 (n_ok, 224, 224, 3) on the GPU, per-row errors
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from attnpipe.data.decode import DecodeError, decode_image

Members = Sequence[bytes | None] | np.ndarray  # member bytes per row (a Ray numpy batch column is an object array)
DECODE_MODES = ("auto", "cpu", "gpu")  # data.decode
GPU_DECODE_CHUNKS = 4  # encoder batches per call of a decoding actor (the pipeline's depth; a call's last chunk waits)
PIXEL_BUDGET = 1 << 27  # decoded pixels per decode_jpeg call (128 Mpx: 384 MiB uint8, 1.5 GiB as float for resizing)
_FRAMES = (0xC0, 0xC1, 0xC2)  # baseline, extended and progressive Huffman: what nvJPEG and libjpeg-turbo both take


@dataclass(frozen=True)
class JpegInfo:
    height: int
    width: int
    components: int
    orientation: int  # EXIF orientation 1..8 (1 = as stored)


def jpeg_info(data: bytes | None) -> JpegInfo | None:
    """Frame header of a complete Huffman JPEG (SOI first, EOI last), or None when the member is anything else.

    Walks the marker segments up to the frame header (SOFn) and reads the EXIF orientation on the way; touches
    only the header bytes, so it costs microseconds even for large files.
    """
    if not data or len(data) < 8 or data[:3] != b"\xff\xd8\xff" or data[-2:] != b"\xff\xd9":
        return None  # not a JPEG, or truncated (the CPU decoder then names the problem)
    i, n, orientation = 2, len(data), 1
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        segment = data[i + 4 : i + 2 + length]
        if length < 2 or len(segment) != length - 2:
            return None
        if marker == 0xE1 and segment[:6] == b"Exif\x00\x00":
            orientation = _exif_orientation(segment[6:])
        elif marker in _FRAMES:
            if len(segment) < 6:
                return None
            h, w, comps = int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big"), segment[5]
            return JpegInfo(h, w, comps, orientation) if h and w else None
        elif 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return None  # lossless, hierarchical or arithmetic-coded: CPU decoder
        elif marker in (0xDA, 0xD9):
            return None  # scan or end before any frame header
        i += 2 + length
    return None


def _exif_orientation(tiff: bytes) -> int:
    """Tag 0x0112 of IFD0 in an EXIF TIFF block; 1 when absent or out of range (as PIL's ``exif_transpose``)."""
    if tiff[:2] not in (b"II", b"MM") or len(tiff) < 8:
        return 1
    order: Literal["little", "big"] = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    for e in range(int.from_bytes(tiff[ifd : ifd + 2], order)):
        p = ifd + 2 + 12 * e
        if p + 12 > len(tiff):
            break
        if int.from_bytes(tiff[p : p + 2], order) == 0x0112:
            value = int.from_bytes(tiff[p + 8 : p + 10], order)  # SHORT, left-justified
            return value if 1 <= value <= 8 else 1
    return 1


def orient(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """``(..., H, W)`` as PIL's ``ImageOps.exif_transpose`` turns it for EXIF ``orientation`` 1..8."""
    if orientation == 2:
        return x.flip(-1)  # FLIP_LEFT_RIGHT
    if orientation == 3:
        return x.flip(-2, -1)  # ROTATE_180
    if orientation == 4:
        return x.flip(-2)  # FLIP_TOP_BOTTOM
    if orientation == 5:
        return x.transpose(-2, -1)  # TRANSPOSE
    if orientation == 6:
        return torch.rot90(x, -1, (-2, -1))  # ROTATE_270 (counter-clockwise) = 90 degrees clockwise
    if orientation == 7:
        return x.transpose(-2, -1).flip(-2, -1)  # TRANSVERSE
    if orientation == 8:
        return torch.rot90(x, 1, (-2, -1))  # ROTATE_90 counter-clockwise
    return x


def squash_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` -> uint8 ``(N, 3, size, size)``: antialiased bilinear, no crop (the CPU path's resize)."""
    if x.shape[-2:] == (size, size):
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def gpu_decode_supported() -> bool:
    """Whether this torchvision decodes lists of JPEGs on CUDA (``decode_jpeg(list, device="cuda")``, >= 0.19)."""
    try:
        import torchvision
    except ImportError:
        return False
    major, minor = (int(v) for v in torchvision.__version__.split("+")[0].split(".")[:2])
    return (major, minor) >= (0, 19)


def encoders_decode(mode: str, cluster_gpus: int) -> bool:
    """Whether the encode pipeline hands raw bytes to the encoder actors (skipping the CPU decode tasks).

    ``gpu`` always does; ``auto`` does when the encoders get GPUs (``cluster_gpus`` > 0; 0 for CPU encoders) and
    this torchvision can decode on CUDA. With ``auto``, an actor that finds no usable GPU after all decodes on its CPU
    instead (same rows, slower).

    Raises:
        ValueError: ``gpu`` on a cluster without GPUs (before any work starts).
    """
    if mode == "gpu" and cluster_gpus == 0:
        raise ValueError(
            "data.decode=gpu needs GPU encoders (GPUs in the Ray cluster, or encode.device=cuda); "
            "use data.decode=auto or cpu"
        )
    return mode == "gpu" or (mode == "auto" and cluster_gpus > 0 and gpu_decode_supported())


def resolve_decode(mode: str, device: torch.device | str) -> str:
    """``data.decode`` -> ``"gpu"`` or ``"cpu"`` for an encoder on ``device``.

    Raises:
        ValueError: an unknown mode, or ``gpu`` on a device without CUDA or a torchvision without CUDA decode.
    """
    if mode not in DECODE_MODES:
        raise ValueError(f"data.decode={mode!r}; allowed: {', '.join(DECODE_MODES)}")
    usable = torch.device(device).type == "cuda" and gpu_decode_supported()
    if mode == "gpu" and not usable:
        raise ValueError(
            f"data.decode=gpu needs a CUDA encoder and torchvision >= 0.19 (nvJPEG); this encoder runs on {device}. "
            "Use data.decode=auto or cpu."
        )
    return "gpu" if mode == "gpu" or (mode == "auto" and usable) else "cpu"


class TorchDecoder:
    """Decodes member bytes into uint8 ``(n, S, S, 3)`` pixels on ``device`` (nvJPEG on CUDA, libjpeg-turbo on CPU).

    On CUDA the work runs on a side stream and the caller's stream waits for it on the device, not on the host, so
    decoding the next chunk overlaps with the model on the current one. ``stats`` counts members decoded by
    ``decode_jpeg`` (``torch``) and by the CPU fallback (``fallback``).
    """

    def __init__(self, size: int, max_pixels: int, device: torch.device | str = "cpu"):
        self.size, self.max_pixels = size, max_pixels
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.stats = {"torch": 0, "fallback": 0}

    def decode(self, datas: Members, errors: Sequence[str | None] | np.ndarray) -> tuple[torch.Tensor, list]:
        """Rows' bytes (and errors already set by the reader) -> ``(pixels of the ok rows, errors for all rows)``.

        Rows whose error is set are skipped; a row the decoders refuse gets the CPU decoder's message. Never raises
        for bad data.
        """
        errors = list(errors)
        if self.stream is None:
            pixels = self._decode(datas, errors)
        else:
            # No wait on the caller's stream: decoding needs none of its work, and waiting would serialize this
            # chunk's decode behind the model on the previous one.
            caller = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(self.stream):
                pixels = self._decode(datas, errors)
            caller.wait_stream(self.stream)  # a device-side wait: the host goes on
            pixels.record_stream(caller)  # made on the side stream, used and freed on the caller's
        return pixels, errors

    def chunks(self, datas: Members, errors: list, rows: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """``decode`` over ``rows``-sized chunks, lazily: yields ``(ok row numbers, pixels)``; fills ``errors``."""
        for s in range(0, len(datas), rows):
            pixels, errs = self.decode(datas[s : s + rows], errors[s : s + rows])
            errors[s : s + rows] = errs
            yield s + np.flatnonzero([e is None for e in errs]), pixels

    def _decode(self, datas: Members, errors: list) -> torch.Tensor:
        n, size = len(datas), self.size
        out = torch.zeros((n, 3, size, size), dtype=torch.uint8, device=self.device)
        jobs: list[tuple[int, JpegInfo]] = []
        fallback: list[int] = []
        for i in range(n):
            if errors[i] is not None:
                continue
            info = jpeg_info(datas[i])
            usable = info is not None and info.components in (1, 3) and info.height * info.width <= self.max_pixels
            if usable and info is not None:
                jobs.append((i, info))
            else:
                fallback.append(i)
        refused = [i for chunk in _by_pixels(jobs) for i in self._decode_jpegs(datas, chunk, out)]
        self.stats["torch"] += len(jobs) - len(refused)
        self._decode_cpu(datas, sorted(fallback + refused), errors, out)
        keep = torch.as_tensor([i for i, e in enumerate(errors) if e is None], dtype=torch.long, device=self.device)
        return out[keep].permute(0, 2, 3, 1)  # (n_ok, 3, S, S) -> (n_ok, S, S, 3), a channels_last view

    def _decode_jpegs(self, datas: Members, chunk: list[tuple[int, JpegInfo]], out: torch.Tensor):
        """Decode + resize + orient one chunk into ``out``; returns the rows decode_jpeg refused."""
        import torchvision  # its io submodule loads with it

        decode_jpeg, rgb = torchvision.io.decode_jpeg, torchvision.io.ImageReadMode.RGB

        inputs = [torch.frombuffer(bytearray(datas[i] or b""), dtype=torch.uint8) for i, _ in chunk]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
            try:
                images: list[torch.Tensor | None] = list(decode_jpeg(inputs, rgb, self.device))
            except RuntimeError:  # nvJPEG fails a whole batch for one bad member: retry one by one
                images = []
                for t in inputs:
                    try:
                        images.append(decode_jpeg(t, rgb, self.device))
                    except RuntimeError:
                        images.append(None)
        refused = []
        groups: dict[tuple[int, ...], list[int]] = {}
        for j, ((i, info), img) in enumerate(zip(chunk, images)):
            if img is None or img.dim() != 3 or img.shape[0] != 3 or tuple(img.shape[1:]) != (info.height, info.width):
                refused.append(i)
            else:
                groups.setdefault(tuple(img.shape), []).append(j)
        for members in groups.values():  # same decoded shape: one stacked resize
            resized = squash_resize(torch.stack([images[j] for j in members]), self.size)  # type: ignore[misc]
            for j, img in zip(members, resized):
                out[chunk[j][0]] = orient(img, chunk[j][1].orientation)
        return refused

    def _decode_cpu(self, datas: Members, rows: list[int], errors: list, out: torch.Tensor) -> None:
        decoded, where = [], []
        for i in rows:
            try:
                decoded.append(decode_image(datas[i], self.size, self.max_pixels))
                where.append(i)
            except DecodeError as exc:
                errors[i] = str(exc)
            except Exception as exc:  # noqa: BLE001 - a row error, never a failed batch
                errors[i] = f"decode failed: {type(exc).__name__}: {exc}"
        self.stats["fallback"] += len(where)
        if decoded:
            pixels = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2)  # (k, S, S, 3) -> (k, 3, S, S)
            out[torch.as_tensor(where, device=self.device)] = pixels.to(self.device)


def decode_and_encode(decoder: TorchDecoder, runner, datas: Members, errors: Sequence[str | None] | np.ndarray):
    """The GPU encoder actor's loop: decode ``runner.batch_size`` rows at a time while the runner encodes the last.

    ``runner`` is an :class:`~attnpipe.models.encoder.EncoderRunner`; the decoder is pulled lazily by its
    ``run_chunks``, so decoding chunk i+1 (host work and nvJPEG) overlaps with the model on chunk i. Returns
    ``(model outputs of the ok rows in row order, errors of all rows)``.
    """
    errors = list(errors)
    chunks = decoder.chunks(datas, errors, runner.batch_size or max(len(errors), 1))
    out = runner.run_chunks(pixels for _, pixels in chunks)
    return out, errors


def _by_pixels(jobs: list[tuple[int, JpegInfo]]) -> Iterator[list[tuple[int, JpegInfo]]]:
    """Chunks of jobs whose decoded pixels stay under :data:`PIXEL_BUDGET` (one oversized image is its own chunk)."""
    chunk: list[tuple[int, JpegInfo]] = []
    pixels = 0
    for job in jobs:
        px = job[1].height * job[1].width
        if chunk and pixels + px > PIXEL_BUDGET:
            yield chunk
            chunk, pixels = [], 0
        chunk.append(job)
        pixels += px
    if chunk:
        yield chunk

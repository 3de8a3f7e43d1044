"""The image encoder: torchvision backbone -> pooling head -> L2-normalized embedding + attention map.

``ImageEncoder`` is a plain ``nn.Module`` (used by the Ray encode actors, ``search --image`` and training);
``EncoderRunner`` wraps it for inference on one device: uint8 HWC batches in, numpy out, with the precision,
memory format and host->device copies chosen for that device. ``model.weights`` may name a trained-encoder artifact
(``attnpipe train`` output, see :mod:`attnpipe.models.artifact`): then the whole encoder, head included, comes from it.

Example::

    runner = EncoderRunner(ModelConfig(backbone="resnet18", pooling="attn"), precision="auto")
    out = runner(np.zeros((8, 224, 224, 3), np.uint8))  # {'embedding': (8, 512), 'attention': (8, 7, 7), ...}
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attnpipe.models import artifact
from attnpipe.models.backbones import build_backbone
from attnpipe.models.config import ModelConfig
from attnpipe.models.pooling import attention_stats, build_pooling

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageEncoder(nn.Module):
    """Normalized images ``(B, 3, S, S)`` -> ``(embedding (B, D) unit-norm, attention (B, h, w))``.

    Raises:
        ValueError: unknown backbone/pooling or unusable weights; :class:`~attnpipe.models.artifact.ArtifactError`
            (a ValueError) for an artifact trained for another backbone or head, or failing its fingerprint check.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        meta = artifact.read_sidecar(cfg.weights)
        if meta is not None:
            artifact.check_matches(meta, cfg.backbone, cfg.pooling, None, cfg.weights)
            _check_normalization(meta, cfg.weights)
        # An artifact holds the backbone too: build it empty (seeded), then load everything below.
        self.backbone, channels = build_backbone(cfg.backbone, "none" if meta else cfg.weights, cfg.seed)
        self.head = build_pooling(cfg.pooling, channels, seed=cfg.seed)
        self.dim: int = int(self.head.out_dim)
        if meta is not None:
            artifact.load_encoder_state(self, cfg.weights, meta)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb, attn = self.head(self.backbone(x))
        return F.normalize(emb.float(), dim=1), attn.float()


def normalization() -> dict[str, list[float]]:
    """The input normalization every encoder applies (uint8 / 255, then ImageNet mean/std), as saved in artifacts."""
    return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def _check_normalization(meta: dict, weights: str) -> None:
    if meta["normalization"] != normalization():
        raise artifact.ArtifactError(
            f"{weights} was trained with input normalization {meta['normalization']}, but the encoder applies "
            f"{normalization()}"
        )


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA (fp16 on GPUs without bf16) and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32."""
    if precision != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    native_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if native_bf16 else torch.float32


class EncoderRunner:
    """Inference on one device: uint8 NHWC batches in, numpy out; precision, memory format and copies chosen once.

    On CUDA: bf16 autocast (fp16 on GPUs without bf16), channels_last, cuDNN autotuning, two pinned host buffers
    used in turn with non-blocking copies, and chunks of ``batch_size`` enqueued without a host sync until the
    results are read, so the host prepares (or decodes, see :meth:`run_chunks`) the next chunk while the GPU runs
    this one. A CUDA out-of-memory halves the chunk size (kept for later calls), so an oversized
    ``encode.batch_size`` degrades instead of failing. ``compile=True`` wraps the model in ``torch.compile`` and pads
    the last chunk to ``batch_size`` (one static shape, no recompiles). On CPU all of this is a no-op: the numbers
    are those of the plain fp32/bf16 module.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        precision: str = "auto",
        threads: int = 0,
        device: str | None = None,
        batch_size: int | None = None,
        compile: bool = False,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        if not self.cuda:
            # Ray pins OMP_NUM_THREADS to the actor's num_cpus (1); the encoder owns the node's cores instead.
            torch.set_num_threads(threads or os.cpu_count() or 1)
        else:
            torch.backends.cudnn.benchmark = True  # fixed input shapes: autotuned convolutions pay off at once
        self.dtype = resolve_precision(precision, self.device)
        self.batch_size = batch_size  # None: each call in one chunk
        # Module.to accepts (device, memory_format=) at runtime; torch's overloads lack that combination.
        self.model = ImageEncoder(cfg).eval().to(self.device, memory_format=torch.channels_last)  # type: ignore[call-overload]
        self._forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = self.model
        self.compiled = compile
        if compile:
            self._forward = torch.compile(self.model, dynamic=False)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255
        self._pinned: list[torch.Tensor | None] = [None, None]  # host staging buffers, used in turn
        self._copied: list[torch.cuda.Event | None] = [None, None]  # when each buffer's last copy finished
        self._turn = 0

    @property
    def dim(self) -> int:
        return self.model.dim

    def __call__(self, pixels: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """uint8 ``(N, S, S, 3)`` (numpy, or a tensor on any device) -> embedding ``(N, D)``, attention ``(N, h, w)``
        and per-image attention stats, as numpy."""
        step = self.batch_size or max(len(pixels), 1)
        return self.run_chunks(pixels[s : s + step] for s in range(0, len(pixels), step))

    @torch.inference_mode()
    def run_chunks(self, chunks: Iterable[np.ndarray | torch.Tensor]) -> dict[str, np.ndarray]:
        """Encode chunks as they come (a lazy iterable, e.g. a decoder's) and return the concatenated results.

        Each chunk is enqueued on the device before the next one is pulled, so producing chunk i+1 on the host
        overlaps with the model on chunk i; the only host sync is the final copy of the results.
        """
        outs = [self._encode(c) for c in chunks if len(c)]
        if not outs:
            return {}
        return {k: torch.cat([o[k] for o in outs]).float().cpu().numpy() for k in outs[0]}

    def _to_device(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(pixels, torch.Tensor):
            return pixels.to(self.device, non_blocking=True)
        x = torch.from_numpy(np.require(pixels, np.uint8, ["C", "W"]))  # Ray batches are read-only views
        if not self.cuda:
            return x
        slot, self._turn = self._turn, 1 - self._turn
        buf, done = self._pinned[slot], self._copied[slot]
        if done is not None:
            done.synchronize()  # the buffer's previous copy must have left before it is overwritten
        if buf is None or buf.numel() < x.numel():
            buf = self._pinned[slot] = torch.empty(x.numel(), dtype=torch.uint8).pin_memory()
        staged = buf[: x.numel()].view(x.shape)
        staged.copy_(x)
        out = staged.to(self.device, non_blocking=True)
        self._copied[slot] = torch.cuda.Event()
        self._copied[slot].record()  # type: ignore[union-attr]
        return out

    def _encode(self, pixels: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """One chunk, enqueued: uint8 NHWC -> device tensors (embedding, attention, stats); halves on CUDA OOM."""
        x = self._to_device(pixels)
        try:
            return self._model_outputs(x)
        except torch.OutOfMemoryError:
            if not self.cuda or len(x) == 1:
                raise
            torch.cuda.empty_cache()
            self.batch_size = max(1, len(x) // 2)
            warnings.warn(
                f"CUDA out of memory at batch {len(x)}; encoding in chunks of {self.batch_size}", stacklevel=2
            )
            halves = [self._encode(x[s : s + self.batch_size]) for s in range(0, len(x), self.batch_size)]
            return {k: torch.cat([h[k] for h in halves]) for k in halves[0]}

    def _model_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n = len(x)
        if self.compiled and self.batch_size and n < self.batch_size:
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])  # one static shape
        x = x.permute(0, 3, 1, 2).float()  # (N, S, S, 3) -> (N, 3, S, S), a channels_last view
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            emb, attn = self._forward(x)
        emb, attn = emb[:n], attn[:n]
        stats = attention_stats(attn)
        return {"embedding": emb, "attention": attn, **{f"attn_{k}": v for k, v in stats.items()}}

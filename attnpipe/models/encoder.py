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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attnpipe.config import ModelConfig
from attnpipe.models import artifact
from attnpipe.models.backbones import build_backbone
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
    """Inference wrapper: picks the device, precision, channels_last and thread count once."""

    def __init__(self, cfg: ModelConfig, precision: str = "auto", threads: int = 0, device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cpu":
            # Ray pins OMP_NUM_THREADS to the actor's num_cpus (1); the encoder owns the node's cores instead.
            torch.set_num_threads(threads or os.cpu_count() or 1)
        self.dtype = resolve_precision(precision, self.device)
        # Module.to accepts (device, memory_format=) at runtime; torch's overloads lack that combination.
        self.model = ImageEncoder(cfg).eval().to(self.device, memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255

    @property
    def dim(self) -> int:
        return self.model.dim

    @torch.inference_mode()
    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 ``(N, S, S, 3)`` -> embedding ``(N, D)``, attention ``(N, h, w)`` and per-image attention stats."""
        x = torch.from_numpy(np.require(pixels, np.uint8, ["C", "W"]))  # Ray batches are read-only views
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float()  # (N, S, S, 3) -> (N, 3, S, S), a channels_last view
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            emb, attn = self.model(x)
        stats = attention_stats(attn)
        out = {"embedding": emb, "attention": attn, **{f"attn_{k}": v for k, v in stats.items()}}
        return {k: v.float().cpu().numpy() for k, v in out.items()}

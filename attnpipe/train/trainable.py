"""What training updates: the encoder's head (and, with ``train.unfreeze``, part of its backbone) plus the objective.

With ``unfreeze=none`` the backbone never changes, so its feature maps are computed once (:func:`feature_maps`,
batched, ``inference_mode``, under the encoder's autocast precision but stored float32) and every epoch trains the
head on those cached maps: an epoch then costs a head forward/backward instead of a backbone pass. With ``last`` or
``all`` the backbone runs inside the loop on uint8 images. Its BatchNorm layers stay in eval mode (frozen running
statistics, the usual choice when fine-tuning with small batches); their affine weights still train.

Example::

    model = TrainModel(encoder, objective, from_features=True)
    loss, parts = model(feature_batch, targets, boxes)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from attnpipe.models.backbones import last_stage
from attnpipe.models.encoder import IMAGENET_MEAN, IMAGENET_STD, ImageEncoder


def normalize_uint8(pixels: Tensor) -> Tensor:
    """uint8 ``(B, S, S, 3)`` -> float ``(B, 3, S, S)`` normalized like ``EncoderRunner`` (channels_last layout)."""
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1) * 255
    x = pixels.permute(0, 3, 1, 2).float()  # (B, S, S, 3) -> (B, 3, S, S)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def set_trainable(encoder: ImageEncoder, backbone: str, unfreeze: str) -> list[nn.Parameter]:
    """Freeze the backbone except what ``unfreeze`` names; returns the backbone parameters left trainable."""
    encoder.backbone.requires_grad_(unfreeze == "all")
    if unfreeze == "last":
        for module in last_stage(backbone, encoder.backbone):
            module.requires_grad_(True)
    return [p for p in encoder.backbone.parameters() if p.requires_grad]


def feature_maps(
    encoder: ImageEncoder, pixels: np.ndarray, device: torch.device, dtype: torch.dtype, batch_size: int = 64
) -> Tensor:
    """Backbone maps of uint8 images ``(N, S, S, 3)`` -> float32 ``(N, C, h, w)`` on the CPU."""
    encoder.backbone.eval()
    # cat outside inference_mode: the result is an ordinary tensor that autograd may use as a head input
    return torch.cat(_backbone_batches(encoder, pixels, device, dtype, batch_size))


@torch.inference_mode()
def _backbone_batches(
    encoder: ImageEncoder, pixels: np.ndarray, device: torch.device, dtype: torch.dtype, batch_size: int
) -> list[Tensor]:
    out = []
    for s in range(0, len(pixels), batch_size):
        x = normalize_uint8(torch.from_numpy(np.ascontiguousarray(pixels[s : s + batch_size])).to(device))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out.append(encoder.backbone(x).float().cpu())
    return out


class TrainModel(nn.Module):
    """Encoder + objective in one module, so one DDP wrapper syncs the gradients of both."""

    def __init__(self, encoder: ImageEncoder, objective: nn.Module, from_features: bool):
        super().__init__()
        self.encoder, self.objective, self.from_features = encoder, objective, from_features

    def train(self, mode: bool = True) -> TrainModel:
        super().train(mode)
        self.encoder.backbone.eval()  # frozen BatchNorm statistics, see the module docstring
        return self

    def embed(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Cached maps ``(B, C, h, w)`` or uint8 images ``(B, S, S, 3)`` -> head output (embedding, attention)."""
        fmap = inputs if self.from_features else self.encoder.backbone(normalize_uint8(inputs))
        return self.encoder.head(fmap)

    def forward(self, inputs: Tensor, targets: Tensor, boxes: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        emb, attn = self.embed(inputs)
        return self.objective(emb, attn, targets, boxes)

    def trainable_state(self, backbone_trains: bool) -> dict[str, Tensor]:
        """State that training changes: everything but the frozen backbone (whose weights are the source's)."""
        return {
            k: v.detach().cpu().clone()
            for k, v in self.state_dict().items()
            if backbone_trains or not k.startswith("encoder.backbone.")
        }

    def load_trainable_state(self, state: dict[str, Tensor], backbone_trains: bool) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if backbone_trains or not k.startswith("encoder.backbone.")]
        if missing or unexpected:
            raise ValueError(
                f"checkpoint state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )

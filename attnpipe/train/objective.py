"""Training objective: normalized-softmax metric loss + attention regularizer (+ optional auxiliary cross-entropy).

The metric loss is normalized softmax (NormFace, Wang et al. 2017; "Classification is a strong baseline for deep
metric learning", Zhai & Wu 2019): one learned proxy per class, ``logits = cos(embedding, proxy) / temperature``,
cross-entropy over classes. It is chosen because it is stable with small batches (every sample is compared with
every class proxy, not only with the few same-class samples a batch happens to hold), needs no pair or triplet mining,
works with a handful of classes, and optimizes exactly what retrieval uses: the cosine between L2-normalized
embeddings. The proxies are part of training state only; the artifact keeps just the encoder.

The attention regularizer pulls attention onto the object: for an image with a box it is ``-log(box mass)``, the mass
being the attention inside the box with each cell weighted by the share of its area the box covers (the
``box_mass`` that the evaluation reports, :func:`attnpipe.evaluate.attention.per_image_stats`); for an image without
a box it is ``(normalized entropy - target)^2``, which keeps the map from collapsing onto one cell or staying uniform.

Example::

    obj = Objective(dim=512, num_classes=5, cfg=TrainConfig(), seed=0)
    loss, parts = obj(emb, attn, targets, boxes)   # parts: {"metric": ..., "attn": ..., "ce": ...}
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnpipe.config import TrainConfig


def box_coverage(boxes: Tensor, h: int, w: int) -> Tensor:
    """``(B, 4)`` boxes ``[x0, y0, x1, y1]`` in 0..1 -> ``(B, h, w)``: share of each cell's area inside the box.

    Cell ``(i, j)`` spans ``[j / w, (j + 1) / w] x [i / h, (i + 1) / h]``; swapped corners are reordered. NaN boxes
    give NaN rows (callers mask them).
    """
    x0, x1 = torch.minimum(boxes[:, 0], boxes[:, 2]), torch.maximum(boxes[:, 0], boxes[:, 2])
    y0, y1 = torch.minimum(boxes[:, 1], boxes[:, 3]), torch.maximum(boxes[:, 1], boxes[:, 3])
    fx = _coverage(x0, x1, w)  # (B, w)
    fy = _coverage(y0, y1, h)  # (B, h)
    return fy[:, :, None] * fx[:, None, :]  # (B, h, 1) * (B, 1, w) -> (B, h, w)


def _coverage(lo: Tensor, hi: Tensor, cells: int) -> Tensor:
    edges = torch.arange(cells + 1, dtype=torch.float32, device=lo.device) / cells
    overlap = torch.minimum(hi[:, None], edges[None, 1:]) - torch.maximum(lo[:, None], edges[None, :-1])
    return (overlap * cells).clamp(0.0, 1.0)


def attention_loss(attn: Tensor, boxes: Tensor, entropy_target: float) -> Tensor:
    """Mean over the batch of ``-log(box mass)`` (rows with a box) or ``(entropy - target)^2`` (rows without)."""
    b, h, w = attn.shape
    has_box = ~torch.isnan(boxes).any(1)  # (B,)
    cover = box_coverage(torch.nan_to_num(boxes), h, w)
    mass = (attn * cover).sum((1, 2))
    box_term = -torch.log(mass.clamp(min=1e-6))
    flat = attn.flatten(1)  # (B, h, w) -> (B, hw)
    # clamped log, not xlogy: where() sends zero gradient to the branch it drops, and 0 * (d xlogy at 0 = -inf) is
    # NaN, which a sharp map (mha's softmax underflows to exact zeros) turns into NaN weights
    ent = -(flat * flat.clamp(min=1e-12).log()).sum(1)
    ent = ent / math.log(h * w) if h * w > 1 else torch.zeros(b, device=attn.device)
    ent_term = (ent - entropy_target) ** 2
    return torch.where(has_box, box_term, ent_term).mean()


class Objective(nn.Module):
    """Class proxies (and an optional linear classifier) turning embeddings + attention into one loss."""

    def __init__(self, dim: int, num_classes: int, cfg: TrainConfig, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.proxies = nn.Parameter(torch.randn(num_classes, dim) / dim**0.5)  # (K, D)
            self.classifier = nn.Linear(dim, num_classes) if cfg.ce_weight > 0 else None
        self.temperature = cfg.temperature
        self.ce_weight, self.attn_weight, self.entropy_target = cfg.ce_weight, cfg.attn_weight, cfg.attn_entropy

    def forward(self, emb: Tensor, attn: Tensor, targets: Tensor, boxes: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``emb`` (B, D) as the head returns it (not normalized), ``attn`` (B, h, w); returns (loss, its parts)."""
        emb = emb.float()
        logits = F.normalize(emb, dim=1) @ F.normalize(self.proxies, dim=1).T / self.temperature  # (B, K)
        parts = {"metric": F.cross_entropy(logits, targets)}
        loss = parts["metric"]
        if self.attn_weight > 0:
            parts["attn"] = attention_loss(attn.float(), boxes, self.entropy_target)
            loss = loss + self.attn_weight * parts["attn"]
        if self.classifier is not None:
            parts["ce"] = F.cross_entropy(self.classifier(emb), targets)
            loss = loss + self.ce_weight * parts["ce"]
        return loss, parts

"""Pooling heads: a backbone feature map -> (embedding, attention map).

Every head maps a feature map ``(B, C, H, W)`` to an embedding ``(B, out_dim)`` (float32, not L2-normalized: the
encoder does that) and an attention map ``(B, H, W)`` (float32, non-negative, summing to 1 over the H*W positions), so
attention statistics compare across heads. Heads are looked up by name in ``POOLINGS`` (``list_poolings()``). Learned
heads (``gem``, ``attn``, ``mha``) are built from a seed without reading or advancing the global RNG, so every encoder
actor builds the same head. Softmax, pow and log run in float32 so heads stay normalized under bf16 autocast.
``attention_stats`` summarises maps for the Parquet columns and the evaluation report.

Example::

    head = build_pooling("attn", in_channels=512, seed=0)
    emb, attn = head(torch.randn(2, 512, 7, 7))  # (2, 512), (2, 7, 7)
    stats = attention_stats(attn)  # {"entropy": (2,), "peak": (2,), "top10_mass": (2,)}
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor, nn


class PoolingHead(nn.Module):
    """Base of the registered heads: ``forward(x (B, C, H, W)) -> (embedding (B, out_dim), attention (B, H, W))``."""

    out_dim: int


POOLINGS: dict[str, type[PoolingHead]] = {}

_H = TypeVar("_H", bound=type[PoolingHead])


def register_pooling(name: str) -> Callable[[_H], _H]:
    """Class decorator adding a head to ``POOLINGS`` under ``name``.

    Raises:
        ValueError: ``name`` is already registered to another class.
    """

    def wrap(cls: _H) -> _H:
        if name in POOLINGS and POOLINGS[name] is not cls:
            raise ValueError(f"pooling {name!r} is already registered to {POOLINGS[name].__name__}")
        POOLINGS[name] = cls
        return cls

    return wrap


def list_poolings() -> list[str]:
    """Names of every registered pooling head, sorted."""
    return sorted(POOLINGS)


def build_pooling(name: str, in_channels: int, seed: int = 0) -> PoolingHead:
    """Build head ``name`` for ``in_channels``-channel feature maps.

    Learned parameters are drawn from ``seed`` inside a forked CPU RNG, so the result is identical on every actor and
    the caller's global RNG state is neither read nor advanced.

    Raises:
        ValueError: unknown head (the message lists the allowed ones) or ``in_channels < 1``.
    """
    if name not in POOLINGS:
        raise ValueError(f"unknown pooling {name!r}; allowed: {', '.join(list_poolings())}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return POOLINGS[name](in_channels)


def _uniform(x: Tensor) -> Tensor:
    b, _, h, w = x.shape
    return torch.full((b, h, w), 1.0 / (h * w), dtype=torch.float32, device=x.device)


def _max_attention(xf: Tensor) -> Tensor:
    b, c, h, w = xf.shape
    idx = xf.flatten(2).argmax(-1)  # (B, C, H, W) -> (B, C, HW) -> (B, C): where each channel peaks
    counts = torch.zeros(b, h * w, dtype=torch.float32, device=xf.device)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))  # (B, HW): channels peaking there
    return (counts / c).view(b, h, w)  # (B, HW) -> (B, H, W)


@register_pooling("avg")
class AvgPool(PoolingHead):
    """Global average pooling. Every position weighs the same, so the attention is uniform."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.out_dim = in_channels

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x.float().mean((2, 3)), _uniform(x)


@register_pooling("max")
class MaxPool(PoolingHead):
    """Global max pooling. Attention at a position is the share of channels whose maximum sits there."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.out_dim = in_channels

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xf = x.float()
        return xf.amax((2, 3)), _max_attention(xf)


@register_pooling("avgmax")
class AvgMaxPool(PoolingHead):
    """Average and max pooling concatenated (the design note's retrieval encoder); ``out_dim = 2C``.

    Attention is the even mix of the two parts' maps: ``0.5 * uniform + 0.5 * max-attention``.
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.out_dim = 2 * in_channels

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xf = x.float()
        emb = torch.cat([xf.mean((2, 3)), xf.amax((2, 3))], 1)  # (B, C) + (B, C) -> (B, 2C)
        return emb, 0.5 * _uniform(x) + 0.5 * _max_attention(xf)


@register_pooling("gem")
class GeMPool(PoolingHead):
    """Generalized mean ``mean(x^p)^(1/p)`` with learnable ``p`` (1 = average, large = max).

    Attention at a position is its share of the pooled mass ``sum_c x^p / sum_{pos,c} x^p``.
    """

    def __init__(self, in_channels: int, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.out_dim = in_channels
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.eps = eps

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xf = x.float().clamp(min=self.eps)
        p = self.p.float()
        # x^p overflows float32 for large p; dividing by a max first leaves both ratios unchanged (so the scale is
        # detached: its exact gradient is zero) and keeps the largest term at 1, so the logs stay finite.
        m_c = xf.detach().amax((2, 3), keepdim=True)  # (B, C, 1, 1)
        emb = (xf / m_c).pow(p).mean((2, 3)).pow(1.0 / p) * m_c.flatten(1)  # (B, C, 1, 1) -> (B, C)
        m_b = m_c.amax(1, keepdim=True)  # (B, 1, 1, 1)
        mass = (xf / m_b).pow(p).sum(1)  # (B, C, H, W) -> (B, H, W)
        return emb, mass / mass.sum((1, 2), keepdim=True)


@register_pooling("crow")
class CroWPool(PoolingHead):
    """CroW cross-dimensional weighting (Kalantidis et al. 2016), parameter-free.

    Attention is the normalized spatial weight ``S / sum S``, ``S`` derived from the channel sum at each position:
    where the map responds strongly across many channels.
    """

    def __init__(self, in_channels: int, a: float = 2.0, b: float = 2.0, eps: float = 1e-6):
        super().__init__()
        self.out_dim = in_channels
        self.a, self.b, self.eps = a, b, eps

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xf = x.float().clamp(min=0)
        s = xf.sum(1)  # (B, C, H, W) -> (B, H, W)
        norm = s.pow(self.a).sum((1, 2), keepdim=True).pow(1.0 / self.a)  # (B, 1, 1)
        # Floor at eps^b so S >= eps after the root: finite gradients at zero positions, and an all-zero map gets a
        # uniform attention instead of 0/0.
        s = (s / norm.clamp(min=self.eps)).clamp(min=self.eps**self.b).pow(1.0 / self.b)
        q = (xf > 0).float().mean((2, 3))  # (B, C): fraction of non-zero positions per channel
        idf = torch.log(q.sum(1, keepdim=True).clamp(min=self.eps) / (q + self.eps))
        idf = torch.where(q > 0, idf, torch.zeros_like(idf))  # empty channels pool to 0 anyway (reference CroW)
        pooled = (xf * s.unsqueeze(1)).sum((2, 3))  # (B, C, H, W) * (B, 1, H, W) -> (B, C)
        return idf * pooled, s / s.sum((1, 2), keepdim=True)


@register_pooling("attn")
class AttnPool(PoolingHead):
    """The design note's attention pooling: an MLP scores every position, softmax over positions, weighted sum.

    Attention is the softmax of the learned scores. The last layer starts near zero, so an untrained head is close
    to (but not exactly) average pooling.
    """

    def __init__(self, in_channels: int, hidden: int | None = None):
        super().__init__()
        self.out_dim = in_channels
        hidden = hidden or max(in_channels // 8, 32)
        # 1x1 convs = the same fc -> ReLU -> fc applied at every position.
        self.scorer = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, 1, 1))
        nn.init.normal_(self.scorer.get_parameter("2.weight"), std=1e-3)  # scorer[2]: the last conv
        nn.init.zeros_(self.scorer.get_parameter("2.bias"))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, _, h, w = x.shape
        scores = self.scorer(x).float().flatten(1)  # (B, 1, H, W) -> (B, HW)
        a = scores.softmax(-1)  # over positions; the note's softmax over the size-1 score axis was a bug
        emb = (x.float().flatten(2) * a.unsqueeze(1)).sum(-1)  # (B, C, HW) * (B, 1, HW) -> (B, C)
        return emb, a.view(b, h, w)


def _sincos_2d(h: int, w: int, dim: int, device: torch.device) -> Tensor:
    """Fixed 2-D sine-cosine positional encoding of an ``h x w`` grid, ``(HW, dim)``, row-major.

    A quarter of the channels each for sin/cos of the row and of the column at geometric frequencies (as in MAE);
    channels left over when ``dim`` is not a multiple of 4 are zero.
    """
    quarter = dim // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32, device=device) / max(quarter, 1))
    rows = torch.arange(h, dtype=torch.float32, device=device).repeat_interleave(w)  # (HW,) row of each position
    cols = torch.arange(w, dtype=torch.float32, device=device).repeat(h)  # (HW,) column of each position
    ang_r, ang_c = rows[:, None] * freq, cols[:, None] * freq  # (HW, 1) * (quarter,) -> (HW, quarter)
    pe = torch.cat([ang_r.sin(), ang_r.cos(), ang_c.sin(), ang_c.cos()], 1)  # (HW, 4 * quarter)
    return nn.functional.pad(pe, (0, dim - 4 * quarter))  # (HW, dim)


@register_pooling("mha")
class MHAPool(PoolingHead):
    """Multi-head attention pooling with a learned query (CLIP's ``AttentionPool2d``).

    The query is the mean feature plus a learned bias; keys and values are the positions plus a fixed 2-D sinusoidal
    encoding (computed per input size, so any ``H x W`` works). Attention is the head-averaged weight the query puts
    on each position; it depends on where features are, not only on what they are.
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.out_dim = in_channels
        self.num_heads = next(n for n in (8, 4, 2, 1) if in_channels % n == 0)
        self.query_bias = nn.Parameter(torch.randn(in_channels) / in_channels**0.5)  # CLIP's positional init scale
        self.mha = nn.MultiheadAttention(in_channels, self.num_heads, batch_first=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        feats = x.float().flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        tokens = feats + _sincos_2d(h, w, c, x.device)  # (B, HW, C) + (HW, C)
        query = feats.mean(1, keepdim=True) + self.query_bias  # (B, 1, C)
        out, weights = self.mha(query, tokens, tokens, need_weights=True, average_attn_weights=True)
        a = weights.float().flatten(1)  # (B, 1, HW) -> (B, HW)
        a = a / a.sum(-1, keepdim=True)  # under autocast the weights may come back in bf16; renormalize in float32
        return out.flatten(1).float(), a.view(b, h, w)  # (B, 1, C) -> (B, C); (B, HW) -> (B, H, W)


def attention_stats(attn: Tensor) -> dict[str, Tensor]:
    """Per-image summary of attention maps ``(B, H, W)``, each entry ``(B,)`` float32.

    ``entropy``: Shannon entropy over positions divided by ``log(HW)``, in [0, 1] (1 = uniform, 0 = one position;
    0 when ``HW == 1``). ``peak``: the largest weight. ``top10_mass``: total weight of the ``ceil(HW / 10)`` largest
    positions.
    """
    flat = attn.float().flatten(1)  # (B, H, W) -> (B, HW)
    n = flat.shape[1]
    ent = -torch.xlogy(flat, flat).sum(1)  # xlogy: 0 * log 0 = 0
    entropy = (ent / math.log(n)).clamp(0.0, 1.0) if n > 1 else torch.zeros_like(ent)
    k = -(-n // 10)  # integer ceil(0.1 * n): the float product rounds up wrongly, e.g. 0.1 * 30 -> 4
    return {"entropy": entropy, "peak": flat.amax(1), "top10_mass": flat.topk(k, dim=1).values.sum(1)}

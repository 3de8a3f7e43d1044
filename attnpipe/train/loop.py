"""One training epoch, and validation: held-out images -> embeddings -> leave-one-out MAP@R and precision@1.

Shuffling draws from ``np.random.default_rng([seed, epoch, rank])``, so epoch ``e`` of a resumed run sees the same
batches as epoch ``e`` of an uninterrupted one. Validation ranks every held-out image against all the others by
exact cosine similarity (its own row removed) and scores same-label relevance with
:mod:`attnpipe.evaluate.metrics`, the definitions the evaluate stage reports.

Example::

    stats = train_epoch(model, opt, inputs, targets, boxes, batch_size=64, seed=0, epoch=3)
    val = retrieval_metrics(embed_all(model, val_inputs, device, torch.float32), val_labels)  # {"map@r", ...}
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnpipe.evaluate.metrics import count_relevant, ranking_metrics
from attnpipe.train.trainable import TrainModel


class TrainingDiverged(ValueError):
    """Held-out embeddings became NaN or infinite."""


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: Tensor,
    targets: Tensor,
    boxes: Tensor,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """One pass over ``inputs`` (this worker's rows) in shuffled batches; returns mean loss and its parts.

    ``model`` is a :class:`~attnpipe.train.trainable.TrainModel`, possibly DDP-wrapped. A last batch of one row is
    dropped (a single sample gives a degenerate metric-loss step). ``dtype`` bf16 runs forward passes under autocast.
    """
    device = device or torch.device("cpu")
    model.train()
    order = np.random.default_rng([seed, epoch, rank]).permutation(len(inputs))
    sums: dict[str, float] = {}
    steps = 0
    for s in range(0, len(order), batch_size):
        rows = torch.from_numpy(order[s : s + batch_size])
        if len(rows) < 2:
            continue
        x, y, b = (t[rows].to(device, non_blocking=True) for t in (inputs, targets, boxes))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype == torch.bfloat16):
            loss, parts = model(x, y, b)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for k, v in {"loss": loss, **parts}.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        steps += 1
    return {k: v / max(steps, 1) for k, v in sums.items()} | {"steps": steps}


@torch.inference_mode()
def embed_all(
    model: TrainModel, inputs: Tensor, device: torch.device, dtype: torch.dtype, batch_size: int = 128
) -> np.ndarray:
    """L2-normalized embeddings ``(N, D)`` float32 of cached maps or uint8 images, in eval mode."""
    model.eval()
    out = []
    for s in range(0, len(inputs), batch_size):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            emb, _ = model.embed(inputs[s : s + batch_size].to(device))
        out.append(F.normalize(emb.float(), dim=1).cpu())
    return torch.cat(out).numpy()


def retrieval_metrics(emb: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Leave-one-out exact retrieval among ``emb`` (unit rows) with same-label relevance: MAP@R and precision@1.

    Sized for held-out sets (an ``N x N`` similarity matrix).

    Raises:
        TrainingDiverged: non-finite embeddings (training diverged; a lower ``train.lr`` usually helps).
    """
    if not np.isfinite(emb).all():
        bad = int((~np.isfinite(emb)).any(1).sum())
        raise TrainingDiverged(
            f"{bad} of {len(emb)} held-out embeddings are not finite: training diverged (try a lower train.lr)"
        )
    labels = np.asarray(labels, dtype=object)
    n = len(emb)
    ranking = np.argsort(-(emb @ emb.T), axis=1, kind="stable")  # (N, N) by cosine, descending
    ranking = ranking[ranking != np.arange(n)[:, None]].reshape(n, n - 1)  # each query's own row removed
    rel = labels[ranking] == labels[:, None]
    num_rel = count_relevant(labels, labels, np.ones(n, bool))
    m = ranking_metrics(rel, num_rel, ks=(1,))
    return {"map@r": m["map@r"], "precision@1": m["precision@1"]}

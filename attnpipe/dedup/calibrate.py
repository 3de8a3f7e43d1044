"""The space dedup compares in (centred, optionally PCA-whitened cosine) and the automatic threshold.

Embeddings of random or weakly trained backbones share one dominant direction (ReLU features pooled over space all
point into a narrow cone), so raw cosines of unrelated images sit near 1. Centring on the dataset mean removes that
direction; PCA whitening (eigenvalues shrunk by ``shrink`` × their mean, so a sample smaller than the dimension is
safe) evens out the few high-variance directions that global image statistics dominate.

The automatic threshold is an outlier cut on each vector's nearest-neighbour similarity: most vectors' nearest
neighbour is merely a look-alike, copies are outliers above that bulk. The bulk's median and MAD are estimated by
sigma clipping (recompute them on the vectors under ``median + z·MAD`` until stable), so a large share of
duplicates (a third of the items in the benchmark) does not inflate the scale; the threshold is the last cut.

Example::

    t = fit_transform(sample, whiten=True)        # mean (D,), whitening (D, D)
    Z = t.apply(X)                                # float32, unit rows
    threshold, info = nn_threshold(nn_sims, z=4.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAD_SCALE = 1.4826  # MAD of a normal distribution -> its standard deviation
MAX_THRESHOLD = 0.995


@dataclass(frozen=True)
class Transform:
    mean: np.ndarray  # (D,) float32
    proj: np.ndarray | None = None  # (D, D) float32 whitening matrix, or None (centring only)

    def apply(self, X: np.ndarray) -> np.ndarray:
        """``(n, D)`` -> centred (whitened) unit rows, float32."""
        Z = np.asarray(X, np.float32) - self.mean
        if self.proj is not None:
            Z = Z @ self.proj
        norms = np.linalg.norm(Z, axis=1, keepdims=True)
        return (Z / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def fit_transform(sample: np.ndarray, whiten: bool = True, shrink: float = 0.5) -> Transform:
    """Centring (and PCA whitening) fitted on a sample ``(s, D)`` of the dataset."""
    X = np.asarray(sample, np.float64)
    mean = X.mean(0)
    if not whiten:
        return Transform(mean.astype(np.float32))
    C = (X - mean).T @ (X - mean) / max(len(X) - 1, 1)  # (D, D)
    w, V = np.linalg.eigh(C)
    w = np.maximum(w, 0.0)
    proj = V / np.sqrt(w + shrink * max(w.mean(), 1e-12))  # columns scaled: (D, D)
    return Transform(mean.astype(np.float32), proj.astype(np.float32))


def nn_threshold(nn: np.ndarray, z: float = 4.0, iters: int = 50) -> tuple[float, dict]:
    """Sigma-clipped ``median + z·MAD`` of nearest-neighbour similarities; returns (threshold, how it was chosen)."""
    nn = np.asarray(nn, np.float64)
    nn = nn[np.isfinite(nn)]
    if len(nn) < 10:
        raise ValueError(f"too few vectors ({len(nn)}) to calibrate a threshold; pass --threshold")
    keep = nn
    for it in range(1, iters + 1):
        med = float(np.median(keep))
        mad = MAD_SCALE * float(np.median(np.abs(keep - med)))
        cut = med + z * mad
        new = nn[nn < cut]
        if len(new) == len(keep) or len(new) < 10:
            break
        keep = new
    threshold = float(min(cut, MAX_THRESHOLD))
    info = {
        "rule": f"sigma-clipped median + {z:g} * MAD of nearest-neighbour similarity",
        "z": z,
        "median": round(med, 6),
        "mad": round(mad, 6),
        "iterations": it,
        "vectors": len(nn),
        "bulk_vectors": len(keep),
        "clamped": bool(cut > MAX_THRESHOLD),
        "nn_quantiles": {f"q{q:02d}": round(float(np.quantile(nn, q / 100)), 6) for q in (1, 10, 50, 90, 99)},
    }
    return threshold, info

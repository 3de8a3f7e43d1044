"""Parquet schema v1 of an embeddings dataset (the README's contract): one row per input image, ok or not."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = "1"


def schema(dim: int, positions: int, metadata: dict[str, object] | None = None) -> pa.Schema:
    """Parquet schema v1 (see README): one row per input image, ok or not."""
    fields = [
        ("id", pa.string()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("label", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("embedding", pa.list_(pa.float32(), dim)),
        ("attention", pa.list_(pa.float16(), positions)),
        ("attn_h", pa.int16()),
        ("attn_w", pa.int16()),
        ("attn_entropy", pa.float32()),
        ("attn_peak", pa.float32()),
        ("attn_top10_mass", pa.float32()),
        ("box", pa.list_(pa.float32(), 4)),  # v1 extension: object box [x0, y0, x1, y1] normalized, when known
    ]
    meta = {"attnpipe.schema_version": SCHEMA_VERSION, **(metadata or {})}
    return pa.schema(fields, metadata={k: str(v) for k, v in meta.items()})


def fixed_list(values: np.ndarray, valid: np.ndarray, type_: pa.DataType) -> pa.Array:
    """``(n, k)`` array -> ``fixed_size_list`` array, null where ``valid`` is False (no copy of the values)."""
    k = values.shape[1]
    flat = pa.array(values.reshape(-1), type=type_.value_type)
    mask = pa.array(~valid) if not valid.all() else None
    return pa.FixedSizeListArray.from_arrays(flat, k, mask=mask)

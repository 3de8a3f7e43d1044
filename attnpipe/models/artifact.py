"""Trained-encoder artifacts: a ``.safetensors`` file of the whole ``ImageEncoder`` plus a JSON sidecar.

``head.safetensors`` holds the full encoder state dict (backbone + pooling head), so it is self-contained;
``head.json`` (the weights path with ``.safetensors`` replaced by ``.json``) says what it is: backbone, pooling,
image size, input normalization, label set, training config and per-epoch metrics, the fingerprint of the backbone
weights training started from, and the sha256 of the ``.safetensors`` file, checked on every load. No pickle is
involved anywhere.

``model.weights=head.safetensors`` is recognised as an artifact by its sidecar (a JSON file next to it whose
``format`` is :data:`FORMAT`); a ``.safetensors`` file without one stays a torchvision state dict for the backbone.

Example::

    save_encoder(encoder, "out/head.safetensors", {"backbone": "resnet18", "pooling": "attn", ...})
    meta = read_sidecar("out/head.safetensors")      # None for plain torchvision weights
    check_matches(meta, "resnet18", "attn", 224, "out/head.safetensors")
"""

from __future__ import annotations

import json
import os

from attnpipe.fs import sha256_file
from attnpipe.models.config import local_weights

FORMAT = "attnpipe.encoder"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """An artifact that does not fit the config, fails its fingerprint check, or is malformed."""


def sidecar_path(weights: str) -> str:
    """``x/head.safetensors`` -> ``x/head.json``."""
    return weights.removesuffix(".safetensors") + ".json"


file_sha256 = sha256_file  # the sidecar's fingerprint of the weights file


def read_sidecar(weights: str) -> dict | None:
    """The sidecar of an artifact, or None when ``weights`` is not one (a keyword, a torch file, no sidecar).

    Raises:
        ArtifactError: the sidecar claims to be ours but has an unsupported version or lacks required fields.
    """
    weights = local_weights(weights)
    if not weights.endswith(".safetensors") or not os.path.isfile(sidecar_path(weights)):
        return None
    try:
        with open(sidecar_path(weights)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None  # someone else's JSON next to plain weights: not an artifact
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{sidecar_path(weights)} has format_version {meta.get('format_version')!r}; this attnpipe reads "
            f"version {FORMAT_VERSION}"
        )
    missing = [k for k in ("backbone", "pooling", "image_size", "sha256", "normalization") if k not in meta]
    if missing:
        raise ArtifactError(f"{sidecar_path(weights)} lacks {missing}; re-export the artifact with attnpipe train")
    return meta


def check_matches(meta: dict, backbone: str, pooling: str, image_size: int | None, weights: str) -> None:
    """Refuse an artifact trained for another backbone, head or image size, naming the ``--set`` that fits it.

    ``image_size=None`` skips the size check (an ``ImageEncoder`` alone does not know the input size).
    """
    wanted: dict[str, tuple[object, object]] = {
        "model.backbone": (meta["backbone"], backbone),
        "model.pooling": (meta["pooling"], pooling),
    }
    if image_size is not None:
        wanted["data.image_size"] = (meta["image_size"], image_size)
    wrong = {k: v for k, v in wanted.items() if v[0] != v[1]}
    if wrong:
        got = ", ".join(f"{k}={cfg!r}" for k, (_, cfg) in wrong.items())
        fix = " ".join(f"--set {k}={art}" for k, (art, _) in wrong.items())
        raise ArtifactError(
            f"model.weights={weights} was trained for backbone={meta['backbone']}, pooling={meta['pooling']}, "
            f"image_size={meta['image_size']}, but the config has {got}; use {fix}"
        )


def save_encoder(encoder, path: str, meta: dict) -> dict:
    """Write ``encoder.state_dict()`` to ``path`` and the sidecar beside it; returns the sidecar written.

    Both files are written under temporary names and renamed into place, the weights first: a crash between the two
    renames leaves a pair whose sha256 check fails loudly on load, never a silently mismatched encoder.
    """
    from safetensors.torch import save_file

    if not path.endswith(".safetensors"):
        raise ArtifactError(f"trained encoders are saved as .safetensors files, got {path!r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    # one metadata key: safetensors writes metadata in hash-map order, so two keys could differ run to run and
    # identical weights would get different sha256 fingerprints (and trigger needless re-encodes)
    save_file(state, path + ".tmp", metadata={"format": f"{FORMAT}/{FORMAT_VERSION}"})
    side = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "sha256": file_sha256(path + ".tmp")}
    with open(sidecar_path(path) + ".tmp", "w") as f:
        json.dump(side, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
    os.replace(sidecar_path(path) + ".tmp", sidecar_path(path))
    return side


def load_encoder_state(encoder, weights: str, meta: dict) -> None:
    """Verify the file against the sidecar's sha256, then load it into ``encoder`` (strict: every key must fit).

    Raises:
        ArtifactError: fingerprint mismatch (a modified or swapped file) or a state that does not fit the encoder.
    """
    weights = local_weights(weights)
    from safetensors.torch import load_file

    digest = file_sha256(weights)
    if digest != meta["sha256"]:
        raise ArtifactError(
            f"{weights} does not match its sidecar {sidecar_path(weights)}: sha256 {digest[:16]}... but the sidecar "
            f"records {meta['sha256'][:16]}...; the file was modified or replaced after training"
        )
    try:
        encoder.load_state_dict(load_file(weights), strict=True)
    except RuntimeError as exc:
        raise ArtifactError(
            f"{weights} does not fit a {meta['backbone']} + {meta['pooling']} encoder: {str(exc)[:300]}"
        ) from exc

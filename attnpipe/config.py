"""Typed configuration: defaults <- YAML file <- ``--set key=value`` overrides, validated.

Each component owns a frozen dataclass of its settings; :class:`Config` composes them. Unknown keys and bad
values fail fast with a message naming the key and what is allowed, before any Ray work starts.

Example::

    cfg = load_config("configs/local.yaml", ["model.backbone=resnet50", "encode.batch_size=64"])
    cfg.model.backbone  # 'resnet50'
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from attnpipe import fs as _fs
from attnpipe.models.config import WEIGHTS_KEYWORDS, ModelConfig  # owned by the model component; re-exported here

DEVICES = ("auto", "cuda", "cpu")


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message says what to fix."""


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
UNFREEZE = ("none", "last", "all")
LOSSES = ("normsoftmax",)


@dataclass(frozen=True)
class DataConfig:
    image_size: int = 224
    max_pixels: int = 64_000_000  # decompression-bomb guard: images declaring more pixels become error rows
    max_bytes: int = 64 * 1024 * 1024  # larger encoded members become error rows, unread
    read_chunk: int = 512  # images per read task for image folders
    decode: str = "auto"  # auto | cpu | gpu: JPEG decode by nvJPEG on the encoder's GPU (auto: when it has one)


@dataclass(frozen=True)
class EncodeConfig:
    batch_size: int = 64
    num_encoders: str = "0"  # "N" or "min,max" (elastic pool); 0 = one per GPU (one CPU actor without GPUs)
    device: str = "auto"  # auto = GPU when the cluster has one now; cuda = request GPUs (autoscaling from zero); cpu
    gpus_per_encoder: float = 1.0  # GPUs each encoder requests (0.5 = two encoders share a GPU)
    precision: str = "auto"  # auto = bf16 on GPU and on CPUs with native bf16, else fp32
    decode_batch_size: int = 64
    threads: int = 0  # torch threads in a CPU encoder; 0 = all cores of its node
    rows_per_file: int = 50_000  # target rows per Parquet part
    compile: bool = False  # torch.compile the encoder (minutes of warm-up per actor; pays off on long GPU runs)


@dataclass(frozen=True)
class TrainConfig:
    """``attnpipe train``: fitting the pooling head (and optionally the backbone's end) on labeled shards."""

    epochs: int = 20
    batch_size: int = 64  # global: split evenly across Ray Train workers
    lr: float = 3e-3  # AdamW, head and class proxies
    backbone_lr_scale: float = 0.1  # unfrozen backbone layers learn at lr * this (a pretrained trunk drifts slowly)
    weight_decay: float = 1e-4
    unfreeze: str = "none"  # none (train on cached feature maps) | last (the backbone's last stage) | all
    loss: str = "normsoftmax"  # see attnpipe.train.objective
    temperature: float = 0.05  # normsoftmax: logits = cos(embedding, class proxy) / temperature
    ce_weight: float = 0.0  # auxiliary plain-softmax cross-entropy on the unnormalized embedding
    attn_weight: float = 0.5  # attention regularizer: -log(mass in the object box), or an entropy target
    attn_entropy: float = 0.5  # normalized-entropy target for images without a box
    val_fraction: float = 0.2  # held-out share of every label, for per-epoch MAP@R and early stopping
    patience: int = 5  # epochs without a better validation MAP@R before stopping; 0 = never stop early
    workers: int = 0  # 0 = this process; N = Ray Train with N workers (one GPU each when the cluster has them)
    seed: int = 0  # split, shuffling and proxy init


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated :class:`Config` from defaults, an optional YAML file and ``key=value`` overrides.

    Raises:
        ConfigError: the file is missing or not a mapping, a key is unknown, or a value is invalid.
    """
    raw: dict[str, Any] = {}
    if path:
        from attnpipe import fs

        if not fs.is_file(path):
            raise ConfigError(f"config file {path!r} " + ("is not a file" if fs.exists(path) else "does not exist"))
        try:
            loaded = yaml.safe_load(fs.read_text(path)) or {}
        except yaml.YAMLError as exc:  # the message carries the line and column
            raise ConfigError(f"config file {path!r} is not valid YAML: {' '.join(str(exc).split())}") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"config file {path!r} cannot be read: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set expects section.key=value (e.g. model.backbone=resnet50), got {item!r}")
        section, _, name = key.strip().partition(".")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"section {section!r} must be a mapping")
        try:
            raw[section][name] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML (quote it, e.g. {key}='...')") from None
    cfg = from_dict(raw)
    validate(cfg)
    return cfg


def from_dict(raw: dict[str, Any]) -> Config:
    """Config from a nested mapping; unknown sections or keys raise :class:`ConfigError` listing the allowed ones."""
    sections = {f.name: f.type for f in fields(Config)}
    kwargs = {}
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(f"unknown config section {section!r}; allowed: {sorted(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
        cls = {"model": ModelConfig, "data": DataConfig, "encode": EncodeConfig, "train": TrainConfig}[section]
        kwargs[section] = _build_section(cls, section, values)
    return Config(**kwargs)


def _build_section(cls: type, section: str, values: dict[str, Any]) -> Any:
    allowed = {f.name: f for f in fields(cls)}
    out = {}
    for key, value in values.items():
        if key not in allowed:
            raise ConfigError(f"unknown key {section}.{key}; allowed in {section}: {sorted(allowed)}")
        expected = type(allowed[key].default)
        if expected is int and not (isinstance(value, int) and not isinstance(value, bool)):
            raise ConfigError(f"{section}.{key} must be an integer, got {value!r}")
        if expected is float:
            value = _as_float(f"{section}.{key}", value)
        if expected is str:
            value = "none" if value is None else str(value)
        out[key] = value
    return cls(**out)


def _as_float(name: str, value: Any) -> float:
    # YAML 1.1 reads "1e-3" (no dot) as a string, so numeric strings are accepted too; bools are not numbers here.
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return out


def validate(cfg: Config) -> None:
    """Check values that types alone cannot; imports torchvision lazily for the backbone/pooling registries."""
    from attnpipe.models.backbones import list_backbones
    from attnpipe.models.pooling import list_poolings

    m, d, e = cfg.model, cfg.data, cfg.encode
    backbones = list_backbones()
    if m.backbone not in backbones:
        raise ConfigError(
            f"model.backbone={m.backbone!r} is not a supported torchvision backbone; allowed: {', '.join(backbones)}"
        )
    if m.backbone.startswith("vit_") and d.image_size != 224:
        raise ConfigError(f"model.backbone={m.backbone} needs data.image_size=224 (its position embeddings are fixed)")
    if m.pooling not in list_poolings():
        raise ConfigError(f"model.pooling={m.pooling!r} is unknown; allowed: {', '.join(list_poolings())}")
    if m.weights not in WEIGHTS_KEYWORDS and not _fs.is_file(m.weights):
        raise ConfigError(
            f"model.weights={m.weights!r} is neither 'none', 'default' nor an existing file "
            "(.safetensors or a torch state dict)"
        )
    if e.precision not in PRECISIONS:
        raise ConfigError(f"encode.precision={e.precision!r}; allowed: {', '.join(PRECISIONS)}")
    from attnpipe.data.gpu_decode import DECODE_MODES  # its owner, which imports torch

    if d.decode not in DECODE_MODES:
        raise ConfigError(f"data.decode={d.decode!r}; allowed: {', '.join(DECODE_MODES)}")
    if not isinstance(e.compile, bool):
        raise ConfigError(f"encode.compile must be true or false, got {e.compile!r}")
    _positive("data.image_size", d.image_size, minimum=32, maximum=4096)
    _positive("data.max_pixels", d.max_pixels)
    _positive("data.max_bytes", d.max_bytes)
    _positive("data.read_chunk", d.read_chunk)
    _positive("encode.batch_size", e.batch_size, maximum=65536)
    _positive("encode.decode_batch_size", e.decode_batch_size, maximum=65536)
    _positive("encode.rows_per_file", e.rows_per_file)
    encoder_pool(e.num_encoders)  # raises ConfigError on a bad value
    if e.device not in DEVICES:
        raise ConfigError(f"encode.device={e.device!r}; allowed: {', '.join(DEVICES)}")
    if not 0 < e.gpus_per_encoder <= 8:
        raise ConfigError(
            f"encode.gpus_per_encoder must be in (0, 8] (fractions share a GPU), got {e.gpus_per_encoder}"
        )
    _positive("encode.threads", e.threads, minimum=0)
    _validate_train(cfg.train)
    _check_weights(cfg)
    _check_trained_weights(cfg)


def _validate_train(t: TrainConfig) -> None:
    if t.unfreeze not in UNFREEZE:
        raise ConfigError(f"train.unfreeze={t.unfreeze!r}; allowed: {', '.join(UNFREEZE)}")
    if t.loss not in LOSSES:
        raise ConfigError(f"train.loss={t.loss!r}; allowed: {', '.join(LOSSES)}")
    _positive("train.epochs", t.epochs)
    _positive("train.batch_size", t.batch_size, minimum=2)
    _positive("train.patience", t.patience, minimum=0)
    _positive("train.workers", t.workers, minimum=0)
    for name in ("lr", "temperature"):
        if getattr(t, name) <= 0:
            raise ConfigError(f"train.{name} must be > 0, got {getattr(t, name)}")
    for name in ("weight_decay", "ce_weight", "attn_weight", "backbone_lr_scale"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name} must be >= 0, got {getattr(t, name)}")
    if not 0 <= t.attn_entropy <= 1:
        raise ConfigError(f"train.attn_entropy is a normalized entropy and must be in [0, 1], got {t.attn_entropy}")
    if not 0 < t.val_fraction < 1:
        raise ConfigError(
            f"train.val_fraction must be in (0, 1) (validation picks the best epoch), got {t.val_fraction}"
        )


def _check_trained_weights(cfg: Config) -> None:
    """A trained-encoder artifact fixes backbone, pooling and image size; say which ``--set`` matches it."""
    from attnpipe.models.artifact import ArtifactError, check_matches, file_sha256, read_sidecar, sidecar_path

    try:
        meta = read_sidecar(cfg.model.weights)
        if meta is not None:
            check_matches(meta, cfg.model.backbone, cfg.model.pooling, cfg.data.image_size, cfg.model.weights)
    except ArtifactError as exc:
        raise ConfigError(str(exc)) from None
    if meta is not None and file_sha256(cfg.model.weights) != meta["sha256"]:  # tampered or damaged since training
        raise ConfigError(
            f"model.weights={cfg.model.weights} does not match the sha256 in {sidecar_path(cfg.model.weights)}: "
            "the file changed since `attnpipe train` wrote it; restore it or train again"
        )


def _check_weights(cfg: Config) -> None:
    """Weights an actor could not load fail here, before Ray starts (missing cache, unreadable, pickled, damaged)."""
    from attnpipe.models.backbones import check_weights

    try:
        check_weights(cfg.model.backbone, cfg.model.weights)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def encoder_pool(spec: str) -> tuple[int, int]:
    """``encode.num_encoders`` -> ``(min, max)`` actors: ``"N"`` -> ``(N, N)``, ``"2,8"`` -> ``(2, 8)``; 0 = auto.

    Raises:
        ConfigError: not ``N`` or ``min,max`` with ``0 <= min <= max``.
    """
    parts = [p.strip() for p in str(spec).split(",")]
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (-1, -1)
    except ValueError:
        lo = hi = -1
    if lo < 0 or hi < lo or (len(parts) == 2 and lo == 0):
        raise ConfigError(f"encode.num_encoders must be N or min,max (e.g. 2,8) with 1 <= min <= max, got {spec!r}")
    return lo, hi


def _positive(name: str, value: int, minimum: int = 1, maximum: int | None = None) -> None:
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value}")

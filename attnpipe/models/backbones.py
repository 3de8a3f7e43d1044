"""Torchvision backbones truncated to their last spatial feature map.

A backbone maps images ``(B, 3, S, S)`` to a feature map ``(B, C, h, w)``; pooling heads turn that map into an
embedding and an attention map. Families are registered by name prefix; ``list_backbones()`` lists every torchvision
classification model that one of them covers. ViTs expose their patch-token grid as the map.

Example::

    net, channels = build_backbone("resnet18", weights="none", seed=0)
    fmap = net(torch.randn(2, 3, 224, 224))  # (2, 512, 7, 7)
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import cast

import torch
import torchvision
from torch import nn

from attnpipe.models.config import local_weights

# name prefix -> function(model) -> (feature extractor, channels)
_FAMILIES: dict[str, Callable[[nn.Module], tuple[nn.Module, int]]] = {}


def _family(*prefixes: str):
    def wrap(fn):
        for p in prefixes:
            _FAMILIES[p] = fn
        return fn

    return wrap


@_family("resnet", "resnext", "wide_resnet")
def _resnet(m: torchvision.models.ResNet) -> tuple[nn.Module, int]:
    trunk = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)
    return trunk, m.fc.in_features


@_family("regnet_")
def _regnet(m: torchvision.models.RegNet) -> tuple[nn.Module, int]:
    return nn.Sequential(m.stem, m.trunk_output), m.fc.in_features


@_family("convnext_", "efficientnet_", "mobilenet_v2", "mobilenet_v3")
def _features(
    m: torchvision.models.ConvNeXt
    | torchvision.models.EfficientNet
    | torchvision.models.MobileNetV2
    | torchvision.models.MobileNetV3,
) -> tuple[nn.Module, int]:
    linear = next(mod for mod in m.classifier.modules() if isinstance(mod, nn.Linear))
    return m.features, linear.in_features


@_family("densenet")
def _densenet(m: torchvision.models.DenseNet) -> tuple[nn.Module, int]:
    return nn.Sequential(m.features, nn.ReLU(inplace=False)), m.classifier.in_features


class _VitGrid(nn.Module):
    """ViT encoder whose patch tokens (class token dropped) are reshaped to a ``(B, C, h, w)`` grid."""

    def __init__(self, vit: torchvision.models.VisionTransformer):
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.encoder(torch.cat([self.vit.class_token.expand(x.shape[0], -1, -1), self._patches(x)], 1))
        patches = tokens[:, 1:]  # (B, 1 + hw, C) -> (B, hw, C)
        side = int(patches.shape[1] ** 0.5)
        return patches.transpose(1, 2).reshape(x.shape[0], -1, side, side)  # (B, hw, C) -> (B, C, h, w)

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.conv_proj(x).flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, hw, C)


@_family("vit_")
def _vit(m: torchvision.models.VisionTransformer) -> tuple[nn.Module, int]:
    return _VitGrid(m), m.hidden_dim


def list_backbones() -> list[str]:
    """Every torchvision classification model with a spatial feature map that attnpipe can truncate."""
    names = torchvision.models.list_models(module=torchvision.models)
    return sorted(n for n in names if _family_of(n) is not None)


def _family_of(name: str):
    for prefix, fn in _FAMILIES.items():
        if name.startswith(prefix):
            return fn
    return None


def build_backbone(name: str, weights: str = "none", seed: int = 0) -> tuple[nn.Module, int]:
    """Build ``name`` truncated to its last feature map; returns ``(module, channels)`` in eval mode.

    Args:
        weights: ``none`` (random init from ``seed``, identical everywhere), ``default`` (torchvision's pretrained
            weights from the local ``TORCH_HOME`` cache; never downloads), or a path to a state dict of the full
            torchvision model (``.safetensors``, or a torch file loaded with ``weights_only=True``).

    Raises:
        ValueError: unknown backbone, or weights that are missing or do not fit the model.
    """
    fam = _family_of(name)
    if fam is None or name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(list_backbones())}")
    kwargs = {"image_size": 224} if name.startswith("vit_") else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    if weights == "default":
        model.load_state_dict(_cached_default_state(name))
    elif weights != "none":
        _load_file(model, local_weights(weights))
    trunk, channels = fam(model)
    return trunk.eval(), channels


def _cached_default_state(name: str) -> dict[str, torch.Tensor]:
    return torch.load(_default_weights_path(name), map_location="cpu", weights_only=True)


def _default_weights_path(name: str) -> str:
    enum = torchvision.models.get_model_weights(name).DEFAULT
    file = os.path.basename(enum.url)
    hub = os.path.join(torch.hub.get_dir(), "checkpoints", file)
    if not os.path.isfile(hub):
        raise ValueError(
            f"model.weights=default needs torchvision's {name} weights at {hub} (no download is attempted); "
            f"copy {file} there, set TORCH_HOME, or pass a weights file path"
        )
    return hub


def check_weights(name: str, weights: str) -> None:
    """Fail fast (before any actor loads them) on weights that cannot load: a missing ``default`` cache, or a file
    that is unreadable, not safetensors/torch, pickled beyond plain tensors, or damaged. Reads headers only where
    the format allows (safetensors header; torch zip files memory-mapped).

    Raises:
        ValueError: what is wrong and what to do instead.
    """
    weights = local_weights(weights)
    if weights == "none":
        return
    if weights == "default":
        _default_weights_path(name)
        return
    if not os.path.isfile(weights):
        raise ValueError(f"model.weights={weights!r} is not a file")
    if not os.access(weights, os.R_OK):
        raise ValueError(f"model.weights={weights!r} is not readable (check its permissions)")
    try:
        if weights.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(weights, framework="pt") as f:
                f.keys()
        else:
            _torch_load_checked(weights)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"model.weights={weights!r} holds pickled objects beyond tensors, refused (weights_only=True loading): "
            f"{str(exc).splitlines()[0][:200]}; save a state_dict (model.state_dict()) or use .safetensors"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any loader failure means a damaged or foreign file
        raise ValueError(
            f"model.weights={weights!r} cannot be loaded (damaged, truncated or not a weights file): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        ) from None


def _torch_load_checked(path: str) -> None:
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format cannot be mapped


def _load_file(model: nn.Module, path: str) -> None:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"weights file {path} does not fit {type(model).__name__}: {str(exc)[:300]}") from exc


def last_stage(name: str, trunk: nn.Module) -> list[nn.Module]:
    """The modules ``train.unfreeze=last`` trains: the backbone's last stage, the one that makes the feature map.

    resnet/resnext/wide_resnet: ``layer4``; regnet: the last stage of ``trunk_output``; convnext, efficientnet and
    mobilenet: ``features[-1]`` (convnext's last block stage; efficientnet's and mobilenet's final 1x1 conv);
    densenet: ``denseblock4`` + ``norm5``; vit: the last encoder block + the final LayerNorm.

    Raises:
        ValueError: ``name`` is not a supported backbone.
    """
    if isinstance(trunk, _VitGrid):
        return [trunk.vit.encoder.layers[-1], trunk.vit.encoder.ln]
    stages = cast(nn.Sequential, trunk)  # every other family's trunk is a Sequential (see the _family functions)
    if name.startswith("regnet_"):
        return [cast(nn.Sequential, stages[1])[-1]]  # trunk_output's last stage
    if name.startswith("densenet"):
        return [stages.get_submodule("0.denseblock4"), stages.get_submodule("0.norm5")]
    if _family_of(name) is None:
        raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(list_backbones())}")
    return [stages[-1]]  # resnet trunk ends in layer4; the features families in features[-1]


def weights_fingerprint(weights: str, backbone: str, seed: int) -> str:
    """A short id of the weights an encoder used, stored with every embedding dataset."""
    if weights == "none":
        return f"random:{backbone}:seed={seed}"
    if weights == "default":
        return f"torchvision:{torchvision.models.get_model_weights(backbone).DEFAULT}"
    from attnpipe.store import sha256_file

    return f"sha256:{sha256_file(weights)[:16]}"

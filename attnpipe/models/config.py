"""The model component's settings: which backbone, pooling head and weights the encoder is built from.

Owned here, beside the registries that give its values meaning; :mod:`attnpipe.config` composes it into
:class:`attnpipe.config.Config` (and re-exports it, so ``from attnpipe.config import ModelConfig`` keeps working).
Importing this module imports neither torch nor torchvision.

Example::

    ModelConfig(backbone="resnet50", pooling="gem")          # weights="none": random, from seed 0
"""

from __future__ import annotations

from dataclasses import dataclass

WEIGHTS_KEYWORDS = ("none", "default")  # anything else must be a file: a state dict or an `attnpipe train` artifact


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet18"  # see attnpipe.models.backbones.list_backbones()
    pooling: str = "attn"  # see attnpipe.models.pooling.list_poolings()
    weights: str = "none"  # none | default (torchvision's pretrained, from the local TORCH_HOME cache) | a file path
    seed: int = 0  # init of random backbone weights and learned heads; identical in every actor

    @property
    def random_weights(self) -> bool:
        """True when the backbone is randomly initialized: embeddings then carry little semantic signal."""
        return self.weights == "none"


def local_weights(weights: str) -> str:
    """``model.weights`` as a local file torch/safetensors can open: keywords as they are, a URI (``s3://...``) as a
    cached download (with its ``.json`` sidecar when it is an ``attnpipe train`` artifact)."""
    if weights in WEIGHTS_KEYWORDS:
        return weights
    from attnpipe import fs

    return fs.local_copy(weights, siblings=(".json",))

"""Training the pooling head (optionally the backbone's end) that the encoder uses; see :mod:`.trainer`.

``train_head`` and ``train_for_demo`` are resolved on first use (PEP 562), so ``import attnpipe.train`` (and the
CLI's ``--help``) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from attnpipe.train.trainer import train_for_demo, train_head

__all__ = ["train_for_demo", "train_head"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from attnpipe.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

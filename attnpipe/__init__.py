"""attnpipe: distributed batch embedding, indexing and evaluation of images on Ray, with attention-pooling heads.

from attnpipe import load_config, encode, read_embeddings
encode(["data/"], "emb/", load_config(overrides=["model.backbone=resnet50"]))
"""

from attnpipe.config import Config, ConfigError, load_config
from attnpipe.data.shards import InputError, discover
from attnpipe.store import load_vectors, read_embeddings, read_manifest

__version__ = "0.1.0"


def encode(*args, **kwargs):
    """See :func:`attnpipe.encode.encode` (imported lazily: it pulls in Ray and torch)."""
    from attnpipe.encode import encode as _encode

    return _encode(*args, **kwargs)


def reindex(*args, **kwargs):
    """See :func:`attnpipe.reindex.reindex` (imported lazily)."""
    from attnpipe.reindex import reindex as _reindex

    return _reindex(*args, **kwargs)


def train_head(*args, **kwargs):
    """See :func:`attnpipe.train.trainer.train_head` (imported lazily)."""
    from attnpipe.train.trainer import train_head as _train_head

    return _train_head(*args, **kwargs)


__all__ = [
    "Config",
    "ConfigError",
    "InputError",
    "discover",
    "encode",
    "load_config",
    "load_vectors",
    "read_embeddings",
    "read_manifest",
    "reindex",
    "train_head",
]

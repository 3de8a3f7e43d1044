"""attnpipe: distributed batch embedding, indexing and evaluation of images on Ray, with attention-pooling heads.

The public API, each name the library's own function or class (real signatures, ``help()`` shows them), imported
on first use so that ``import attnpipe`` pulls in neither torch nor Ray::

    import attnpipe
    cfg = attnpipe.load_config(overrides=["model.backbone=resnet50"])
    attnpipe.encode(["data/"], "emb/", cfg)
    attnpipe.build_index("emb/", "index/")
    metrics = attnpipe.evaluate("emb/", "index/", "eval/")
    scores, ids = attnpipe.SearchIndex.load("index/").search(vectors, k=10)

``encode``, ``evaluate``, ``reindex`` and ``dedup`` share their names with submodules. Importing such a submodule
(``import attnpipe.encode``, which the library itself does) would normally rebind the package attribute to the
module; the package's module class refuses that one rebinding, so ``attnpipe.encode`` is always the function. Reach
a submodule with ``from attnpipe.encode import ...`` or ``importlib.import_module("attnpipe.encode")``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access)
_LAZY = {
    "encode": "attnpipe.encode",
    "build_index": "attnpipe.index.build",
    "evaluate": "attnpipe.evaluate.runner",
    "reindex": "attnpipe.reindex",
    "train_head": "attnpipe.train.trainer",
    "dedup": "attnpipe.dedup",
    "DedupConfig": "attnpipe.dedup",
    "SearchIndex": "attnpipe.index.search",
    "Searcher": "attnpipe.query",
    "search_image": "attnpipe.query",
    "Config": "attnpipe.config",
    "ConfigError": "attnpipe.config",
    "load_config": "attnpipe.config",
    "InputError": "attnpipe.data.shards",
    "discover": "attnpipe.data.shards",
    "open_dataset": "attnpipe.store",
    "read_embeddings": "attnpipe.store",
    "load_vectors": "attnpipe.store",
    "read_manifest": "attnpipe.store",
}

if TYPE_CHECKING:
    from attnpipe.config import Config, ConfigError, load_config
    from attnpipe.data.shards import InputError, discover
    from attnpipe.dedup import DedupConfig, dedup
    from attnpipe.encode import encode
    from attnpipe.evaluate.runner import evaluate
    from attnpipe.index.build import build_index
    from attnpipe.index.search import SearchIndex
    from attnpipe.query import Searcher, search_image
    from attnpipe.reindex import reindex
    from attnpipe.store import load_vectors, open_dataset, read_embeddings, read_manifest
    from attnpipe.train.trainer import train_head

__all__ = [
    "Config",
    "ConfigError",
    "DedupConfig",
    "InputError",
    "SearchIndex",
    "Searcher",
    "build_index",
    "dedup",
    "discover",
    "encode",
    "evaluate",
    "load_config",
    "load_vectors",
    "open_dataset",
    "read_embeddings",
    "read_manifest",
    "reindex",
    "search_image",
    "train_head",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cached in the module dict: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return [*__all__, "__version__"]


class _Package(types.ModuleType):
    """The ``attnpipe`` module's class: a submodule import never shadows the public function of the same name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return  # the import system binding ``attnpipe.<submodule>``; the submodule stays in sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

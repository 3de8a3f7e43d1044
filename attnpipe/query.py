"""Search by image: the encoder of an index's source embeddings composed with the vector index.

The index layer knows vectors, not networks (:mod:`attnpipe.index.search`); this module sits above both. A
:class:`Searcher` reads the config saved with the source embeddings (``_config.yaml``), builds the same encoder
once (same backbone, pooling head, weights, image size and precision), and then turns image files, bytes or
decoded pixels into ranked ids.

Example::

    from attnpipe.query import Searcher, search_image
    hits = search_image(SearchIndex.load("index/"), "query.jpg", k=5)   # [(id, cosine), ...], best first
    searcher = Searcher.load("index/")                                   # encoder built once, then reused
    for path, hits in zip(paths, searcher.search_images(paths, k=10)): ...
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import yaml

from attnpipe import fs, log, store
from attnpipe.config import Config, ConfigError, from_dict
from attnpipe.index.search import SearchIndex

logger = log.get_logger(__name__)
Hits = list[tuple[str, float]]


class Searcher:
    """A loaded index plus the encoder that made its vectors; search by image file (local path or URI) or bytes."""

    def __init__(self, index: SearchIndex, cfg: Config | None = None):
        """``cfg`` defaults to the config saved with the index's source embeddings.

        Raises:
            ConfigError: the source embeddings have no saved config (and none was given).
        """
        self.index = index
        self.cfg = cfg if cfg is not None else source_config(index)
        self._runner: Any = (
            None  # an EncoderRunner, built on first use: torch is imported only when an image is encoded
        )

    @classmethod
    def load(cls, root: str, version: str | None = None, cfg: Config | None = None) -> Searcher:
        return cls(SearchIndex.load(root, version), cfg)

    def encode(self, images: Sequence[bytes]) -> np.ndarray:
        """Encoded image bytes -> L2-normalized embeddings ``(n, D)``, exactly as ``attnpipe encode`` makes them.

        Raises:
            attnpipe.data.decode.DecodeError: an image is empty, oversize or not decodable (a ValueError).
        """
        from attnpipe.data.decode import decode_image

        d = self.cfg.data
        pixels = np.stack([decode_image(b, d.image_size, d.max_pixels) for b in images])  # (n, S, S, 3) uint8
        return self.runner(pixels)["embedding"]

    @property
    def runner(self):
        if self._runner is None:
            from attnpipe.models.encoder import EncoderRunner

            e = self.cfg.encode
            self._runner = EncoderRunner(self.cfg.model, e.precision, e.threads)
        return self._runner

    def search_bytes(self, data: bytes, k: int = 10) -> Hits:
        D, names = self.index.search(self.encode([data]), k)
        return list(zip(names[0], D[0].tolist()))

    def search_image(self, path: str, k: int = 10) -> Hits:
        """Top-k ``(id, cosine)`` for one image file.

        Raises:
            FileNotFoundError: no such file. DecodeError (ValueError): not a decodable image.
        """
        return self.search_bytes(fs.read_bytes(path), k)

    def search_images(self, paths: Sequence[str], k: int = 10, batch: int = 64) -> list[Hits]:
        """Top-k for many image files, encoded ``batch`` at a time (progress with ETA in the log)."""
        out: list[Hits] = []
        starts = range(0, len(paths), batch)
        for start in log.progress(starts, "query: encoding images", unit="batch", logger=logger):
            chunk = paths[start : start + batch]
            D, names = self.index.search(self.encode([fs.read_bytes(p) for p in chunk]), k)
            out += [list(zip(n, d.tolist())) for n, d in zip(names, D)]
        return out


def source_config(index: SearchIndex) -> Config:
    """The resolved config saved beside the embeddings the index was built from.

    Raises:
        ConfigError: the embeddings dataset has no ``_config.yaml``.
    """
    src = index.manifest["source"]["embeddings"]
    text = store.open_dataset(src).config_text()
    if text is None:
        raise ConfigError(f"{src} has no {store.CONFIG_FILE}: cannot tell which model encodes a query image")
    return from_dict(yaml.safe_load(text) or {})


def search_image(index: SearchIndex, path: str, k: int = 10) -> Hits:
    """Encode one image file with the model of ``index``'s source embeddings and return its top-k ``(id, cosine)``."""
    return Searcher(index).search_image(path, k)

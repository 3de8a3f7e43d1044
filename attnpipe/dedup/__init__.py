"""Near-duplicate and leakage detection on embeddings (``attnpipe dedup``).

Modules: :mod:`~attnpipe.dedup.calibrate` (comparison space, automatic threshold), :mod:`~attnpipe.dedup.semantic`
(k-means buckets + exact cosine on Ray tasks), :mod:`~attnpipe.dedup.minhash` (weighted MinHash-LSH pairs),
:mod:`~attnpipe.dedup.groups` (union-find, keep rule), :mod:`~attnpipe.dedup.report` (HTML),
:mod:`~attnpipe.dedup.command` (orchestration, CLI arguments), :mod:`~attnpipe.dedup.planted` (planted copies for
measuring quality).

Example::

    from attnpipe.dedup import DedupConfig, dedup
    summary = dedup("emb/", "dedup/", against=["train-emb/"], cfg=DedupConfig(keep="central"))
"""

from attnpipe.dedup.command import DedupConfig, dedup

__all__ = ["DedupConfig", "dedup"]

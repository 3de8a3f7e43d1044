"""The whole pipeline in one call: (sample →) (train →) encode → index → eval; what ``attnpipe run`` and
``make run`` do.

Without inputs it makes a sample dataset (4 tar shards of labeled synthetic images with object boxes, plus a shard
of broken members) and trains the demo head on a second sample, so the evaluation is on unseen images.

Example::

    result = run_pipeline(load_config(overrides=list(DEMO_SETTINGS)), workdir="attnpipe-demo")
    result["eval"]["exact"]["map@r"], result["eval"]["report"]
"""

from __future__ import annotations

import dataclasses
import logging

from attnpipe import fs, store
from attnpipe.config import Config

DEMO_DIR = "attnpipe-demo"
DEMO_SETTINGS = ("model.backbone=resnet18", "model.pooling=attn", "data.image_size=160")
TRAINABLE = ("attn", "mha", "gem")
log = logging.getLogger("attnpipe.pipeline")


def run_pipeline(
    cfg: Config,
    workdir: str = DEMO_DIR,
    inputs: list[str] | None = None,
    n: int = 600,
    train: bool | None = None,
    ray_address: str | None = None,
) -> dict:
    """Run every stage into ``workdir`` (a local path or URI); returns a summary of each stage.

    ``train`` (default: only on the generated sample) first fits the head with a short schedule.
    """
    from attnpipe.data.sample import make_sample_anywhere
    from attnpipe.encode import encode
    from attnpipe.evaluate.runner import evaluate, headline
    from attnpipe.index.build import build_index

    if not inputs:
        data = fs.join(workdir, "data")
        if not fs.exists(data):
            make_sample_anywhere(data, fmt="tar", n=n, num_shards=4, image_size=128, broken=True)
            log.info("made a sample dataset of %d images (+ a shard of broken ones) in %s", n, data)
    if train if train is not None else not inputs:
        cfg = _train_demo_head(cfg, workdir, inputs, n)
    emb, root, report_dir = (fs.join(workdir, p) for p in ("embeddings", "index", "eval"))
    summary = encode(inputs or [fs.join(workdir, "data")], emb, cfg, overwrite=True, ray_address=ray_address)
    manifest = build_index(emb, root, lsh="both")
    metrics = evaluate(emb, root, report_dir, num_queries=200)
    report = fs.join(report_dir, "report.html")
    log.info("\n%s", headline(metrics))
    log.info("report: %s", fs.display(report))
    log.info("try:    attnpipe search --index %s --id %s", fs.display(root), _first_ok_id(emb))
    return {
        "embeddings": summary,
        "index": {
            "root": fs.display(root),
            "version": manifest["version"],
            "count": manifest["count"],
            "factory": manifest["faiss"]["factory"],
            "recall@10": manifest["faiss"]["recall@10"],
        },
        "eval": {"report": fs.display(report), **headline_numbers(metrics)},
    }


def _train_demo_head(cfg: Config, workdir: str, inputs: list[str] | None, n: int) -> Config:
    """Fit the head with a short schedule; returns the config that encodes with it."""
    from attnpipe.data.sample import make_sample_anywhere
    from attnpipe.train import train_for_demo

    if cfg.model.pooling not in TRAINABLE and cfg.train.unfreeze == "none":
        log.info("run: model.pooling=%s has nothing to train; skipping training", cfg.model.pooling)
        return cfg
    if not inputs:
        inputs = [fs.join(workdir, "train-data")]
        if not fs.exists(inputs[0]):
            make_sample_anywhere(inputs[0], fmt="tar", n=n, num_shards=2, image_size=128, seed=1)
    weights = train_for_demo(inputs, fs.join(workdir, "head.safetensors"), cfg)
    log.info("run: trained %s head -> %s", cfg.model.pooling, weights)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=weights))


def headline_numbers(metrics: dict) -> dict:
    keep = ("map@r", "precision@1", "ndcg@10", "recall_vs_exact@10", "qps", "candidate_recall@10")
    return {
        section: {k: round(v, 4) for k, v in metrics[section].items() if k in keep}
        for section in ("exact", "faiss", "lsh")
        if section in metrics
    }


def _first_ok_id(embeddings: str) -> str:
    ds = store.open_dataset(embeddings)
    for part in ds.parts():
        ids, _ = store.part_vectors(ds.path, part)
        if ids:
            return ids[0]
    return "<id>"

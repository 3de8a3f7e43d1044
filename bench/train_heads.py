"""Trained pooling heads vs average pooling on held-out queries: `attnpipe train` end to end, one run.

    python bench/train_heads.py [--n 1200] [--classes 8] [--image-size 128] [--epochs 30]
                                [--runs convnext_tiny:attn,convnext_tiny:mha,convnext_tiny:gem,resnet18:attn]

For each ``backbone:head`` run: ``train_head`` on a labeled sample made by ``attnpipe.data.sample.make_sample`` (random
backbone weights, frozen; head trained on cached feature maps), then the held-out split (the one training validated
on) is encoded through ``EncoderRunner`` with ``model.weights=<artifact>`` and scored by leave-one-out MAP@R and
precision@1; the same held-out images encoded with ``avg`` pooling on the same backbone are the baseline. Prints
one table and the ratio trained / avg per run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from attnpipe.config import ModelConfig, load_config
from attnpipe.data.sample import make_sample
from attnpipe.models.encoder import EncoderRunner
from attnpipe.train import train_head
from attnpipe.train.data import load_labeled, split_holdout
from attnpipe.train.loop import retrieval_metrics


def held_out(data_dir: str, cfg) -> tuple:
    data = load_labeled([data_dir], cfg.data)
    _, val = split_holdout(data.labels, cfg.train.val_fraction, cfg.train.seed)
    return data.pixels[val], data.labels[val]


def score(model: ModelConfig, pixels, labels) -> dict:
    runner = EncoderRunner(model)
    emb = [runner(pixels[s : s + 128])["embedding"] for s in range(0, len(pixels), 128)]
    return retrieval_metrics(np.concatenate(emb), labels)


def run(data_dir: str, out_dir: str, backbone: str, head: str, args: argparse.Namespace) -> dict:
    overrides = [
        f"model.backbone={backbone}",
        f"model.pooling={head}",
        f"data.image_size={args.image_size}",
        f"train.epochs={args.epochs}",
        f"train.patience={args.patience}",
        "train.val_fraction=0.25",
    ]
    cfg = load_config(None, overrides)
    out = os.path.join(out_dir, f"{backbone}-{head}.safetensors")
    start = time.perf_counter()
    summary = train_head([data_dir], out, cfg, resume=False, progress=lambda _: None)
    seconds = time.perf_counter() - start
    pixels, labels = held_out(data_dir, cfg)
    trained = score(ModelConfig(backbone=backbone, pooling=head, weights=out), pixels, labels)
    avg = score(ModelConfig(backbone=backbone, pooling="avg"), pixels, labels)
    return {
        "backbone": backbone,
        "head": head,
        "avg": avg,
        "trained": trained,
        "seconds": seconds,
        "epochs": summary["epochs_done"],
        "best_epoch": summary["best_epoch"],
        "queries": len(labels),
        "train_images": summary["train_images"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1200)
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=8)
    p.add_argument("--runs", default="convnext_tiny:attn,convnext_tiny:mha,convnext_tiny:gem,resnet18:attn")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        make_sample(data, fmt="tar", n=args.n, num_shards=4, image_size=args.image_size, classes=args.classes, seed=11)
        for item in args.runs.split(","):
            backbone, head = item.split(":")
            rows.append(run(data, tmp, backbone, head, args))
    r0 = rows[0]
    print(
        f"trained heads vs avg: {args.n} images, {args.classes} classes, {args.image_size}px, random backbone "
        f"weights, {r0['train_images']} training / {r0['queries']} held-out queries, on {device}"
    )
    print(
        "| backbone | head | avg map@r | avg p@1 | trained map@r | trained p@1 | ratio map@r | epochs (best) | "
        "train s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        a, t = r["avg"], r["trained"]
        print(
            f"| {r['backbone']} | {r['head']} | {a['map@r']:.4f} | {a['precision@1']:.4f} | {t['map@r']:.4f} | "
            f"{t['precision@1']:.4f} | **{t['map@r'] / a['map@r']:.2f}** | {r['epochs']} ({r['best_epoch']}) | "
            f"{r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()

"""Encode throughput: the whole `attnpipe encode` pipeline vs plain model-only loops of the same backbone, one run.

    python bench/encode_throughput.py [--n 3000] [--image-size 224] [--backbone resnet18] [--pooling attn]

Measures, on the same machine and data:
  * naive loop   - single process, images decoded up front (untimed), fp32 NCHW, torch.no_grad, batch 64;
  * tuned loop   - the same with attnpipe's device settings (channels_last, bf16 where native, inference_mode);
  * pipeline     - `attnpipe encode` as a subprocess: Python + Ray start-up, read, decode, encode, Parquet write.
and prints images/s and the ratios pipeline/naive and pipeline/tuned.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from attnpipe.config import ModelConfig
from attnpipe.data.decode import decode_image
from attnpipe.data.readers import read_unit
from attnpipe.data.sample import make_sample
from attnpipe.data.shards import discover, read_units
from attnpipe.models.encoder import IMAGENET_MEAN, IMAGENET_STD, EncoderRunner, ImageEncoder


def predecode(data_dir: str, size: int) -> np.ndarray:
    rows = [r for u in read_units(discover([data_dir])) for r in read_unit(u, 1 << 30).to_pylist()]
    return np.stack([decode_image(r["data"], size, 1 << 40) for r in rows])


def naive_loop(pixels: np.ndarray, cfg: ModelConfig, batch: int = 64) -> float:
    model = ImageEncoder(cfg).eval()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x_all = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255).sub(mean).div(std).contiguous()
    with torch.no_grad():
        model(x_all[:batch])  # warm-up
        start = time.perf_counter()
        for i in range(0, len(x_all), batch):
            model(x_all[i : i + batch])
    return len(pixels) / (time.perf_counter() - start)


def tuned_loop(pixels: np.ndarray, cfg: ModelConfig, batch: int = 64) -> tuple[float, str]:
    runner = EncoderRunner(cfg)
    runner(pixels[:batch])
    start = time.perf_counter()
    for i in range(0, len(pixels), batch):
        runner(pixels[i : i + batch])
    return len(pixels) / (time.perf_counter() - start), str(runner.dtype).removeprefix("torch.")


def pipeline(data_dir: str, out: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "attnpipe.cli",
        "encode",
        "--input",
        data_dir,
        "--out",
        out,
        "--json",
        "--set",
        f"model.backbone={args.backbone}",
        "--set",
        f"model.pooling={args.pooling}",
        "--set",
        f"data.image_size={args.image_size}",
        "--set",
        f"encode.batch_size={args.batch_size}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"pipeline failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**summary, "wall_s": wall, "images_per_s_wall": summary["rows"] / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--source-size", type=int, default=256, help="stored JPEG size (decoded and resized)")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--pooling", default="attn")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    cfg = ModelConfig(backbone=args.backbone, pooling=args.pooling)
    device = "cuda" if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        make_sample(data, fmt="tar", n=args.n, num_shards=8, image_size=args.source_size)
        pixels = predecode(data, args.image_size)
        naive = naive_loop(pixels, cfg, args.batch_size)
        tuned, dtype = tuned_loop(pixels, cfg, args.batch_size)
        pipe = pipeline(data, os.path.join(tmp, "emb"), args)
    print(f"encode throughput: {args.n} images, {args.backbone}+{args.pooling} at {args.image_size}px on {device}")
    print(f"  naive model-only loop (fp32, NCHW, pre-decoded):  {naive:8.1f} images/s")
    print(f"  tuned model-only loop ({dtype}, channels_last):  {tuned:8.1f} images/s")
    print(
        f"  attnpipe encode, wall incl. Python+Ray start-up:   {pipe['images_per_s_wall']:8.1f} images/s "
        f"({pipe['wall_s']:.1f} s, {pipe['ok']} ok / {pipe['error']} error)"
    )
    print(f"  ratio pipeline / naive loop: {pipe['images_per_s_wall'] / naive:.2f}")
    print(f"  ratio pipeline / tuned loop: {pipe['images_per_s_wall'] / tuned:.2f}")


if __name__ == "__main__":
    main()

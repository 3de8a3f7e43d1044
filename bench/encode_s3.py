"""Encode to an object store vs to the local disk: the same `attnpipe encode` on the same sample, one run each.

    python bench/encode_s3.py [--n 500] [--image-size 160] [--backbone resnet18] [--rows-per-file 50000]

Starts its own S3 server (SeaweedFS on 127.0.0.1, via tests/_s3_server.py), writes one tar sample locally and
uploads a copy to ``s3://bench/data``, then times ``attnpipe encode`` as a subprocess (its own local Ray, the
server's AWS variables in its environment):

  * local -> local   --input DIR         --out DIR
  * s3 -> s3         --input s3://.../data --out s3://.../emb

and prints images/s (wall, including Python and Ray start-up) and the ratio s3 / local. The server is on loopback,
so the gap is the S3 protocol (HTTP requests, per-object PUT/GET, listing, retries) and not network bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from attnpipe import fs
from attnpipe.data.sample import make_sample

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import _s3_server  # benches may use the test helpers


def encode(inp: str, out: str, env: dict[str, str], args: argparse.Namespace) -> dict:
    sets = {
        "model.backbone": args.backbone,
        "data.image_size": args.image_size,
        "encode.batch_size": args.batch_size,
        "encode.rows_per_file": args.rows_per_file,
    }
    cmd = [sys.executable, "-m", "attnpipe.cli", "encode", "--input", inp, "--out", out, "--json"]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"encode {inp} -> {out} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**summary, "wall_s": wall, "images_per_s_wall": summary["rows"] / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--source-size", type=int, default=192, help="stored JPEG size (decoded and resized)")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rows-per-file", type=int, default=50000, help="encode.rows_per_file (parts per shard)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="attnpipe-bench-s3-") as tmp:
        server = _s3_server.start(os.path.join(tmp, "s3"))
        try:
            env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **server.env()}
            os.environ.update(server.env())  # for the upload and the size listing below
            bucket = server.make_bucket("bench")
            data = os.path.join(tmp, "data")
            make_sample(data, fmt="tar", n=args.n, num_shards=args.shards, image_size=args.source_size)
            fs.upload_dir(data, f"{bucket}/data")
            local = encode(data, os.path.join(tmp, "emb"), env, args)
            s3 = encode(f"{bucket}/data", f"{bucket}/emb", env, args)
            s3_bytes = sum(size for _, size in fs.walk_files(f"{bucket}/emb"))
            local_bytes = sum(size for _, size in fs.walk_files(os.path.join(tmp, "emb")))
        finally:
            server.stop()
    print(
        f"encode to S3 vs local disk: {args.n} images in {args.shards} tar shards, {args.backbone} at "
        f"{args.image_size}px, rows_per_file={args.rows_per_file}, on {os.cpu_count()} CPUs"
    )
    for name, r, size in (("local -> local", local, local_bytes), ("s3 -> s3 (SeaweedFS, loopback)", s3, s3_bytes)):
        print(
            f"  {name:32s} {r['images_per_s_wall']:7.1f} images/s wall ({r['wall_s']:.1f} s; pipeline "
            f"{r['seconds']:.1f} s, {r['images_per_s']} images/s; {size / 2**20:.1f} MiB written)"
        )
    print(f"  ratio s3 / local (wall images/s): {s3['images_per_s_wall'] / local['images_per_s_wall']:.2f}")
    print(f"  ratio s3 / local (pipeline images/s): {s3['images_per_s'] / local['images_per_s']:.2f}")


if __name__ == "__main__":
    main()

"""GPU encode throughput: model-only, decode-only and end-to-end images/s, and their ratio, on one machine.

    python bench/encode_gpu.py                 # on a CUDA box: ResNet-50 and ViT-B/16 at 224 px, bf16/fp16, ...
    python bench/encode_gpu.py --quick         # tiny sizes; runs on CPU too (checks the script works)
    python bench/encode_gpu.py --no-ray        # end to end without Ray even when it is installed

Measures, for each backbone, precision, torch.compile on/off and batch size:
  * model-only   - synthetic uint8 batches already on the device through the runner (normalize, channels_last,
                   autocast, backbone, pooling head), synchronized; peak device memory;
  * decode-only  - the same JPEGs decoded + resized by nvJPEG (TorchDecoder on the GPU) and by PIL on one CPU core;
  * end-to-end   - JPEG tar shards made here -> images/s. With Ray: ``attnpipe encode`` as a subprocess (read tasks,
                   encoder actors decoding on their GPU, Parquet). Without Ray (``import ray`` fails or --no-ray): the
                   encoder actor's own loop on the shards -- read rows, ``decode_and_encode`` (nvJPEG chunks
                   pipelined with the model) or PIL decode + runner on CPU -- so numbers can be taken on a box with only
                   torch, torchvision, numpy, pyarrow, pillow (+ pyyaml, which attnpipe.store imports);
and prints the ratio end-to-end / model-only (target on one H100/H200, ResNet-50 224 px bf16: >= 8,000 images/s
end to end and >= 0.8 of model-only).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from attnpipe.data.decode import decode_batch, decode_image
from attnpipe.data.gpu_decode import GPU_DECODE_CHUNKS, TorchDecoder, decode_and_encode, resolve_decode
from attnpipe.data.readers import read_unit
from attnpipe.data.sample import make_sample
from attnpipe.data.shards import discover, read_units
from attnpipe.models.config import ModelConfig
from attnpipe.models.encoder import EncoderRunner

MAX_PIXELS = 64_000_000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_only(runner: EncoderRunner, batch: int, size: int, iters: int) -> tuple[float, float]:
    """images/s of the runner on device-resident uint8 batches, and peak device memory in GiB (0 on CPU)."""
    x = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=runner.device)
    if runner.cuda:
        torch.cuda.reset_peak_memory_stats(runner.device)
    with torch.inference_mode():
        for _ in range(3):  # warm-up: cuDNN autotuning, compile
            runner._model_outputs(x)
        _sync(runner.device)
        start = time.perf_counter()
        for _ in range(iters):
            runner._model_outputs(x)
        _sync(runner.device)
    rate = batch * iters / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(runner.device) / 2**30 if runner.cuda else 0.0
    return rate, peak


def decode_only(datas: list[bytes], size: int, device: torch.device, batch: int) -> dict[str, float]:
    out = {}
    start = time.perf_counter()
    for d in datas:
        decode_image(d, size, MAX_PIXELS)
    out["pil_1core"] = len(datas) / (time.perf_counter() - start)
    dec = TorchDecoder(size, MAX_PIXELS, device)
    dec.decode(datas[:batch], [None] * min(batch, len(datas)))  # warm-up (nvJPEG handles, allocator)
    _sync(device)
    start = time.perf_counter()
    for s in range(0, len(datas), batch):
        dec.decode(datas[s : s + batch], [None] * len(datas[s : s + batch]))
    _sync(device)
    out[f"torch_{device.type}"] = len(datas) / (time.perf_counter() - start)
    return out


def raw_rows(data_dir: str) -> list[dict]:
    return [r for u in read_units(discover([data_dir])) for r in read_unit(u, 1 << 30).to_pylist()]


def end_to_end_no_ray(data_dir: str, runner: EncoderRunner, size: int, batch: int) -> float:
    """The encoder actor's loop without Ray: read the shards, then per batch decode + encode as the actor does."""
    gpu = resolve_decode("auto", runner.device) == "gpu"
    decoder = TorchDecoder(size, MAX_PIXELS, runner.device) if gpu else None
    start = time.perf_counter()
    rows = raw_rows(data_dir)  # reading is part of end to end
    n = 0
    step = batch * GPU_DECODE_CHUNKS if gpu else batch  # what build_dataset hands each actor call
    for s in range(0, len(rows), step):
        chunk = rows[s : s + step]
        datas, errors = [r["data"] for r in chunk], [r["error"] for r in chunk]
        if decoder is not None:
            out, errors = decode_and_encode(decoder, runner, datas, errors)
        else:
            dec = decode_batch(
                {"id": np.array([r["id"] for r in chunk], object), "data": np.array(datas, object),
                 "error": np.array(errors, object)},
                size=size, max_pixels=MAX_PIXELS,
            )  # fmt: skip
            ok = dec["status"] == "ok"
            out = runner(dec["pixels"][ok]) if ok.any() else {}
        n += len(chunk)
        assert not out or np.isfinite(out["embedding"]).all()
    _sync(runner.device)
    return n / (time.perf_counter() - start)


def end_to_end_ray(data_dir: str, out: str, backbone: str, size: int, batch: int, precision: str, compile_: bool):
    cmd = [sys.executable, "-m", "attnpipe.cli", "encode", "--input", data_dir, "--out", out, "--json"]
    for kv in (
        f"model.backbone={backbone}",
        "model.pooling=attn",
        f"data.image_size={size}",
        f"encode.batch_size={batch}",
        f"encode.precision={precision}",
        f"encode.compile={str(compile_).lower()}",
    ):
        cmd += ["--set", kv]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"attnpipe encode failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall": summary["rows"] / wall, "pipeline": summary["images_per_s"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (resnet18, 64 px, 64 images): a CPU smoke run")
    p.add_argument("--no-ray", action="store_true", help="end to end without Ray even when it is installed")
    p.add_argument("--n", type=int, default=8192, help="images in the tar shards")
    p.add_argument("--backbones", default="resnet50,vit_b_16")
    p.add_argument("--precisions", default="bf16,fp16")
    p.add_argument("--compile", default="off,on")
    p.add_argument("--batch-sizes", default="64,128,256,512")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--source-size", type=int, default=500, help="stored JPEG side (ImageNet-like ~500x375)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.backbones, args.precisions, args.compile = 64, "resnet18", "fp32", "off"
        args.batch_sizes, args.image_size, args.source_size, args.iters = "16", 64, 96, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{os.cpu_count()}"
    try:
        import ray  # noqa: F401

        have_ray = not args.no_ray
    except ImportError:
        have_ray = False
    batches = [int(b) for b in args.batch_sizes.split(",")]
    results: dict = {"device": name, "model_only": [], "decode_only": {}, "end_to_end": []}
    print(f"encode_gpu on {name}: {args.n} JPEGs of {args.source_size} px -> {args.image_size} px", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        make_sample(data, fmt="tar", n=args.n, num_shards=8, image_size=args.source_size)
        datas = [r["data"] for r in raw_rows(data)]
        results["decode_only"] = decode_only(datas[: min(len(datas), 2048)], args.image_size, device, max(batches))
        print("  decode-only images/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in results["decode_only"].items()))
        for backbone, precision, comp in itertools.product(
            args.backbones.split(","), args.precisions.split(","), args.compile.split(",")
        ):
            cfg = ModelConfig(backbone=backbone, pooling="attn")
            best = None
            for batch in batches:
                runner = EncoderRunner(cfg, precision, device=str(device), batch_size=batch, compile=comp == "on")
                try:
                    rate, peak = model_only(runner, batch, args.image_size, args.iters)
                except torch.OutOfMemoryError:
                    print(f"  {backbone} {precision} compile={comp} batch {batch}: out of memory")
                    continue
                row = {"backbone": backbone, "precision": precision, "compile": comp, "batch": batch}
                row["images_per_s"] = rate
                results["model_only"].append({**row, "peak_gib": peak})
                print(f"  model-only {backbone:>9} {precision} compile={comp:3} batch {batch:4}: "
                      f"{rate:10,.0f} images/s  peak {peak:6.2f} GiB", flush=True)  # fmt: skip
                best = max(best or row, row, key=lambda r: r["images_per_s"])
            if best is None:
                continue
            runner = EncoderRunner(cfg, precision, device=str(device), batch_size=best["batch"], compile=comp == "on")
            e2e = {**{k: best[k] for k in ("backbone", "precision", "compile", "batch")}}
            e2e["loop_no_ray"] = end_to_end_no_ray(data, runner, args.image_size, best["batch"])
            if have_ray:
                out = os.path.join(tmp, f"emb-{len(results['end_to_end'])}")
                r = end_to_end_ray(data, out, backbone, args.image_size, best["batch"], precision, comp == "on")
                e2e["ray_wall"], e2e["ray_pipeline"] = r["wall"], r["pipeline"]
            e2e["model_only"] = best["images_per_s"]
            e2e["ratio"] = max(e2e.get("ray_pipeline", 0), e2e["loop_no_ray"]) / best["images_per_s"]
            results["end_to_end"].append(e2e)
            print(f"  end-to-end {backbone:>9} {precision} compile={comp:3} batch {best['batch']:4}: actor loop "
                  f"{e2e['loop_no_ray']:,.0f}" + (f", Ray pipeline {e2e['ray_pipeline']:,.0f} (wall incl. start-up "
                  f"{e2e['ray_wall']:,.0f})" if have_ray else " (no Ray)")
                  + f" images/s; end-to-end / model-only {e2e['ratio']:.2f}", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU twins of the GPU paths (they always run) and their CUDA / faiss-GPU runs (gpu-marked, skipped without one).

Twins: the encoder actor fed raw rows (the ``data.decode=gpu`` path, torch decoder on CPU) against the CPU-decoded
pipeline; the runner's chunked, tensor-fed and compiled paths against its plain call; SimHash codes computed by
torch against numpy's.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from attnpipe.config import ModelConfig
from attnpipe.data.decode import decode_batch
from attnpipe.data.gpu_decode import TorchDecoder, encoders_decode
from attnpipe.data.readers import read_unit
from attnpipe.data.sample import make_broken_shard, make_sample
from attnpipe.data.shards import discover, read_units
from attnpipe.index.lsh import SimHashLSH
from attnpipe.models.encoder import EncoderRunner
from tests.conftest import fast_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def raw_batch(tmp_path_factory) -> dict[str, np.ndarray]:
    """Raw rows (reader output, as Ray hands them to a numpy-format UDF): 10 JPEGs + the broken shard's members."""
    root = tmp_path_factory.mktemp("twins")
    make_sample(str(root), fmt="tar", n=10, num_shards=1, image_size=80)
    make_broken_shard(str(root), fmt="tar", image_size=64)
    table = pa.concat_tables([read_unit(u, 1 << 26) for u in read_units(discover([str(root)]))])
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def _actor(decoder_device: str | None, *overrides: str):
    from attnpipe.encode import EncodeActor

    actor = EncodeActor(fast_config("encode.precision=fp32", *overrides).to_dict())
    actor.decoder = None if decoder_device is None else TorchDecoder(actor.size, actor.max_pixels, decoder_device)
    return actor


@pytest.fixture(scope="module")
def cpu_actor():
    return _actor(None)


def _emb(table: pa.Table) -> np.ndarray:
    return np.stack([e if e is not None else np.zeros(512) for e in table.column("embedding").to_pylist()])


def test_actor_on_raw_rows_matches_cpu_decoded_pipeline(raw_batch, cpu_actor):
    decoded = decode_batch(dict(raw_batch), size=64, max_pixels=64_000_000)
    ref = cpu_actor(decoded)
    fallback = cpu_actor(dict(raw_batch))  # raw rows on an actor without a usable GPU: the CPU decoder
    cpu_actor.decoder = TorchDecoder(cpu_actor.size, cpu_actor.max_pixels, "cpu")
    try:
        twin = cpu_actor(dict(raw_batch))  # the data.decode=gpu path, torch decoder on CPU
        cpu_actor.runner.batch_size = 3
        chunked = cpu_actor(dict(raw_batch))  # decode and encode pipelined over 3-row chunks
    finally:
        cpu_actor.decoder, cpu_actor.runner.batch_size = None, 16
    for col in ("id", "status", "error", "attn_h"):
        assert twin.column(col).to_pylist() == ref.column(col).to_pylist() == fallback.column(col).to_pylist()
    assert chunked.column("status").to_pylist() == twin.column("status").to_pylist()
    ok = np.array(ref.column("status").to_pylist()) == "ok"
    assert ok.sum() >= 10 and (~ok).sum() >= 4
    np.testing.assert_array_equal(_emb(fallback), _emb(ref))  # same decoder, same numbers
    np.testing.assert_allclose(_emb(chunked), _emb(twin), atol=1e-5)
    cos = (_emb(twin)[ok] * _emb(ref)[ok]).sum(1)
    assert (cos > 0.99).all(), cos  # pixels within 2/255 mean (tests/test_gpu_decode.py) -> nearly equal embeddings


def test_runner_chunks_and_tensor_input_equal_plain_call():
    runner = EncoderRunner(ModelConfig(backbone="resnet18", pooling="attn"), precision="fp32")
    pixels = np.random.default_rng(2).integers(0, 255, (7, 64, 64, 3), dtype=np.uint8)
    plain = runner(pixels)
    runner.batch_size = 3
    chunked = runner(pixels)
    tensor = runner(torch.from_numpy(pixels))
    for k in plain:
        np.testing.assert_allclose(chunked[k], plain[k], atol=1e-5)
        np.testing.assert_allclose(tensor[k], plain[k], atol=1e-5)
    assert plain["embedding"].shape == (7, 512) and plain["attn_entropy"].shape == (7,)


@pytest.mark.gpu
@cuda
def test_compiled_runner_pads_to_one_shape_and_matches():
    cfg = ModelConfig(backbone="resnet18", pooling="attn")
    pixels = np.random.default_rng(3).integers(0, 255, (5, 64, 64, 3), dtype=np.uint8)
    plain = EncoderRunner(cfg, precision="fp32", device="cuda")(pixels)
    compiled = EncoderRunner(cfg, precision="fp32", batch_size=4, compile=True, device="cuda")(pixels)  # 4 + 1 padded
    np.testing.assert_allclose(compiled["embedding"], plain["embedding"], atol=1e-3)


def test_pipeline_decode_placement():
    assert not encoders_decode("auto", 0) and not encoders_decode("cpu", 4)
    assert encoders_decode("gpu", 1) and encoders_decode("auto", 2)
    with pytest.raises(ValueError, match="data.decode=gpu needs GPU encoders"):
        encoders_decode("gpu", 0)


def test_config_keys_validated():
    from attnpipe.config import ConfigError, load_config

    cfg = load_config(None, ["data.decode=gpu", "encode.compile=true"])
    assert cfg.data.decode == "gpu" and cfg.encode.compile is True
    assert load_config().data.decode == "auto" and load_config().encode.compile is False
    with pytest.raises(ConfigError, match="allowed: auto, cpu, gpu"):
        load_config(None, ["data.decode=nvjpeg"])
    with pytest.raises(ConfigError, match="encode.compile must be true or false"):
        load_config(None, ["encode.compile=2"])


@pytest.mark.parametrize("dim, bits", [(64, 12), (512, 12), (33, 64)])
def test_simhash_torch_codes_equal_numpy(dim, bits):
    rng = np.random.default_rng(dim)
    X = np.maximum(rng.standard_normal((3000, dim)), 0).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    lsh = SimHashLSH(dim, num_tables=8, bits=bits, seed=1, center=X.mean(0))
    X[:3] = X.mean(0)  # rows on every hyperplane's threshold: inside the band, recomputed by numpy
    assert np.array_equal(lsh.codes(torch.from_numpy(X), batch_size=1000), lsh.codes(X))


@pytest.mark.gpu
@cuda
def test_simhash_cuda_codes_equal_numpy():
    rng = np.random.default_rng(0)
    X = np.maximum(rng.standard_normal((20000, 512)), 0).astype(np.float32)
    lsh = SimHashLSH(512, seed=3, center=X.mean(0))
    assert np.array_equal(lsh.codes(torch.from_numpy(X).cuda()), lsh.codes(X))


@pytest.mark.gpu
@cuda
def test_actor_gpu_decode_and_encode_match_cpu(raw_batch):
    gpu = _actor("cuda", "encode.precision=bf16")
    assert gpu.runner.device.type == "cuda"
    out = gpu(dict(raw_batch))
    ref = _actor(None)(decode_batch(dict(raw_batch), size=64, max_pixels=64_000_000))
    assert out.column("error").to_pylist() == ref.column("error").to_pylist()
    ok = np.array(ref.column("status").to_pylist()) == "ok"
    assert ((_emb(out)[ok] * _emb(ref)[ok]).sum(1) > 0.98).all()
    assert gpu.decoder is not None and gpu.decoder.stats["torch"] >= 10


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or __import__("faiss").get_num_gpus() == 0, reason="needs faiss with a GPU"
)
def test_faiss_gpu_train_and_add_match_cpu():
    import faiss

    from attnpipe.index import faiss_index

    rng = np.random.default_rng(0)
    X = rng.standard_normal((20000, 64)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    Q = X[:500] + 0.05 * rng.standard_normal((500, 64)).astype(np.float32)
    exact = faiss.IndexFlatIP(64)
    exact.add(X)
    _, truth = exact.search(Q, 10)
    recalls = []
    for gpu in (False, True):
        index, _ = faiss_index.make_index("IVF64,Flat", 64)
        sample = X[rng.permutation(len(X))[:5000]]
        if gpu:
            faiss_index.train(index, sample, seed=0)  # k-means on the GPU: faiss sees one
            index = faiss_index.to_gpu(index)
        else:
            ivf = faiss.extract_index_ivf(index)
            ivf.cp.seed = 0
            index.train(sample)
        faiss_index.add(index, X, np.arange(len(X)))
        index = faiss_index.to_cpu(index)
        faiss_index.set_search_param([index], "nprobe", 8)
        _, ids = index.search(Q, 10)
        recalls.append(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)]))
    assert abs(recalls[0] - recalls[1]) <= 0.005, recalls

"""The public Python API: lazy re-exports with real signatures, each callable twice in one process (also after the
same-named submodules were imported), and search by image through :mod:`attnpipe.query`."""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys

import numpy as np
import pytest

import attnpipe
from attnpipe import store
from tests.conftest import fast_config

PUBLIC = {
    "encode": ("inputs", "out", "cfg", "overwrite"),
    "build_index": ("embeddings", "root", "config"),
    "evaluate": ("embeddings", "index_root", "out", "queries", "ks"),
    "reindex": ("inputs", "embeddings", "root", "cfg"),
    "train_head": ("inputs", "out", "cfg"),
    "dedup": ("embeddings", "out", "against", "cfg"),
    "load_config": ("path", "overrides"),
    "read_embeddings": ("path", "columns"),
    "search_image": ("index", "path", "k"),
}


def test_import_is_light_and_names_stay_functions_after_submodule_imports():
    """In a fresh interpreter: ``import attnpipe`` loads no torch/Ray; importing the submodule named like an API
    function (``attnpipe.evaluate``, a package, and one of its modules) does not replace the function. The same
    guard covers ``attnpipe.encode`` and ``attnpipe.reindex`` (checked in-process below, where torch is loaded once).
    """
    code = """
import inspect, json, sys, types
import attnpipe
light = [m for m in ("torch", "ray", "faiss", "pyarrow") if m in sys.modules]
import attnpipe.evaluate, attnpipe.evaluate.attention
from attnpipe.evaluate import metrics
f = attnpipe.evaluate
import attnpipe.evaluate
print(json.dumps({"light": light, "metrics": metrics.__name__, "f": [type(f).__name__, f.__module__],
                  "params": list(inspect.signature(f).parameters)[:3], "again": attnpipe.evaluate is f,
                  "submodule": type(sys.modules["attnpipe.evaluate"]).__name__}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["light"] == [] and out["again"] is True and out["submodule"] == "module"
    assert out["metrics"] == "attnpipe.evaluate.metrics"
    assert out["f"] == ["function", "attnpipe.evaluate.runner"]
    assert out["params"] == ["embeddings", "index_root", "out"]


def test_public_names_have_real_signatures_and_docs():
    importlib.import_module("attnpipe.encode")  # the submodule, as library code imports it
    importlib.import_module("attnpipe.evaluate.runner")
    for name, params in PUBLIC.items():
        f = getattr(attnpipe, name)
        assert inspect.isfunction(f), (name, f)
        assert set(params) <= set(inspect.signature(f).parameters), (name, inspect.signature(f))
        assert f.__doc__ and "*args" not in str(inspect.signature(f)), name
    assert attnpipe.encode is sys.modules["attnpipe.encode"].encode
    assert attnpipe.evaluate is sys.modules["attnpipe.evaluate.runner"].evaluate
    importlib.import_module("attnpipe.dedup.command")  # the package attnpipe.dedup shares the function's name
    assert attnpipe.dedup is sys.modules["attnpipe.dedup.command"].dedup and inspect.isfunction(attnpipe.dedup)
    assert attnpipe.SearchIndex is sys.modules["attnpipe.index.search"].SearchIndex
    assert sorted(attnpipe.__all__) == sorted(attnpipe._LAZY) and "__version__" in dir(attnpipe)
    assert all(hasattr(attnpipe, n) for n in attnpipe.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        attnpipe.nope  # noqa: B018
    assert "inputs" in pydoc_text(attnpipe.encode)


def pydoc_text(obj) -> str:
    import pydoc

    return pydoc.render_doc(obj, renderer=pydoc.plaintext)


def _vectors(n: int = 300, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4, dim))
    y = rng.integers(0, 4, n)
    X = (centers[y] + 0.8 * rng.normal(size=(n, dim))).astype(np.float32)
    return [f"syn/{i:05d}" for i in range(n)], X, [f"c{c}" for c in y]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_build_index_and_evaluate_twice(ray_session, tmp_path):
    ids, X, labels = _vectors()
    emb, root = str(tmp_path / "emb"), str(tmp_path / "index")
    store.write_vectors(emb, ids, X, labels, num_shards=2)
    first = attnpipe.build_index(emb, root, factory="Flat", lsh="none", workers=1)
    second = attnpipe.build_index(emb, root, factory="Flat", lsh="none", workers=1)
    assert (first["version"], second["version"]) == ("v1", "v2") and first["count"] == second["count"] == 300
    index = attnpipe.SearchIndex.load(root)
    assert index.search_id("syn/00007", k=1)[0][0] == "syn/00007"
    m1 = attnpipe.evaluate(emb, root, str(tmp_path / "eval"), num_queries=40, ks=(1, 10))
    m2 = attnpipe.evaluate(emb, root, str(tmp_path / "eval"), num_queries=40, ks=(1, 10))
    assert m1["exact"] == m2["exact"] and 0 < m1["exact"]["precision@1"] <= 1
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["exact"] == m2["exact"]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_encode_twice_then_search_by_image(ray_session, tmp_path):
    from attnpipe.data.sample import make_sample
    from attnpipe.query import Searcher

    importlib.import_module("attnpipe.encode")
    make_sample(str(tmp_path / "data"), fmt="folder", n=8, num_shards=1, image_size=48, prefix="img")
    cfg = fast_config("data.image_size=32", "model.pooling=gem")
    a = attnpipe.encode([str(tmp_path / "data")], str(tmp_path / "a"), cfg)
    b = attnpipe.encode([str(tmp_path / "data")], str(tmp_path / "b"), cfg)
    assert a["ok"] == b["ok"] == 8
    (ids_a, Xa), (ids_b, Xb) = store.load_vectors(str(tmp_path / "a")), store.load_vectors(str(tmp_path / "b"))
    assert sorted(ids_a) == sorted(ids_b)
    np.testing.assert_allclose(Xa[np.argsort(ids_a)], Xb[np.argsort(ids_b)], atol=1e-5)

    attnpipe.build_index(str(tmp_path / "a"), str(tmp_path / "index"), factory="Flat", lsh="none", workers=1)
    images = sorted((tmp_path / "data" / "img-00000").glob("*/*.jpg"))
    hits = attnpipe.search_image(attnpipe.SearchIndex.load(str(tmp_path / "index")), str(images[3]), k=3)
    assert hits[0][0] == f"img-00000/{images[3].parent.name}/{images[3].stem}" and hits[0][1] > 0.999, hits
    searcher = Searcher.load(str(tmp_path / "index"))
    assert searcher.cfg.model.pooling == "gem" and searcher.cfg.data.image_size == 32  # the embeddings' model
    batch = searcher.search_images([str(p) for p in images[:5]], k=2, batch=2)
    for path, hits in zip(images[:5], batch):
        assert hits[0][0].endswith(f"/{path.stem}") and hits[0][1] > 0.999, (path, hits)
    with pytest.raises(ValueError):  # DecodeError: not an image
        searcher.search_bytes(b"not an image", k=1)

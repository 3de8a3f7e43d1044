"""attnpipe.train: a trained head beats average pooling on held-out queries; artifacts, resume, Ray Train, config.

The head-quality test uses a random-weight ``convnext_tiny``: random ResNet-18 layer-4 maps carry no more class
signal at the object than around it (pooling them with the exact object box scores *below* average pooling on this
data, so no attention can help), while random ConvNeXt maps do (box pooling ~0.47 MAP@R vs ~0.12 for average).
Everything else runs on a tiny ResNet-18 set at 64 px (2 x 2 maps).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from attnpipe.config import ConfigError, ModelConfig
from attnpipe.data.sample import make_sample
from attnpipe.evaluate.attention import per_image_stats
from attnpipe.models.artifact import ArtifactError, file_sha256, read_sidecar
from attnpipe.models.backbones import build_backbone, weights_fingerprint
from attnpipe.models.encoder import EncoderRunner, ImageEncoder
from attnpipe.train import train_head
from attnpipe.train.checkpoint import CheckpointMismatch
from attnpipe.train.data import load_labeled, split_holdout
from attnpipe.train.fit import SimulatedCrash
from attnpipe.train.objective import attention_loss, box_coverage
from attnpipe.train.trainable import set_trainable
from tests.conftest import fast_config

QUALITY = (
    "model.backbone=convnext_tiny",
    "model.pooling=attn",
    "data.image_size=96",
    "train.epochs=8",
    "train.patience=0",
    "train.val_fraction=0.25",
)
TINY = (
    "model.pooling=attn",
    "encode.precision=fp32",
    "train.batch_size=16",
    "train.val_fraction=0.25",
    "train.patience=0",
)


def _quiet(_line: str) -> None:
    pass


def _map_at_r(emb: np.ndarray, labels: np.ndarray) -> float:
    """Reference MAP@R, leave-one-out, by a plain loop (independent of attnpipe.evaluate.metrics)."""
    sim = emb @ emb.T
    scores = []
    for i in range(len(emb)):
        others = [j for j in np.argsort(-sim[i], kind="stable") if j != i]
        r = int((labels == labels[i]).sum()) - 1
        hits = [labels[j] == labels[i] for j in others[:r]]
        scores.append(sum(np.mean(hits[: k + 1]) for k in range(r) if hits[k]) / r)
    return float(np.mean(scores))


@pytest.fixture(scope="module")
def quality(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    make_sample(str(root / "data"), fmt="tar", n=240, num_shards=2, image_size=96, classes=5, seed=3)
    cfg = fast_config(*QUALITY)
    out = str(root / "attn.safetensors")
    summary = train_head([str(root / "data")], out, cfg, progress=_quiet)
    data = load_labeled([str(root / "data")], cfg.data)
    _, val = split_holdout(data.labels, cfg.train.val_fraction, cfg.train.seed)
    return {
        "cfg": cfg,
        "out": out,
        "summary": summary,
        "pixels": data.pixels[val],
        "labels": data.labels[val],
        "boxes": data.boxes[val],
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_sample(str(root / "data"), fmt="parquet", n=48, num_shards=1, image_size=64, classes=4, seed=5)
    return root


@pytest.fixture(scope="module")
def tiny_trained(tiny):
    """3 uninterrupted epochs on the tiny set."""
    out = str(tiny / "straight.safetensors")
    return train_head([str(tiny / "data")], out, fast_config(*TINY, "train.epochs=3"), progress=_quiet)


def test_trained_attn_beats_avg_on_held_out_queries(quality):
    s = quality["summary"]
    assert s["epochs_done"] == 8 and s["val_images"] == 60 and s["train_images"] == 180
    avg = EncoderRunner(ModelConfig(backbone="convnext_tiny", pooling="avg"))(quality["pixels"])
    attn = EncoderRunner(ModelConfig(backbone="convnext_tiny", pooling="attn", weights=quality["out"]))(
        quality["pixels"]
    )
    avg_map, attn_map = _map_at_r(avg["embedding"], quality["labels"]), _map_at_r(attn["embedding"], quality["labels"])
    assert attn_map > avg_map + 0.15, (attn_map, avg_map)
    best = s["history"][s["best_epoch"] - 1]["map@r"]  # the artifact reproduces the best validation score
    assert abs(best - attn_map) < 0.02, (best, attn_map)
    # the box regularizer put attention on the objects: far more mass in the box than its share of the image
    trained_mass = np.nanmean(per_image_stats(attn["attention"], quality["boxes"])["box_mass"])
    uniform_mass = np.nanmean(per_image_stats(avg["attention"], quality["boxes"])["box_mass"])
    assert trained_mass > uniform_mass + 0.2, (trained_mass, uniform_mass)


def test_artifact_for_another_model_is_refused(quality):
    out = quality["out"]
    with pytest.raises(ConfigError, match=r"trained for backbone=convnext_tiny.*--set model.backbone=convnext_tiny"):
        fast_config("model.backbone=resnet34", "data.image_size=96", f"model.weights={out}")
    with pytest.raises(ConfigError, match=r"--set model.pooling=attn"):
        fast_config("model.backbone=convnext_tiny", "model.pooling=gem", "data.image_size=96", f"model.weights={out}")
    with pytest.raises(ConfigError, match=r"--set data.image_size=96"):
        fast_config("model.backbone=convnext_tiny", "data.image_size=128", f"model.weights={out}")
    with pytest.raises(ArtifactError, match="trained for backbone=convnext_tiny"):
        ImageEncoder(ModelConfig(backbone="resnet18", pooling="attn", weights=out))


def _in_memory(trained_run: dict, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The in-memory model: a fresh encoder given the best epoch's weights as training kept them (the checkpoint)."""
    state = torch.load(os.path.join(trained_run["checkpoint"], "state.pt"), weights_only=True)
    trained = ImageEncoder(fast_config(*TINY).model).eval()
    trained.load_state_dict(state["best"]["state"], strict=False)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1
    )
    with torch.inference_mode():
        return trained(x)


def test_artifact_reloads_to_the_trained_weights(tiny, tiny_trained):
    out = tiny_trained["weights"]
    meta = read_sidecar(out)
    assert meta["sha256"] == file_sha256(out) and weights_fingerprint(out, "x", 0) == f"sha256:{meta['sha256'][:16]}"
    assert (meta["backbone"], meta["pooling"], meta["image_size"]) == ("resnet18", "attn", 64)
    assert meta["labels"] == tiny_trained["labels"] and len(meta["history"]) == 3 and meta["train"]["epochs"] == 3
    assert meta["source_weights"] == "random:resnet18:seed=0" and meta["normalization"]["std"][0] == 0.229
    state = torch.load(os.path.join(tiny_trained["checkpoint"], "state.pt"), weights_only=True)
    assert state["best"]["epoch"] == meta["best_epoch"]
    pixels = load_labeled([str(tiny / "data")], fast_config().data).pixels[:8]
    emb, attn = _in_memory(tiny_trained, pixels)
    loaded = EncoderRunner(ModelConfig(backbone="resnet18", pooling="attn", weights=out), precision="fp32")(pixels)
    np.testing.assert_allclose(loaded["embedding"], emb.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(loaded["attention"], attn.numpy(), atol=1e-5, rtol=0)
    untrained = EncoderRunner(ModelConfig(backbone="resnet18", pooling="attn"), precision="fp32")(pixels)
    assert np.abs(untrained["attention"] - loaded["attention"]).max() > 1e-3  # the head did change


def test_tampered_artifact_is_refused(tiny_trained, tmp_path):
    out = str(tmp_path / "t.safetensors")
    shutil.copy(tiny_trained["weights"], out)
    shutil.copy(tiny_trained["sidecar"], tmp_path / "t.json")
    ImageEncoder(ModelConfig(backbone="resnet18", pooling="attn", weights=out))  # the copy loads
    with open(out, "r+b") as f:  # flip one byte of tensor data (past the safetensors header)
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="does not match its sidecar"):
        ImageEncoder(ModelConfig(backbone="resnet18", pooling="attn", weights=out))


def _state(out: str) -> dict:
    return torch.load(out.removesuffix(".safetensors") + ".ckpt/state.pt", weights_only=True)


def test_resume_and_crash_resume_equal_an_uninterrupted_run(tiny, tiny_trained, tmp_path):
    data, cfg, straight = [str(tiny / "data")], fast_config(*TINY, "train.epochs=3"), tiny_trained
    assert straight["start_epoch"] == 0 and straight["epochs_done"] == 3

    b = str(tmp_path / "b.safetensors")
    train_head(data, b, fast_config(*TINY, "train.epochs=2"), progress=_quiet)
    two = _state(b)
    lines: list[str] = []
    resumed = train_head(data, b, cfg, progress=lines.append)
    assert resumed["start_epoch"] == 2 and resumed["epochs_done"] == 3
    assert any("resuming after epoch 2" in x for x in lines) and sum("train: epoch" in x for x in lines) == 1
    same = ("loss", "map@r", "precision@1")
    assert [[h[k] for k in same] for h in resumed["history"]] == [[h[k] for k in same] for h in straight["history"]]

    c = str(tmp_path / "c.safetensors")
    with pytest.raises(SimulatedCrash):
        train_head(data, c, cfg, progress=_quiet, _crash_after=0)
    assert not os.path.exists(c) and _state(c)["epoch"] == 1
    assert train_head(data, c, cfg, progress=_quiet)["start_epoch"] == 1

    steps = 3  # 36 training images in batches of 16
    assert {float(s["step"]) for s in two["optimizer"]["state"].values()} == {2.0 * steps}
    opt_a, opt_b, opt_c = (_state(p)["optimizer"]["state"] for p in (straight["weights"], b, c))
    for other in (opt_b, opt_c):  # Adam moments only match if the saved optimizer state was restored exactly
        assert opt_a.keys() == other.keys()
        for k in opt_a:
            assert float(opt_a[k]["step"]) == float(other[k]["step"]) == 3.0 * steps
            assert torch.equal(opt_a[k]["exp_avg"], other[k]["exp_avg"])
            assert torch.equal(opt_a[k]["exp_avg_sq"], other[k]["exp_avg_sq"])
    for other in (b, c):  # same best weights -> byte-identical artifacts
        assert read_sidecar(other)["sha256"] == read_sidecar(straight["weights"])["sha256"]


def test_checkpoint_of_another_run_is_refused(tiny, tiny_trained):
    data, out = [str(tiny / "data")], tiny_trained["weights"]
    with pytest.raises(CheckpointMismatch, match=r"backbone: checkpoint 'resnet18', now 'resnet34'.*--no-resume"):
        train_head(data, out, fast_config(*TINY, "train.epochs=3", "model.backbone=resnet34"), progress=_quiet)
    with pytest.raises(CheckpointMismatch, match=r"train.lr: checkpoint 0.003, now 0.01"):
        train_head(data, out, fast_config(*TINY, "train.epochs=3", "train.lr=0.01"), progress=_quiet)
    assert read_sidecar(out)["sha256"] == file_sha256(out)  # refused before touching anything


def test_unfreeze_last_trains_only_the_last_stage(tiny, tmp_path):
    net, _ = build_backbone("resnet18")
    enc = ImageEncoder(ModelConfig(backbone="resnet18"))
    trainable = set_trainable(enc, "resnet18", "last")
    assert sum(p.numel() for p in trainable) == sum(p.numel() for p in enc.backbone[7].parameters())
    out = str(tmp_path / "last.safetensors")
    train_head([str(tiny / "data")], out, fast_config(*TINY, "train.epochs=1", "train.unfreeze=last"), progress=_quiet)
    from safetensors.torch import load_file

    state = load_file(out)
    assert torch.equal(state["backbone.0.weight"], net[0].weight)  # conv1: frozen
    assert not torch.equal(state["backbone.7.1.conv2.weight"], net[7][1].conv2.weight)  # layer4: trained


def test_a_head_without_parameters_has_nothing_to_train(tiny, tmp_path):
    with pytest.raises(ValueError, match="nothing to train"):
        train_head(
            [str(tiny / "data")],
            str(tmp_path / "avg.safetensors"),
            fast_config(*TINY, "model.pooling=avg"),
            progress=_quiet,
        )


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_ray_train_two_cpu_workers_write_a_loadable_artifact(ray_session, tiny, tmp_path):
    out = str(tmp_path / "ray.safetensors")
    summary = train_head(
        [str(tiny / "data")], out, fast_config(*TINY, "train.epochs=2", "train.workers=2"), progress=_quiet
    )
    meta = read_sidecar(out)
    assert summary["epochs_done"] == 2 and meta["train"]["workers"] == 2 and meta["sha256"] == file_sha256(out)
    pixels = np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    emb = EncoderRunner(ModelConfig(backbone="resnet18", pooling="attn", weights=out), precision="fp32")(pixels)
    np.testing.assert_allclose(np.linalg.norm(emb["embedding"], axis=1), 1.0, atol=1e-5)


def test_box_coverage_and_attention_loss_match_the_evaluation_stats():
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(6, 3, 4, generator=g)
    attn /= attn.sum((1, 2), keepdim=True)
    boxes = torch.rand(6, 4, generator=g)
    boxes[5] = float("nan")
    mass = (attn[:5] * box_coverage(boxes[:5], 3, 4)).sum((1, 2))
    ref = per_image_stats(attn.numpy(), boxes.numpy())
    np.testing.assert_allclose(mass.numpy(), ref["box_mass"][:5], atol=1e-6)
    expected = (-torch.log(mass).sum() + (ref["entropy"][5] - 0.5) ** 2) / 6
    torch.testing.assert_close(attention_loss(attn, boxes, 0.5), expected.float(), atol=1e-5, rtol=0)
    # one-hot maps (a sharp softmax underflows to exact zeros) must still give finite gradients
    sharp = torch.zeros(6, 3, 4)
    sharp[:, 1, 2] = 1.0
    sharp.requires_grad_(True)
    attention_loss(sharp, boxes, 0.5).backward()
    assert torch.isfinite(sharp.grad).all()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.unfreeze=bogus"], "train.unfreeze='bogus'; allowed: none, last, all"),
        (["train.lr=-0.1"], "train.lr must be > 0"),
        (["train.lr=fast"], "train.lr must be a number"),
        (["train.val_fraction=1.5"], "train.val_fraction must be in"),
        (["train.workers=-1"], "train.workers must be >= 0"),
        (["train.epochs=0"], "train.epochs must be >= 1"),
        (["train.loss=triplet"], "allowed: normsoftmax"),
        (["train.colour=red"], "unknown key train.colour"),
    ],
)
def test_train_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        fast_config(*overrides)


def test_train_config_numbers():
    cfg = fast_config("train.lr=1", "train.weight_decay=1e-3", "train.attn_weight=0")
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.train.weight_decay == 1e-3
    assert json.loads(json.dumps(cfg.to_dict()))["train"]["unfreeze"] == "none"


def test_train_command_prints_a_json_summary(tiny, tmp_path, capsys):
    from attnpipe.cli import build_parser
    from attnpipe.train.command import run_train_command

    out = str(tmp_path / "cmd.safetensors")
    args = build_parser().parse_args(
        [
            "train",
            "--input",
            str(tiny / "data"),
            "--out",
            out,
            "--pooling",
            "gem",
            "--json",
            "--no-resume",
            *(x for o in (*TINY, "train.epochs=1", "data.image_size=64") for x in ("--set", o)),
        ]
    )
    assert run_train_command(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["weights"] == out and summary["epochs_done"] == 1 and read_sidecar(out)["pooling"] == "gem"


def test_plain_safetensors_with_a_foreign_json_stay_torchvision_weights(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    model = torchvision.models.resnet18(weights=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "r18.safetensors")
    (tmp_path / "r18.json").write_text('{"note": "not an attnpipe sidecar"}')
    assert read_sidecar(str(tmp_path / "r18.safetensors")) is None
    enc = ImageEncoder(ModelConfig(backbone="resnet18", weights=str(tmp_path / "r18.safetensors")))
    assert torch.equal(enc.backbone[0].weight, model.conv1.weight)


def test_encode_job_with_the_artifact_writes_the_trained_embeddings(ray_session, tiny, tiny_trained, tmp_path):
    """Saved -> loaded by the Ray encode stage -> Parquet embeddings equal the in-memory trained encoder's."""
    from attnpipe import store
    from attnpipe.encode import encode

    out = tiny_trained["weights"]
    images = load_labeled([str(tiny / "data")], fast_config().data)
    expected = dict(zip(images.ids.tolist(), _in_memory(tiny_trained, images.pixels)[0].numpy()))

    emb = str(tmp_path / "emb")
    encode([str(tiny / "data")], emb, fast_config(*TINY, f"model.weights={out}"))
    ids, X = store.load_vectors(emb)
    assert sorted(ids) == sorted(expected)
    np.testing.assert_allclose(X, np.stack([expected[i] for i in ids]), atol=1e-5, rtol=0)
    assert store.dataset_metadata(emb)["attnpipe.weights"] == f"sha256:{read_sidecar(out)['sha256'][:16]}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_gpu_writes_an_artifact_the_cpu_encoder_loads(tiny, tiny_trained, tmp_path):
    """GPU twin of the CPU training tests: the same schedule on CUDA learns as well, and the artifact moves to CPU."""
    out = str(tmp_path / "gpu.safetensors")
    summary = train_head([str(tiny / "data")], out, fast_config(*TINY, "train.epochs=3"), progress=_quiet)
    assert summary["epochs_done"] == 3
    best_gpu = max(h["map@r"] for h in summary["history"])
    assert best_gpu > max(h["map@r"] for h in tiny_trained["history"]) - 0.1  # CPU run of the same schedule
    pixels = load_labeled([str(tiny / "data")], fast_config().data).pixels[:8]
    cpu = EncoderRunner(ModelConfig(backbone="resnet18", pooling="attn", weights=out), precision="fp32", device="cpu")
    np.testing.assert_allclose(np.linalg.norm(cpu(pixels)["embedding"], axis=1), 1.0, atol=1e-5)

"""Config: defaults <- YAML <- --set, and clear errors for every kind of mistake."""

from __future__ import annotations

import json

import pytest
import torch

from attnpipe.config import Config, ConfigError, load_config


def test_defaults_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  backbone: resnet50\n  pooling: gem\nencode:\n  batch_size: 32\n")
    cfg = load_config(str(f), ["encode.batch_size=8", "data.image_size=96"])
    assert cfg.model.backbone == "resnet50" and cfg.model.pooling == "gem"
    assert cfg.encode.batch_size == 8 and cfg.data.image_size == 96
    assert cfg.model.weights == "none" and cfg.encode.precision == "auto"
    assert load_config() == Config()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.backbone=resnet9000"], "allowed: .*resnet18"),
        (["model.pooling=median"], "allowed: .*attn"),
        (["model.weights=/nope.safetensors"], "neither 'none', 'default' nor an existing file"),
        (["model.colour=red"], "unknown key model.colour; allowed in model"),
        (["modle.backbone=resnet18"], "unknown config section 'modle'"),
        (["encode.batch_size=zero"], "encode.batch_size must be an integer"),
        (["encode.batch_size=0"], "encode.batch_size must be >= 1"),
        (["encode.precision=fp8"], "allowed: auto, fp32, bf16, fp16"),
        (["data.image_size=8"], "data.image_size must be >= 32"),
        (["backbone=resnet18"], "section.key=value"),
        (["model.backbone=vit_b_16", "data.image_size=128"], "needs data.image_size=224"),
    ],
)
def test_bad_values_say_what_to_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(str(f))


def test_weights_file_accepted(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "w.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(f))
    assert load_config(None, [f"model.weights={f}"]).model.weights == str(f)
    t = tmp_path / "w.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, t)  # a plain state dict loads with weights_only=True
    assert load_config(None, [f"model.weights={t}"]).model.weights == str(t)


# --- fail fast on every bad setting, before Ray starts ---------------------------------------------------------


def test_yaml_syntax_errors_name_the_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  backbone: [resnet18\n  pooling: attn\n")
    with pytest.raises(ConfigError, match=r"bad.yaml' is not valid YAML.*line \d+"):
        load_config(str(f))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, ["model.backbone=[resnet18"])
    with pytest.raises(ConfigError, match="is not a file"):
        load_config(str(tmp_path))
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="bin.yaml"):
        load_config(str(tmp_path / "bin.yaml"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.image_size=4097"], "data.image_size must be <= 4096"),
        (["encode.batch_size=65537"], "encode.batch_size must be <= 65536"),
        (["encode.decode_batch_size=1000000"], "encode.decode_batch_size must be <= 65536"),
    ],
)
def test_absurd_values_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
    assert load_config(None, ["data.image_size=4096", "encode.batch_size=65536"]).data.image_size == 4096


def test_weights_that_cannot_load_fail_at_config_time(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    pickled = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a whole pickled module, not a state dict
    with pytest.raises(ConfigError, match="pickled objects beyond tensors, refused"):
        load_config(None, [f"model.weights={pickled}"])
    good = tmp_path / "w.safetensors"
    save_file({"fc.weight": torch.zeros(64, 64)}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ConfigError, match="cut.safetensors' cannot be loaded"):
        load_config(None, [f"model.weights={cut}"])
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 not really a torch zip")
    with pytest.raises(ConfigError, match="cut.pt' cannot be loaded"):
        load_config(None, [f"model.weights={tmp_path / 'cut.pt'}"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError, match="needs torchvision's resnet18 weights at .*empty-cache.*no download"):
        load_config(None, ["model.weights=default"])


def test_tampered_trained_artifact_is_refused(tmp_path):
    from safetensors.torch import save_file

    from attnpipe.models.artifact import FORMAT, FORMAT_VERSION, file_sha256

    weights = tmp_path / "head.safetensors"
    save_file({"w": torch.ones(4)}, str(weights))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "backbone": "resnet18", "pooling": "attn"}
    meta |= {"image_size": 224, "normalization": {}, "sha256": file_sha256(str(weights))}
    (tmp_path / "head.json").write_text(json.dumps(meta))
    assert load_config(None, [f"model.weights={weights}"]).model.weights == str(weights)
    save_file({"w": torch.zeros(4)}, str(weights))  # same shape, other values: only the checksum can tell
    with pytest.raises(ConfigError, match="does not match the sha256 in .*head.json"):
        load_config(None, [f"model.weights={weights}"])


def _cli(argv: list[str], capfd) -> tuple[int, str]:
    from attnpipe.cli import main

    code = main(argv)
    return code, capfd.readouterr().err


def test_cli_exits_2_with_a_message_and_no_traceback(tmp_path, capfd):
    from attnpipe.data.sample import make_sample

    make_sample(str(tmp_path / "data"), fmt="tar", n=2, num_shards=1, image_size=32)
    (tmp_path / "bad.yaml").write_text("model: {backbone: resnet18\n")
    encode = ["encode", "--input", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    cases = [
        ([*encode, "--config", str(tmp_path / "bad.yaml")], "is not valid YAML"),
        ([*encode, "--set", "data.image_size=100000"], "data.image_size must be <= 4096"),
        ([*encode, "--set", "model.weights=/no/such.safetensors"], "model.weights='/no/such.safetensors'"),
        (["search", "--index", str(tmp_path / "idx"), "--id", "a", "-k", "0"], "-k must be between 1 and"),
        (["search", "--index", str(tmp_path / "idx"), "--id", "a", "--version", "../x"], "--version expects"),
        (["eval", "--embeddings", "e", "--index", "i", "--out", "o", "--version", "/etc"], "--version expects"),
        (["eval", "--embeddings", "e", "--index", "i", "--out", "o", "--k", "0,5"], "--k expects"),
    ]
    for argv, message in cases:
        code, err = _cli(argv, capfd)
        assert code == 2, (argv, err)
        assert message in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "out").exists()  # nothing was started or written


def test_encoder_pool_and_device_settings():
    from attnpipe.config import encoder_pool

    assert encoder_pool("0") == (0, 0) and encoder_pool("3") == (3, 3) and encoder_pool("2, 8") == (2, 8)
    cfg = load_config(None, ["encode.num_encoders=1,4", "encode.device=cuda", "encode.gpus_per_encoder=0.5"])
    assert (cfg.encode.num_encoders, cfg.encode.device, cfg.encode.gpus_per_encoder) == ("1,4", "cuda", 0.5)
    for bad in ("encode.num_encoders=4,2", "encode.num_encoders=a", "encode.num_encoders=0,3", "encode.device=tpu",
                "encode.gpus_per_encoder=0", "encode.gpus_per_encoder=16"):  # fmt: skip
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])


@pytest.mark.ray
def test_cuda_encoders_request_gpus_even_without_gpu_nodes(ray_session, sample_inputs):
    """device=cuda asks Ray for GPUs (the autoscaler's signal), elastic min..max; on a node without CUDA it fails
    naming the node instead of encoding on CPU."""
    from attnpipe.data.shards import discover
    from attnpipe.encode import _actor_device, build_dataset

    cfg = load_config(None, ["encode.device=cuda", "encode.num_encoders=1,3", "encode.gpus_per_encoder=0.5"])
    ds = build_dataset(discover([sample_inputs["tar"]]), cfg)
    op = ds._logical_plan.dag  # the encoder stage, not executed (this machine has no GPU)
    assert op.ray_remote_args.get("num_gpus") == 0.5
    assert (op.compute.min_size, op.compute.max_size) == (1, 3)
    with pytest.raises(RuntimeError, match="encode.device=cuda but the encoder landed on node"):
        _actor_device("cuda")
    assert _actor_device("auto") is None and _actor_device("cpu") == "cpu"

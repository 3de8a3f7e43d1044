"""Config: defaults <- YAML <- --set, and clear errors for every kind of mistake."""

from __future__ import annotations

import pytest

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
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x")
    assert load_config(None, [f"model.weights={f}"]).model.weights == str(f)

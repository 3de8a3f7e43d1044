"""Backbones truncated to their feature maps, weights handling, and the encoder runner's precision paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from attnpipe.config import ModelConfig
from attnpipe.models.backbones import build_backbone, list_backbones, weights_fingerprint
from attnpipe.models.encoder import EncoderRunner, ImageEncoder


@pytest.mark.parametrize(
    "name, size, channels",
    [
        ("resnet18", 64, 512),
        ("convnext_tiny", 64, 768),
        ("efficientnet_b0", 64, 1280),
        ("regnet_x_400mf", 64, 400),
        ("mobilenet_v3_small", 64, 576),
        ("vit_b_16", 224, 768),
    ],
)
def test_backbone_families_give_spatial_maps(name, size, channels):
    net, c = build_backbone(name)
    assert c == channels
    with torch.inference_mode():
        fmap = net(torch.randn(1, 3, size, size))
    assert fmap.shape[:2] == (1, channels) and fmap.dim() == 4
    if name == "vit_b_16":
        assert fmap.shape[2:] == (14, 14)


def test_registry_lists_families_and_rejects_unknown():
    names = list_backbones()
    for n in ("resnet50", "convnext_small", "efficientnet_b3", "regnet_y_800mf", "vit_b_16"):
        assert n in names
    assert "googlenet" not in names  # no clean spatial map: not offered
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet9000")


def test_random_init_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, _ = build_backbone("resnet18", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b, _ = build_backbone("resnet18", seed=3)
    c, _ = build_backbone("resnet18", seed=4)
    wa, wb, wc = (next(m.parameters()) for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_weights_from_file_safetensors_and_torch(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(7)
    model = torchvision.models.resnet18(weights=None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "r18.safetensors")
    torch.save(state, tmp_path / "r18.pt")
    for f in ("r18.safetensors", "r18.pt"):
        net, _ = build_backbone("resnet18", weights=str(tmp_path / f))
        assert torch.equal(net[0].weight, model.conv1.weight)
    assert weights_fingerprint(str(tmp_path / "r18.pt"), "resnet18", 0).startswith("sha256:")
    with pytest.raises(ValueError, match="does not fit"):
        build_backbone("resnet34", weights=str(tmp_path / "r18.pt"))


def test_default_weights_never_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="no download is attempted"):
        build_backbone("resnet18", weights="default")


def test_runner_bf16_close_to_fp32_and_normalized():
    cfg = ModelConfig(backbone="resnet18", pooling="attn")
    pixels = np.random.default_rng(0).integers(0, 255, (4, 96, 96, 3), dtype=np.uint8)
    fp32 = EncoderRunner(cfg, precision="fp32")(pixels)
    bf16 = EncoderRunner(cfg, precision="bf16")(pixels)
    assert fp32["embedding"].shape == (4, 512) and fp32["attention"].shape == (4, 3, 3)
    np.testing.assert_allclose(np.linalg.norm(bf16["embedding"], axis=1), 1.0, atol=1e-5)
    cos = (fp32["embedding"] * bf16["embedding"]).sum(1)
    assert (cos > 0.98).all(), cos
    np.testing.assert_allclose(fp32["attention"].sum((1, 2)), 1.0, atol=1e-5)


def test_runner_matches_plain_module():
    """The runner's uint8 -> normalize -> channels_last path equals ImageEncoder on torchvision-style input."""
    cfg = ModelConfig(backbone="resnet18", pooling="gem")
    pixels = np.random.default_rng(1).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    out = EncoderRunner(cfg, precision="fp32")(pixels)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    x = torchvision.transforms.functional.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.inference_mode():
        emb, _ = ImageEncoder(cfg).eval()(x)
    np.testing.assert_allclose(out["embedding"], emb.numpy(), atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runner_on_gpu_matches_cpu():
    cfg = ModelConfig(backbone="resnet18", pooling="attn")
    pixels = np.random.default_rng(0).integers(0, 255, (4, 96, 96, 3), dtype=np.uint8)
    gpu = EncoderRunner(cfg, precision="bf16", device="cuda")(pixels)
    cpu = EncoderRunner(cfg, precision="fp32", device="cpu")(pixels)
    assert ((gpu["embedding"] * cpu["embedding"]).sum(1) > 0.98).all()

import math

import numpy as np
import pytest
import torch

from attnpipe.models.pooling import (
    POOLINGS,
    attention_stats,
    build_pooling,
    list_poolings,
    register_pooling,
)

HEADS = list_poolings()
C = 16


def _x(b=2, c=C, h=6, w=6, seed=0, positive=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, h, w, generator=g) if positive else torch.randn(b, c, h, w, generator=g)
    return x + 0.1 if positive else x


def _check_contract(head, x, emb, attn, atol=1e-5):
    b, _, h, w = x.shape
    assert emb.shape == (b, head.out_dim)
    assert attn.shape == (b, h, w)
    assert attn.dtype == torch.float32
    assert torch.isfinite(emb).all() and torch.isfinite(attn).all()
    assert (attn >= 0).all()
    torch.testing.assert_close(attn.sum((1, 2)), torch.ones(b), atol=atol, rtol=0)


def _permute(x, perm):
    b, c, h, w = x.shape
    return x.flatten(2)[:, :, perm].reshape(b, c, h, w)  # permute positions of the row-major grid


def test_registry_lists_every_head_sorted():
    assert HEADS == sorted(["attn", "avg", "avgmax", "crow", "gem", "max", "mha"])
    assert set(HEADS) == set(POOLINGS)


def test_unknown_head_raises_with_allowed_names():
    with pytest.raises(ValueError, match="nope") as exc:
        build_pooling("nope", 8)
    for name in HEADS:
        assert name in str(exc.value)


def test_bad_channels_and_duplicate_registration_raise():
    with pytest.raises(ValueError, match="in_channels"):
        build_pooling("avg", 0)
    with pytest.raises(ValueError, match="already registered"):
        register_pooling("avg")(type("Other", (torch.nn.Module,), {}))


@pytest.mark.parametrize("name", HEADS)
def test_contract(name):
    head = build_pooling(name, C)
    assert isinstance(head.out_dim, int)
    assert head.out_dim == (2 * C if name == "avgmax" else C)
    x = _x()
    emb, attn = head(x)
    _check_contract(head, x, emb, attn)
    assert emb.dtype == torch.float32


@pytest.mark.parametrize("hw", [(5, 7), (7, 5), (1, 1), (1, 9)])
@pytest.mark.parametrize("name", HEADS)
def test_any_map_size(name, hw):
    head = build_pooling(name, C)
    x = _x(h=hw[0], w=hw[1])
    emb, attn = head(x)
    _check_contract(head, x, emb, attn)
    if hw == (1, 1):
        assert torch.equal(attn, torch.ones(2, 1, 1))


@pytest.mark.parametrize("name", HEADS)
def test_bf16_autocast(name):
    head = build_pooling(name, C)
    x = _x(h=5, w=7)
    ref_emb, _ = head(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb, attn = head(x)
    _check_contract(head, x, emb, attn, atol=1e-3)
    torch.testing.assert_close(emb.float(), ref_emb, atol=0.1, rtol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 features straight from a bf16 backbone
        emb, attn = head(x.bfloat16())
    _check_contract(head, x, emb, attn, atol=1e-3)


@pytest.mark.parametrize("name", HEADS)
def test_build_is_deterministic_and_leaves_global_rng(name):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = build_pooling(name, C, seed=7), build_pooling(name, C, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    x = _x()
    for ta, tb in zip(a(x), b(x)):
        assert torch.equal(ta, tb)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("name", ["attn", "mha"])
def test_seed_changes_learned_init(name):
    a, b = build_pooling(name, C, seed=0), build_pooling(name, C, seed=1)
    assert any(not torch.equal(va, vb) for va, vb in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name", ["avg", "max", "gem", "crow", "attn", "avgmax"])
def test_position_permutation_equivariance(name):
    head = build_pooling(name, C)
    x = _x(h=5, w=7, seed=1)
    perm = torch.randperm(35, generator=torch.Generator().manual_seed(0))
    emb, attn = head(x)
    emb_p, attn_p = head(_permute(x, perm))
    torch.testing.assert_close(emb_p, emb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn_p.flatten(1), attn.flatten(1)[:, perm], atol=1e-6, rtol=1e-5)


def test_mha_is_not_permutation_invariant():
    head = build_pooling("mha", C)
    x = _x(h=5, w=7, seed=1)
    perm = torch.randperm(35, generator=torch.Generator().manual_seed(0))
    emb, attn = head(x)
    emb_p, attn_p = head(_permute(x, perm))
    assert not torch.allclose(attn_p.flatten(1), attn.flatten(1)[:, perm], atol=1e-4)
    assert not torch.allclose(emb_p, emb, atol=1e-4)


def _positive_scorer(head):
    # A "trained" scorer that scores positions by their feature sum, so a hot spot gets the largest weight.
    first, last = head.scorer[0], head.scorer[-1]
    with torch.no_grad():
        first.weight.fill_(1.0 / C)
        first.bias.zero_()
        last.weight.fill_(1.0)
        last.bias.zero_()


@pytest.mark.parametrize("name", ["max", "gem", "crow", "attn"])
def test_hot_spot_translation_moves_attention_peak(name):
    head = build_pooling(name, C)
    if name == "attn":
        _positive_scorer(head)
    base = _x(b=1, h=6, w=8, positive=True) * 0.5
    peaks = []
    for i, j in [(1, 2), (4, 6), (0, 0)]:
        x = base.clone()
        x[:, :, i, j] = 10.0
        _, attn = head(x)
        peaks.append(divmod(int(attn.flatten(1).argmax()), 8))
        assert attn[0, i, j] > 0.5 if name != "crow" else attn[0, i, j] == attn.max()
    assert peaks == [(1, 2), (4, 6), (0, 0)]


def test_avg_is_mean_and_avgmax_is_concat():
    x = _x()
    emb, attn = build_pooling("avg", C)(x)
    torch.testing.assert_close(emb, x.mean((2, 3)))
    torch.testing.assert_close(attn, torch.full_like(attn, 1 / 36))
    emb2, attn2 = build_pooling("avgmax", C)(x)
    torch.testing.assert_close(emb2, torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1))
    _, max_attn = build_pooling("max", C)(x)
    torch.testing.assert_close(attn2, 0.5 * attn + 0.5 * max_attn)


def test_max_attention_counts_channel_argmax():
    x = torch.zeros(1, 4, 2, 2)
    x[0, 0, 0, 0] = x[0, 1, 0, 0] = x[0, 2, 1, 1] = x[0, 3, 0, 1] = 1.0
    emb, attn = build_pooling("max", 4)(x)
    torch.testing.assert_close(emb, torch.ones(1, 4))
    torch.testing.assert_close(attn, torch.tensor([[[0.5, 0.25], [0.0, 0.25]]]))


def test_gem_matches_reference_and_limits():
    head = build_pooling("gem", C)
    assert head.p.item() == 3.0
    x = _x(positive=True)
    emb, attn = head(x)
    x64 = x.double()
    torch.testing.assert_close(emb.double(), x64.pow(3).mean((2, 3)).pow(1 / 3), rtol=1e-5, atol=1e-6)
    mass = x64.pow(3).sum(1)
    torch.testing.assert_close(attn.double(), mass / mass.sum((1, 2), keepdim=True), rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        head.p.fill_(1.0)
    torch.testing.assert_close(head(x)[0], x.mean((2, 3)), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        head.p.fill_(500.0)  # values up to ~110: a naive x^p (110^500) would overflow float32
    emb, attn = head(x * 100)
    torch.testing.assert_close(emb, (x * 100).amax((2, 3)), rtol=1e-2, atol=0)
    assert torch.isfinite(attn).all()


def _crow_reference(x: np.ndarray, eps=1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Straight port of the CroW paper's reference code for one (C, H, W) map."""
    x = np.maximum(x.astype(np.float64), 0)
    s = x.sum(0)
    s = np.sqrt(s / np.sqrt((s**2).sum()))
    q = (x > 0).reshape(x.shape[0], -1).mean(1)
    idf = np.array([np.log(q.sum() / (eps + qc)) if qc > 0 else 0.0 for qc in q])
    return idf * (x * s).sum((1, 2)), s / s.sum()


def test_crow_matches_reference():
    x = _x(b=2, h=5, w=7, seed=3)  # signed: exercises the clamp and zero-fraction channel weights
    x[1, 3] = -1.0  # an all-zero channel after clamping
    emb, attn = build_pooling("crow", C)(x)
    for i in range(2):
        ref_emb, ref_attn = _crow_reference(x[i].numpy())
        np.testing.assert_allclose(emb[i].numpy(), ref_emb, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(attn[i].numpy(), ref_attn, rtol=1e-4, atol=1e-6)
    emb0, attn0 = build_pooling("crow", C)(torch.zeros(1, C, 3, 4))
    assert torch.equal(emb0, torch.zeros(1, C))
    torch.testing.assert_close(attn0, torch.full((1, 3, 4), 1 / 12))


def test_attn_zeroed_scorer_is_avg_and_untrained_is_near_avg():
    head = build_pooling("attn", C)
    x = _x(h=5, w=7)
    emb, attn = head(x)
    assert head.scorer[0].out_channels == max(C // 8, 32)
    assert not torch.equal(attn, torch.full_like(attn, 1 / 35))
    torch.testing.assert_close(attn, torch.full_like(attn, 1 / 35), atol=1e-3, rtol=0)
    with torch.no_grad():
        head.scorer[-1].weight.zero_()
        head.scorer[-1].bias.zero_()
    emb, attn = head(x)
    torch.testing.assert_close(emb, x.mean((2, 3)))
    torch.testing.assert_close(attn, torch.full_like(attn, 1 / 35))


@pytest.mark.parametrize("channels,heads", [(16, 8), (12, 4), (6, 2), (3, 1)])
def test_mha_head_count(channels, heads):
    head = build_pooling("mha", channels)
    assert head.mha.num_heads == heads
    emb, _ = head(_x(c=channels, h=3, w=4))
    assert emb.shape == (2, channels)


@pytest.mark.parametrize(
    "name,params",
    [("gem", ["p"]), ("attn", ["scorer.0.weight", "scorer.2.weight", "scorer.2.bias"]), ("mha", None)],
)
def test_gradient_reaches_learned_parameters(name, params):
    head = build_pooling(name, C)
    x = _x(h=4, w=5, positive=True)
    emb, attn = head(x)
    w = torch.randn(emb.shape, generator=torch.Generator().manual_seed(0))
    ((emb * w).sum() + (attn * attn).sum()).backward()
    named = dict(head.named_parameters())
    for p in params or named:
        grad = named[p].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, p


def test_attention_stats_extremes_and_reference():
    uniform = torch.full((2, 5, 7), 1 / 35)
    s = attention_stats(uniform)
    torch.testing.assert_close(s["entropy"], torch.ones(2))
    torch.testing.assert_close(s["peak"], torch.full((2,), 1 / 35))
    torch.testing.assert_close(s["top10_mass"], torch.full((2,), 4 / 35))  # ceil(3.5) = 4 positions
    onehot = torch.zeros(2, 5, 7)
    onehot[0, 2, 3] = onehot[1, 0, 0] = 1.0
    s = attention_stats(onehot)
    assert torch.equal(s["entropy"], torch.zeros(2))
    assert torch.equal(s["peak"], torch.ones(2))
    assert torch.equal(s["top10_mass"], torch.ones(2))
    half = torch.tensor([[[0.5, 0.5], [0.0, 0.0]]])
    s = attention_stats(half)
    torch.testing.assert_close(s["entropy"], torch.tensor([math.log(2) / math.log(4)]))
    torch.testing.assert_close(s["top10_mass"], torch.tensor([0.5]))  # ceil(0.4) = 1 position
    assert torch.equal(attention_stats(torch.ones(3, 1, 1))["entropy"], torch.zeros(3))
    thirty = torch.arange(30.0).view(1, 5, 6)
    thirty = thirty / thirty.sum()
    torch.testing.assert_close(attention_stats(thirty)["top10_mass"], (27.0 + 28 + 29) / thirty.new_tensor([435.0]))


@pytest.mark.parametrize("name", HEADS)
def test_heads_on_real_pooling_output_are_valid_stats(name):
    _, attn = build_pooling(name, C)(_x(h=5, w=7))
    s = attention_stats(attn)
    for v in s.values():
        assert v.shape == (2,) and v.dtype == torch.float32
        assert ((v >= 0) & (v <= 1 + 1e-6)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", HEADS)
def test_cuda_bf16(name):
    head = build_pooling(name, C).cuda()
    x = _x(h=5, w=7).cuda()
    ref_emb, _ = build_pooling(name, C)(x.cpu())
    emb, attn = head(x)
    _check_contract(head, x, emb, attn)
    torch.testing.assert_close(emb.cpu(), ref_emb, atol=1e-3, rtol=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        emb, attn = head(x)
    _check_contract(head, x, emb, attn, atol=1e-3)

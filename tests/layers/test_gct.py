"""Gated Channel Transformation (GCT paper, Eqns 1-5)."""

import math

import pytest
import torch
from torch import nn

from cenet.layers import GCT_MODES, GatedChannelTransformation, gct_no_decay_parameters


def make_input(n=3, c=8, h=5, w=4, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, h, w, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)


def set_params(gct, alpha, gamma, beta):
    with torch.no_grad():
        gct.alpha.copy_(torch.as_tensor(alpha))
        gct.gamma.copy_(torch.as_tensor(gamma))
        gct.beta.copy_(torch.as_tensor(beta))


@pytest.mark.parametrize("mode", GCT_MODES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_exact_identity_at_initialization(mode, layout):
    gct = GatedChannelTransformation(8, mode=mode)
    assert torch.equal(gct.alpha, torch.ones(8))
    assert torch.equal(gct.gamma, torch.zeros(8)) and torch.equal(gct.beta, torch.zeros(8))
    assert all(p.dim() == 1 for p in gct.parameters())
    x = make_input(dtype=torch.float32).contiguous(memory_format=layout)
    y = gct(x)
    assert torch.equal(y, x)
    assert y.is_contiguous(memory_format=layout)
    # also for an all-zero input (ℓ1 embedding 0, ε keeps the normalization finite)
    z = torch.zeros(2, 8, 3, 3)
    assert torch.equal(gct(z), z)


# x: sample 0 has channel 0 = [3, 4], channel 1 = [1, -2]; sample 1 = [0, 1], [2, 2].
X = [[[3.0, 4.0], [1.0, -2.0]], [[0.0, 1.0], [2.0, 2.0]]]
ALPHA, GAMMA, BETA = [2.0, 0.5], [1.0, -3.0], [0.5, 0.0]


def hand_gct(mode, eps):
    """Eqns 2-4 with Python floats."""
    out = []
    for sample in X:
        if mode == "l2":
            norms = [math.sqrt(sum(v * v for v in ch) + eps) for ch in sample]
        else:
            norms = [sum(abs(v) for v in ch) for ch in sample]
        s = [a * v for a, v in zip(ALPHA, norms, strict=True)]
        denom = math.sqrt(sum(v * v for v in s) + eps)
        s_hat = [math.sqrt(2) * v / denom for v in s]
        gates = [1 + math.tanh(g * v + b) for g, v, b in zip(GAMMA, s_hat, BETA, strict=True)]
        out.append([[v * gate for v in ch] for gate, ch in zip(gates, sample, strict=True)])
    return torch.tensor(out, dtype=torch.float64)[:, :, None, :]  # (N, C, 1, 2)


@pytest.mark.parametrize("mode", GCT_MODES)
@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_matches_hand_computation_of_eqns_2_to_4(mode, eps):
    gct = GatedChannelTransformation(2, mode=mode, eps=eps).double()
    set_params(gct, ALPHA, GAMMA, BETA)
    x = torch.tensor(X, dtype=torch.float64)[:, :, None, :]
    torch.testing.assert_close(gct(x), hand_gct(mode, eps), rtol=1e-14, atol=1e-14)


def test_l1_and_l2_embeddings_differ_and_l1_uses_absolute_values():
    x = torch.tensor(X, dtype=torch.float64)[:, :, None, :]
    outs = {}
    for mode in GCT_MODES:
        gct = GatedChannelTransformation(2, mode=mode).double()
        set_params(gct, ALPHA, GAMMA, BETA)
        outs[mode] = gct(x)
        torch.testing.assert_close(gct.embedding(x)[0, 1], torch.tensor(
            0.5 * (3.0 if mode == "l1" else math.sqrt(5 + 1e-5)), dtype=torch.float64))
    assert not torch.allclose(outs["l1"], outs["l2"])


@pytest.mark.parametrize("mode", GCT_MODES)
def test_gradcheck_in_float64(mode):
    torch.manual_seed(0)
    gct = GatedChannelTransformation(4, mode=mode).double()
    set_params(gct, torch.rand(4) + 0.5, torch.randn(4), torch.randn(4))
    x = make_input(n=2, c=4, h=3, w=2).requires_grad_(True)
    params = dict(gct.named_parameters())

    def f(x, alpha, gamma, beta):
        return torch.func.functional_call(
            gct, {"alpha": alpha, "gamma": gamma, "beta": beta}, (x,)
        )

    assert torch.autograd.gradcheck(f, (x, params["alpha"], params["gamma"], params["beta"]))


def test_half_precision_input_does_not_overflow_the_embedding():
    # Σ x² = 64 · 300² ≈ 5.8e6 overflows float16 (max 65504); the embedding is float32.
    x = torch.full((1, 2, 8, 8), 300.0)
    x[:, 1] = 1.0
    gct = GatedChannelTransformation(2)
    set_params(gct, [1.0, 1.0], [1.0, 1.0], [0.0, 0.0])
    ref = gct(x)
    y = gct.half()(x.half())
    assert y.dtype == torch.float16
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref, rtol=2e-3, atol=2e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = GatedChannelTransformation(2).float()(x)
    assert torch.equal(yb, x)


def test_bad_mode_lists_valid_modes():
    with pytest.raises(ValueError, match=r"valid modes are \('l2', 'l1'\)"):
        GatedChannelTransformation(8, mode="l3")
    with pytest.raises(ValueError, match="eps"):
        GatedChannelTransformation(8, eps=0.0)
    with pytest.raises(ValueError, match="num_features"):
        GatedChannelTransformation(0)
    gct = GatedChannelTransformation(8)
    with pytest.raises(ValueError, match="4-D input"):
        gct(torch.randn(8, 4))
    with pytest.raises(ValueError, match="num_features=8"):
        gct(torch.randn(1, 4, 2, 2))
    assert "8, mode='l2', eps=1e-05" in repr(gct)


def _net():
    net = nn.Sequential(
        GatedChannelTransformation(3),
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        GatedChannelTransformation(4, mode="l1"),
        nn.Conv2d(4, 2, 1, bias=False),
    )
    net[1].bias.requires_grad_(False)  # frozen parameters are left out
    return net


def _ids(params):
    return [id(p) for p in params]


def test_no_decay_parameters_are_exactly_the_gct_betas():
    net = _net()
    assert _ids(gct_no_decay_parameters(net)) == _ids([net[0].beta, net[3].beta])


def test_no_decay_parameters_all_gct_parameters():
    net = _net()
    assert _ids(gct_no_decay_parameters(net, "all")) == _ids(
        [*net[0].parameters(), *net[3].parameters()]
    )


def test_no_decay_parameters_empty_without_gct_and_reject_unknown_choice():
    plain = nn.Conv2d(3, 3, 1)
    assert gct_no_decay_parameters(plain) == []
    with pytest.raises(ValueError, match=r"valid values are \('beta', 'all'\)"):
        gct_no_decay_parameters(plain, "gamma")

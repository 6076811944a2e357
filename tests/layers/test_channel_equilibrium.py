"""The CE block (CE paper, Eqns 2-8, 32): modes, running statistics, gradients, layouts,
bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from cenet.layers import (
    BatchDecorrelation,
    ChannelEquilibrium,
    InstanceReweighting,
    batch_covariance,
    group_statistics,
    newton_schulz_isqrt,
    trace_normalize,
)

# every test here runs on the reference and on each native instruction set (conftest.py)
pytestmark = pytest.mark.usefixtures("ce_path")


def make_input(n=6, c=8, h=5, w=4, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(c) + 0.5 * torch.randn(c, c, generator=gen)
    x = torch.einsum("dc,nchw->ndhw", mix, torch.randn(n, c, h, w, generator=gen))
    return (x * 1.5 + 0.3).to(dtype)


def test_lambda_starts_at_one_half_and_parameters_are_1d():
    ce = ChannelEquilibrium(16)
    assert ce.lam.item() == 0.5
    assert all(p.dim() <= 2 for p in ce.parameters())
    assert ce.theta.shape == (1,)
    assert "16, mode='ce'" in repr(ce)
    assert "group_size=16, num_iters=3" in repr(ce)


def test_ce_training_output_is_the_mix_of_bd_and_ir_branches():
    x = make_input()
    ce = ChannelEquilibrium(8, group_size=4)
    with torch.no_grad():
        ce.theta.fill_(0.7)
    bd = BatchDecorrelation(8, group_size=4)
    ir = InstanceReweighting(8)
    ir.load_state_dict(ce.ir.state_dict())
    lam = torch.sigmoid(torch.tensor(0.7))
    expected = lam * bd(x) + (1 - lam) * ir(x)
    torch.testing.assert_close(ce(x), expected)
    torch.testing.assert_close(ce.bd.running_wm, bd.running_wm)
    torch.testing.assert_close(ce.ir.running_inv_std, ir.running_inv_std)


def test_bd_applies_newton_inverse_sqrt_of_trace_normalized_batch_covariance():
    x = make_input(dtype=torch.float64)
    bd = BatchDecorrelation(8, group_size=4, num_iters=3).double()
    flat = x.permute(1, 0, 2, 3).reshape(8, -1)
    out = bd(x).permute(1, 0, 2, 3).reshape(8, -1)
    for k in range(2):
        cov = torch.cov(flat[4 * k : 4 * k + 4], correction=0) + 1e-5 * torch.eye(4, dtype=x.dtype)
        w = newton_schulz_isqrt(cov / cov.trace(), 3)
        # applied to the un-centered input, not rescaled by tr(Σ)^(-1/2)
        torch.testing.assert_close(out[4 * k : 4 * k + 4], w @ flat[4 * k : 4 * k + 4])


def test_bd_pool_takes_statistics_from_2x2_max_pooling():
    x = make_input(h=6, w=6)
    bd = BatchDecorrelation(8, group_size=8, pool=True)
    bd(x)
    cov = batch_covariance(group_statistics(F.max_pool2d(x, 2, 2), 8)) + 1e-5 * torch.eye(8)
    expected = newton_schulz_isqrt(trace_normalize(cov), 3)
    torch.testing.assert_close(
        bd.running_wm, 0.9 * torch.eye(8) + 0.1 * expected[0].expand(8, 8).reshape(1, 8, 8)
    )


def test_ir_matches_hand_computation():
    torch.manual_seed(0)
    x = make_input(n=3, c=4)
    ir = InstanceReweighting(4, rd_ratio=0.5)
    var = x.var((2, 3), correction=0)  # population variance, Eqn 7
    hidden = F.layer_norm(var @ ir.fc1.weight.T, (2,), ir.norm.weight, ir.norm.bias)
    gate = torch.sigmoid(torch.relu(hidden) @ ir.fc2.weight.T)
    s = var.mean()
    torch.testing.assert_close(ir(x), x * (gate / torch.sqrt(s + 1e-5))[:, :, None, None])
    torch.testing.assert_close(ir.running_inv_std, 0.9 + 0.1 / torch.sqrt(s + 1e-5).reshape(1))


def test_running_buffers_update_in_training_and_are_used_in_eval():
    x = make_input()
    ce = ChannelEquilibrium(8, group_size=4)
    assert torch.equal(ce.bd.running_wm, torch.eye(4).repeat(2, 1, 1))
    assert ce.bd.running_wm.is_contiguous() and 0 not in ce.bd.running_wm.stride()
    for _ in range(3):
        ce(x)
    assert not torch.allclose(ce.bd.running_wm, torch.eye(4).repeat(2, 1, 1))
    assert ce.ir.running_inv_std.item() != 1.0
    ce.eval()
    wm_before = ce.bd.running_wm.clone()
    y1 = ce(x)
    assert torch.equal(ce.bd.running_wm, wm_before)  # eval does not update
    # eval = λ·(grouped 1×1 conv with the running matrix) + (1 − λ)·gate·ŝ^(-1/2)·x
    lam = ce.lam
    bd_eval = F.conv2d(x, ce.bd.conv_weight(), groups=2)
    d = ce.ir.gate(x.var((2, 3), correction=0)) * ce.ir.running_inv_std
    torch.testing.assert_close(y1, lam * bd_eval + (1 - lam) * d[:, :, None, None] * x)
    # eval output of one sample does not depend on the rest of the batch
    torch.testing.assert_close(ce(x[:1]), y1[:1])


def test_fresh_model_in_eval_is_finite_also_for_constant_input():
    ce = ChannelEquilibrium(16).eval()
    assert torch.isfinite(ce(torch.full((2, 16, 3, 3), 4.0))).all()
    ce.train()
    assert torch.isfinite(ce(torch.full((2, 16, 3, 3), 4.0))).all()


@pytest.mark.parametrize("mode", ["ce", "bd", "ir"])
def test_modes_build_only_their_branches(mode):
    ce = ChannelEquilibrium(16, mode=mode)
    assert (ce.bd is not None) == (mode in ("ce", "bd"))
    assert (ce.ir is not None) == (mode in ("ce", "ir"))
    assert hasattr(ce, "theta") == (mode == "ce")
    assert ce.lam.item() == {"ce": 0.5, "bd": 1.0, "ir": 0.0}[mode]
    y = ce(make_input(c=16))
    assert y.shape == (6, 16, 5, 4) and torch.isfinite(y).all()


@pytest.mark.parametrize("mode", ["ce", "bd", "ir"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_whole_block_in_float64(mode, layout, training):
    torch.manual_seed(0)
    ce = ChannelEquilibrium(8, mode=mode, group_size=4).double().train(training)
    x = make_input(n=3, h=3, w=3, dtype=torch.float64)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in ce.named_parameters()}
    if "theta" in params:
        params["theta"] = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    buffers = dict(ce.named_buffers())
    names = list(params)

    def f(x, *ps):
        return functional_call(ce, ({**dict(zip(names, ps, strict=True)), **buffers},), (x,))

    assert torch.autograd.gradcheck(f, (x.requires_grad_(True), *params.values()))


@pytest.mark.parametrize("mode", ["ce", "bd", "ir"])
def test_channels_last_gives_the_same_numbers_and_layout(mode):
    x = make_input(c=16)
    a = ChannelEquilibrium(16, mode=mode)
    b = ChannelEquilibrium(16, mode=mode)
    b.load_state_dict(a.state_dict())
    xc = x.contiguous(memory_format=torch.channels_last)
    ya, yb = a(x), b(xc)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
    assert yb.is_contiguous(memory_format=torch.channels_last)
    (ga,) = torch.autograd.grad(a(x.requires_grad_()).square().sum(), x)
    (gb,) = torch.autograd.grad(b(xc.requires_grad_()).square().sum(), xc)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-4)
    a.eval(), b.eval()
    torch.testing.assert_close(a(x), b(xc), rtol=1e-4, atol=1e-5)


def test_bfloat16_autocast_keeps_statistics_in_float32():
    ce = ChannelEquilibrium(16)
    x = make_input(c=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ce(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert ce.bd.running_wm.dtype == torch.float32
    ref = ChannelEquilibrium(16)(x)
    assert (y.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_device_and_dtype_arguments():
    ce = ChannelEquilibrium(16, dtype=torch.float64, device="cpu")
    assert {p.dtype for p in ce.parameters()} == {torch.float64}
    assert ce.bd.running_wm.dtype == torch.float64 and ce.ir.running_inv_std.dtype == torch.float64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"group_size": 5}, r"group_size=5 does not divide num_features=16.*\[1, 2, 4, 8, 16\]"),
        ({"num_iters": 0}, "num_iters must be a positive integer, got 0"),
        ({"mode": "xy"}, r"unknown CE mode 'xy'; valid modes are \('ce', 'bd', 'ir'\)"),
        ({"eps": 0.0}, "eps must be positive"),
        ({"momentum": 1.5}, r"momentum must lie in \(0, 1\]"),
        ({"rd_ratio": 0}, r"rd_ratio must lie in \(0, 1\]"),
    ],
)
def test_bad_arguments_raise_in_init(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ChannelEquilibrium(16, **kwargs)


@pytest.mark.parametrize("mode", ["ce", "bd", "ir"])
def test_bad_inputs_raise_clear_errors(mode):
    ce = ChannelEquilibrium(16, mode=mode)
    with pytest.raises(ValueError, match=r"4-D input \(N, C, H, W\), got shape \(2, 16\)"):
        ce(torch.randn(2, 16))
    with pytest.raises(ValueError, match="num_features=16 channels, got an input with 8"):
        ce(torch.randn(2, 8, 4, 4))


def test_too_few_samples_per_group_in_training():
    with pytest.raises(ValueError, match=r"at least 2 positions.*N·H·W = 1·1·1 = 1"):
        ChannelEquilibrium(16)(torch.randn(1, 16, 1, 1))
    with pytest.raises(ValueError, match="after 2×2 pooling"):
        BatchDecorrelation(16, pool=True)(torch.randn(1, 16, 2, 2))
    ChannelEquilibrium(16).eval()(torch.randn(1, 16, 1, 1))  # fine in eval


@pytest.mark.parametrize("mode", ["ce", "bd", "ir"])
def test_non_finite_batch_raises_before_running_buffers_change(mode):
    ce = ChannelEquilibrium(16, mode=mode)
    ce(make_input(c=16))
    before = {k: v.clone() for k, v in ce.state_dict().items()}
    x = make_input(c=16)
    x[0, 3, 1, 1] = math.nan
    with pytest.raises(FloatingPointError, match="not finite"):
        ce(x)
    x[0, 3, 1, 1] = math.inf
    with pytest.raises(FloatingPointError, match="not finite"):
        ce(x)
    for k, v in ce.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("mode", ["ce", "bd", "ir"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_identity_init_is_exact_identity_then_learns(mode, layout):
    x = make_input(c=16)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    ce = ChannelEquilibrium(16, mode=mode, identity_init=True)
    assert "identity_init=True" in repr(ce)
    torch.testing.assert_close(ce(x), x, rtol=0, atol=1e-6)
    ce.eval()
    torch.testing.assert_close(ce(x), x, rtol=0, atol=1e-6)
    ce.train()
    ce(x).square().sum().backward()
    assert ce.gate.grad is not None and ce.gate.grad.abs().item() > 0
    # with the gate fully open it is the plain block
    plain = ChannelEquilibrium(16, mode=mode)
    state = {k: v for k, v in ce.state_dict().items() if k != "gate"}
    plain.load_state_dict(state)
    with torch.no_grad():
        ce.gate.fill_(1.0)
    torch.testing.assert_close(ce(x), plain(x), rtol=1e-5, atol=1e-5)

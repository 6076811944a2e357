"""The compiled group kernels against plain torch products, and their fallback."""

import warnings

import pytest
import torch

from cenet import kernels
from cenet.layers import ChannelEquilibrium

SHAPES = [  # (N, G, g, M): tails of every kind (M not a multiple of the vector width, odd g)
    (3, 2, 16, 1024),
    (2, 3, 5, 37),
    (4, 4, 16, 49),
    (1, 1, 64, 100),
    (2, 1, 8, 1),
    (5, 2, 3, 70),
    (2, 1, 4, 1030),  # a last range of 6 positions (ranges are 512 long)
    (2, 2, 80, 20),  # groups wider than the kernels take (64): the torch fallback
]


@pytest.fixture
def compiled():
    if not kernels.kernels_available():
        pytest.skip("the CPU kernels could not be built here")


@pytest.fixture
def fallback(monkeypatch):
    monkeypatch.setitem(kernels._state, "ok", False)


def _reference_apply(w, x, diag, bias, transpose):
    b, g, m = x.shape
    mats = (w.transpose(1, 2) if transpose else w).repeat(b // w.shape[0], 1, 1)
    if diag is not None:
        mats = mats + torch.diag_embed(diag)
    out = mats @ x
    return out if bias is None else out + bias[..., None]


def _check_all(dtype, atol):
    torch.manual_seed(0)
    for n, groups, g, m in SHAPES:
        b = n * groups
        w = torch.randn(groups, g, g, dtype=dtype)
        x, y = torch.randn(b, g, m, dtype=dtype), torch.randn(b, g, m, dtype=dtype)
        d, c = torch.randn(b, g, dtype=dtype), torch.randn(b, g, dtype=dtype)
        for diag in (None, d):
            for bias in (None, c):
                for transpose in (False, True):
                    out = kernels.group_apply(w, x, diag, bias, transpose=transpose)
                    ref = _reference_apply(w, x, diag, bias, transpose)
                    torch.testing.assert_close(out, ref, atol=atol, rtol=atol)
        per = x @ y.transpose(1, 2)
        total, diag = kernels.group_gram(x, y, groups, with_diag=True)
        torch.testing.assert_close(total, per.view(n, groups, g, g).sum(0), atol=atol, rtol=atol)
        torch.testing.assert_close(diag, per.diagonal(dim1=1, dim2=2), atol=atol, rtol=atol)
        sym, none = kernels.group_gram(x, x, groups, symmetric=True)
        ref = (x @ x.transpose(1, 2)).view(n, groups, g, g).sum(0)
        assert none is None
        torch.testing.assert_close(sym, ref, atol=atol, rtol=atol)
        second, sums, squares = kernels.group_second_moments(x, groups)
        torch.testing.assert_close(second, ref, atol=atol, rtol=atol)
        torch.testing.assert_close(sums, x.sum(2), atol=atol, rtol=atol)
        torch.testing.assert_close(squares, x.square().sum(2), atol=atol, rtol=atol)
        total, sq = kernels.row_moments(x.view(b * g, m))
        torch.testing.assert_close(total, x.view(b * g, m).sum(1), atol=atol, rtol=atol)
        torch.testing.assert_close(sq, x.view(b * g, m).square().sum(1), atol=atol, rtol=atol)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-3)])
def test_compiled_kernels_match_torch(compiled, dtype, atol):
    _check_all(dtype, atol)


def test_fallback_matches_torch(fallback):
    _check_all(torch.float64, 1e-10)


def test_shaped_output_is_allocated_not_viewed(compiled):
    x = torch.randn(2 * 4, 16, 9)
    out = kernels.group_apply(torch.randn(4, 16, 16), x, shape=(2, 64, 3, 3))
    assert out.shape == (2, 64, 3, 3) and out._base is None


def test_groups_wider_than_the_kernels_take_use_the_fallback(compiled):
    block = ChannelEquilibrium(160, group_size=80)
    x = torch.randn(4, 160, 3, 3, requires_grad=True)
    block(x).sum().backward()  # the kernels would raise for g = 80
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()


def test_bad_arguments_raise(compiled):
    with pytest.raises(RuntimeError, match="not a multiple of G"):
        kernels.group_apply(torch.randn(3, 4, 4), torch.randn(4, 4, 5))
    with pytest.raises(RuntimeError, match="expected W"):
        kernels.group_apply(torch.randn(2, 4, 3), torch.randn(4, 4, 5))


@pytest.mark.parametrize("mode", ["ce", "bd", "ir"])
def test_block_with_and_without_kernels_agrees(compiled, monkeypatch, mode):
    torch.manual_seed(0)
    block = ChannelEquilibrium(32, mode=mode).double()
    x = torch.randn(4, 32, 5, 7, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(4, 32, 5, 7, dtype=torch.float64)
    results = []
    for ok in (True, False):
        monkeypatch.setitem(kernels._state, "ok", ok)
        block.zero_grad()
        x.grad = None
        block(x).backward(grad)
        results.append([x.grad.clone()] + [p.grad.clone() for p in block.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_failed_build_warns_and_falls_back(monkeypatch):
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler\nError building extension 'cenet_block_ops'")

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setattr(kernels, "_state", {})
    with pytest.warns(RuntimeWarning, match="could not build the CPU kernels.*torch.bmm"):
        assert not kernels.kernels_available()
    x = torch.randn(2, 4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not on every call
        out = kernels.group_apply(torch.eye(4).expand(2, 4, 4).contiguous(), x)
    torch.testing.assert_close(out, x)


def test_environment_variable_turns_kernels_off(monkeypatch):
    monkeypatch.setenv("CENET_KERNELS", "0")
    monkeypatch.setattr(kernels, "_state", {})
    assert not kernels.kernels_available()


def test_flop_counter_counts_the_products_as_matmuls(compiled):
    from torch.utils.flop_counter import FlopCounterMode

    x, w = torch.randn(4, 16, 9), torch.randn(2, 16, 16)
    with FlopCounterMode(display=False) as counter:
        kernels.group_apply(w, x)
        kernels.group_gram(x, x, 2)
    assert counter.get_total_flops() == 2 * (2 * 4 * 16 * 16 * 9)


def _trained(mode, c, dtype, **kwargs):
    """A block whose running statistics and gate weights are not the initial ones."""
    torch.manual_seed(1)
    block = ChannelEquilibrium(c, mode=mode, **kwargs).to(dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for _ in range(3):
            block(torch.randn(6, c, 5, 4, dtype=dtype) * 2 + 1)
    return block.eval()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("mode,c,group_size", [("ce", 32, 16), ("ce", 12, 4), ("ir", 20, 16)])
@pytest.mark.parametrize("hw", [(8, 8), (7, 5), (1, 3), (14, 14), (1, 1)])
def test_fused_eval_matches_the_general_path(compiled, monkeypatch, dtype, tol, mode, c,
                                             group_size, hw):
    block = _trained(mode, c, dtype, group_size=group_size)
    calls = []
    fused = kernels.ce_eval
    monkeypatch.setattr(kernels, "ce_eval", lambda *a: calls.append(1) or fused(*a))
    # few samples (positions split over threads) and many (one sample per task)
    for n in (1, 4 * torch.get_num_threads() + 1):
        x = torch.randn(n, c, *hw, dtype=dtype) * 3 - 1
        with torch.no_grad():
            out = block(x)
        monkeypatch.setitem(kernels._state, "ok", False)
        with torch.no_grad():
            ref = block(x)
        monkeypatch.setitem(kernels._state, "ok", True)
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    assert len(calls) == 2


def test_fused_eval_only_where_it_applies(compiled, monkeypatch):
    calls = []
    fused = kernels.ce_eval
    monkeypatch.setattr(kernels, "ce_eval", lambda *a: calls.append(1) or fused(*a))
    x = torch.randn(2, 32, 4, 4)
    cases = [
        (_trained("ce", 32, torch.float32), x, torch.enable_grad),  # autograd wants a graph
        (_trained("bd", 32, torch.float32), x, torch.no_grad),  # no IR branch
        (_trained("ce", 32, torch.float32, identity_init=True), x, torch.no_grad),
        (_trained("ce", 32, torch.float32).train(), x, torch.no_grad),
    ]
    for block, inp, ctx in cases:
        with ctx():
            assert torch.isfinite(block(inp)).all()
    assert calls == []
    # channels-last input: through the kernel in NCHW, returned channels-last
    block = _trained("ce", 32, torch.float32)
    nhwc = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = block(nhwc)
    assert calls == [1] and out.is_contiguous(memory_format=torch.channels_last)
    with torch.enable_grad():
        torch.testing.assert_close(out, block(nhwc).detach(), atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        _trained("ce", 32, torch.float32)(x)
    assert calls == [1, 1]


def test_flop_counter_counts_the_fused_eval(compiled):
    from torch.utils.flop_counter import FlopCounterMode

    block = _trained("ce", 32, torch.float32)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        block(torch.randn(3, 32, 5, 5))
    hidden = block.ir.fc1.weight.shape[0]
    assert counter.get_total_flops() == 2 * 3 * 32 * 16 * 25 + 2 * 3 * 2 * 32 * hidden


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-3)])
@pytest.mark.parametrize("use_kernels", [True, False])
def test_paired_products_match_torch(monkeypatch, dtype, atol, use_kernels):
    if use_kernels and not kernels.kernels_available():
        pytest.skip("the CPU kernels could not be built here")
    monkeypatch.setitem(kernels._state, "ok", use_kernels)
    torch.manual_seed(0)
    for n, groups, g, m in SHAPES:
        b = n * groups
        w1, w2 = torch.randn(groups, g, g, dtype=dtype), torch.randn(groups, g, g, dtype=dtype)
        x1, x2 = torch.randn(b, g, m, dtype=dtype), torch.randn(b, g, m, dtype=dtype)
        d1, d2, c = (torch.randn(b, g, dtype=dtype) for _ in range(3))
        for diags, bias in (((None, None), None), ((d1, d2), c), ((None, d2), c)):
            out = kernels.group_apply_pair(w1, x1, diags[0], w2, x2, diags[1], bias)
            ref = _reference_apply(w1, x1, diags[0], bias, True)
            ref = ref + _reference_apply(w2, x2, diags[1], None, False)
            torch.testing.assert_close(out, ref, atol=atol, rtol=atol)
        # no W2: the second term is the diagonal only
        out = kernels.group_apply_pair(w1, x1, d1, None, x2, d2, c)
        ref = _reference_apply(w1, x1, d1, c, True) + x2 * d2[..., None]
        torch.testing.assert_close(out, ref, atol=atol, rtol=atol)


def test_eval_constants_follow_parameter_and_buffer_changes(compiled):
    block = _trained("ce", 32, torch.float32)
    x = torch.randn(2, 32, 4, 4)
    other = {k: v + 0.1 * torch.randn_like(v) for k, v in block.state_dict().items()}
    outputs = []
    with torch.no_grad():
        outputs.append(block(x))
        assert torch.equal(block(x), outputs[0])  # kept constants: the same numbers
        block.theta.add_(0.5)  # an optimizer step
        outputs.append(block(x))
        block.load_state_dict(other)
        outputs.append(block(x))
        block.ir.running_inv_std.mul_(2)
        outputs.append(block(x))
        block.ir.fc1.weight.mul_(1.5)  # either gate layer
        outputs.append(block(x))
    for i in range(1, len(outputs)):
        assert not torch.equal(outputs[i], outputs[i - 1]), i
    # the last output against the general path (gradients on: no fused kernel) in that state
    with torch.enable_grad():
        reference = block(x).detach()
    torch.testing.assert_close(outputs[-1], reference, atol=1e-5, rtol=1e-5)


def test_stream_threshold_reads_and_sets(compiled):
    default = kernels.stream_threshold()
    assert default >= 12 * 2**20
    try:
        assert kernels.stream_threshold(0) == default
        assert kernels.stream_threshold() == 0
    finally:
        kernels.stream_threshold(default)
    assert kernels.stream_threshold() == default
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        kernels.stream_threshold(-1)


@pytest.fixture(params=["streamed", "cached"])
def streaming(request, compiled):
    """Outputs of 12 MiB and more written with non-temporal stores, or none (the default
    threshold depends on the machine's last-level cache)."""
    old = kernels.stream_threshold(12 * 2**20 if request.param == "streamed" else 2**62)
    yield request.param
    kernels.stream_threshold(old)


# Streamed outputs are computed into a buffer, then written with non-temporal stores (whole
# blocks at once, or column ranges of long rows); rows that start off a cache line, ranges with
# tails, and wide groups.
LARGE = [(250, 4, 16, 197), (49, 4, 16, 1030), (21, 4, 64, 600), (4325, 4, 5, 37)]


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-3)])
@pytest.mark.parametrize("n,groups,g,m", LARGE)
def test_large_outputs_match_torch(streaming, dtype, atol, n, groups, g, m):
    torch.manual_seed(0)
    b = n * groups
    assert b * g * m * dtype.itemsize >= 12 * 2**20
    w1, w2 = torch.randn(groups, g, g, dtype=dtype), torch.randn(groups, g, g, dtype=dtype)
    x1, x2 = torch.randn(b, g, m, dtype=dtype), torch.randn(b, g, m, dtype=dtype)
    d1, d2, c = (torch.randn(b, g, dtype=dtype) for _ in range(3))
    out = kernels.group_apply(w1, x1, d1, c, transpose=True)
    torch.testing.assert_close(out, _reference_apply(w1, x1, d1, c, True), atol=atol, rtol=atol)
    out = kernels.group_apply_pair(w1, x1, d1, w2, x2, d2, c)
    ref = _reference_apply(w1, x1, d1, c, True) + _reference_apply(w2, x2, d2, None, False)
    torch.testing.assert_close(out, ref, atol=atol, rtol=atol)
    out = kernels.group_apply_pair(w1, x1, d1, None, x2, d2, c)
    ref = _reference_apply(w1, x1, d1, c, True) + x2 * d2[..., None]
    torch.testing.assert_close(out, ref, atol=atol, rtol=atol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape", [(1, 64, 224, 224), (16, 64, 56, 56), (32, 512, 14, 14)])
def test_fused_eval_of_large_maps_matches_the_general_path(streaming, monkeypatch, dtype, tol,
                                                           shape):
    block = _trained("ce", shape[1], dtype)
    x = torch.randn(shape, dtype=dtype) * 3 - 1
    with torch.no_grad():
        out = block(x)
    monkeypatch.setitem(kernels._state, "ok", False)
    with torch.no_grad():
        ref = block(x)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_fused_eval_gate_saturates_as_torch_sigmoid(compiled, monkeypatch, dtype, tol):
    """Gate logits far out on both sides (the kernel's float exp is a polynomial with clamped
    range): the same IR weights as torch.sigmoid."""
    block = _trained("ir", 48, dtype)
    with torch.no_grad():
        block.ir.fc2.weight.mul_(200)
    x = torch.randn(9, 48, 5, 5, dtype=dtype) * 3 - 1
    with torch.no_grad():
        out = block(x)
    monkeypatch.setitem(kernels._state, "ok", False)
    with torch.no_grad():
        ref = block(x)
    ir = block.ir
    with torch.no_grad():
        logits = ir.fc2(torch.relu(ir.norm(ir.fc1(x.var(dim=(2, 3), unbiased=False)))))
    assert logits.min() < -90 and logits.max() > 90
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("pool", [False, True])
def test_flop_counter_counts_the_compiled_training_step(compiled, pool):
    """Hand-counted: N, C, M, g, G, Hd, T = 4, 32, 25, 16, 2, 8, 3."""
    from torch.utils.flop_counter import FlopCounterMode

    block = ChannelEquilibrium(32, pool=pool)
    x = torch.randn(4, 32, 5, 5, requires_grad=True)
    n, c, m, g, groups, hd, iters = 4, 32, 25, 16, 2, 8, 3
    newton = (iters - 1) * 3 * 2 * groups * g**3
    operator = 2 * groups * g * g + newton + 2 * 2 * n * c * hd
    operator_backward = 2 * groups * g * g + newton * 8 // 3 + 4 * 2 * n * c * hd
    product = 2 * n * c * g * m
    ms = 2 * 2 if pool else m  # the BD moments of the pooled map
    with FlopCounterMode(display=False) as counter:
        y = block(x)
    assert counter.get_total_flops() == 2 * n * c * g * ms + product + operator
    with FlopCounterMode(display=False) as counter:
        y.sum().backward()
    # gram and the input gradient: with pool, (W + Diag(d))ᵀ dY only, and the pooled moments'
    # backward, a product of the pooled map
    products = 2 * product + 2 * n * c * g * ms if pool else 3 * product
    assert counter.get_total_flops() == products + operator_backward

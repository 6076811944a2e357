"""The CE block's training step as one autograd node (cenet.layers.fused_block) against the
unfused graph of torch operations."""

import copy

import pytest
import torch

from cenet import kernels
from cenet.layers import BatchDecorrelation, ChannelEquilibrium


@pytest.fixture(autouse=True)
def compiled():
    if not kernels.kernels_available():
        pytest.skip("the CPU kernels could not be built here")


def _perturbed(block):
    torch.manual_seed(2)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return block


FUSED = ("_FusedGroupBlockBackward", "_CompiledCEStepBackward")


def _fused(y):
    """True if y comes from one of the fused training nodes."""
    return type(y.grad_fn).__name__ in FUSED


def _step(block, x, grad):
    x.grad = None
    y = block(x)
    y.backward(grad)
    return y, [y.detach(), x.grad.clone(), *(p.grad.clone() for p in block.parameters()),
               *(b.clone() for b in block.buffers())]


CASES = [  # (shape, group_size, pool): odd sizes, one position per sample, g from 4 to 64
    ((4, 32, 5, 7), 16, False), ((3, 12, 8, 8), 4, False), ((2, 16, 1, 2), 16, False),
    ((2, 64, 9, 40), 64, False), ((4, 32, 5, 7), 16, True), ((3, 12, 8, 8), 4, True),
    ((2, 64, 9, 40), 64, True), ((3, 32, 4, 5), 8, False), ((2, 64, 3, 3), 32, True),
]


@pytest.mark.parametrize("mode", ["ce", "bd"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
@pytest.mark.parametrize("shape,group_size,pool", CASES)
def test_fused_step_matches_the_unfused_graph(monkeypatch, mode, dtype, tol, shape, group_size,
                                              pool):
    block = ChannelEquilibrium(shape[1], mode=mode, group_size=group_size, pool=pool)
    block = _perturbed(block.to(dtype))
    x = (torch.randn(shape, dtype=dtype) * 2 + 0.5).requires_grad_()
    grad = torch.randn(shape, dtype=dtype)
    y, fused = _step(copy.deepcopy(block), x, grad)
    assert _fused(y)
    monkeypatch.setitem(kernels._state, "ok", False)  # the torch graph, no kernels
    y, ref = _step(copy.deepcopy(block), x, grad)
    assert not _fused(y)
    for a, b in zip(fused, ref, strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("pool", [False, True])
def test_gradcheck_of_the_fused_step_in_float64(pool):
    block = _perturbed(ChannelEquilibrium(8, group_size=4, pool=pool).double())
    params = list(block.parameters())
    x = torch.randn(3, 8, 5, 4, dtype=torch.float64, requires_grad=True)

    def f(x):
        out = block(x)
        assert _fused(out)
        return out

    # the parameters enter through the module: gradcheck for the input gradient, central
    # differences of a scalar loss for the parameter gradients
    assert torch.autograd.gradcheck(f, (x,))
    weights = torch.randn(3, 8, 5, 4, dtype=torch.float64)
    block.zero_grad()
    (block(x) * weights).sum().backward()
    for p in params:
        analytic = p.grad.clone()
        numeric = torch.zeros_like(p)
        flat = p.data.view(-1)
        for i in range(flat.numel()):
            old = flat[i].item()
            values = []
            for delta in (1e-6, -1e-6):
                flat[i] = old + delta
                with torch.no_grad():
                    values.append((block(x) * weights).sum().item())
            flat[i] = old
            numeric.view(-1)[i] = (values[0] - values[1]) / 2e-6
        torch.testing.assert_close(analytic, numeric, atol=1e-6, rtol=1e-5)


def test_fused_step_only_where_it_applies():
    x = torch.randn(4, 16, 6, 6, requires_grad=True)
    cases = {
        "identity_init": ChannelEquilibrium(16, identity_init=True),
        "ir": ChannelEquilibrium(16, mode="ir"),
    }
    for name, block in cases.items():
        assert not _fused(block(x)), name
    nhwc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    y = ChannelEquilibrium(16, mode="bd")(nhwc)
    assert not _fused(y)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert type(BatchDecorrelation(16)(x).grad_fn).__name__ == "_FusedGroupBlockBackward"


def test_parameters_get_gradients_when_the_input_needs_none():
    block = ChannelEquilibrium(16)
    block(torch.randn(4, 16, 3, 3)).square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_in_place_activation_after_the_fused_step():
    block = ChannelEquilibrium(16)
    x = torch.randn(4, 16, 3, 3, requires_grad=True)
    torch.relu_(block(x)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_subclass_with_its_own_statistics_turns_fusion_off():
    class AllReduced(BatchDecorrelation):
        fuse_training = False

    x = torch.randn(4, 16, 3, 3, requires_grad=True)
    assert not _fused(AllReduced(16)(x))
    block = ChannelEquilibrium(16)
    block.bd.fuse_training = False
    assert not _fused(block(x))


@pytest.mark.parametrize("pool", [False, True])
def test_parameter_hooks_fire_once_as_unfused(monkeypatch, pool):
    x = torch.randn(4, 16, 5, 5, requires_grad=True)
    counts = []
    for ok in (True, False):
        monkeypatch.setitem(kernels._state, "ok", ok)
        block = ChannelEquilibrium(16, pool=pool)
        calls = {name: 0 for name, _ in block.named_parameters()}
        for name, p in block.named_parameters():
            p.register_hook(lambda g, name=name, calls=calls: calls.update({name: calls[name] + 1}))
        y = block(x)
        assert _fused(y) == ok
        y.square().sum().backward()
        counts.append(calls)
    assert counts[0] == counts[1] and set(counts[0].values()) == {1}


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape,group_size,pool", CASES)
def test_compiled_operator_matches_the_autograd_operator(monkeypatch, dtype, tol, shape,
                                                         group_size, pool):
    """The hand-derived backward of cenet_kernels::ce_operator (in the compiled step without
    pooling, in the fused node with it) against autograd through the operator's torch graph
    in the fused node: output, input and parameter gradients, running estimates."""
    import cenet.layers.channel_equilibrium as ce_module
    from cenet.layers.ce_operator import CompiledCEOperator

    block = _perturbed(ChannelEquilibrium(shape[1], group_size=group_size, pool=pool).to(dtype))
    x = (torch.randn(shape, dtype=dtype) * 2 + 0.5).requires_grad_()
    grad = torch.randn(shape, dtype=dtype)
    used = []
    monkeypatch.setattr(CompiledCEOperator, "__init__",
                        lambda self, b: (used.append(b), setattr(self, "block", b))[-1])
    y, compiled = _step(copy.deepcopy(block), x, grad)
    assert type(y.grad_fn).__name__ == ("_FusedGroupBlockBackward" if pool
                                        else "_CompiledCEStepBackward")
    assert len(used) == pool
    monkeypatch.setattr(ce_module, "compiled_operator_usable", lambda *args: False)
    y, ref = _step(copy.deepcopy(block), x, grad)
    assert len(used) == pool and type(y.grad_fn).__name__ == "_FusedGroupBlockBackward"
    for a, b in zip(compiled, ref, strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_compiled_operator_only_for_the_operator_it_implements():
    from cenet.layers import InstanceReweighting
    from cenet.layers.ce_operator import compiled_operator_usable

    x = torch.randn(2, 16, 3, 3)
    assert compiled_operator_usable(ChannelEquilibrium(16), x)
    assert not compiled_operator_usable(ChannelEquilibrium(16).double(), x)  # dtypes differ

    class Gated(InstanceReweighting):
        def gate(self, inst_var):
            return super().gate(inst_var) * 2

    block = ChannelEquilibrium(16)
    block.ir = Gated(16)
    assert not compiled_operator_usable(block, x)
    block = ChannelEquilibrium(16)
    block.ir.norm = torch.nn.LayerNorm(4, elementwise_affine=False)
    assert not compiled_operator_usable(block, x)


def test_channels_last_input_takes_the_compiled_step_in_nchw():
    """A channels-last map is copied to NCHW for the compiled step and the result copied back:
    the same output, gradients and running estimates as the channels-last graph, output and
    input gradient channels-last."""
    block = _perturbed(ChannelEquilibrium(32).double())
    x = (torch.randn(4, 32, 6, 5, dtype=torch.float64) * 2 + 0.5)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(x.shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y, compiled = _step(copy.deepcopy(block), x, grad)
    assert type(y.grad_fn).__name__ == "_CompiledCEStepBackward"
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    reference = copy.deepcopy(block)
    reference.bd.fuse_training = False  # the channels-last graph of torch operations
    y, ref = _step(reference, x, grad)
    assert not _fused(y)
    for a, b in zip(compiled, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)

"""The native CPU operators of the CE block (cenet.kernels.operators) against the reference
(cenet.layers.functional), on every instruction set the CPU supports: outputs, gradients,
running estimates, the dispatch, opcheck, torch.compile and torch.export."""

import copy

import pytest
import torch
from torch import nn

from cenet import kernels
from cenet.kernels import operators
from cenet.layers import ChannelEquilibrium


def make_pair(c, group_size, dtype, theta=0.3, seed=0):
    torch.manual_seed(seed)
    native = ChannelEquilibrium(c, group_size=group_size).to(dtype)
    with torch.no_grad():
        native.theta.fill_(theta)
        native.ir.norm.weight.uniform_(0.5, 1.5)
        native.ir.norm.bias.uniform_(-0.2, 0.2)
    return native, copy.deepcopy(native)


def reference(module, x):
    """Run ``module`` through the reference path whatever the kernels."""
    from cenet import kernels

    with kernels.use_isa(None):
        assert not module.uses_native(x)
        return module(x)


def make_input(shape, dtype, layout="nchw", seed=1):
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    mix = torch.eye(c) + 0.3 * torch.randn(c, c, generator=gen)
    x = torch.einsum("dc,nchw->ndhw", mix, torch.randn(shape, generator=gen)) * 1.7 + 0.4
    x = x.to(dtype).contiguous()
    return x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x


def in_layout(t, layout):
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    return t.is_contiguous(memory_format=fmt)


TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-10}, torch.float32: {"rtol": 1e-4, "atol": 1e-5}}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize(("shape", "group_size"), [
    ((4, 32, 6, 5), 8), ((3, 64, 4, 4), 16), ((2, 64, 5, 3), 32), ((2, 128, 3, 3), 64),
    ((5, 12, 7, 7), 4), ((3, 48, 2, 1), 16),
])
def test_training_step_matches_the_reference(native_isa, dtype, layout, shape, group_size):
    native, ref = make_pair(shape[1], group_size, dtype)
    x = make_input(shape, dtype, layout)
    xn, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert native.uses_native(xn)
    yn, yr = native(xn), reference(ref, xr)
    torch.testing.assert_close(yn, yr, **TOL[dtype])
    assert in_layout(yn, layout)
    grad = torch.randn_like(yn)
    yn.backward(grad)
    yr.backward(grad)
    torch.testing.assert_close(xn.grad, xr.grad, **TOL[dtype])
    assert in_layout(xn.grad, layout)
    for (name, p), q in zip(native.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **TOL[dtype], msg=name)
    for (name, b), c in zip(native.named_buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(b, c, **TOL[dtype], msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("mode", ["ce", "ir"])
@pytest.mark.parametrize(("shape", "group_size"), [((4, 32, 6, 5), 8), ((20, 1024, 2, 2), 16)])
def test_eval_matches_the_reference(native_isa, dtype, layout, mode, shape, group_size):
    torch.manual_seed(0)
    native = ChannelEquilibrium(shape[1], mode=mode, group_size=group_size).to(dtype)
    native(make_input(shape, dtype, seed=5))  # running estimates from a real batch
    native(make_input(shape, dtype, seed=6))
    native.eval()
    x = make_input(shape, dtype, layout)
    with torch.no_grad():
        assert native.uses_native(x)
        y = native(x)
    torch.testing.assert_close(y, reference(native, x), **TOL[dtype])
    assert in_layout(y, layout)
    assert not native.uses_native(x)  # grad enabled: the op has no autograd formula


@pytest.mark.parametrize(("shape", "group_size"), [
    ((2, 64, 48, 40), 64),  # the stem's group, 1920 positions: two chunks of the NHWC kernel
    ((1, 64, 7, 9), 32),
    ((3, 24, 5, 4), 8),
    ((2, 30, 3, 3), 6),  # a group narrower than a vector and not a power of two
    ((3, 96, 1, 1), 16),
])
def test_channels_last_eval_kernel_matches_the_reference(native_isa, shape, group_size):
    """The channels-last eval kernel (no layout copy) for group sizes with and without a
    compile-time tile, several position chunks, batch 1 and 1x1 maps."""
    torch.manual_seed(1)
    for dtype in (torch.float64, torch.float32):
        native = ChannelEquilibrium(shape[1], group_size=group_size).to(dtype)
        native(make_input(shape, dtype, seed=5))
        native.eval()
        x = make_input(shape, dtype, "nhwc", seed=7)
        with torch.no_grad():
            assert native.uses_native(x)
            y = native(x)
        torch.testing.assert_close(y, reference(native, x), **TOL[dtype])
        assert in_layout(y, "nhwc") or shape[2] * shape[3] == 1


def test_channels_last_kernel_refuses_groups_without_a_tile(native_isa):
    """Groups other than 16, 32, 64 take the NCHW kernel (the module's output is still
    channels-last, checked above); called directly, the NHWC kernel says so."""
    x = torch.randn(2, 9, 24)
    fc1, fc2 = torch.randn(6, 24), torch.randn(24, 6)
    with pytest.raises(RuntimeError, match="must be 16, 32 or 64"):
        kernels.ops().ce_eval_nhwc(x, torch.empty(0), fc1, torch.ones(6), torch.zeros(6), 1e-5,
                                   fc2, torch.ones(1), 8, torch.empty_like(x))


def test_gradcheck_through_the_native_operator(native_isa):
    native, _ = make_pair(8, 4, torch.float64)
    x = make_input((3, 8, 3, 3), torch.float64).requires_grad_()
    params = [native.theta, native.ir.fc1.weight, native.ir.norm.weight, native.ir.norm.bias,
              native.ir.fc2.weight]

    def step(x, *params):
        return operators.ce_train(x, *params, group_size=4, num_iters=3, eps_bd=1e-5,
                                  eps_ir=1e-5, ln_eps=1e-5).output

    assert torch.autograd.gradcheck(step, (x, *params))


def test_opcheck_of_the_three_ops(native_isa):
    native, _ = make_pair(32, 8, torch.float32)
    ir = native.ir
    x = make_input((4, 32, 5, 5), torch.float32)
    weights = (native.theta, ir.fc1.weight, ir.norm.weight, ir.norm.bias, ir.fc2.weight)
    args = (x.requires_grad_(), *weights, 8, 3, 1e-5, 1e-5, 1e-5)
    torch.library.opcheck(torch.ops.cenet.ce_train.default, args)
    saved = torch.ops.cenet.ce_train(*args)[1:]
    torch.library.opcheck(torch.ops.cenet.ce_train_backward.default,
                          (torch.randn_like(x), x.detach(), ir.fc1.weight.detach(),
                           ir.norm.weight.detach(), ir.fc2.weight.detach(),
                           [s.detach() for s in saved]))
    with torch.no_grad():
        eval_args = (x.detach(), native.bd.running_wm * 0.5, ir.fc1.weight,
                     ir.norm.weight, ir.norm.bias, ir.fc2.weight,
                     torch.tensor([0.5]), 8, 1e-5)
        torch.library.opcheck(torch.ops.cenet.ce_eval.default, eval_args)


@pytest.mark.parametrize(("kwargs", "why"), [
    ({"pool": True}, "pooled statistics"), ({"mode": "bd"}, "bd mode"),
    ({"mode": "ir"}, "ir mode"), ({"identity_init": True}, "identity_init"),
])
def test_dispatch_takes_the_reference_where_the_operator_does_not_apply(native_isa, kwargs, why):
    ce = ChannelEquilibrium(16, **kwargs)
    assert not ce.uses_native(torch.randn(2, 16, 4, 4)), why


def test_dispatch_by_dtype_device_and_layout(native_isa):
    ce = ChannelEquilibrium(16)
    assert ce.uses_native(torch.randn(2, 16, 4, 4))
    assert not ce.uses_native(torch.randn(2, 16, 4, 4).bfloat16())  # mixed precision
    assert not ce.uses_native(torch.randn(2, 16, 4, 8)[..., ::2])  # neither layout
    assert not ce.uses_native(torch.empty(2, 16, 4, 4, device="meta"))
    assert ChannelEquilibrium(16).half().uses_native(torch.randn(2, 16, 4, 4).half()) is False


def small_net(c=32):
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
        ChannelEquilibrium(c, group_size=8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(c, 10),
    )


def test_torch_compile_fullgraph_traces_the_native_ops(native_isa):
    torch.manual_seed(0)
    eager = small_net()
    compiled_net = copy.deepcopy(eager)
    compiled = torch.compile(compiled_net, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 8, 8)
    y, ye = compiled(x), eager(x)
    torch.testing.assert_close(y, ye, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    ye.square().sum().backward()
    for p, q in zip(compiled_net.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_net[2].bd.running_wm, eager[2].bd.running_wm)
    compiled_net.eval(), eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


def test_export_holds_the_native_ops_and_matches_eager(native_isa):
    net = small_net().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        program = torch.export.export(net, (x,))
        targets = {str(n.target) for n in program.graph.nodes}
        assert "cenet.ce_eval.default" in targets
        torch.testing.assert_close(program.module()(x), net(x))
    # with grad enabled the eval block takes the reference: standard ops only
    program = torch.export.export(net, (x,))
    assert not any("cenet" in str(n.target) for n in program.graph.nodes)
    torch.testing.assert_close(program.module()(x), net(x), rtol=1e-5, atol=1e-6)
    train_program = torch.export.export(small_net().train(), (x,))
    assert "cenet.ce_train.default" in {str(n.target) for n in train_program.graph.nodes}


def test_non_finite_batch_keeps_running_estimates_under_compile(native_isa):
    ce = ChannelEquilibrium(16)
    before = {k: v.clone() for k, v in ce.state_dict().items()}
    x = torch.randn(2, 16, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    compiled = torch.compile(ce, fullgraph=True, backend="aot_eager")
    compiled(x)  # no exception inside the graph, but the buffers stay
    for k, v in ce.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_input_gradient_reaches_the_previous_layer_in_its_layout(native_isa):
    """A channels-last map's gradient leaves the block channels-last (not only for a leaf,
    whose .grad autograd re-strides): an NCHW gradient makes BN's backward several times
    slower."""
    ce = ChannelEquilibrium(32, group_size=8)
    x = make_input((4, 32, 6, 5), torch.float32, "nhwc").requires_grad_()
    seen = []
    mid = x * 1.0
    mid.register_hook(lambda g: seen.append(g))
    ce(mid).sum().backward()
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    assert not seen[0].is_contiguous()


def test_flop_counter_counts_the_native_ops_by_hand(native_isa):
    """torch.utils.flop_counter books the ops as the products they compute (2 FLOPs per
    multiply-add): the passes over the map, the Newton iteration's g×g products, the gate."""
    from torch.utils.flop_counter import FlopCounterMode

    n, c, h, w, g, hidden, iters = 4, 32, 6, 5, 8, 8, 3
    ce = ChannelEquilibrium(c, group_size=g, num_iters=iters)
    x = make_input((n, c, h, w), torch.float32).requires_grad_()
    groups, m = c // g, h * w
    gate = 2 * 2 * n * c * hidden  # two layers of n × c × hidden multiply-adds
    newton_fwd = (iters - 1) * 3 * 2 * groups * g**3
    newton_bwd = (iters - 1) * 8 * 2 * groups * g**3
    covariance = 2 * groups * g * g
    with FlopCounterMode(display=False) as counter:
        ce(x).sum().backward()
    flops = counter.get_flop_counts()["Global"]
    assert flops[torch.ops.cenet.ce_train] == (2 * (2 * n * c * g * m) + covariance
                                               + newton_fwd + gate)
    assert flops[torch.ops.cenet.ce_train_backward] == (3 * (2 * n * c * g * m) + covariance
                                                        + newton_bwd + 2 * gate)
    ce.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ce(x)
    assert counter.get_total_flops() == 2 * n * c * g * m + gate

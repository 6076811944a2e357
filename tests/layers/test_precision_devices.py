"""The CE block in other precisions and on other devices: float16/bfloat16 modules train with
float32 statistics, autocast, dtype mismatches get BatchNorm-like errors, ``meta`` propagates
shapes in training, and every device this machine has (CUDA where present) matches a float64
CPU computation."""

import copy

import pytest
import torch

from cenet.layers import ChannelEquilibrium

pytestmark = pytest.mark.usefixtures("ce_path")


def make_input(n=4, c=32, h=6, w=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(c) + 0.3 * torch.randn(c, c, generator=gen)
    return (torch.einsum("dc,nchw->ndhw", mix, torch.randn(n, c, h, w, generator=gen))
            + 0.5).contiguous()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["ce", "bd", "ir"])
def test_low_precision_module_trains_and_evaluates(dtype, mode):
    torch.manual_seed(0)
    full = ChannelEquilibrium(32, mode=mode, group_size=8)
    low = copy.deepcopy(full).to(dtype)
    x = make_input()
    xl = x.to(dtype).requires_grad_()
    y = low(xl)
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().square().mean().backward()
    assert xl.grad.dtype == dtype and torch.isfinite(xl.grad).all()
    assert all(p.grad.dtype == dtype for p in low.parameters())
    # buffers stay in the module's dtype; the statistics were float32, so close to float32
    expected = full(x)
    assert low.bd is None or low.bd.running_wm.dtype == dtype
    tol = 0.05 * expected.abs().max()
    assert (y.float() - expected).abs().max() < tol
    low.eval()
    with torch.no_grad():
        assert torch.isfinite(low(x.to(dtype))).all()


@pytest.mark.parametrize(("module_dtype", "input_dtype"), [
    (torch.float32, torch.float64), (torch.float64, torch.float32),
    (torch.float16, torch.float32), (torch.bfloat16, torch.float16),
])
def test_dtype_mismatch_raises_a_clear_error(module_dtype, input_dtype):
    ce = ChannelEquilibrium(32, group_size=8).to(module_dtype)
    with pytest.raises(TypeError, match=rf"input dtype {input_dtype} does not match the "
                                         rf"module's dtype {module_dtype}"):
        ce(make_input().to(input_dtype))


def test_half_precision_input_into_a_float32_module_is_mixed_precision():
    ce = ChannelEquilibrium(32, group_size=8)
    y = ce(make_input().bfloat16())
    assert y.dtype == torch.bfloat16 and ce.bd.running_wm.dtype == torch.float32


@pytest.mark.parametrize("mode", ["ce", "bd", "ir"])
@pytest.mark.parametrize("pool", [False, True])
def test_meta_device_training_propagates_shapes(mode, pool):
    ce = ChannelEquilibrium(32, mode=mode, group_size=8, pool=pool, device="meta")
    x = torch.empty(4, 32, 6, 6, device="meta", requires_grad=True)
    y = ce(x)
    assert y.shape == x.shape and y.device.type == "meta"
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("mode", ["ce", "bd", "ir"])
def test_every_device_matches_float64_on_the_cpu(device, mode):
    torch.manual_seed(0)
    ref = ChannelEquilibrium(32, mode=mode, group_size=8).double()
    module = copy.deepcopy(ref).float().to(device)
    x = make_input()
    y = module(x.to(device))
    expected = ref(x.double())
    torch.testing.assert_close(y.cpu().double(), expected, rtol=1e-4, atol=1e-4)
    for name, buf in module.named_buffers():
        torch.testing.assert_close(buf.cpu().double(), ref.get_buffer(name), rtol=1e-4,
                                   atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("mode", ["ce", "bd", "ir"])
def test_cuda_autocast_keeps_float32_statistics_and_buffers(mode):
    module = ChannelEquilibrium(32, mode=mode, group_size=8).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = module(make_input().cuda().bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert all(b.dtype == torch.float32 for b in module.buffers())

"""Inference fusion: the fold maths against conv-then-map, and every registered network's
fused copy against its eval output after real training steps filled the running buffers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cenet
from cenet.deploy import affine_map, fuse, fuse_conv_affine_weights, fuse_conv_bd_weights
from cenet.deploy.fused_model import LEAF_TYPES
from cenet.layers import BatchDecorrelation, ChannelEquilibrium, IterNorm


def _blocks(groups, g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(groups, g, g, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("conv_groups,g", [(1, 4), (2, 4), (8, 1)])
def test_folded_conv_equals_conv_then_block_diagonal_map(bias, conv_groups, g):
    gen = torch.Generator().manual_seed(1)
    c_in, c = 8, 8
    w = torch.randn(c, c_in // conv_groups, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(c, generator=gen, dtype=torch.float64) if bias else None
    m, shift = _blocks(c // g, g), torch.randn(c, generator=gen, dtype=torch.float64)
    x = torch.randn(2, c_in, 5, 5, generator=gen, dtype=torch.float64)
    y = F.conv2d(x, w, b, padding=1, groups=conv_groups)
    dense = torch.block_diag(*m)  # (C, C), independent of the batched product
    expected = torch.einsum("ij,njhw->nihw", dense, y) + shift[:, None, None]
    wf, bf = fuse_conv_affine_weights(w, b, m, shift, conv_groups=conv_groups)
    torch.testing.assert_close(F.conv2d(x, wf, bf, padding=1, groups=conv_groups), expected)


def test_bd_fold_is_the_running_whitening_matrix_applied_after_the_conv():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(16, 3, 1, 1, generator=gen)
    wm = _blocks(2, 8).float()
    wf, bf = fuse_conv_bd_weights(w, None, wm)
    assert torch.count_nonzero(bf) == 0
    x = torch.randn(2, 3, 4, 4, generator=gen)
    ref = cenet.layers.functional.channel_equilibrium(F.conv2d(x, w), wm, None)
    torch.testing.assert_close(F.conv2d(x, wf, bf), ref, rtol=1e-5, atol=1e-5)


def test_fold_rejects_blocks_that_straddle_conv_groups_and_bad_shapes():
    w = torch.randn(8, 1, 3, 3)  # depthwise over 8 channels
    with pytest.raises(ValueError, match="straddle"):
        fuse_conv_affine_weights(w, None, _blocks(2, 4), conv_groups=8)
    with pytest.raises(ValueError, match="does not cover"):
        fuse_conv_affine_weights(w, None, _blocks(1, 4), conv_groups=8)
    with pytest.raises(ValueError, match=r"shift must be \(8,\)"):
        fuse_conv_affine_weights(w, None, _blocks(8, 1), torch.zeros(3), conv_groups=8)


def _trained(module: nn.Module, shape, steps=3, seed=0) -> nn.Module:
    """Running buffers filled by real training forwards (not the identity of a fresh layer)."""
    gen = torch.Generator().manual_seed(seed)
    module.train()
    with torch.no_grad():
        for _ in range(steps):
            module(torch.randn(*shape, generator=gen) * 1.7 + 0.4)
    return module.eval()


@pytest.mark.parametrize("layer", [
    lambda: nn.BatchNorm2d(16),
    lambda: BatchDecorrelation(16, group_size=4),
    lambda: ChannelEquilibrium(16, mode="bd", group_size=8),
    lambda: ChannelEquilibrium(16, mode="bd", group_size=8, identity_init=True),
    lambda: IterNorm(16, group_size=8),
], ids=["bn", "bd", "ce-bd", "ce-bd-identity-init", "iternorm"])
def test_affine_map_is_the_eval_output_of_the_layer(layer):
    mod = layer()
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(0.2 * torch.randn_like(p))
    mod = _trained(mod, (8, 16, 4, 4))
    matrix, shift = affine_map(mod)
    x = torch.randn(3, 16, 4, 4, dtype=torch.float64)
    expected = torch.einsum("ij,njhw->nihw", torch.block_diag(*matrix), x)
    if shift is not None:
        expected = expected + shift[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(mod.double()(x), expected)


def test_layers_with_a_per_sample_gate_have_no_affine_map():
    assert affine_map(ChannelEquilibrium(16, mode="ce")) is None
    assert affine_map(ChannelEquilibrium(16, mode="ir")) is None
    assert affine_map(cenet.layers.SqueezeExcitation(16)) is None
    assert affine_map(nn.BatchNorm2d(16, track_running_stats=False)) is None


@pytest.mark.parametrize("name", cenet.list_models())
def test_every_registered_model_fuses_to_its_eval_output(name):
    torch.manual_seed(0)
    size = 32  # every registered network runs at 32x32 (ImageNet ones down to 1x1)
    model = _trained(cenet.create_model(name, num_classes=10), (6, 3, size, size), steps=2)
    before = copy.deepcopy(model.state_dict())
    fused = fuse(model)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        y, yf = model(x), fused(x)
    assert torch.isfinite(y).all() and torch.isfinite(yf).all()  # else the check below is void
    rel = ((y - yf).abs().max() / y.abs().max()).item()
    if rel >= 1e-5:  # float32 round-off of the unfused model itself can reach 1e-5 (DBN):
        with torch.no_grad():  # then the fused one must be as close to the float64 output
            y64 = copy.deepcopy(model).double()(x.double()).float()
        err, err_fused = (y - y64).abs().max(), (yf - y64).abs().max()
        assert err_fused <= 1.5 * err, f"fused {rel:.2e} from eval; {err_fused} vs {err} to f64"
    # the original is untouched and still trains
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training is False and model.train() is model
    # what is left: no BatchNorm after a conv, no BD-mode CE; CE with IR stays
    kinds = {type(m) for m in fused.modules()}
    assert nn.BatchNorm2d not in kinds
    assert not any(isinstance(m, ChannelEquilibrium) and m.mode == "bd" for m in fused.modules())
    if name.endswith(("_ce", "_ir")):
        assert ChannelEquilibrium in kinds
    assert len(fused.folded) > 0
    assert all(not p.requires_grad for p in fused.parameters())


def test_fused_model_is_eval_only():
    fused = fuse(cenet.create_model("cifar_resnet20_bd"))
    with pytest.raises(RuntimeError, match="inference only"):
        fused.train()
    assert fused.eval() is fused


def test_fuse_reports_untraceable_models_and_non_modules():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # data-dependent Python branch

    with pytest.raises(ValueError, match="torch.fx could not trace"):
        fuse(Branchy())
    with pytest.raises(TypeError, match="nn.Module"):
        fuse(torch.zeros(1))


def test_every_public_cenet_layer_is_traced_as_a_leaf():
    """A layer class added to cenet.layers without being added to LEAF_TYPES would be traced
    into (and fail on its shape checks): every exported nn.Module class is a leaf."""
    classes = [getattr(cenet.layers, n) for n in cenet.layers.__all__]
    modules = [c for c in classes if isinstance(c, type) and issubclass(c, nn.Module)]
    assert len(modules) >= 10
    assert [c.__name__ for c in modules if not issubclass(c, LEAF_TYPES)] == []

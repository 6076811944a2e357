"""Frozen CE and ``freeze_norms``: the eval form of a trained CE/BN, fixed whatever the mode,
no parameters, the same state-dict keys (the "frozen" setting of CE paper Table 5)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import cenet
from cenet.layers import ChannelEquilibrium, FrozenChannelEquilibrium, SyncChannelEquilibrium


def _trained_ce(mode: str = "ce", **kwargs) -> ChannelEquilibrium:
    """A CE block whose running estimates, gate and λ have moved away from their init."""
    torch.manual_seed(0)
    ce = ChannelEquilibrium(32, mode=mode, **kwargs).double()
    opt = torch.optim.SGD(ce.parameters(), lr=0.5) if list(ce.parameters()) else None
    for _ in range(3):
        x = torch.randn(8, 32, 6, 6, dtype=torch.float64) * 2 + 1
        loss = ce(x).square().mean()
        if opt is not None:
            loss.backward()
            opt.step()
            opt.zero_grad()
    return ce.eval()


@pytest.mark.parametrize("mode", ["ce", "bd", "ir"])
def test_frozen_equals_the_eval_form_and_never_changes(mode):
    ce = _trained_ce(mode)
    if mode == "ce":
        assert abs(ce.lam.item() - 0.5) > 1e-4  # λ moved: the copy is not of the init
    frozen = FrozenChannelEquilibrium.from_module(ce)
    assert list(frozen.parameters()) == []
    assert frozen.state_dict().keys() == ce.state_dict().keys()
    x = torch.randn(4, 32, 5, 5, dtype=torch.float64)
    ref = ce(x)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    frozen.train()  # ignored: still the eval form, buffers fixed
    assert not frozen.training and not any(m.training for m in frozen.modules())
    out = frozen(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for key, value in frozen.state_dict().items():
        assert torch.equal(value, before[key]), key
    # the copy is independent of the source
    with torch.no_grad():
        next(iter(ce.parameters()), ce.bd.running_wm if ce.bd is not None else None).add_(1.0)
    torch.testing.assert_close(frozen(x), ref, rtol=1e-12, atol=1e-12)


def test_gradient_reaches_the_input_and_no_parameter():
    frozen = FrozenChannelEquilibrium.from_module(_trained_ce())
    x = torch.randn(2, 32, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(frozen, (x,))


def test_state_dict_round_trip_and_constructor():
    ce = _trained_ce()
    frozen = FrozenChannelEquilibrium(32).double()
    frozen.load_state_dict(ce.state_dict())
    x = torch.randn(3, 32, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(frozen(x), ce(x), rtol=1e-12, atol=1e-12)
    back = ChannelEquilibrium(32).double()
    back.load_state_dict(frozen.state_dict())
    torch.testing.assert_close(back.eval()(x), ce(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="group_sise"):
        FrozenChannelEquilibrium(32, group_sise=8)
    with pytest.raises(TypeError, match="expects a ChannelEquilibrium"):
        FrozenChannelEquilibrium.from_module(nn.BatchNorm2d(4))


def test_native_operator_serves_an_input_without_gradient():
    ce = _trained_ce().float()
    frozen = FrozenChannelEquilibrium.from_module(ce)
    x = torch.randn(2, 32, 6, 6)
    expected = cenet.kernels.active_isa() is not None
    assert frozen.uses_native(x) is expected  # grad mode on, x needs no gradient
    assert frozen.uses_native(x.requires_grad_()) is False
    torch.testing.assert_close(frozen(x.detach()), ce(x.detach()), rtol=1e-5, atol=1e-5)


def test_freeze_norms_converts_bn_and_ce_in_a_network():
    torch.manual_seed(0)
    net = cenet.create_model("cifar_resnet20_ce")
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):
        net(torch.randn(8, 3, 16, 16)).logsumexp(1).mean().backward()
        opt.step()
        opt.zero_grad()
    net.eval()
    ref_net = copy.deepcopy(net)
    x = torch.randn(4, 3, 16, 16)
    frozen = cenet.freeze_norms(cenet.convert_sync_ce(net))  # a SyncCE freezes too
    kinds = {type(m) for m in frozen.modules()}
    assert FrozenBatchNorm2d in kinds and FrozenChannelEquilibrium in kinds
    assert not kinds & {nn.BatchNorm2d, ChannelEquilibrium, SyncChannelEquilibrium}
    frozen.train()
    torch.testing.assert_close(frozen(x), ref_net(x), rtol=1e-5, atol=1e-5)
    expected = {k for k in ref_net.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(frozen.state_dict()) == expected
    owners = {type(m) for m in frozen.modules() if list(m.parameters(recurse=False))}
    assert owners == {nn.Conv2d, nn.Linear}  # the convolutions and the classifier only
    assert not any(".attn." in n for n, _ in frozen.named_parameters())


def test_freeze_norms_refuses_what_it_cannot_freeze():
    with pytest.raises(ValueError, match="track_running_stats=False"):
        cenet.freeze_norms(nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(TypeError, match="nn.Module"):
        cenet.freeze_norms(torch.zeros(3))

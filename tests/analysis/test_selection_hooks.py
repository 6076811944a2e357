"""Layer selection and forward hooks that are always removed."""

import pytest
import torch
from torch import nn

from cenet.analysis import forward_hooks, record_outputs, select_modules


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 1), nn.ReLU6(), nn.Flatten(), nn.Linear(4 * 8 * 8, 2),
    )


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_select_by_glob_type_sequence_predicate():
    net = _net()
    assert list(select_modules(net)) == ["2", "4"]  # default: rectifiers
    assert list(select_modules(net, "[03]")) == ["0", "3"]
    assert list(select_modules(net, nn.Conv2d)) == ["0", "3"]
    assert list(select_modules(net, ["1", nn.Linear])) == ["1", "6"]
    assert list(select_modules(net, lambda n, m: n == "5")) == ["5"]


def test_default_skips_rectifiers_inside_channel_gates():
    from torchvision.ops import SqueezeExcitation as TorchvisionSE

    from cenet.layers import ChannelEquilibrium, SqueezeExcitation

    net = nn.Sequential(
        nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), ChannelEquilibrium(16), nn.ReLU(),
        SqueezeExcitation(16), TorchvisionSE(16, 4), nn.ReLU6(),
    )
    assert any(isinstance(m, nn.ReLU) for m in net[4].modules())  # SE's hidden ReLU exists
    assert list(select_modules(net)) == ["3", "6"]
    assert "4.act" in select_modules(net, nn.ReLU)  # asked for explicitly, it is selected
    with pytest.raises(ValueError, match="the default .rectifiers outside channel gates"):
        select_modules(nn.Sequential(SqueezeExcitation(16)))


def test_empty_selection_names_pattern_and_available_modules():
    with pytest.raises(ValueError, match=r"'layer9\*' matches no module.*'0', '1'"):
        select_modules(_net(), "layer9*")
    with pytest.raises(ValueError, match="cannot select layers with 3"):
        select_modules(_net(), 3)


def test_record_outputs_and_hooks_removed_also_on_error():
    net = _net()
    x = torch.randn(2, 3, 8, 8)
    with record_outputs(net, nn.ReLU) as outs:
        net(x)
        net(x)
    assert list(outs) == ["2"] and len(outs["2"]) == 2
    expected = torch.relu(net[1](net[0](x)))
    torch.testing.assert_close(outs["2"][0], expected)
    assert _no_hooks(net)
    with pytest.raises(RuntimeError, match="boom"), record_outputs(net) as outs:
        net(x)
        raise RuntimeError("boom")
    assert _no_hooks(net)


def test_reused_module_gets_one_key_per_call_and_replacing_output():
    relu = nn.ReLU()
    net = nn.Sequential(nn.Conv2d(3, 2, 1), relu, nn.Conv2d(2, 5, 1), relu)
    with record_outputs(net) as outs:
        net(torch.randn(1, 3, 4, 4))
        net(torch.randn(1, 3, 4, 4))
    assert {k: [o.shape[1] for o in v] for k, v in outs.items()} == {"1": [2, 2], "1:1": [5, 5]}

    def zero_second(key, _m, _i, out):
        return out * 0 if key == "1:1" else None

    with forward_hooks(net, {"1": relu}, zero_second):
        assert net(torch.randn(1, 3, 4, 4)).abs().sum() == 0
    assert _no_hooks(net)

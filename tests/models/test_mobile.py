"""MobileNetV2 and ShuffleNetV2, plain, SE and CE: torchvision's networks with the blocks placed
as the CE paper's appendix E (Fig. 6) says, without moving any of torchvision's weights."""

import pytest
import torch
import torchvision
from torch import nn

import cenet
from cenet.layers import ChannelEquilibrium, SqueezeExcitation
from cenet.models._mobile_blocks import largest_divisor

# torchvision's documented parameter counts (``Weights.meta["num_params"]``)
TORCHVISION_PARAMS = {
    "mobilenet_v2": 3_504_872,
    "shufflenet_v2_x0_5": 1_366_792,
    "shufflenet_v2_x1_0": 2_278_604,
}
PLAIN = list(TORCHVISION_PARAMS)
VARIANTS = [f"{base}{suffix}" for base in PLAIN for suffix in ("", "_se", "_ce")]
BLOCKS = (ChannelEquilibrium, SqueezeExcitation)


def torchvision_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return getattr(torchvision.models, name)().eval()


def perturb_bn_statistics(model: nn.Module) -> None:
    """Give every BN non-trivial running statistics and affine parameters (torchvision's fresh
    ones are 0/1, which would hide a BN loaded into the wrong place)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))


@pytest.fixture(scope="module")
def reference():
    """name → (torchvision model in eval with perturbed BN, its state_dict, input, its output)."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    out = {}
    for name in PLAIN:
        model = torchvision_model(name)
        perturb_bn_statistics(model)
        with torch.no_grad():
            out[name] = (model.state_dict(), x, model(x))
    return out


def block_keys(model: nn.Module) -> set[str]:
    """The state_dict keys that belong to the CE/SE blocks."""
    return {
        f"{name}.{key}"
        for name, module in model.named_modules()
        if isinstance(module, BLOCKS)
        for key in module.state_dict()
    }


@pytest.mark.parametrize("name", PLAIN)
def test_plain_parameter_counts_equal_torchvision(name):
    ours = sum(p.numel() for p in cenet.create_model(name).parameters())
    theirs = sum(p.numel() for p in torchvision_model(name).parameters())
    assert ours == theirs == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize("name", PLAIN)
def test_plain_loads_torchvision_strictly_and_gives_its_output(name, reference):
    state, x, expected = reference[name]
    torch.manual_seed(123)  # different initial weights from the reference
    model = cenet.create_model(name).eval()
    assert list(model.state_dict()) == list(state)  # same names, same order, buffers too
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("name", [v for v in VARIANTS if v not in PLAIN])
def test_block_variants_miss_exactly_the_block_keys(name):
    base = name.rsplit("_", 1)[0]
    model = cenet.create_model(name)
    result = model.load_state_dict(torchvision_model(base).state_dict(), strict=False)
    assert result.unexpected_keys == []
    expected = block_keys(model)
    assert expected  # the variant does have blocks
    assert set(result.missing_keys) == expected
    assert len(result.missing_keys) == len(expected)


@pytest.mark.parametrize("name", [v for v in VARIANTS if v.endswith("_ce")])
def test_identity_init_ce_reproduces_torchvision(name, reference):
    state, x, expected = reference[name.removesuffix("_ce")]
    model = cenet.create_model(name, attn_kwargs={"identity_init": True}).eval()
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    # without identity_init the (untrained) CE blocks do change the output
    plain_ce = cenet.create_model(name).eval()
    plain_ce.load_state_dict(state, strict=False)
    with torch.no_grad():
        assert not torch.allclose(plain_ce(x), expected, atol=1e-3)


def record_inputs_and_outputs(model: nn.Module, x: torch.Tensor):
    """Run ``model(x)`` in eval; return {module name: input tensor} for the CE/SE blocks and
    {id(output tensor): module name} for every other leaf module (outputs kept alive)."""
    inputs, producers, keep = {}, {}, []
    names = {m: n for n, m in model.named_modules()}

    def hook(module, args, output):
        if isinstance(module, BLOCKS):
            inputs[names[module]] = args[0]
        else:
            producers[id(output)] = names[module]
        keep.append(output)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, BLOCKS) or not list(m.children())
    ]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return inputs, producers


def test_mobilenet_v2_ce_after_the_depthwise_bn_before_relu6():
    model = cenet.create_model("mobilenet_v2_ce")
    inputs, producers = record_inputs_and_outputs(model, torch.randn(1, 3, 32, 32))
    assert len(inputs) == 17  # every inverted residual block, the t = 1 one included
    assert "features.1.conv.0.2.0" in inputs  # the first block's depthwise conv is layer 0
    for name, x in inputs.items():
        source = producers[id(x)]  # the module whose output the CE receives
        layer = model.get_submodule(name.rsplit(".", 2)[0])  # conv → BN → Sequential(CE, act)
        assert source == name.rsplit(".", 2)[0] + ".1"
        assert isinstance(layer[1], nn.BatchNorm2d)
        conv = layer[0]
        assert conv.kernel_size == (3, 3) and conv.groups == conv.in_channels == conv.out_channels
        assert isinstance(layer[2][1], nn.ReLU6)
        assert layer[2][0].bd.group_size == 16
    widths = sorted({model.get_submodule(n).num_features for n in inputs})
    assert widths == [32, 96, 144, 192, 384, 576, 960]


def test_mobilenet_v2_se_after_the_depthwise_relu6():
    model = cenet.create_model("mobilenet_v2_se")
    inputs, producers = record_inputs_and_outputs(model, torch.randn(1, 3, 32, 32))
    assert len(inputs) == 17
    for name, x in inputs.items():
        layer = model.get_submodule(name.rsplit(".", 1)[0])  # conv → BN → ReLU6 → SE
        assert producers[id(x)] == name.rsplit(".", 1)[0] + ".2"
        assert isinstance(layer[2], nn.ReLU6) and layer[0].groups == layer[0].in_channels > 1
        se = layer[3]
        assert se.rd_channels * 4 == se.num_features  # reduction 4


@pytest.mark.parametrize("base, widths", [
    ("shufflenet_v2_x0_5", {24: 12, 48: 16, 96: 16}),
    ("shufflenet_v2_x1_0", {58: 2, 116: 4, 232: 8}),
])
def test_shufflenet_ce_between_bn_and_relu_of_the_last_1x1_conv(base, widths):
    model = cenet.create_model(f"{base}_ce")
    inputs, producers = record_inputs_and_outputs(model, torch.randn(1, 3, 64, 64))
    assert len(inputs) == 16  # one per unit: 4 + 8 + 4
    for name, x in inputs.items():
        branch_name = name.removesuffix(".7.0")
        assert branch_name.endswith("branch2")  # the main branch, never branch1
        branch = model.get_submodule(branch_name)
        assert producers[id(x)] == branch_name + ".6"
        assert isinstance(branch[6], nn.BatchNorm2d)
        conv = branch[5]
        assert conv.kernel_size == (1, 1) and conv.groups == 1
        assert isinstance(branch[7][1], nn.ReLU) and len(branch) == 8
        ce = branch[7][0]
        assert widths[ce.num_features] == ce.bd.group_size  # largest divisor of C ≤ 16
    assert count(model, nn.ReLU) == count(cenet.create_model(base), nn.ReLU)


@pytest.mark.parametrize("base", ["shufflenet_v2_x0_5", "shufflenet_v2_x1_0"])
def test_shufflenet_se_on_the_main_branch_output(base):
    model = cenet.create_model(f"{base}_se")
    inputs, producers = record_inputs_and_outputs(model, torch.randn(1, 3, 64, 64))
    assert len(inputs) == 16
    for name, x in inputs.items():
        assert name.endswith("branch2.8")
        assert producers[id(x)] == name.removesuffix(".8") + ".7"  # the last ReLU
        assert model.get_submodule(name).rd_channels == round(
            model.get_submodule(name).num_features / 4
        )


def count(model: nn.Module, cls: type) -> int:
    return sum(type(m) is cls for m in model.modules())


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_backward_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = cenet.create_model(name, num_classes=7).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7)
    loss = nn.functional.cross_entropy(out, torch.tensor([0, 6]))
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [
        n for n, p in model.named_parameters()
        if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0
    ]
    assert not no_grad


def test_largest_divisor_rule():
    assert [largest_divisor(c, 16) for c in (24, 48, 96, 58, 116, 232, 960, 7)] == [
        12, 16, 16, 2, 4, 8, 16, 7,
    ]
    assert largest_divisor(24, 8) == 8
    with pytest.raises(ValueError, match="ce_group_size must be a positive integer, got 0"):
        largest_divisor(24, 0)


def test_ce_group_size_argument():
    model = cenet.create_model("shufflenet_v2_x0_5_ce", ce_group_size=8)
    assert {m.bd.group_size for m in model.modules() if isinstance(m, ChannelEquilibrium)} == {8}
    model = cenet.create_model("mobilenet_v2_ce", ce_group_size=12)
    sizes = {(m.num_features, m.bd.group_size) for m in model.modules()
             if isinstance(m, ChannelEquilibrium)}
    assert sizes == {(32, 8), (96, 12), (144, 12), (192, 12), (384, 12), (576, 12), (960, 12)}


@pytest.mark.parametrize("kwargs, match", [
    ({"attn_kwargs": {"group_size": 16}}, "must not set group_size.*ce_group_size"),
    ({"ce_group_size": 0}, "ce_group_size must be a positive integer, got 0"),
    ({"attn_position": "after_norm"},
     r"attn_position must be one of \('before_act', 'after_act'\), got 'after_norm'"),
    ({"attn_layer": "cee"}, "unknown attn_layer 'cee'"),
])
@pytest.mark.parametrize("name", ["mobilenet_v2_ce", "shufflenet_v2_x0_5_ce"])
def test_invalid_arguments_raise_value_error(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cenet.create_model(name, **kwargs)


def test_builder_rejects_unknown_keyword():
    with pytest.raises(TypeError, match="widht_mult"):
        cenet.create_model("mobilenet_v2", widht_mult=0.5)


def test_norm_and_act_injection():
    model = cenet.create_model(
        "shufflenet_v2_x0_5_ce", norm_layer=lambda c: nn.GroupNorm(4, c), act_layer=nn.ELU,
    )
    assert count(model, nn.BatchNorm2d) == 0 and count(model, nn.ReLU) == 0
    assert count(model, nn.GroupNorm) == 56 and count(model, nn.ELU) == 1 + 3 + 2 * 16 + 1
    assert count(model, ChannelEquilibrium) == 16
    model = cenet.create_model("mobilenet_v2_se", act_layer=nn.ReLU)
    assert count(model, nn.ReLU6) == 0
    # 35 rectifiers of the network, plus the hidden ReLU of each of the 17 SE blocks
    assert count(model, nn.ReLU) == 35 + 17
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


def test_registered_names():
    assert set(cenet.list_models("mobilenet_v2*")) | set(cenet.list_models("shufflenet_v2*")) \
        == set(VARIANTS)

"""Every registered network trains: forward, backward, finite loss, a gradient everywhere."""

import pytest
import torch
from torch import nn

import cenet
from cenet.layers import ChannelEquilibrium, GatedChannelTransformation
from cenet.models.cifar_resnet import BasicBlock


@pytest.mark.parametrize("name", cenet.list_models("cifar_*"))
def test_forward_backward_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    kwargs = {"width": 0.25} if "vgg" in name else {}
    model = cenet.create_model(name, num_classes=7, **kwargs)
    for m in model.modules():  # GCT starts as an identity, where α gets no gradient
        if isinstance(m, GatedChannelTransformation):
            nn.init.normal_(m.gamma)
            nn.init.normal_(m.beta)
    x = torch.randn(4, 3, 32, 32)
    out = model(x)
    assert out.shape == (4, 7)
    loss = nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 6]))
    assert torch.isfinite(loss)
    loss.backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    # every gradient is non-zero, except where a tiny SE bottleneck (C/16 = 1 unit at width
    # 0.25) can start with its single ReLU unit dead
    zero = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    assert all(n.split(".")[-2] in ("fc1", "fc2") for n in zero) if "_se" in name else not zero
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_registry_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown model 'cifar_resnet20ce'.*'cifar_resnet20_ce'"):
        cenet.create_model("cifar_resnet20ce")
    assert "cifar_vgg16_ce" in cenet.list_models("cifar_vgg16*")


def test_each_network_has_its_plain_bn_twin():
    names = set(cenet.list_models("cifar_*"))
    suffixes = ("_ce", "_bd", "_ir", "_se", "_gct")
    variants = {n for n in names if n.endswith(suffixes)}
    plain = names - variants
    # each variant has its plain twin, and each plain network its CE variant
    assert {n.rsplit("_", 1)[0] for n in variants} == plain
    assert {f"{n}_ce" for n in plain} <= variants
    assert plain == {"cifar_resnet20", "cifar_resnet56", "cifar_vgg11", "cifar_vgg16"}


def test_builder_rejects_unknown_keyword():
    with pytest.raises(TypeError, match="widht"):
        cenet.create_model("cifar_resnet20", widht=2)


def count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


def test_vgg16_ce_after_every_bn_and_fractions():
    assert count(cenet.create_model("cifar_vgg16_ce", width=0.25), ChannelEquilibrium) == 13
    assert (
        count(cenet.create_model("cifar_vgg16_ce", width=0.25, attn_ratio=0.75), ChannelEquilibrium)
        == 10
    )
    assert (
        count(cenet.create_model("cifar_vgg16_ce", width=0.25, attn_ratio=0.5), ChannelEquilibrium)
        == 6
    )
    assert count(cenet.create_model("cifar_vgg16", width=0.25), ChannelEquilibrium) == 0


def test_vgg_ce_position_after_norm_and_before_norm():
    feats = cenet.create_model("cifar_vgg16_ce", width=0.25).features
    assert [type(m) for m in feats[:4]] == [nn.Conv2d, nn.BatchNorm2d, ChannelEquilibrium, nn.ReLU]
    feats = cenet.create_model("cifar_vgg16_ce", width=0.25, attn_position="before_norm").features
    assert [type(m) for m in feats[:4]] == [nn.Conv2d, ChannelEquilibrium, nn.BatchNorm2d, nn.ReLU]


def test_vgg16_paper_parameter_count():
    # 13 conv layers (no bias) + 13 BN + linear 512→10
    convs = [
        (3, 64),
        (64, 64),
        (64, 128),
        (128, 128),
        (128, 256),
        (256, 256),
        (256, 256),
        (256, 512),
        (512, 512),
        (512, 512),
        (512, 512),
        (512, 512),
        (512, 512),
    ]
    expected = sum(9 * a * b + 2 * b for a, b in convs) + 512 * 10 + 10
    assert sum(p.numel() for p in cenet.create_model("cifar_vgg16").parameters()) == expected


def test_resnet20_ce_sits_after_last_bn_before_addition():
    model = cenet.create_model("cifar_resnet20_ce")
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9 and all(isinstance(b.attn, ChannelEquilibrium) for b in blocks)
    assert count(model, ChannelEquilibrium) == 9  # not in the stem, nor the shortcut
    assert count(cenet.create_model("cifar_resnet56_ce"), ChannelEquilibrium) == 27
    assert count(cenet.create_model("cifar_resnet20_ce", stem_attn=True), ChannelEquilibrium) == 10
    # the block output is act(attn(bn2(conv2(.))) + shortcut): check with hooks
    block = blocks[0].eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        inner = block.attn(block.bn2(block.conv2(block.act1(block.bn1(block.conv1(x))))))
        torch.testing.assert_close(block(x), torch.relu(inner + x))


def test_resnet_norm_act_attn_injection():
    model = cenet.create_model(
        "cifar_resnet20",
        norm_layer=lambda c: nn.GroupNorm(4, c),
        act_layer=nn.LeakyReLU,
        attn_layer="ir",
    )
    assert count(model, nn.BatchNorm2d) == 0 and count(model, nn.GroupNorm) > 0
    assert count(model, nn.LeakyReLU) > 0
    assert count(model, ChannelEquilibrium) == 9
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_depth_must_be_6n_plus_2():
    from cenet.models.cifar_resnet import CifarResNet

    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(21)


def test_resnet20_parameter_count_with_projection_shortcuts():
    # 0.27M of He et al. plus the two 1×1 projection shortcuts (option B)
    n = sum(p.numel() for p in cenet.create_model("cifar_resnet20").parameters())
    assert n == 272_474


def test_unknown_attn_layer_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown attn_layer 'cee'; valid names are \('bd', 'ce'"):
        cenet.create_model("cifar_resnet20", attn_layer="cee")


@pytest.mark.parametrize("name", ["cifar_resnet20_ce", "cifar_vgg11_ce", "cifar_vgg16_bd"])
def test_state_dict_round_trip_and_eval_determinism(name):
    torch.manual_seed(0)
    kwargs = {"width": 0.25} if "vgg" in name else {}
    model = cenet.create_model(name, num_classes=5, **kwargs)
    x = torch.randn(4, 3, 32, 32)
    for _ in range(2):  # move the running statistics away from their initial values
        model(x)
    model.eval()
    with torch.no_grad():
        y = model(x)
        assert torch.equal(model(x), y)
        copy = cenet.create_model(name, num_classes=5, **kwargs).eval()
        copy.load_state_dict(model.state_dict())
        torch.testing.assert_close(copy(x), y, rtol=0, atol=0)


@pytest.mark.parametrize(
    "norm_layer",
    [
        pytest.param(lambda c: nn.GroupNorm(4, c), id="GN"),
        pytest.param(lambda c: nn.InstanceNorm2d(c, affine=True), id="IN"),
        pytest.param(lambda c: nn.GroupNorm(1, c), id="LN"),
    ],
)
@pytest.mark.parametrize("act_layer", [nn.ReLU, nn.ELU, nn.LeakyReLU, nn.ReLU6])
def test_ce_after_other_norms_and_before_other_rectifiers(norm_layer, act_layer):
    # paper Fig. 1 and Table 7: CE after GN / IN / LN, before ELU / LeakyReLU
    model = cenet.create_model(
        "cifar_vgg11_ce", width=0.25, norm_layer=norm_layer, act_layer=act_layer
    )
    feats = list(model.features)
    i = next(k for k, m in enumerate(feats) if isinstance(m, ChannelEquilibrium))
    assert not isinstance(feats[i - 1], nn.BatchNorm2d)
    assert isinstance(feats[i + 1], act_layer)
    out = model(torch.randn(4, 3, 32, 32))
    out.sum().backward()
    assert torch.isfinite(out).all()


def test_vgg_se_and_gct_positions():
    from cenet.layers import SqueezeExcitation

    feats = list(cenet.create_model("cifar_vgg11_gct", width=0.25).features)
    assert [type(m) for m in feats[:4]] == [
        nn.Conv2d, nn.BatchNorm2d, nn.ReLU, GatedChannelTransformation
    ]
    assert count(cenet.create_model("cifar_vgg11_gct", width=0.25), GatedChannelTransformation) == 8
    feats = list(cenet.create_model("cifar_vgg16_se", width=0.25).features)
    assert [type(m) for m in feats[:4]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, SqueezeExcitation]

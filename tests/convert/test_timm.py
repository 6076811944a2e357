"""The optional timm integration: cenet's networks in timm's registry, and convert_ce on timm
networks (their norm-act layers included)."""

import re

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
cenet_timm = pytest.importorskip("cenet.timm")

import cenet  # noqa: E402
from cenet.convert import CEAct, NormCE, convert_ce  # noqa: E402
from cenet.layers import ChannelEquilibrium  # noqa: E402

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def n_ce(model):
    return sum(isinstance(m, ChannelEquilibrium) for m in model.modules())


def test_timm_builds_our_cifar_networks():
    model = timm.create_model("cifar_resnet20_ce", num_classes=7)
    # the network cenet's builder makes, with timm's num_classes: same keys and shapes
    # (strict load) and, with the same weights, the same outputs
    reference = cenet.create_model("cifar_resnet20_ce", num_classes=7)
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x), rtol=0, atol=0)
    assert n_ce(model) == 9  # one per residual block: 3 stages of 3
    # He et al.'s ResNet-20 (0.27 M) with two 1×1 projection shortcuts, built through timm
    assert n_params(timm.create_model("cifar_resnet20")) == 272_474
    config = timm.data.resolve_data_config(model=model)
    assert config["input_size"] == (3, 32, 32)
    assert config["mean"] == (0.4914, 0.4822, 0.4465)  # CIFAR-10's channel means


def test_timm_resnet50_ce_is_timms_resnet50_with_the_papers_ce_blocks():
    torch.manual_seed(0)
    ours = timm.create_model("resnet50_ce")  # registered by cenet.timm
    assert ours.pretrained_cfg["input_size"] == (3, 224, 224)
    # the independent reference: timm's own ResNet-50, converted with the paper's placement
    theirs = timm.create_model("resnet50")
    assert n_params(theirs) == 25_557_032
    convert_ce(theirs, after=["layer1.*.bn3", "layer2.*.bn3", "layer3.*.bn3"])
    convert_ce(theirs, after="bn1", group_size=64, pool=True)
    assert n_ce(ours) == n_ce(theirs) == 14 and n_params(ours) == n_params(theirs)
    x = X[:, :, :32, :32]
    with torch.no_grad():
        ours(x)  # a training-mode pass moves every running estimate off its initial value
        theirs.load_state_dict(cenet.ce_keys_from_model(ours.state_dict()), strict=True)
        torch.testing.assert_close(theirs.eval()(x), ours.eval()(x))


def test_timm_names_are_never_clobbered():
    registered, skipped = set(cenet_timm.REGISTERED), set(cenet_timm.SKIPPED)
    # timm's own ResNets stay timm's; every other network of ours is registered
    assert {"resnet18", "resnet34", "resnet50", "resnet101"} <= skipped
    assert registered.isdisjoint(skipped)
    assert registered | skipped == set(cenet.list_models())
    for name in skipped:
        assert timm.models.model_entrypoint(name).__module__.startswith("timm.models.")
    assert type(timm.create_model("resnet50")).__module__ == "timm.models.resnet"
    assert {"resnet50_ce", "cifar_resnet20_ce", "mobilenet_v2_ce"} <= registered
    assert cenet_timm.register_cenet_models() == []  # idempotent
    assert set(timm.list_models(module="timm")) >= registered


def test_timm_entrypoint_arguments():
    model = timm.create_model("cifar_resnet20", drop_rate=0.0, in_chans=3, width=2)
    assert model.layer1[0].conv1.out_channels == 32
    assert timm.create_model("cifar_resnet20", in_chans=1).stem[0].in_channels == 1
    with pytest.raises(TypeError, match="widht"):
        timm.create_model("cifar_resnet20", widht=2)
    with pytest.raises(ValueError, match="drop_path_rate must be 0"):
        timm.create_model("cifar_resnet20", drop_path_rate=0.1)
    with pytest.raises(ValueError, match="no pretrained weights for 'cifar_resnet20'"):
        timm.create_model("cifar_resnet20", pretrained=True)


def test_convert_timm_resnet50_paper_placement_loads_timms_weights():
    torch.manual_seed(0)
    source = timm.create_model("resnet50").eval()
    model = timm.create_model("resnet50")
    convert_ce(model, after=["layer1.*.bn3", "layer2.*.bn3", "layer3.*.bn3"],
               identity_init=True)
    convert_ce(model, after="bn1", group_size=64, pool=True, identity_init=True)
    assert n_ce(model) == 14
    # our resnet50_ce plus the 14 identity gates of identity_init
    assert n_params(model) == n_params(cenet.create_model("resnet50_ce")) + 14
    result = model.load_state_dict(source.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(re.search(r"\.ce\.", k) for k in result.missing_keys)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(X[:, :, :32, :32]), source(X[:, :, :32, :32]))


def test_batchnormact2d_gets_ce_between_norm_and_activation():
    norm = timm.layers.BatchNormAct2d(32, act_layer=nn.ReLU)
    model = nn.Sequential(nn.Conv2d(3, 32, 3), norm)
    convert_ce(model, after="all")
    assert model[1] is norm and isinstance(norm.act, CEAct)
    assert {"1.weight", "1.running_mean", "1.act.ce.theta"} <= set(model.state_dict())
    with torch.no_grad():
        model(torch.randn(4, 3, 10, 10))  # train step: the running estimates move
        model.eval()
        x = torch.randn(2, 3, 10, 10)
        bn = nn.functional.batch_norm(model[0](x), norm.running_mean, norm.running_var,
                                      norm.weight, norm.bias, eps=norm.eps)
        torch.testing.assert_close(model(x), torch.relu(norm.act.ce(bn)))


def test_layernorm2d_is_selected_by_all():
    model = nn.Sequential(nn.Conv2d(3, 16, 1), timm.layers.LayerNorm2d(16), nn.GELU())
    convert_ce(model, after="all", mode="ir")
    assert isinstance(model[1], NormCE) and model[1].ce.num_features == 16
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), nn.functional.gelu(model[1].ce(model[1].norm(
            model[0](x)))))


def test_convert_timm_mobilenetv3_norm_act_layers_trains():
    model = timm.create_model("mobilenetv3_small_050", num_classes=5)
    convert_ce(model, after="all", mode="ir")
    blocks = [m for m in model.modules() if isinstance(m, CEAct)]
    assert len(blocks) == n_ce(model) > 20
    loss = model(X[:, :, :32, :32]).logsumexp(1).sum()
    loss.backward()
    assert all(p.grad is not None for m in blocks for p in m.ce.parameters())

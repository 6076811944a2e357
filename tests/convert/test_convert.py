"""cenet.convert_ce inserts CE after chosen norm layers and changes nothing else (CE paper
Sec. 3.3, Fig. 2c: ``Norm → CE → g``)."""

import copy
import re

import pytest
import torch
import torchvision
from torch import nn

import cenet
from cenet.convert import CEAct, NormCE, convert_ce, norm_channels
from cenet.layers import ChannelEquilibrium

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def resnet18(seed=0):
    torch.manual_seed(seed)
    return torchvision.models.resnet18()


def ce_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, ChannelEquilibrium)]


def test_conversion_keeps_every_module_parameter_buffer_and_training_flag():
    model = resnet18()
    model.layer3.eval()  # mixed flags must survive
    modules = dict(model.named_modules())
    flags = {n: m.training for n, m in modules.items()}
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    selected = [f"layer{i}.{j}.bn2" for i in range(1, 5) for j in range(2)]

    out = convert_ce(model, after="layer*.*.bn2")

    assert out is model
    after = dict(model.named_modules())
    for name, old in modules.items():
        if name in selected:
            wrapper = after[name]
            assert isinstance(wrapper, NormCE) and wrapper.norm is old
            assert after[name + ".norm"] is old
            assert isinstance(wrapper.ce, ChannelEquilibrium)
            assert wrapper.ce.num_features == old.num_features
        else:
            assert after[name] is old, name
        assert old.training == flags[name], name
    # named_modules diff: exactly the wrapped norms' new paths and the CE subtrees
    new_names = set(after) - set(modules)
    expected = {f"{s}.norm" for s in selected} | {
        n for n in after if any(n == f"{s}.ce" or n.startswith(f"{s}.ce.") for s in selected)
    }
    assert new_names == expected
    # new objects: only the wrappers and the CE blocks with their parts
    old_ids = {id(m) for m in modules.values()}
    for name, m in after.items():
        if id(m) not in old_ids:
            assert name in selected or ".ce" in name, name
    # CE blocks follow their norm's training flag (layer3 is in eval)
    assert not model.layer3[0].bn2.ce.training and model.layer1[0].bn2.ce.training
    assert not model.layer3[0].bn2.training and model.layer1[0].bn2.training
    # the shortcut path is untouched
    assert type(model.layer2[0].downsample[1]) is nn.BatchNorm2d
    # same parameter and buffer tensors, reachable under their old names
    for name, p in params.items():
        assert model.get_parameter(name) is p
    structural = {n: b for n, b in model.named_buffers()}
    for name, b in buffers.items():
        module, _, attr = name.rpartition(".")
        assert getattr(model.get_submodule(module), attr) is b
        assert structural.get(name, structural.get(f"{module}.norm.{attr}")) is b
    new_params = {id(p) for p in model.parameters()} - {id(p) for p in params.values()}
    ce_params = {id(p) for n in ce_names(model) for p in model.get_submodule(n).parameters()}
    assert new_params == ce_params


def test_ce_sits_between_the_last_norm_and_the_addition():
    model = convert_ce(resnet18(), after="layer*.*.bn2")
    model.eval()
    block = model.layer1[0]
    x = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        inner = block.bn2.norm(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
        expected = torch.relu(block.bn2.ce(inner) + x)
        torch.testing.assert_close(block(x), expected)
        # and the CE changes the block (W_run = I, but IR reweights): it is really applied
        assert not torch.allclose(block(x), torch.relu(inner + x))


@pytest.mark.parametrize(
    ("after", "count"),
    [
        ("layer*.*.bn2", 8),
        (["layer1.*.bn2", "layer4.1.bn1"], 3),
        (lambda name, m: name.endswith("bn1") and isinstance(m, nn.BatchNorm2d), 9),
        (nn.BatchNorm2d, 20),  # stem 1 + blocks 16 + shortcuts 3
        ("all", 20),
    ],
    ids=["pattern", "patterns", "predicate", "type", "all"],
)
def test_selection_by_pattern_predicate_type_and_all(after, count):
    model = convert_ce(resnet18(), after=after, mode="ir")
    assert len(ce_names(model)) == count
    assert model(X).shape == (2, 1000)


def test_type_selection_of_group_norms_and_root_norm():
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.GroupNorm(4, 32), nn.ReLU(),
                          nn.Conv2d(32, 16, 3), nn.BatchNorm2d(16))
    convert_ce(model, after=nn.GroupNorm)
    assert ce_names(model) == ["1.ce"] and model[1].ce.num_features == 32
    root = nn.BatchNorm2d(16)
    out = convert_ce(root, after="all", mode="bd")
    assert isinstance(out, NormCE) and out.norm is root
    keys = list(out.state_dict())
    assert keys[:2] == ["weight", "bias"] and "ce.bd.running_wm" in keys


@pytest.mark.parametrize(
    ("after", "message"),
    [
        (None, "needs a selection"),
        (["layer*.*.bn2", "layer5.*.bn2"], r"pattern 'layer5\.\*\.bn2' matches no module"),
        (lambda n, m: False, "predicate .* selects no module"),
        (nn.GroupNorm, "has no such module"),
        ("layer1.0.conv1", r"layer1\.0\.conv1 \(Conv2d\) is not a normalization layer"),
        (42, "after must be"),
    ],
)
def test_bad_selection_raises_and_leaves_model_unchanged(after, message):
    model = resnet18()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        convert_ce(model, after=after)
    assert not ce_names(model) and not any(isinstance(m, NormCE) for m in model.modules())
    assert list(model.state_dict()) == list(before)


def test_invalid_ce_argument_names_the_norm_and_converts_nothing():
    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.BatchNorm2d(32), nn.Conv2d(32, 48, 1),
                          nn.BatchNorm2d(48))
    with pytest.raises(ValueError, match=r"CE for 3 \(BatchNorm2d\), 48 channels.*group_size=32"):
        convert_ce(model, after="all", group_size=32)  # fine for 32 channels, not for 48
    assert not ce_names(model)
    with pytest.raises(TypeError, match="group_sise"):
        convert_ce(model, after="all", group_sise=16)
    assert not ce_names(model)
    with pytest.raises(ValueError, match="unknown CE mode 'cee'"):
        convert_ce(model, after="all", mode="cee")


def test_converting_twice_raises():
    model = convert_ce(resnet18(), after="layer1.*.bn2")
    with pytest.raises(ValueError, match=r"layer1\.0\.bn2\.norm .*already has a CE"):
        convert_ce(model, after="all")
    assert len(ce_names(model)) == 2


def test_converting_the_same_norm_twice_by_name_raises_and_changes_nothing():
    model = convert_ce(resnet18(), after="bn1")
    wrapper = model.bn1
    with pytest.raises(ValueError, match=r"^bn1 \(NormCE\) already has a CE .*BatchNorm2d"):
        convert_ce(model, after="bn1")
    assert model.bn1 is wrapper and type(wrapper.norm) is nn.BatchNorm2d
    assert ce_names(model) == ["bn1.ce"]
    # one such norm among new ones: none of them converted
    convert_ce(model, after="layer1.0.bn2")
    with pytest.raises(ValueError, match=r"^layer1\.0\.bn2 \(NormCE\) already has a CE"):
        convert_ce(model, after=["layer2.*.bn2", "layer1.0.bn2"])
    assert ce_names(model) == ["bn1.ce", "layer1.0.bn2.ce"]
    assert type(model.layer2[0].bn2) is nn.BatchNorm2d


def test_state_dict_keeps_the_original_keys_and_loads_a_torchvision_checkpoint():
    source = resnet18(seed=1)
    sd = source.state_dict()
    model = convert_ce(resnet18(seed=2), after="layer*.*.bn2", identity_init=True)
    keys = list(model.state_dict())
    ce_keys = [k for k in keys if ".ce." in k]
    assert [k for k in keys if ".ce." not in k] == list(sd)  # same keys, same order
    assert ce_keys and all(re.fullmatch(r"layer\d\.\d\.bn2\.ce\..+", k) for k in ce_keys)

    result = model.load_state_dict(sd, strict=False)
    assert result.unexpected_keys == [] and sorted(result.missing_keys) == sorted(ce_keys)
    for k, v in sd.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    # identity_init: the converted network computes exactly what the checkpoint did
    for train in (False, True):
        source.train(train)
        model.train(train)
        with torch.no_grad():
            torch.testing.assert_close(model(X), source(X))

    # round trip, and back into the original architecture
    again = convert_ce(resnet18(seed=3), after="layer*.*.bn2", identity_init=True)
    again.load_state_dict(model.state_dict(), strict=True)
    plain = resnet18(seed=4)
    result = plain.load_state_dict(model.state_dict(), strict=False)
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == sorted(ce_keys)


def test_missing_norm_key_is_reported_by_its_saved_name():
    model = convert_ce(resnet18(), after="layer*.*.bn2")
    sd = model.state_dict()
    del sd["layer1.0.bn2.weight"]
    missing = r'Missing key\(s\) in state_dict: "layer1\.0\.bn2\.weight"\. '
    with pytest.raises(RuntimeError, match=missing):
        model.load_state_dict(sd)


def test_deepcopy_and_pickle_keep_keys():
    model = convert_ce(resnet18(), after="layer4.*.bn2")
    keys = list(model.state_dict())
    assert list(copy.deepcopy(model).state_dict()) == keys
    import io

    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert list(torch.load(buf, weights_only=False).state_dict()) == keys


def test_ce_is_created_on_the_norms_device_and_dtype():
    model = resnet18().double()
    convert_ce(model, after="layer1.0.bn2")
    assert all(t.dtype == torch.float64 for t in model.layer1[0].bn2.ce.state_dict().values())
    meta = resnet18().to("meta")
    convert_ce(meta, after="layer1.0.bn2")
    assert all(t.device.type == "meta" for t in meta.layer1[0].bn2.ce.state_dict().values())


def test_shared_norm_gets_one_wrapper_at_every_place():
    bn = nn.BatchNorm2d(16)
    model = nn.Sequential(nn.Conv2d(16, 16, 1), bn, nn.Conv2d(16, 16, 1), bn)
    convert_ce(model, after="1")
    assert isinstance(model[1], NormCE) and model[3] is model[1] and model[1].norm is bn


class NormAct(nn.BatchNorm2d):
    """A norm that applies its activation inside, like timm's BatchNormAct2d."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


def test_norm_act_layer_gets_ce_before_its_activation():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), NormAct(16))
    norm = model[1]
    convert_ce(model, after="all", mode="ir")
    assert model[1] is norm and isinstance(norm.act, CEAct)
    assert "1.act.ce.ir.fc1.weight" in model.state_dict() and "1.weight" in model.state_dict()
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        bn = nn.functional.batch_norm(model[0](x), norm.running_mean, norm.running_var,
                                      norm.weight, norm.bias)
        torch.testing.assert_close(model(x), torch.relu(norm.act.ce(bn)))


def test_norm_channels():
    assert norm_channels(nn.BatchNorm2d(12)) == 12
    assert norm_channels(nn.GroupNorm(2, 12)) == 12
    assert norm_channels(nn.LayerNorm(12)) == 12
    assert norm_channels(torchvision.ops.FrozenBatchNorm2d(12)) == 12
    assert norm_channels(nn.Conv2d(3, 12, 1)) is None


# the CE paper's placements (Sec. 5.1, appendix G) on torchvision's ResNets, against cenet's own
# networks
PAPER_PLACEMENT = {
    "resnet18": ["layer*.*.bn2"],
    "resnet50": ["layer1.*.bn3", "layer2.*.bn3", "layer3.*.bn3"],
    "resnet101": ["layer1.*.bn3", "layer2.*.bn3"],
}


def paper_convert(name):
    model = getattr(torchvision.models, name)()
    convert_ce(model, after=PAPER_PLACEMENT[name])
    convert_ce(model, after="bn1", group_size=64, pool=True)  # the stem CE
    return model


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet101"])
def test_converted_torchvision_resnet_has_the_parameters_of_our_ce_resnet(name):
    assert n_params(paper_convert(name)) == n_params(cenet.create_model(f"{name}_ce"))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_converted_torchvision_resnet_computes_our_ce_resnet(name):
    torch.manual_seed(0)
    ours = cenet.create_model(f"{name}_ce")
    last_bn = "bn2" if name == "resnet18" else "bn3"
    renamed = {}
    for key, value in ours.state_dict().items():
        key = re.sub(r"^stem_attn\.", "bn1.ce.", key)
        renamed[re.sub(r"\.attn\.", f".{last_bn}.ce.", key)] = value
    converted = paper_convert(name)
    converted.load_state_dict(renamed, strict=True)
    with torch.no_grad():
        # training mode (batch statistics, running estimates updated), then eval with them
        torch.testing.assert_close(converted(X), ours(X))
        converted.eval()
        ours.eval()
        torch.testing.assert_close(converted(X), ours(X))

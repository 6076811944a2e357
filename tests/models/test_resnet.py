"""ImageNet ResNets: torchvision's architecture and names, the CE paper's CE placements
(Sec. 3.3 and 5.1, Fig. 2c, appendix G) and the baselines (SE, GCT, IterNorm, DBN)."""

import pytest
import torch
import torchvision
from torch import nn

import cenet
from cenet.layers import (
    ChannelEquilibrium,
    DecorrelatedBatchNorm,
    GatedChannelTransformation,
    IterNorm,
    SqueezeExcitation,
)
from cenet.models.resnet import Bottleneck, ResNet, iternorm_layer, resolve_attn_blocks

DEPTHS = (18, 34, 50, 101)
# the reference counts torchvision documents for its resnet{18,34,50,101}
TORCHVISION_PARAMS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160}
BLOCK_CLASSES = {"_ce": ChannelEquilibrium, "_bd": ChannelEquilibrium,
                 "_ir": ChannelEquilibrium, "_se": SqueezeExcitation,
                 "_gct": GatedChannelTransformation}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run this module on one thread: its tensors are tiny, so per-op thread synchronisation
    dominates, and on a busy 2-core machine it made the module several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


def skeleton(name, **kwargs):
    """The network on the meta device: its structure and shapes without the cost of init."""
    with torch.device("meta"):
        return cenet.create_model(name, **kwargs)


def torchvision_resnet(depth, seed=0):
    """torchvision's ResNet with random weights and non-trivial BN statistics and affine."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize("depth", DEPTHS)
def test_plain_networks_have_torchvision_names_and_parameter_counts(depth):
    with torch.device("meta"):
        tv = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    ours = skeleton(f"resnet{depth}")
    assert num_params(ours) == num_params(tv) == TORCHVISION_PARAMS[depth]
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in tv.state_dict().items()
    }
    ours.load_state_dict(tv.state_dict(), strict=True, assign=True)


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_weights_give_torchvision_outputs(depth):
    tv = torchvision_resnet(depth)
    ours = cenet.create_model(f"resnet{depth}")
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = tv(x)
        torch.testing.assert_close(ours.eval()(x), expected)
        # and a network that differs (fresh weights) does not match: the check can fail
        assert not torch.allclose(cenet.create_model(f"resnet{depth}").eval()(x), expected)


@pytest.mark.parametrize("name", ["resnet18_ce", "resnet18_bd", "resnet18_ir", "resnet18_se",
                                  "resnet18_gct", "resnet50_ce", "resnet50_se", "resnet50_gct",
                                  "resnet101_ce"])
def test_variants_load_torchvision_weights_missing_only_their_blocks(name):
    depth = int(name[6:].split("_")[0])
    tv = torchvision_resnet(depth)
    model = cenet.create_model(name)
    cls = BLOCK_CLASSES["_" + name.split("_")[1]]
    added = {
        f"{prefix}.{key}"
        for prefix, module in model.named_modules() if isinstance(module, cls)
        for key in module.state_dict()
    }
    assert added
    result = model.load_state_dict(tv.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == added
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in tv.state_dict().items())


def test_resnet50_ce_identity_init_reproduces_torchvision_exactly():
    tv = torchvision_resnet(50)
    model = cenet.create_model("resnet50_ce", attn_kwargs={"identity_init": True})
    assert model.stem_attn.identity_init  # attn_kwargs reach the stem CE too
    model.load_state_dict(tv.state_dict(), strict=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), tv(x))
        # training mode (batch statistics, running updates) also gives the same outputs
        assert torch.equal(model.train()(x), tv.train()(x))
    # without identity_init the CE network computes something else
    plain_ce = cenet.create_model("resnet50_ce")
    plain_ce.load_state_dict(tv.state_dict(), strict=False)
    with torch.no_grad():
        assert not torch.allclose(plain_ce.eval()(x), tv.eval()(x))


@pytest.mark.parametrize(("name", "per_stage"), [
    ("resnet18_ce", (2, 2, 2, 2)),   # every block
    ("resnet34_ce", (3, 4, 6, 3)),
    ("resnet50_ce", (3, 4, 6, 0)),   # not the 2048-channel blocks of layer4
    ("resnet101_ce", (3, 4, 0, 0)),  # "the first seven residual blocks": layer1 + layer2
    ("resnet50_bd", (3, 4, 6, 0)),
    ("resnet101_ir", (3, 4, 0, 0)),
])
def test_ce_blocks_per_stage_and_stem(name, per_stage):
    model = skeleton(name)
    for i, k in enumerate(per_stage):
        stage = getattr(model, f"layer{i + 1}")
        has = [isinstance(b.attn, ChannelEquilibrium) for b in stage]
        assert has == [True] * k + [False] * (len(stage) - k)
        assert all(b.attn is None for b in stage[k:])
    assert count(model, ChannelEquilibrium) == sum(per_stage) + 1
    stem = model.stem_attn  # appendix G: ChannelEquilibrium(64, group_size=64, pool=True)
    assert isinstance(stem, ChannelEquilibrium) and stem.num_features == 64
    mode = name.split("_")[1]
    assert stem.mode == mode
    blocks = [b for b in model.blocks() if b.attn is not None]
    assert all(b.attn.num_features == b.last_norm.num_features for b in blocks)
    assert all(b.attn.mode == mode for b in blocks)
    if mode == "ir":  # IR alone builds no BD branch anywhere
        assert stem.bd is None and all(b.attn.bd is None for b in blocks)
    else:  # BD statistics: the stem's in groups of 64 on 2×2 pooled maps, the blocks' in 16
        assert stem.bd.group_size == 64 and stem.bd.pool
        assert all(b.attn.bd.group_size == 16 and not b.attn.bd.pool for b in blocks)


def test_ce_placement_is_switchable():
    assert count(skeleton("resnet101_ce", attn_blocks=7), ChannelEquilibrium) == 8
    assert count(skeleton("resnet101_ce", attn_blocks=(3, 4, 23, 0)), ChannelEquilibrium) == 31
    assert count(skeleton("resnet50_ce", attn_blocks=None, stem_attn=False),
                 ChannelEquilibrium) == 16
    assert count(skeleton("resnet18_ce", stem_attn=False), ChannelEquilibrium) == 8
    assert resolve_attn_blocks(7, (3, 4, 23, 3)) == (3, 4, 0, 0)
    assert resolve_attn_blocks(13, (3, 4, 6, 3)) == (3, 4, 6, 0)
    assert resolve_attn_blocks(None, (2, 2, 2, 2)) == (2, 2, 2, 2)


@pytest.mark.parametrize("name", ["resnet18_ce", "resnet50_ce", "resnet50_se"])
def test_block_is_last_norm_then_attn_then_addition(name):
    """Fig. 2c: ``conv-BN-CE (+ shortcut) → ReLU``, recomputed by hand on a block with a
    projection shortcut."""
    torch.manual_seed(0)
    block = cenet.create_model(name).layer2[0]
    assert block.downsample is not None
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    with torch.no_grad():
        # move every statistic and affine off its initial value, where BN is nearly the
        # identity and the order of BN and the block would hardly matter
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
        block.train()(x)
        block.eval()
        out = torch.relu(block.bn1(block.conv1(x)))
        if isinstance(block, Bottleneck):
            out = torch.relu(block.bn2(block.conv2(out)))
        last_conv = block.conv3 if isinstance(block, Bottleneck) else block.conv2
        branch = block.attn(block.last_norm(last_conv(out)))
        expected = torch.relu(branch + block.downsample(x))
        torch.testing.assert_close(block(x), expected)
        # the block matters: without it the output differs
        assert not torch.allclose(torch.relu(block.last_norm(last_conv(out))
                                             + block.downsample(x)), expected)


@pytest.mark.parametrize("depth", [18, 50])
def test_se_in_every_block_with_reduction_16(depth):
    model = skeleton(f"resnet{depth}_se")
    blocks = model.blocks()
    assert all(isinstance(b.attn, SqueezeExcitation) for b in blocks)
    assert count(model, SqueezeExcitation) == len(blocks) == {18: 8, 50: 16}[depth]
    # hand count: per block two 1×1 convs with biases, C → C/16 → C
    extra = sum(2 * c * (c // 16) + c // 16 + c for c in (b.last_norm.num_features for b in blocks))
    assert num_params(model) == TORCHVISION_PARAMS[depth] + extra


@pytest.mark.parametrize("depth", [18, 50])
def test_gct_before_every_convolution(depth):
    model = cenet.create_model(f"resnet{depth}_gct")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    gcts = [m for m in model.modules() if isinstance(m, GatedChannelTransformation)]
    assert len(gcts) == len(convs)  # stem, conv1..conv3 of each block, projection shortcuts
    assert num_params(model) == TORCHVISION_PARAMS[depth] + 3 * sum(g.num_features for g in gcts)
    # each GCT feeds its convolution: hooks see the GCT output arrive at the conv
    pairs = [(model.conv1_attn, model.conv1)]
    for b in model.blocks():
        pairs += [(getattr(b, f"conv{i}_attn"), getattr(b, f"conv{i}"))
                  for i in (1, 2, 3) if hasattr(b, f"conv{i}")]
        if b.downsample is not None:
            pairs.append((b.downsample_attn, b.downsample[0]))
    assert len(pairs) == len(convs)
    seen = {}
    hooks = [g.register_forward_hook(lambda m, i, o: seen.__setitem__(id(m), o)) for g, _ in pairs]
    hooks += [c.register_forward_pre_hook(lambda m, i: seen.__setitem__(id(m), i[0]))
              for _, c in pairs]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    assert all(seen[id(g)] is seen[id(c)] for g, c in pairs)


@pytest.mark.parametrize(("suffix", "cls", "group"), [("_iternorm", IterNorm, 64),
                                                       ("_dbn", DecorrelatedBatchNorm, 16)])
def test_whitening_norm_replaces_every_bn(suffix, cls, group):
    plain = skeleton("resnet50")
    model = skeleton("resnet50" + suffix)
    assert count(model, nn.BatchNorm2d) == 0
    assert count(model, cls) == count(plain, nn.BatchNorm2d) == 53
    assert {m.group_size for m in model.modules() if isinstance(m, cls)} == {group}
    # the same per-channel affine as BN, so the same number of parameters
    assert num_params(model) == TORCHVISION_PARAMS[50]
    assert iternorm_layer(32).group_size == 32  # min(group, C) for narrow layers


def _make_gct_non_identity(model):
    # GCT starts as an exact identity (γ = β = 0), where α gets no gradient
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GatedChannelTransformation):
                m.gamma.normal_(0, 0.5)
                m.beta.normal_(0, 0.5)


@pytest.mark.parametrize("name", cenet.list_models("resnet*"))
def test_every_variant_trains_round_trips_and_is_deterministic(name):
    torch.manual_seed(0)
    # the heavy ResNet-101 variants on 32×32 (layer4 sees 1×1 maps), the others on 64×64.
    # Not DBN: with N·H·W = 2 positions its 16×16 covariances have rank 1, so the running ZCA
    # matrix scales 15 directions by ~ε^{-1/2}, and 104 such layers overflow in eval.
    size = 32 if name.startswith("resnet101") and name != "resnet101_dbn" else 64
    model = cenet.create_model(name, num_classes=7)
    _make_gct_non_identity(model)
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 7)
    loss = nn.functional.cross_entropy(out, torch.tensor([0, 6]))
    assert torch.isfinite(loss)
    loss.backward()
    bad = [n for n, p in model.named_parameters()
           if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0]
    assert not bad
    model.eval()
    # round trip into a fresh instance that holds no values of its own (meta device): any
    # state the state_dict missed would fail the forward below
    twin = skeleton(name, num_classes=7)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    twin.load_state_dict(state, strict=True, assign=True)
    twin.eval()
    with torch.no_grad():
        first = model(x)
        assert torch.isfinite(first).all()
        assert torch.equal(model(x), first)
        assert torch.equal(twin(x), first)


def test_arguments_are_validated():
    with pytest.raises(ValueError, match=r"attn_blocks must lie in \[0, 33\].*got 34"):
        cenet.create_model("resnet101_ce", attn_blocks=34)
    with pytest.raises(ValueError, match=r"attn_blocks must be None.*got \(3, 4\)"):
        cenet.create_model("resnet50_ce", attn_blocks=(3, 4))
    with pytest.raises(ValueError, match=r"attn_blocks.*got \(3, 4, 7, 0\)"):
        cenet.create_model("resnet50_ce", attn_blocks=(3, 4, 7, 0))
    with pytest.raises(ValueError, match="stem_attn=True needs an attn_layer"):
        cenet.create_model("resnet18", stem_attn=True)
    with pytest.raises(ValueError, match=r"layers must be four positive ints.*\(2, 2, 2\)"):
        ResNet(Bottleneck, (2, 2, 2))
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got 0"):
        cenet.create_model("resnet18", num_classes=0)
    with pytest.raises(ValueError, match="unknown attn_layer 'cee'"):
        cenet.create_model("resnet18_ce", attn_layer="cee")
    with pytest.raises(TypeError, match="attn_block"):
        cenet.create_model("resnet18_ce", attn_block=3)


def test_zero_init_residual_and_default_classes():
    model = cenet.create_model("resnet18", zero_init_residual=True)
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for b in model.blocks())
    assert model.fc.out_features == 1000 and model.num_features == 512
    assert cenet.create_model("resnet50_ce").fc.in_features == 2048

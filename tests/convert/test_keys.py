"""``ce_keys_to_model`` / ``ce_keys_from_model``: a torchvision ResNet converted with the
paper's placements (Sec. 5.1, appendix G) is ``create_model("resnet*_ce")`` under other key
names."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision

import cenet
from cenet.convert import ce_keys_from_model, ce_keys_to_model, convert_ce

X = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))

PLACEMENT = {
    "resnet18": ["layer*.*.bn2"],
    "resnet50": ["layer1.*.bn3", "layer2.*.bn3", "layer3.*.bn3"],
}


def converted(name: str, seed: int) -> torch.nn.Module:
    """torchvision's ``name`` with the paper's CE blocks inserted (README, convert_ce)."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)()
    convert_ce(model, after=PLACEMENT[name])
    convert_ce(model, after="bn1", group_size=64, pool=True)
    return model


def created(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cenet.create_model(f"{name}_ce")


def trained_a_little(model: torch.nn.Module) -> torch.nn.Module:
    """Two training-mode forwards (running statistics move away from their initial values),
    then eval mode."""
    with torch.no_grad():
        for i in range(2):
            model(X.roll(i, dims=0) * (1 + i))
    return model.eval()


def test_the_paper_resnet50_maps_key_for_key() -> None:
    tv_sd = converted("resnet50", 0).state_dict()
    ours_sd = created("resnet50", 0).state_dict()
    mapped = ce_keys_to_model(tv_sd)
    assert list(mapped) == [k for k in mapped if not re.search(r"(^|\.)ce\.", k)]
    assert sorted(mapped) == sorted(ours_sd)
    assert mapped["stem_attn.theta"] is tv_sd["bn1.ce.theta"]  # the same tensors, renamed
    assert mapped["layer3.5.attn.ir.fc1.weight"] is tv_sd["layer3.5.bn3.ce.ir.fc1.weight"]
    assert "layer1.0.bn3.ce.theta" in tv_sd  # the input is left as it was
    assert list(ce_keys_from_model(mapped)) == list(tv_sd)
    assert sorted(ce_keys_from_model(ours_sd)) == sorted(tv_sd)
    # module versions go along (BatchNorm's, kept at the norm's name by NormCE)
    assert mapped._metadata["layer1.0.attn"] == tv_sd._metadata["layer1.0.bn3.ce"]
    assert mapped._metadata["layer1.0.bn3"] == tv_sd._metadata["layer1.0.bn3"]
    assert "layer1.0.bn3.ce" in ce_keys_from_model(ours_sd)._metadata


@pytest.mark.parametrize("name", ["resnet50", "resnet18"])
def test_converted_weights_load_into_create_model_and_compute_the_same(name) -> None:
    tv = trained_a_little(converted(name, 1))
    ours = created(name, 2).eval()
    with torch.no_grad():
        expected = tv(X)
        assert not torch.allclose(ours(X), expected)  # other weights: other outputs
        ours.load_state_dict(ce_keys_to_model(tv.state_dict()), strict=True)
        torch.testing.assert_close(ours(X), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet50", "resnet18"])
def test_create_model_weights_load_into_the_converted_network(name) -> None:
    ours = trained_a_little(created(name, 3))
    tv = converted(name, 4).eval()
    with torch.no_grad():
        expected = ours(X)
        assert not torch.allclose(tv(X), expected)
        tv.load_state_dict(ce_keys_from_model(ours.state_dict()), strict=True)
        torch.testing.assert_close(tv(X), expected, rtol=1e-5, atol=1e-5)


def test_a_ce_create_model_has_no_place_for_is_named() -> None:
    model = torchvision.models.resnet50()
    convert_ce(model, after="layer1.0.bn2")  # not the last norm of the branch
    with pytest.raises(ValueError, match=r"'layer1\.0\.bn2\.ce\.theta'.*last norm"):
        ce_keys_to_model(model.state_dict())
    model = torchvision.models.resnet18()
    convert_ce(model, after="layer2.0.downsample.1")
    with pytest.raises(ValueError, match=r"'layer2\.0\.downsample\.1\.ce\.theta'"):
        ce_keys_to_model(model.state_dict())


def test_keys_without_ce_pass_through_and_non_mappings_are_refused() -> None:
    plain = torchvision.models.resnet18().state_dict()
    assert list(ce_keys_to_model(plain)) == list(plain)
    assert list(ce_keys_from_model(plain)) == list(plain)
    with pytest.raises(TypeError, match="expected a state dict.*got list"):
        ce_keys_to_model(list(plain))
    assert cenet.ce_keys_to_model is ce_keys_to_model
    assert cenet.ce_keys_from_model is ce_keys_from_model

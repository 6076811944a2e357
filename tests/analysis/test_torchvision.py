"""The measurements run on a torchvision ResNet-18 (no cenet model involved)."""

import json

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from cenet.analysis import (
    ablation_curve,
    channel_correlations,
    channel_magnitude_map,
    inhibited_channels,
    norm_parameter_conditions,
    record_outputs,
)


@pytest.fixture(scope="module")
def model_and_batches():
    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=5)
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(2, 3, 64, 64, generator=gen), torch.randint(5, (2,), generator=gen))
        for _ in range(2)
    ]
    return model, batches


def test_resnet18_measurements(model_and_batches):
    model, batches = model_and_batches
    model.train()
    res = inhibited_channels(model, batches, first_n=6)
    # the stem relu, then the shared relu of each BasicBlock called twice: 1 + 8 * 2 outputs
    assert len(res.layers) == 17 and "layer1.0.relu:1" in res.layers
    assert res.layers["relu"].num_channels == 64
    assert res.layers["layer4.1.relu:1"].num_channels == 512
    assert len(res.averaged) == 6 and 0 <= res.ratio <= 1
    assert model.training
    norms = norm_parameter_conditions(model)
    assert len(norms.layers) == 20
    assert norms.overall.num_channels == sum(
        m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)
    )
    assert norms.overall.gamma_small == 0.0 and norms.overall.beta_nonpositive == 1.0  # init
    mag = channel_magnitude_map(model, batches[0][0], layer=nn.BatchNorm2d)
    assert mag.shape == (32, 32)  # bn1 of the stem, stride 2
    corr = channel_correlations(model, batches, layers="layer1.0.relu", max_batches=1)
    assert set(corr) == {"layer1.0.relu", "layer1.0.relu:1"}
    curve = ablation_curve(model, batches, layers="layer2.0.relu", ratios=(0.0, 1.0), repeats=1)
    with record_outputs(model, "layer2.0.relu") as outs:
        model.eval()
        with torch.no_grad():
            model(batches[0][0])
    assert len(outs) == 2 and curve.num_channels == {"layer2.0.relu": 128, "layer2.0.relu:1": 128}
    json.dumps([res.to_dict(), norms.to_dict(), curve.to_dict(), corr])

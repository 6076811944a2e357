"""The statistics step: group moments, batch covariance (Eqn 5), instance variance (Eqn 7)."""

import pytest
import torch

from cenet.layers import batch_covariance, group_moments, instance_variance, spatial_variance


@pytest.fixture(params=["nchw", "nhwc"])
def feature_map(request):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 12, 4, 3, generator=gen, dtype=torch.float64) * 2 + 0.5
    if request.param == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def test_group_moments_match_direct_sums(feature_map):
    x, g = feature_map, 4
    m = group_moments(x, g)
    torch.testing.assert_close(m.mean, x.mean((2, 3)))
    torch.testing.assert_close(m.sq_mean, (x * x).mean((2, 3)))
    flat = x.permute(1, 0, 2, 3).reshape(12, -1)  # C × (N·H·W)
    for k in range(3):
        block = flat[k * g : (k + 1) * g]
        torch.testing.assert_close(m.second[k], block @ block.T / flat.shape[1])


def test_batch_covariance_matches_torch_cov_plus_eps(feature_map):
    x = feature_map
    cov = batch_covariance(group_moments(x, 4), eps=1e-3)
    flat = x.permute(1, 0, 2, 3).reshape(12, -1)
    for k in range(3):
        expected = torch.cov(flat[4 * k : 4 * k + 4], correction=0) + 1e-3 * torch.eye(
            4, dtype=x.dtype
        )
        torch.testing.assert_close(cov[k], expected)


def test_instance_variance_is_population_variance(feature_map):
    x = feature_map
    expected = x.var((2, 3), correction=0)
    torch.testing.assert_close(instance_variance(group_moments(x, 4)), expected)
    torch.testing.assert_close(spatial_variance(x), expected)


def test_moments_gradients(feature_map):
    x = feature_map.clone().requires_grad_(True)

    def f(x):
        m = group_moments(x, 4)
        return m.mean.sin().sum() + m.sq_mean.cos().sum() + (m.second**2).sum()

    assert torch.autograd.gradcheck(f, (x,))

"""The 2×2 max pooling of the BD statistics against F.max_pool2d."""

import pytest
import torch
import torch.nn.functional as F

from cenet import kernels
from cenet.layers.pooling import max_pool_2x2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 7, 9), (1, 2, 2, 2), (2, 2, 5, 70),
                                   (1, 1, 33, 35), (1, 2, 64, 64)])
def test_values_and_gradients_match_max_pool2d_with_ties(dtype, shape):
    if not kernels.kernels_available():
        pytest.skip("the CPU kernels could not be built here")
    torch.manual_seed(0)
    # small integers: many windows hold several equal maxima, where the gradient must go to
    # the first of them (row-major), as in F.max_pool2d
    x = torch.randint(-3, 4, shape).to(dtype).requires_grad_()
    grad = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, dtype=dtype)
    y = max_pool_2x2(x)
    assert type(y.grad_fn).__name__ == "_MaxPool2x2Backward"
    y.backward(grad)
    ours, x.grad = x.grad, None
    ref = F.max_pool2d(x, 2, 2)
    ref.backward(grad)
    assert torch.equal(y, ref)
    assert torch.equal(ours, x.grad)


def test_non_finite_values_propagate_as_in_max_pool2d():
    if not kernels.kernels_available():
        pytest.skip("the CPU kernels could not be built here")
    x = torch.randn(2, 3, 6, 36)
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    x[1, 0, 4, 20] = float("nan")
    y, ref = max_pool_2x2(x), F.max_pool2d(x, 2, 2)
    assert torch.equal(y.isnan(), ref.isnan()) and y.isnan().sum() == 2
    assert torch.equal(y.nan_to_num(), ref.nan_to_num())


def test_other_layouts_use_max_pool2d():
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    y = max_pool_2x2(x.requires_grad_())
    assert type(y.grad_fn).__name__ != "_MaxPool2x2Backward"
    torch.testing.assert_close(y, F.max_pool2d(x, 2, 2))

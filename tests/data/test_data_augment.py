"""cenet.data.augment: batch crop/flip against hand-made references, and normalization."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cenet.data.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    augment_batch,
    draw_crop_flip,
    normalize,
    random_crop_flip,
)


@pytest.fixture
def batch():
    return torch.randint(
        0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )


def _fixed(b, top, left, flip):
    return torch.tensor([[top, left]] * b), torch.full((b,), flip)


def test_shape_and_dtype(batch):
    out = random_crop_flip(batch, generator=torch.Generator().manual_seed(0))
    assert out.shape == batch.shape and out.dtype == torch.uint8
    y = augment_batch(batch, generator=torch.Generator().manual_seed(0))
    assert y.shape == batch.shape and y.dtype == torch.float32


def test_offset_at_padding_is_identity(batch):
    offsets, flip = _fixed(6, 4, 4, False)
    assert torch.equal(random_crop_flip(batch, offsets=offsets, flip=flip), batch)


def test_forced_flip_equals_torch_flip(batch):
    offsets, flip = _fixed(6, 4, 4, True)
    assert torch.equal(random_crop_flip(batch, offsets=offsets, flip=flip), torch.flip(batch, [3]))


def test_corner_crop_shifts_in_zeros(batch):
    offsets, flip = _fixed(6, 0, 0, False)
    out = random_crop_flip(batch, offsets=offsets, flip=flip)
    assert torch.equal(out[:, :, 4:, 4:], batch[:, :, :28, :28])
    assert out[:, :, :4, :].eq(0).all() and out[:, :, :, :4].eq(0).all()
    offsets, _ = _fixed(6, 8, 2, False)
    out = random_crop_flip(batch, offsets=offsets, flip=flip)
    assert torch.equal(out[:, :, :28, 2:], batch[:, :, 4:, :30])
    assert out[:, :, 28:, :].eq(0).all() and out[:, :, :, :2].eq(0).all()


def test_matches_per_image_reference(batch):
    g = torch.Generator().manual_seed(7)
    offsets, flip = draw_crop_flip(6, generator=g)
    out = random_crop_flip(batch, offsets=offsets, flip=flip)
    padded = F.pad(batch, (4, 4, 4, 4))
    for i in range(6):
        t, left = offsets[i].tolist()
        ref = padded[i, :, t : t + 32, left : left + 32]
        ref = ref.flip(2) if flip[i] else ref
        assert torch.equal(out[i], ref)


def test_same_seed_same_output_and_draws_vary(batch):
    a = augment_batch(batch, generator=torch.Generator().manual_seed(3))
    b = augment_batch(batch, generator=torch.Generator().manual_seed(3))
    c = augment_batch(batch, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    offsets, flip = draw_crop_flip(20_000, generator=torch.Generator().manual_seed(0))
    assert offsets.min() == 0 and offsets.max() == 8
    assert 0.48 < flip.float().mean() < 0.52
    assert abs(offsets.float().mean().item() - 4.0) < 0.05


def test_normalize_constant_image_by_hand():
    x = torch.empty(2, 3, 4, 5, dtype=torch.uint8)
    x[:, 0], x[:, 1], x[:, 2] = 0, 128, 255
    y = normalize(x)
    expect = [(0 / 255 - 0.4914) / 0.2470, (128 / 255 - 0.4822) / 0.2435, (1 - 0.4465) / 0.2616]
    for c in range(3):
        assert torch.allclose(y[:, c], torch.full((2, 4, 5), expect[c]), atol=1e-5)
    assert y.dtype == torch.float32
    assert normalize(x, channels_last=True).is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(normalize(x, channels_last=True), y)
    assert CIFAR10_MEAN == (0.4914, 0.4822, 0.4465) and CIFAR10_STD == (0.2470, 0.2435, 0.2616)


def test_bad_inputs_raise(batch):
    with pytest.raises(ValueError, match="uint8"):
        normalize(batch.float())
    with pytest.raises(ValueError, match="need 3 values"):
        normalize(batch, (0.5,), (0.5,))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        random_crop_flip(batch[0])
    with pytest.raises(ValueError, match="0..8"):
        random_crop_flip(
            batch, offsets=torch.full((6, 2), 9), flip=torch.zeros(6, dtype=torch.bool)
        )


def test_non_square_and_padding_zero():
    x = torch.arange(2 * 1 * 3 * 5, dtype=torch.uint8).view(2, 1, 3, 5)
    out = random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(2)) for i in range(2))
    offsets, flip = _fixed(2, 1, 3, True)
    out = random_crop_flip(x, padding=2, offsets=offsets, flip=flip)
    ref = F.pad(x, (2, 2, 2, 2))[:, :, 1:4, 3:8].flip(3)
    assert torch.equal(out, ref)

"""Patch second moments from the input map (compress/patch_moments.py) against their oracle,
im2col: ``patches(x)ᵀ patches(y)`` and the sum of the patches, for every geometry a stride-1
conv can have — kernels square and not, dilation, padding modes, Conv1d, groups, maps smaller
than the kernel's reach — and through the statistics that use them."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from bscompress.compress.calibrate import (
    StopForward,
    collect_patch_covariances,
    from_map,
    map_of,
    patches,
)
from bscompress.compress.paired import paired_covariance
from bscompress.compress.patch_moments import patch_gram, patch_sum, position_major

CONVS = [
    (nn.Conv2d, (6, 4, 3), dict(padding=1), (9, 11)),
    (nn.Conv2d, (6, 4, 3), dict(padding=0), (9, 11)),
    (nn.Conv2d, (4, 4, (3, 5)), dict(padding=(1, 2), dilation=(2, 1)), (12, 10)),
    (nn.Conv2d, (4, 6, 5), dict(padding=2), (7, 7)),
    (nn.Conv2d, (6, 4, 3), dict(padding=1, groups=2), (8, 8)),
    (nn.Conv2d, (4, 4, 3), dict(padding=1, padding_mode="reflect"), (6, 9)),
    (nn.Conv2d, (4, 4, 3), dict(padding=1, padding_mode="circular"), (5, 5)),
    (nn.Conv2d, (4, 4, 3), dict(padding=1), (1, 1)),  # every window is the whole map
    (nn.Conv2d, (4, 4, (2, 3)), dict(padding="same"), (4, 6)),  # an even kernel
    (nn.Conv1d, (6, 4, 5), dict(padding=2, groups=2), (13,)),
]
IDS = [f"{c[0].__name__}{c[1]}{c[2]}{c[3]}" for c in CONVS]


@pytest.mark.parametrize("cls,args,kw,size", CONVS, ids=IDS)
def test_gram_and_sum_equal_im2col(cls, args, kw, size):
    torch.manual_seed(0)
    conv = cls(*args, **kw)
    assert from_map(conv)
    x, y = torch.randn(3, conv.in_channels, *size), torch.randn(3, conv.in_channels, *size)
    (mx, shape), (my, _) = map_of(conv, x, None), map_of(conv, y, None)
    bx, by = position_major(mx, shape), position_major(my, shape)
    px, py = patches(conv, x).double(), patches(conv, y).double()
    gram = patch_gram(bx, by, shape, len(x), conv.groups).double()
    assert torch.allclose(gram, px.transpose(1, 2) @ py, atol=1e-4)
    second = patch_gram(bx, bx, shape, len(x), conv.groups)  # half the offsets, mirrored
    assert torch.allclose(second.double(), px.transpose(1, 2) @ px, atol=1e-4)
    assert torch.allclose(second, patch_gram(bx, bx.clone(), shape, len(x), conv.groups),
                          atol=1e-5)
    assert torch.allclose(patch_sum(bx, shape, len(x), conv.groups).double(), px.sum(1),
                          atol=1e-4)
    assert len(x) * shape.patches_per_image == px.shape[1]


def test_a_shift_moves_every_entry_of_the_patch_including_padding():
    """``position_major`` less a channel shift s is the map whose patches are p − s."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.rand(2, 3, 5, 5) + 5.0
    mx, shape = map_of(conv, x, None)
    shift = torch.tensor([5.0, 4.0, 6.0])
    buffer = position_major(mx, shape, shift)
    p = patches(conv, x).double() - shift.repeat_interleave(9).double()
    assert torch.allclose(patch_gram(buffer, buffer, shape, 2).double(),
                          p.transpose(1, 2) @ p, atol=1e-4)
    assert torch.allclose(patch_sum(buffer, shape, 2).double(), p.sum(1), atol=1e-4)


def test_strided_pointwise_and_large_kernel_convs_keep_im2col():
    """(Past 7×7 the tap pairs' overhead outweighs the map's fewer products.)"""
    assert not from_map(nn.Conv2d(4, 4, 3, stride=2))
    assert not from_map(nn.Conv2d(4, 4, 1))
    assert not from_map(nn.Linear(4, 4))
    assert from_map(nn.Conv2d(4, 4, 7)) and not from_map(nn.Conv2d(4, 4, 9))
    assert from_map(nn.Conv1d(4, 4, 49)) and not from_map(nn.Conv1d(4, 4, 50))


def _im2col_moments(conv: nn.Module, batches: list[torch.Tensor]) -> tuple:
    p = torch.cat([patches(conv, x) for x in batches], dim=1).double()  # [g, P, D]
    return p.transpose(1, 2) @ p / p.shape[1], p.mean(1), p.shape[1]


def test_collected_statistics_are_the_im2col_ones_under_a_large_mean():
    """A post-ReLU-like input with a mean 100× its spread: the shifted sums keep Σ's
    covariance to float32's precision of the spread, not of the mean."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, groups=3))
    batches = [100.0 + torch.rand(4, 3, 7, 7) for _ in range(3)]
    cov = collect_patch_covariances(model, batches, ["0"])["0"]
    second, mean, count = _im2col_moments(model[0], batches)
    assert cov.patches == count
    assert torch.allclose(cov.mean, mean, rtol=1e-6)
    oracle = second - mean[:, :, None] * mean[:, None, :]
    ours = cov.full - cov.mean[:, :, None] * cov.mean[:, None, :]
    assert torch.allclose(ours, oracle, atol=2e-4 * oracle.abs().max())


def test_paired_statistics_from_the_map_equal_im2col():
    torch.manual_seed(0)
    a, b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
    inputs = [(torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)) for _ in range(2)]

    def passes():
        for x, y in inputs:
            with torch.no_grad():
                for layer, data in ((a, x), (b, y)):
                    with contextlib.suppress(StopForward):  # the hooks stop each pass
                        layer(data)
            yield

    cov = paired_covariance(a, b, passes)
    p = torch.cat([patches(a, x) for x, _ in inputs], 1).double()
    q = torch.cat([patches(b, y) for _, y in inputs], 1).double()
    n = p.shape[1]
    assert cov.patches == n
    assert torch.allclose(cov.full, q.transpose(1, 2) @ q / n, atol=1e-5)
    y = p @ a.weight.detach().double().reshape(4, -1).T[None]  # the original's outputs
    assert torch.allclose(cov.cross, y.transpose(1, 2) @ q / n, atol=1e-5)
    assert torch.allclose(cov.target_energy, y.square().sum((1, 2)) / n, atol=1e-5)
    assert torch.allclose(cov.mean, q.mean(1), atol=1e-6)

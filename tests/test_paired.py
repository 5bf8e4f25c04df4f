"""The sequential fit's statistics (compress/paired.py) against their oracle: im2col patches
of both layers' inputs, the original's outputs y = W p computed from them, and the moments
E[p̃ p̃ᵀ], E[y p̃ᵀ], E‖y‖², E[y], E[p̃] taken directly; for every layer kind, through the
outputs and through the input pairs alike."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from bscompress.compress import paired
from bscompress.compress.calibrate import StopForward, _thin, collect_patch_covariances, patches
from bscompress.compress.paired import paired_covariance, through_outputs
from bscompress.core.covariance import centred
from bscompress.core.padding import input_padding
from bscompress.factorize.gsvd import paired_relative_error, sequential_target
from tests.test_conv_subclasses import Conv2dSame

LAYERS = {
    "3x3": (lambda: nn.Conv2d(6, 5, 3, padding=1), (7, 9)),
    "3x3 no padding, dilated": (lambda: nn.Conv2d(4, 6, 3, dilation=2), (9, 8)),
    "3x3 stride 2": (lambda: nn.Conv2d(6, 4, 3, stride=2, padding=1), (9, 9)),
    "1x1 reducing": (lambda: nn.Conv2d(8, 3, 1), (5, 6)),
    "1x1 expanding, stride 2": (lambda: nn.Conv2d(3, 8, 1, stride=2), (6, 6)),
    "grouped": (lambda: nn.Conv2d(6, 4, 3, padding=1, groups=2), (6, 7)),
    "depthwise": (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (6, 7)),
    "tf same (timm Conv2dSame)": (lambda: Conv2dSame(4, 5, 3), (6, 7)),
    "tf same, stride 2": (lambda: Conv2dSame(4, 5, 3, stride=2), (8, 7)),
    "reflect": (lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), (6, 6)),
    "conv1d": (lambda: nn.Conv1d(4, 5, 3, padding=1), (11,)),
    "linear": (lambda: nn.Linear(6, 3), (6,)),
}


def _inputs(layer: nn.Module, size: tuple, count: int = 3) -> list[tuple[torch.Tensor, ...]]:
    """Pairs (original's input, compressed network's input): post-ReLU-like, with a mean
    that dominates, and correlated between the two."""
    g = torch.Generator().manual_seed(0)
    channels = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    shape = (5, *size[:-1], channels) if isinstance(layer, nn.Linear) else (5, channels, *size)
    pairs = []
    for _ in range(count):
        x = torch.relu(torch.randn(shape, generator=g) + 1.5)
        pairs.append((x, x + 0.3 * torch.randn(shape, generator=g)))
    return pairs


def _collect(a: nn.Module, b: nn.Module, inputs, **kwargs):
    def passes():
        with torch.no_grad():
            for x, x_tilde in inputs:
                for layer, data in ((a, x), (b, x_tilde)):
                    with contextlib.suppress(StopForward):  # the hooks stop each pass
                        layer(data)
                yield

    return paired_covariance(a, b, passes, **kwargs)


def _kept(layer: nn.Module, x: torch.Tensor, limit: int | None) -> torch.Tensor:
    """The im2col patches of one batch that the statistics keep (every ⌈P/limit⌉-th)."""
    pad = None if isinstance(layer, nn.Linear) else input_padding(layer).spec
    p = patches(layer, x, pad)
    return p if limit is None else p[:, ::_thin(p.shape[1], limit)]


@pytest.mark.parametrize("way", ["outputs", "pairs"])
@pytest.mark.parametrize(("kind", "limit"), [(kind, None) for kind in LAYERS] + [
    ("3x3 stride 2", 7), ("1x1 reducing", 11), ("linear", 4)])  # patches thinned per batch
def test_paired_statistics_equal_the_moments_of_the_patches_and_outputs(kind, limit, way,
                                                                         monkeypatch):
    make, size = LAYERS[kind]
    torch.manual_seed(0)
    a = make().eval()
    b = make().eval()  # another layer of the same geometry: only its input is taken
    inputs = _inputs(a, size)
    monkeypatch.setattr(paired, "through_outputs", lambda _module: way == "outputs")
    cov = _collect(a, b, inputs, **({} if limit is None else {"max_patches_per_batch": limit}))

    p = torch.cat([_kept(a, x, limit) for x, _ in inputs], 1).double()  # [g, P, D]
    q = torch.cat([_kept(b, x, limit) for _, x in inputs], 1).double()
    groups = p.shape[0]
    w = a.weight.detach().double().reshape(groups, a.weight.shape[0] // groups, -1)
    y = p @ w.transpose(1, 2)  # [g, P, N/g]: the original's outputs, without the bias
    n = p.shape[1]
    assert cov.patches == n
    assert torch.allclose(cov.full, q.transpose(1, 2) @ q / n, rtol=1e-5, atol=1e-5)
    assert torch.allclose(cov.mean, q.mean(1), atol=1e-5)
    assert torch.allclose(cov.cross, y.transpose(1, 2) @ q / n, rtol=1e-5, atol=1e-5)
    assert torch.allclose(cov.target_energy, y.square().sum((1, 2)) / n, rtol=1e-5)
    assert torch.allclose(cov.target_mean, y.mean(1), atol=1e-5)
    # centred: the covariances of the same samples
    c = centred(cov)
    yc, qc = y - y.mean(1, keepdim=True), q - q.mean(1, keepdim=True)
    assert torch.allclose(c.cross, yc.transpose(1, 2) @ qc / n, atol=1e-5)
    assert torch.allclose(c.target_energy, yc.square().sum((1, 2)) / n, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("way", ["outputs", "pairs"])
def test_the_one_shot_statistics_of_the_original_stand_for_its_own(way, monkeypatch):
    """A layer through the input pairs takes E[p pᵀ] and E[p] from the one-shot Σ given;
    either way the statistics are those computed without it."""
    a, b = nn.Conv2d(4, 6, 1).eval(), nn.Conv2d(4, 6, 1).eval()
    inputs = _inputs(a, (5, 5))
    monkeypatch.setattr(paired, "through_outputs", lambda _module: way == "outputs")
    one_shot = collect_patch_covariances(a, [x for x, _ in inputs], [""])[""]
    given, computed = _collect(a, b, inputs, reference=one_shot), _collect(a, b, inputs)
    for key in ("full", "cross", "target_energy", "target_mean", "mean"):
        assert torch.allclose(getattr(given, key), getattr(computed, key), rtol=1e-6), key
    fewer = collect_patch_covariances(a, [inputs[0][0]], [""])[""]
    with pytest.raises(ValueError, match="patches"):
        _collect(a, b, inputs, reference=fewer)


def test_the_cheaper_way_is_chosen_by_the_layer_shape():
    assert through_outputs(nn.Conv2d(64, 64, 3, padding=1))  # 18·M² against 25·M²
    assert through_outputs(nn.Conv2d(64, 64, 3, stride=2))  # against 81·M² (im2col)
    assert through_outputs(nn.Conv2d(256, 64, 1))  # a bottleneck's reducing 1×1
    assert not through_outputs(nn.Conv2d(64, 256, 1))  # its expanding 1×1
    assert not through_outputs(nn.Conv2d(64, 256, 3, padding=1))  # 72·M² against 25·M²


def test_the_sequential_target_reproduces_the_original_outputs_from_the_new_inputs():
    """The least-squares oracle: W_eff = Y Σ̃⁻¹ is the weight that best maps the compressed
    network's patches to the original's outputs, and its error is the residual's."""
    torch.manual_seed(0)
    a, b = nn.Conv2d(4, 3, 3, padding=1).eval(), nn.Conv2d(4, 3, 3, padding=1).eval()
    inputs = _inputs(a, (6, 6))
    cov = _collect(a, b, inputs)
    p = torch.cat([_kept(a, x, None) for x, _ in inputs], 1).double()[0]
    q = torch.cat([_kept(b, x, None) for _, x in inputs], 1).double()[0]
    y = p @ a.weight.detach().double().reshape(3, -1).T
    oracle = torch.linalg.lstsq(q, y).solution.T  # [N, D]
    fitted = sequential_target(cov.cross, cov.full)
    assert torch.allclose(fitted[0], oracle, atol=1e-4)
    residual = (y - q @ oracle.T).square().sum() / y.square().sum()
    error = paired_relative_error(fitted, cov.full, cov.cross, cov.target_energy)
    assert error == pytest.approx(float(residual), rel=1e-3, abs=1e-7)

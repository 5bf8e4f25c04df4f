"""Centred statistics: the mean output error given back to a bias or the next BatchNorm, so
that the data-aware fits and the errors charged count only what varies (issue 19).

Oracles: the sample covariance of the patches themselves, the output mean of the original
network, and the dropped singular values of the whitened *centred* problem."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bscompress.compress.batchnorm import following_batchnorms
from bscompress.compress.calibrate import collect_patch_covariances, patches
from bscompress.compress.data_aware import absorb_mean, grouped, grouped_weight, merged, without
from bscompress.compress.decomposition import decompose
from bscompress.compress.paired import collect_paired_covariance
from bscompress.core.covariance import centred
from bscompress.core.plan import LayerPlan
from bscompress.core.surgery import Eligibility
from bscompress.factorize.gsvd import relative_output_error, whitened_lowrank
from bscompress.methods import RankOptions, get_method


def _shifted(seed: int, n: int = 3, c: int = 6, size: int = 8) -> list[torch.Tensor]:
    """Post-ReLU-like inputs: a large common mean on top of what varies."""
    g = torch.Generator().manual_seed(seed)
    return [torch.relu(torch.randn(8, c, size, size, generator=g) + 1.5) for _ in range(n)]


def _sample_patches(conv: nn.Module, data) -> torch.Tensor:
    return torch.cat([patches(conv, x) for x in data], dim=1).double()  # [g, P, D]


@pytest.mark.parametrize("groups", [1, 2])
def test_centred_statistics_are_the_sample_covariance(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, 3, padding=1, groups=groups).eval()
    data = _shifted(0)
    cov = collect_patch_covariances(conv, data, [""])[""]
    p = _sample_patches(conv, data)
    mean = p.mean(1)
    assert torch.allclose(cov.mean, mean, atol=1e-6)
    c = centred(cov)
    assert c.centred and centred(c) is c
    oracle = (p - mean[:, None]).transpose(1, 2) @ (p - mean[:, None]) / p.shape[1]
    assert torch.allclose(c.full, oracle, atol=1e-5)
    k = 9
    blocks = oracle.reshape(groups, 6 // groups, k, 6 // groups, k).diagonal(dim1=1, dim2=3)
    assert torch.allclose(c.blocks, blocks.permute(0, 3, 1, 2), atol=1e-5)


def test_without_keeps_the_means_of_the_rest():
    conv = nn.Conv2d(6, 4, 1).eval()
    data = _shifted(1, n=4)
    everything = collect_patch_covariances(conv, data, [""])[""]
    part = collect_patch_covariances(conv, data[3:], [""])[""]
    rest = collect_patch_covariances(conv, data[:3], [""])[""]
    left = without(everything, part)
    assert torch.allclose(left.mean, rest.mean, atol=1e-6)
    assert torch.allclose(centred(left).full, centred(rest).full, atol=1e-5)
    with pytest.raises(ValueError, match="uncentred"):
        without(centred(everything), part)


@pytest.mark.parametrize("max_bytes", [1 << 30, 0])  # full Σ, and the K×K blocks only
def test_merged_parts_are_the_statistics_of_all_the_data(max_bytes):
    conv = nn.Conv2d(6, 4, 3, padding=1).eval()
    data = _shifted(2, n=4)
    everything = collect_patch_covariances(conv, data, [""], max_bytes)[""]
    first = collect_patch_covariances(conv, data[:3], [""], max_bytes)[""]
    last = collect_patch_covariances(conv, data[3:], [""], max_bytes)[""]
    both = merged(first, last)
    assert both.patches == everything.patches
    assert torch.allclose(both.mean, everything.mean, atol=1e-6)
    assert torch.allclose(both.blocks, everything.blocks, atol=1e-5)
    assert (both.full is None) == (everything.full is None)
    if both.full is not None:
        assert torch.allclose(both.full, everything.full, atol=1e-5)
    assert torch.allclose(without(both, last).blocks, first.blocks, atol=1e-5)
    with pytest.raises(ValueError, match="uncentred"):
        merged(centred(first), last)


def test_paired_statistics_centre_like_the_patches():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(6, 4, 3, padding=1)).eval()
    compressed = copy.deepcopy(original)
    with torch.no_grad():
        compressed[0].weight.mul_(0.8)
    data = _shifted(2)
    cov = centred(collect_paired_covariance(original, compressed, "2", data))
    with torch.no_grad():
        p = _sample_patches(original[2], [original[:2](x) for x in data])[0]
        q = _sample_patches(compressed[2], [compressed[:2](x) for x in data])[0]
    y = p @ original[2].weight.detach().double().reshape(4, -1).T  # its outputs, no bias
    y, q = y - y.mean(0), q - q.mean(0)
    n = len(p)
    assert torch.allclose(cov.full[0], q.T @ q / n, atol=1e-5)
    assert torch.allclose(cov.cross[0], y.T @ q / n, atol=1e-5)
    assert torch.allclose(cov.target_energy[0], y.square().sum() / n, atol=1e-5)


def test_paired_statistics_stop_each_pass_at_the_layer():
    """The layers after the one fitted do not run (half the sequential passes' cost)."""
    original = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    compressed = copy.deepcopy(original)
    calls = []
    for model in (original, compressed):
        model[3].register_forward_hook(lambda *_: calls.append(1))
    cov = collect_paired_covariance(original, compressed, "2", _shifted(3, c=3))
    assert calls == [] and cov.patches == 3 * 8 * 8 * 8
    assert original(torch.zeros(1, 3, 8, 8)).shape == (1, 2, 8, 8)  # the hooks are gone
    assert len(calls) == 1


def test_following_batchnorms_are_found_by_the_tensor_they_take():
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)
            self.other, self.bn2 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
            self.last, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            x = self.bn(self.conv(x))
            x = self.bn2(torch.relu(self.other(x)))  # an activation in between
            return self.bn3(self.last(x) + x)  # a residual sum in between

    model = Custom().eval()
    found = following_batchnorms(model, ["conv", "other", "last"], torch.randn(1, 3, 4, 4))
    assert found == {"conv": model.bn}
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    assert following_batchnorms(seq, ["0"], torch.randn(1, 3, 5, 5)) == {"0": seq[1]}
    # the same tensor object, changed in place on the way: not the layer's output any more
    inplace = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(4)).eval()
    assert following_batchnorms(inplace, ["0"], torch.randn(1, 3, 5, 5)) == {}

    class Inference(nn.Module):  # tensors without a version counter
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            with torch.inference_mode():
                return self.bn(self.conv(x))

    odd = Inference().eval()
    assert following_batchnorms(odd, ["conv"], torch.randn(1, 3, 4, 4)) == {"conv": odd.bn}


@pytest.mark.parametrize("method", ["svd", "bsconv-u", "dsc", "tucker2"])
def test_the_mean_error_goes_to_the_bias_exactly(method):
    torch.manual_seed(0)
    kernel = 1 if method == "svd" else 3
    conv = nn.Conv2d(6, 8, kernel, padding=kernel // 2).eval()
    data = _shifted(3)
    cov = collect_patch_covariances(conv, data, [""])[""]
    impl = get_method(method)
    entry = LayerPlan("conv", "Conv2d", method=method)
    entry.ranks, entry.options = impl.choose(conv, RankOptions(rank=1, tucker_ranks=0.25))
    block, _ = impl.build(conv, entry)
    assert absorb_mean(conv, block, cov) == "mean → bias"
    with torch.no_grad():
        ours = torch.cat([block(x) for x in data])
        theirs = torch.cat([conv(x) for x in data])
    # the oracle: a dense conv holding the reconstructed weight, bias corrected by (W − Ŵ) μ
    assert torch.allclose(ours.mean(dim=(0, 2, 3)), theirs.mean(dim=(0, 2, 3)), atol=1e-4)
    error = float((ours - theirs).square().sum())
    energy = float((theirs - theirs.mean(dim=(0, 2, 3), keepdim=True)).square().sum())
    predicted = relative_output_error(grouped_weight(conv), grouped(block.to_dense(), 1),
                                      centred(cov).full)
    assert error / energy == pytest.approx(predicted, rel=1e-3)


def test_the_mean_error_goes_to_the_next_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 8, 1, bias=False), nn.BatchNorm2d(8)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    data = _shifted(4)
    cov = collect_patch_covariances(model, data, ["0"])["0"]
    compressed = copy.deepcopy(model)
    entry = LayerPlan("0", "Conv2d", method="svd", ranks={"rank": 2})
    compressed[0], _ = get_method("svd").build(model[0], entry)
    assert absorb_mean(model[0], compressed[0], cov, compressed[1]) == "mean → next BatchNorm"
    with torch.no_grad():
        ours, theirs = torch.cat([compressed(x) for x in data]), torch.cat([model(x)
                                                                              for x in data])
    assert torch.allclose(ours.mean(dim=(0, 2, 3)), theirs.mean(dim=(0, 2, 3)), atol=1e-4)


def test_calibrated_svd_reaches_the_centred_optimum():
    """The 1×1 conv's error inside the network is the dropped singular values of W C^½ with
    C the covariance of its inputs: the optimum once the mean is given back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 12, 1), nn.ReLU(), nn.Conv2d(12, 10, 1),
                          nn.BatchNorm2d(10)).eval()
    data = _shifted(5, n=4)
    compressed, plan = decompose(copy.deepcopy(model), "svd", (1, 6, 8, 8),
                                 RankOptions(rank=3), Eligibility(include=("2",)),
                                 calibration=data, holdout=0, reestimate_bn=False)
    entry = plan.replaced()[0]
    assert entry.fit.endswith("centred (mean → bias)")
    with torch.no_grad():
        inputs = [model[:2](x) for x in data]
    p = _sample_patches(model[2], inputs)[0]
    c = torch.cov(p.T, correction=0)
    _, _, spectrum = whitened_lowrank(grouped_weight(model[2]), c[None], 3)
    w = grouped_weight(model[2])[0]
    optimum = float(spectrum[0, 3:].square().sum() / torch.einsum("nd,de,ne->", w, c, w))
    assert entry.output_error == pytest.approx(optimum, rel=1e-4)
    with torch.no_grad():
        ours = torch.cat([compressed[2](x) for x in inputs])
        theirs = torch.cat([model[2](x) for x in inputs])
    energy = float((theirs - theirs.mean(dim=(0, 2, 3), keepdim=True)).square().sum())
    assert float((ours - theirs).square().sum()) / energy == pytest.approx(optimum, rel=1e-3)


def test_without_bias_or_batchnorm_the_fit_stays_uncentred():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 12, 1), nn.ReLU(), nn.Conv2d(12, 10, 1, bias=False),
                          nn.ReLU()).eval()
    _, plan = decompose(copy.deepcopy(model), "svd", (1, 6, 8, 8), RankOptions(rank=3),
                        Eligibility(include=("2",)), calibration=_shifted(6, n=4), holdout=0)
    assert "centred" not in plan.replaced()[0].fit


def test_a_decomposition_with_centring_keeps_the_output_mean_on_other_data():
    """The network-level effect: with post-ReLU inputs of large mean, a rank-1 data-aware
    fit keeps the output mean of the original on data it was not fitted on, where the
    data-free fit of the same rank does not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 12, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(12, 10, 3, padding=1), nn.BatchNorm2d(10)).eval()
    calib, other = _shifted(7, n=4), _shifted(8, n=2)
    args = ("bsconv-u", (1, 6, 8, 8), RankOptions(rank=1), Eligibility(include=("2",)))
    aware, _ = decompose(copy.deepcopy(model), *args, calibration=calib, holdout=0)
    free, _ = decompose(copy.deepcopy(model), *args)

    def mean_error(net: nn.Module) -> float:
        with torch.no_grad():
            ours = torch.cat([net(x) for x in other]).mean(dim=(0, 2, 3))
            theirs = torch.cat([model(x) for x in other]).mean(dim=(0, 2, 3))
        return float((ours - theirs).abs().max())

    assert mean_error(aware) < 0.2 * mean_error(free)

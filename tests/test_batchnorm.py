"""BatchNorm correction after compression: exact for an affine distortion on any data, plain
re-estimation on representative data, kept only where the held-out error goes down."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bscompress.compress import batchnorm
from bscompress.compress.batchnorm import (
    OriginalSeen,
    correct_batchnorm,
    correct_batchnorm_checked,
    held_out_output_error,
    network_outputs,
)
from bscompress.compress.calibrate import collect_patch_covariances, reestimate_batchnorm
from bscompress.core.errors import BadInput


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():  # trained-looking statistics, not the defaults
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net.eval()


def _distorted(net: nn.Module) -> nn.Module:
    """The first conv's output channels scaled and shifted: BN 1's input is a·x + b exactly."""
    other = copy.deepcopy(net)
    torch.manual_seed(1)
    a = torch.rand(8) * 1.5 + 0.5
    b = torch.randn(8)
    with torch.no_grad():
        other[0].weight.mul_(a.view(-1, 1, 1, 1))
        other[0].bias.mul_(a).add_(b)
    return other


def test_an_affine_distortion_is_undone_exactly_from_narrow_data():
    net = _net()
    compressed = _distorted(net)
    narrow = [torch.randn(16, 3, 6, 6) * 0.3 + 2.0 for _ in range(3)]  # far from "training"
    other = torch.randn(32, 3, 6, 6)
    assert not torch.allclose(compressed(other), net(other), atol=1e-3)
    assert correct_batchnorm(compressed, net, narrow) == 2
    # the second BatchNorm's input is now the original's: its statistics barely move
    assert torch.allclose(compressed(other), net(other), atol=1e-4)
    assert torch.allclose(compressed[4].running_mean, net[4].running_mean, atol=1e-4)


def test_plain_reestimation_is_the_special_case_of_representative_data():
    net = _net()
    data = [torch.randn(64, 3, 6, 6) for _ in range(4)]
    reestimate_batchnorm(net, data)  # the "training" statistics are those of the data
    compressed = _distorted(net)
    compressed[3].weight.data.mul_(0.9)  # and the second stage changed too
    plain = copy.deepcopy(compressed)
    reestimate_batchnorm(plain, data)
    correct_batchnorm(compressed, net, data)
    for ours, theirs in ((compressed[1], plain[1]), (compressed[4], plain[4])):
        assert torch.allclose(ours.running_mean, theirs.running_mean, atol=1e-4)
        # running_var is unbiased, the moments biased: n/(n−1) apart
        assert torch.allclose(ours.running_var, theirs.running_var, rtol=1e-2)


def test_a_channel_without_variance_keeps_its_trained_variance():
    net = _net()
    with torch.no_grad():
        net[0].weight[2] = 0.0  # channel 2 of BN 1 is constant on every input
    compressed = copy.deepcopy(net)
    with torch.no_grad():
        compressed[0].bias[2] += 0.5
    correct_batchnorm(compressed, net, [torch.randn(32, 3, 6, 6)])
    assert torch.isfinite(compressed[1].running_var).all()
    assert compressed[1].running_var[2] == pytest.approx(float(net[1].running_var[2]))
    assert compressed[1].running_mean[2] == pytest.approx(float(net[1].running_mean[2]) + 0.5,
                                                          abs=1e-5)


def test_too_few_samples_are_refused_before_anything_changes():
    net = _net()
    compressed = _distorted(net)
    state = copy.deepcopy(compressed.state_dict())
    with pytest.raises(BadInput, match="BatchNorm"):
        correct_batchnorm(compressed, net, [torch.randn(4, 3, 6, 6)])
    assert all(torch.equal(v, compressed.state_dict()[k]) for k, v in state.items())


def test_the_originals_outputs_stand_for_it_within_their_byte_bound():
    net = _net()
    held = [torch.randn(16, 3, 6, 6), torch.randn(8, 3, 6, 6)]
    compressed = _distorted(net)
    targets = network_outputs(net, held)
    assert [t.shape[0] for t in targets] == [16, 8]
    assert held_out_output_error(compressed, targets, held) == pytest.approx(
        held_out_output_error(compressed, net, held), rel=1e-12)
    assert network_outputs(net, held, max_bytes=8) is net  # over the bound: the network
    assert torch.is_grad_enabled()  # left as it was


def test_the_correction_is_kept_only_where_the_held_out_error_goes_down(monkeypatch):
    net = _net()
    data = [torch.randn(16, 3, 6, 6) for _ in range(3)]
    held = [torch.randn(16, 3, 6, 6)]
    compressed = _distorted(net)
    before = held_out_output_error(compressed, net, held)
    result = correct_batchnorm_checked(compressed, net, data, held)
    assert result["kept"] and result["corrected"] == 2
    assert result["held_out_error"]["after"] < before == result["held_out_error"]["before"]

    def scramble(model, reference, batches, seen=None):  # a correction that does harm
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(3.0)
        return 2

    worse = _distorted(net)
    state = copy.deepcopy(worse.state_dict())
    monkeypatch.setattr(batchnorm, "correct_batchnorm", scramble)
    result = correct_batchnorm_checked(worse, net, data, held)
    assert not result["kept"] and result["corrected"] == 0
    assert all(torch.equal(v, worse.state_dict()[k]) for k, v in state.items())
    assert "in_sample" not in result
    # too few samples to hold any out: checked on the calibration batches themselves
    result = correct_batchnorm_checked(worse, net, data)
    assert not result["kept"] and result["in_sample"]
    assert all(torch.equal(v, worse.state_dict()[k]) for k, v in state.items())
    assert result["held_out_error"]["before"] == held_out_output_error(worse, net, data)


def test_networks_return_to_their_modes():
    net = _net().train()
    compressed = _distorted(net).train()
    correct_batchnorm(compressed, net, [torch.randn(32, 3, 6, 6)])
    assert net.training and compressed.training


def test_moments_merged_batch_by_batch_equal_those_of_all_the_values(monkeypatch):
    """Chan's merge of per-batch moments: the mean and variance of every value at once
    (float64 oracle), under a large mean (post-ReLU activations), for 2-D, 3-D and 4-D inputs,
    channels-last ones summed in chunks of rows (several here) too."""
    from bscompress.compress import batchnorm
    from bscompress.compress.batchnorm import _Moments

    generator = torch.Generator().manual_seed(0)
    cases = [((7, 5), None), ((6, 5, 9), None), ((4, 5, 3, 3), None),
             ((4, 5, 6, 7), torch.channels_last)]
    for shape, layout in cases:
        batches = [1000 + 3 * torch.randn((k, *shape[1:]), generator=generator)
                   for k in (shape[0], 1, shape[0] + 2)]
        if layout is not None:
            batches = [x.contiguous(memory_format=layout) for x in batches]
            monkeypatch.setattr(batchnorm, "CHUNK_ELEMENTS", 5 * 16)  # 16 rows a chunk
        moments = _Moments(5)
        for x in batches:
            moments.add(x)
        every = torch.cat(batches).double().transpose(0, 1).reshape(5, -1)
        mean, var = moments.mean_var()
        assert torch.allclose(mean, every.mean(1), rtol=1e-7)
        assert torch.allclose(var, every.var(1, correction=0), rtol=1e-4)
        assert moments.count == every.shape[1]


def test_what_the_statistics_pass_saw_of_the_original_is_not_run_again():
    """The original's BatchNorm inputs (fitting batches) and outputs (held-out batches),
    recorded by the statistics pass, give the correction of a run of its own without
    running the original; other batches than those seen run it."""
    net = _net()
    data = [torch.randn(16, 3, 6, 6) * 0.3 + 2.0 for _ in range(3)]
    held = [torch.randn(16, 3, 6, 6) * 0.3 + 2.0]
    observed = OriginalSeen()
    collect_patch_covariances(net, data, ["3"], observe=lambda: observed.moment_hooks(net))
    collect_patch_covariances(net, held, ["3"], observe=lambda: observed.output_hooks(net))
    assert observed.covers("moments", data) and observed.covers("outputs", held)
    assert not observed.covers("moments", held)
    plain, reused, third = _distorted(net), _distorted(net), _distorted(net)
    calls = []
    net.register_forward_pre_hook(lambda *_: calls.append(1))  # after the copies
    expected = correct_batchnorm_checked(plain, net, data, held)
    ran = len(calls)
    result = correct_batchnorm_checked(reused, net, data, held, observed)
    assert len(calls) == ran  # the original did not run
    assert result["corrected"] == expected["corrected"] == 2
    assert result["held_out_error"]["before"] == pytest.approx(
        expected["held_out_error"]["before"], rel=1e-12)
    # the same correction: the moments replayed batch by batch
    for ours, theirs in ((reused[1], plain[1]), (reused[4], plain[4])):
        assert torch.equal(ours.running_mean, theirs.running_mean)
        assert torch.equal(ours.running_var, theirs.running_var)
    other = [x + 1.0 for x in data]
    correct_batchnorm_checked(third, net, other, held, observed)
    assert len(calls) > ran  # batches it did not see: the original runs

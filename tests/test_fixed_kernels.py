"""``--fixed-kernels``: matched depthwise kernels and blueprints become fixed buffers with their
own sign and scale, identity blueprints reduce a block to its 1×1 conv, archives reload."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bscompress.app.cli import app
from bscompress.core.errors import BadInput
from bscompress.core.plan import LayerPlan, Plan
from bscompress.core.records import Summary
from bscompress.core.stats import count_params, module_macs
from bscompress.core.surgery import apply_plan
from bscompress.factorize.kernel_bank import gaussian_kernel, kernel_bank
from bscompress.io.archive import load_model
from bscompress.layers import BSConvU, DSConv, FixedKernelConv
from bscompress.transforms.fixed_kernels import FixedKernelOptions, fix_kernels

NETS = Path(__file__).parent / "nets.py"


class DepthwiseNet(nn.Module):
    """A stride-1 and a stride-2 depthwise conv with planted kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.dw1 = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.dw2 = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4)

    def forward(self, x):
        return self.dw2(self.dw1(x).relu())


def _planted() -> DepthwiseNet:
    torch.manual_seed(0)
    net = DepthwiseNet()
    names, bank = kernel_bank((3, 3))
    with torch.no_grad():
        for conv in (net.dw1, net.dw2):
            conv.weight[0, 0] = -2.5 * gaussian_kernel((3, 3), 1.0)   # a negative Gaussian
            conv.weight[1, 0] = 0.7 * bank[names.index("sobel x")]
            conv.weight[2, 0] = 1.3 * bank[names.index("identity")]
            # channel 3 stays random
    return net


def test_bank_mode_fixes_the_planted_kernels_exactly():
    net = _planted()
    reference = copy.deepcopy(net)
    model, plan = fix_kernels(net, None, (1, 4, 8, 8), FixedKernelOptions("bank", 0.99))
    for name in ("dw1", "dw2"):
        block = getattr(model, name)
        assert isinstance(block, FixedKernelConv) and block.fixed_indices == [0, 1, 2]
        assert torch.allclose(block.to_dense(), getattr(reference, name).weight, atol=1e-6)
    fixed = plan.summary.fixed_kernels
    assert (fixed.gaussian, fixed.edge, fixed.identity, fixed.negative) == (2, 2, 2, 2)
    x = torch.randn(2, 4, 8, 8)
    assert torch.allclose(model(x), reference(x), atol=1e-5)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert not any(b.requires_grad for b in model.buffers())


def test_strided_gaussian_touches_strided_gaussians_only():
    model, plan = fix_kernels(_planted(), None, (1, 4, 8, 8),
                              FixedKernelOptions("strided-gaussian", 0.99))
    assert isinstance(model.dw1, nn.Conv2d) and isinstance(model.dw2, FixedKernelConv)
    assert model.dw2.fixed_indices == [0]
    assert plan.summary.fixed_kernels.kernels == 4  # the strided layer's kernels examined
    assert [e.name for e in plan.replaced()] == ["dw2"]


def _identity_block(kind: str) -> tuple[nn.Module, nn.Module]:
    """The original conv, and its block whose spatial kernels are all scaled identities."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1)
    block = BSConvU.from_conv(conv, 1) if kind == "bsconv-u" else DSConv.from_conv(conv, 2)
    with torch.no_grad():
        weight = block.dw.weight
        weight.zero_()
        weight[:, :, 1, 1] = torch.randn(weight.shape[:2]) + 2.0
    return conv, block


@pytest.mark.parametrize("kind", ["bsconv-u", "dsc"])
def test_identity_blueprints_reduce_the_block_to_its_pointwise_conv(kind):
    conv, block = _identity_block(kind)
    original = nn.Sequential()
    original.add_module("conv", conv)
    net = copy.deepcopy(original)
    net.conv = block
    reference = copy.deepcopy(net)
    shape = (1, 6, 7, 7)
    plan = Plan([LayerPlan("conv", "Conv2d", kind, {"rank": 1 if kind == "bsconv-u" else 2},
                           params_before=6 * 8 * 9 + 8,
                           macs_before=module_macs(block, shape).macs)],
                input_shape=list(shape), summary=Summary(params_before=440, macs_before=0))
    model, plan = fix_kernels(net, plan, shape, FixedKernelOptions("identity"))
    assert type(model.conv) is nn.Conv2d and model.conv.kernel_size == (1, 1)
    assert plan.summary.fixed_kernels.dropped_blocks == 1
    assert count_params(model.conv) < count_params(reference.conv)
    assert module_macs(model, shape).macs < module_macs(reference, shape).macs
    x = torch.randn(3, 6, 7, 7)
    assert torch.allclose(model(x), reference(x), atol=1e-5)
    # the plan rebuilds the 1×1 structure from the original architecture, as archives do
    rebuilt = apply_plan(original, plan)
    rebuilt.load_state_dict(model.state_dict())
    assert torch.allclose(rebuilt(x), model(x), atol=1e-6)


def test_fixed_blueprints_reload_from_an_archive(tmp_path):
    runner = CliRunner()
    torch.manual_seed(0)
    from tests.nets import TinyNet

    ckpt = tmp_path / "tiny.pt"
    torch.save(TinyNet().state_dict(), ckpt)
    out = tmp_path / "fixed.pt"
    result = runner.invoke(app, ["decompose", str(ckpt), "--arch", f"{NETS}:TinyNet",
                                 "-m", "bsconv-u", "--fixed-kernels", "bank", "--match", "0.5",
                                 "-o", str(out), "--input-shape", "1,3,16,16"])
    assert result.exit_code == 0, result.stderr
    assert "fixed kernels (bank" in result.stdout
    loaded = load_model(out)
    assert loaded.plan.summary.fixed_kernels.layers >= 1
    assert any(isinstance(m, FixedKernelConv) for m in loaded.model.modules())
    alone = runner.invoke(app, ["decompose", str(ckpt), "--arch", f"{NETS}:TinyNet", "-m",
                                "none", "--fixed-kernels", "bank", "--match", "0.5", "-o",
                                str(tmp_path / "none.pt"), "--input-shape", "1,3,16,16"])
    assert alone.exit_code == 0, alone.stderr  # the depthwise conv of TinyNet alone


@pytest.mark.parametrize("args,message", [
    (["-m", "none"], "add --fixed-kernels"),
    (["--fixed-kernels", "sobel"], "--fixed-kernels must be 'strided-gaussian', 'bank' or "
                                   "'identity', got 'sobel'"),
    (["--fixed-kernels", "bank", "--match", "1.5"], "--match: input should be less than or "
                                                    "equal to 1"),
])
def test_bad_fixed_kernel_options_exit_2(tmp_path, args, message):
    result = CliRunner().invoke(app, ["decompose", "torchvision:resnet18", *args, "-o",
                                      str(tmp_path / "x.pt")])
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "x.pt").exists()


def test_options_validate():
    with pytest.raises(BadInput):
        FixedKernelOptions("bank", 0.0)


@pytest.mark.parametrize("kind", ["bsconv-u", "dsc"])
def test_a_block_with_fixed_kernels_equals_its_dense_conv(kind):
    """Oracle: an nn.Conv2d holding the block's to_dense() once some kernels are fixed."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1)
    block = BSConvU.from_conv(conv, 1) if kind == "bsconv-u" else DSConv.from_conv(conv, 2)
    with torch.no_grad():
        block.dw.weight[:2, 0] = -1.7 * gaussian_kernel((3, 3), 1.5)
    net = nn.Sequential()
    net.add_module("conv", block)
    plan = Plan([LayerPlan("conv", "Conv2d", kind, {})], input_shape=[1, 6, 9, 9],
                summary=Summary(params_before=0, macs_before=0))
    model, _ = fix_kernels(net, plan, (1, 6, 9, 9), FixedKernelOptions("strided-gaussian", 0.99))
    assert isinstance(model.conv.dw, FixedKernelConv) and model.conv.dw.fixed_indices == [0, 1]
    dense = nn.Conv2d(6, 8, 3, stride=2, padding=1)
    with torch.no_grad():
        dense.weight.copy_(model.conv.to_dense())
        dense.bias.copy_(model.conv(torch.zeros(1, 6, 9, 9))[0, :, 2, 2])
    x = torch.randn(2, 6, 9, 9)
    assert torch.allclose(model(x), dense(x), atol=1e-5)


def test_blocks_without_a_depthwise_stage_are_counted_and_left_alone():
    from bscompress.compress.decomposition import decompose
    from bscompress.methods import RankOptions
    from tests.nets import INPUT_SHAPE, TinyNet

    torch.manual_seed(0)
    model, plan = decompose(TinyNet(), "bsconv-u", INPUT_SHAPE, RankOptions(rank=2))
    model, plan = fix_kernels(model, plan, INPUT_SHAPE, FixedKernelOptions("bank", 0.01))
    fixed = plan.summary.fixed_kernels
    assert fixed.unsupported_blocks == len(plan.replaced()) - fixed.layers > 0


def test_fixed_kernels_alone_on_a_model_without_depthwise_kernels_exit_2(tmp_path):
    """-m none --fixed-kernels on a network with no k×k depthwise conv (1×1 convs only, or
    Conv1d) would write it unchanged with exit 0: refused in a sentence, nothing written."""
    source = tmp_path / "pw.py"
    source.write_text("import torch\nfrom torch import nn\nINPUT_SHAPE = (1, 8, 8, 8)\n"
                      "def net():\n    return nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), "
                      "nn.Conv2d(16, 8, 1))\n")
    out = tmp_path / "x.pt"
    result = CliRunner().invoke(app, ["decompose", f"{source}:net", "-m", "none",
                                      "--fixed-kernels", "bank", "-o", str(out)])
    assert result.exit_code == 2 and "found no depthwise 2-D kernel" in result.stderr, (
        result.stderr)
    assert not out.exists()


# ------------------------------------------------------------------ matching on calibration data


def _maps(channels: int = 4, seed: int = 0) -> torch.Tensor:
    """Smooth, positive feature maps with a large mean (as after a ReLU): the data metric and
    the weight metric then disagree."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(8, channels, 12, 12, generator=g, dtype=torch.float64)
    x = nn.functional.avg_pool2d(x, 3, stride=1, padding=1)
    return 2.0 + x


def _moments(x: torch.Tensor, kernel: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ and μ of each channel's zero-padded 3×3 patches of ``x``, by im2col."""
    n, c = x.shape[:2]
    p = nn.functional.unfold(x, kernel, padding=kernel // 2)            # [n, c·K, L]
    p = p.reshape(n, c, kernel * kernel, -1).permute(1, 0, 3, 2).reshape(c, -1, kernel**2)
    return torch.einsum("cni,cnj->cij", p, p) / p.shape[1], p.mean(1)


def test_matching_on_data_gives_the_least_squares_scale_and_the_output_error():
    """Oracle: the depthwise conv of each kernel and of its scaled member on the maps
    themselves. s minimises the output error, and 1 − ρ² is that error over the output's
    variance; with Σ = I and μ = 0 the weight-space match is returned."""
    from bscompress.factorize.kernel_bank import match_bank

    x = _maps()
    g = torch.Generator().manual_seed(1)
    kernels = torch.randn(4, 3, 3, generator=g, dtype=torch.float64)
    names, bank = kernel_bank((3, 3))
    found = match_bank(kernels, bank, _moments(x))
    for c in range(4):
        member = bank[found.index[c]]
        y = nn.functional.conv2d(x[:, c:c + 1], kernels[c][None, None], padding=1)
        fixed = nn.functional.conv2d(x[:, c:c + 1], member[None, None], padding=1)
        best = float((y * fixed).sum() / fixed.square().sum())          # least squares
        assert float(found.scale[c]) == pytest.approx(best, rel=1e-9)
        error = float((y - best * fixed).square().mean())
        assert 1 - float(found.correlation[c]) ** 2 == pytest.approx(
            error / float(y.var(unbiased=False)), rel=1e-7)
        others = [float(nn.functional.conv2d(x[:, c:c + 1], b[None, None], padding=1)
                        .flatten().dot(y.flatten()) ** 2
                        / nn.functional.conv2d(x[:, c:c + 1], b[None, None], padding=1)
                        .square().sum()) for b in bank]
        assert max(others) == pytest.approx(others[int(found.index[c])], rel=1e-9)
    eye = torch.eye(9, dtype=torch.float64).expand(4, 9, 9)
    plain, identity = match_bank(kernels, bank), match_bank(kernels, bank,
                                                            (eye, torch.zeros(4, 9)))
    assert torch.equal(plain.index, identity.index)
    assert torch.allclose(plain.correlation, identity.correlation)
    assert torch.allclose(plain.scale, identity.scale)


class _SmoothNet(nn.Module):
    """A depthwise conv on smooth maps with a mean, then a BatchNorm and a classifier."""

    INPUT_SHAPE = (1, 4, 12, 12)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.dw = nn.Conv2d(4, 8, 3, padding=1, groups=4, bias=False)  # channel multiplier 2
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.bn(self.dw(x)).relu().mean((2, 3)))


def test_fix_kernels_on_calibration_data_records_the_metric_and_the_output_change():
    net = _SmoothNet().eval()
    x = _maps().float()
    with torch.no_grad():
        net.bn.running_mean.copy_(net.dw(x).mean((0, 2, 3)))
        net.bn.running_var.copy_(net.dw(x).var((0, 2, 3)))
    reference = copy.deepcopy(net)
    model, plan = fix_kernels(net, None, net.INPUT_SHAPE, FixedKernelOptions("bank", 0.5),
                              [x[:4], x[4:]])
    fixed = plan.summary.fixed_kernels
    assert fixed.metric == "inputs" and fixed.weight_metric == {}
    assert fixed.measured_on == "calibration data"
    assert isinstance(model.dw, FixedKernelConv) and model.dw.fixed_indices
    with torch.no_grad():
        y0, y = reference(x).double(), model(x).double()
    change = float((y - y0).square().sum() / y0.square().sum())
    assert fixed.output_change == pytest.approx(change, rel=1e-4)
    assert fixed.agreement == float((y.argmax(1) == y0.argmax(1)).float().mean())
    # each fixed kernel's output error, over its output variance, is at most 1 − 0.5²
    sigma, mean = _moments(x.double())
    for c in model.dw.fixed_indices:
        k0 = reference.dw.weight.detach()[c, 0].double()
        k = model.dw.to_dense().detach()[c, 0].double()
        s, m = sigma[c // 2], mean[c // 2]
        error = float((k - k0).flatten() @ s @ (k - k0).flatten())
        variance = float(k0.flatten() @ s @ k0.flatten() - (k0.flatten() @ m) ** 2)
        assert error <= (1 - 0.5**2) * variance * 1.02  # the 1% shrinkage of the covariance


def test_a_conv_the_calibration_never_reaches_is_matched_on_its_weights():
    class Branch(nn.Module):
        INPUT_SHAPE = (1, 4, 12, 12)

        def __init__(self) -> None:
            super().__init__()
            self.dw, self.other = _planted().dw1, _planted().dw2

        def forward(self, x):
            return self.other(x) if float(x.mean()) > 100 else self.dw(x)

    net = Branch()
    model, plan = fix_kernels(net, None, net.INPUT_SHAPE, FixedKernelOptions("bank", 0.99),
                              [_maps().float()])
    fixed = plan.summary.fixed_kernels
    assert set(fixed.weight_metric) == {"other"}
    assert "never reached" in fixed.weight_metric["other"]
    assert model.other.fixed_indices == [0, 1, 2]  # the planted kernels, on their weights


def test_fixed_kernels_matched_on_data_reload_from_an_archive_and_warn(tmp_path):
    source = tmp_path / "smooth.py"
    source.write_text(
        "import torch\nfrom torch import nn\n\n\nclass Net(nn.Module):\n"
        "    INPUT_SHAPE = (1, 3, 16, 16)\n\n    def __init__(self):\n        super().__init__()\n"
        "        torch.manual_seed(0)\n"
        "        self.stem = nn.Conv2d(3, 8, 3, padding=1)\n"
        "        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)\n"
        "        self.head = nn.Linear(8 * 8 * 8, 10)\n\n"
        "    def forward(self, x):\n"
        "        return self.head(self.dw(self.stem(x).relu()).flatten(1))\n")
    out = tmp_path / "fixed.pt"
    result = CliRunner().invoke(app, [
        "decompose", f"{source}:Net", "--trust-code", "-m", "none", "--fixed-kernels", "bank",
        "--match", "0.3", "--calib", "synthetic:3x16x16:10", "--calib-samples", "64",
        "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert "of their output on the calibration data" in result.stdout
    assert "warning: with the fixed kernels" in result.stderr, result.stdout[-600:]
    loaded = load_model(str(out))
    fixed = loaded.plan.summary.fixed_kernels
    assert fixed.metric == "inputs" and fixed.agreement is not None
    x = torch.randn(2, 3, 16, 16)
    reloaded = load_model(str(out)).model
    assert torch.equal(loaded.model(x), reloaded(x))


def test_method_none_calibrates_the_fixed_kernels_only():
    from pydantic import ValidationError

    from bscompress.core.recipe import Decompose

    Decompose(method="none", fixed_kernels="bank", calibration={"data": "demo"})
    with pytest.raises(ValidationError, match="need a method"):
        Decompose(method="none", fixed_kernels="bank",
                  calibration={"data": "demo", "sequential": True})

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

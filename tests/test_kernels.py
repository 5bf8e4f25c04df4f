"""VGNet kernel analysis (``inspect --kernels``) and the fixed-kernel depthwise layer.

Oracles: planted bank members (Gaussian, Sobel, Laplacian, identity, with negative scales) that
the analysis must find with |ρ| = 1 and the planted scale; a dense ``nn.Conv2d`` holding
``FixedKernelConv.to_dense()``; ONNX Runtime for the export.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bscompress.analysis.kernels import (
    KernelReport,
    fixed_assignments,
    inspect_kernels,
    plot_kernels,
    stage_of,
)
from bscompress.app.cli import app
from bscompress.core.errors import BadInput
from bscompress.deploy.export import export_onnx
from bscompress.factorize.kernel_bank import kernel_bank
from bscompress.layers import BSConvS, BSConvU, CPConv, DSConv, FixedKernelConv
from tests.nets import TinyNet

NETS = Path(__file__).parent / "nets.py"
SPEC = f"{NETS}:TinyNet"
NAMES, BANK = kernel_bank((3, 3))
runner = CliRunner()

#: channel → (bank member, planted scale)
PLANTED = {0: ("gaussian σ=1", 2.5), 1: ("sobel x", -1.3), 2: ("identity", -0.7),
           3: ("laplacian 4", 0.4), 5: ("gaussian σ=0.5", -3.0)}


def member(name: str) -> torch.Tensor:
    return BANK[NAMES.index(name)].float()


def plant(weight: torch.Tensor) -> None:
    """Put the PLANTED kernels into ``weight [C, 1, 3, 3]`` (in place)."""
    with torch.no_grad():
        for c, (name, scale) in PLANTED.items():
            weight[c, 0] = scale * member(name)


def check_planted(members, rho, scale) -> None:
    for c, (name, s) in PLANTED.items():
        assert members[c] == name, c
        assert abs(rho[c]) == pytest.approx(1, abs=1e-6)
        assert (rho[c] < 0) == (s < 0)
        assert scale[c] == pytest.approx(s, rel=1e-5)


# ------------------------------------------------------------------------- the analysis


def test_stage_rule_on_torchvision_style_names():
    assert stage_of("layer2.0.conv2") == "layer2"
    assert stage_of("features.3.1.block.1.0") == "features.3"
    assert stage_of("features.2.conv.1.0") == "features.2"
    assert stage_of("trunk_output.block2.block2-0.f.b") == "trunk_output.block2"
    assert stage_of("stages.1.blocks.0.conv_dw") == "stages.1"
    assert stage_of("features.4") == "features"
    assert stage_of("conv1") == "conv1"


def test_planted_kernels_found_in_a_depthwise_conv():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)),
        nn.Conv2d(8, 16, 3, padding=1, groups=8),  # channel multiplier 2
        nn.Conv2d(16, 16, 1, groups=16),  # 1×1: no spatial kernel
    )
    plant(model[1][0].weight)
    report = inspect_kernels(model)
    assert [la.name for la in report.layers] == ["1.0", "2"]
    layer = report.layers[0]
    assert (layer.kind, layer.stage, layer.stride, len(layer.rho)) == ("depthwise", "1", [2, 2], 8)
    check_planted(layer.members, layer.rho, layer.scale)
    summary = layer.summary(0.9)
    assert summary.gaussian >= 2 and summary.edge >= 2 and summary.identity >= 1
    assert summary.negative >= 3
    assert len(report.layers[1].rho) == 16  # every output channel of the multiplier conv
    assert set(report.by_stride) == {"stride 1", "strided"}
    assert report.by_stride["strided"].kernels == 8
    assert report.total.kernels == 24
    data = json.loads(json.dumps(report.to_dict()))
    assert data["layers"][0]["best"][1] == "sobel x"
    assert data["stages"][0]["matched"] == data["layers"][0]["matched"]
    shares = data["total"]
    assert shares["gaussian_share"] + shares["edge_share"] + shares["identity_share"] == \
        pytest.approx(shares["matched_share"])


def test_planted_kernels_found_in_bsconv_blueprints():
    """A conv whose filters are rank 1 (W[n, m] = a[n, m]·K_n) has K_n as its blueprints."""
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
    kernels = torch.randn(8, 3, 3)
    for c, (name, scale) in PLANTED.items():
        kernels[c] = scale * member(name)
    with torch.no_grad():
        conv.weight.copy_(torch.rand(8, 4, 1, 1) * kernels[:, None])
    model = nn.Sequential()
    model.add_module("layer3", nn.Sequential(nn.Module()))
    model.layer3[0].conv = BSConvU.from_conv(conv, rank=1)
    report = inspect_kernels(model)
    (layer,) = report.layers
    assert (layer.name, layer.kind, layer.block, layer.stage) == (
        "layer3.0.conv.dw", "blueprint", "layer3.0.conv", "layer3")
    assert layer.stride == [2, 2]
    for c, (name, _) in PLANTED.items():  # an SVD vector's sign and norm are arbitrary
        assert layer.members[c] == name and abs(layer.rho[c]) == pytest.approx(1, abs=1e-6)
    # rank 2 (N·r blueprints, groups ≠ in_channels), BSConv-S, DSC and CP are collected too
    blocks = nn.ModuleDict({"u": BSConvU.from_conv(conv, rank=2),
                            "s": BSConvS.from_conv(conv, rank=1),
                            "d": DSConv.from_conv(conv, rank=2),
                            "c": CPConv.from_conv(conv, rank=3, random_state=0),
                            "c4": CPConv.from_conv(conv, rank=2, mode="cp4", random_state=0)})
    report = inspect_kernels(blocks)
    found = {la.name: (la.kind, len(la.rho)) for la in report.layers}
    assert found == {"u.dw": ("blueprint", 16), "s.dw": ("blueprint", 8), "d.dw": ("dsc", 8),
                     "c.dw": ("cp", 3), "c4.dw1*dw2": ("cp", 2)}


def test_fixed_assignments_choose_by_threshold_and_family():
    torch.manual_seed(2)
    kernels = torch.randn(8, 3, 3, dtype=torch.float64) * 0.01
    for c, (name, scale) in PLANTED.items():
        kernels[c] += scale * BANK[NAMES.index(name)]
    chosen = fixed_assignments(kernels, NAMES, BANK, match=0.9)
    assert [c for c, _, _ in chosen] == sorted(PLANTED)
    for c, name, scale in chosen:
        assert name == PLANTED[c][0]
        assert scale == pytest.approx(PLANTED[c][1], rel=0.05)
        rebuilt = scale * BANK[NAMES.index(name)]
        assert torch.linalg.norm(rebuilt - kernels[c]) < 0.05 * torch.linalg.norm(kernels[c])
    only_edges = fixed_assignments(kernels, NAMES, BANK, families=("edge",))
    assert [c for c, _, _ in only_edges] == [1, 3]
    assert fixed_assignments(kernels, NAMES, BANK, match=1.0) == []  # noise: |ρ| < 1
    with pytest.raises(ValueError, match="match"):
        fixed_assignments(kernels, NAMES, BANK, match=0)
    with pytest.raises(ValueError, match="families"):
        fixed_assignments(kernels, NAMES, BANK, families=("gabor",))


def test_bad_input_for_the_analysis():
    with pytest.raises(BadInput, match="no depthwise"):
        inspect_kernels(nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 1, groups=8)))
    dw = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4))
    for bad in (0, 1.5, -0.2):
        with pytest.raises(BadInput, match="--match"):
            inspect_kernels(dw, match=bad)
    with pytest.raises(BadInput, match="--include/--exclude"):
        inspect_kernels(dw, exclude=("0",))


def test_plot_gallery_from_a_model(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(*[nn.Conv2d(8, 8, 3, stride=1 + i % 2, groups=8) for i in range(9)])
    out = plot_kernels(model, tmp_path / "k.png", max_layers=4, per_layer=6)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = inspect_kernels(model)
    assert isinstance(report, KernelReport)
    plot_kernels(report, tmp_path / "two.png", layers=["0", "1"])
    with pytest.raises(BadInput, match="nope"):
        plot_kernels(report, tmp_path / "x.png", layers=["nope"])


# ---------------------------------------------------------------------- FixedKernelConv


def _fixed_from(conv: nn.Conv2d, channels: list[int]) -> tuple[FixedKernelConv, dict]:
    names = list(PLANTED.values())
    fixed = {c: names[i % len(names)][1] * member(names[i % len(names)][0])
             for i, c in enumerate(channels)}
    return FixedKernelConv.from_conv(conv, fixed), fixed


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("multiplier", [1, 2])
@pytest.mark.parametrize(("padding", "mode", "bias"),
                         [(1, "zeros", True), ((1, 2), "reflect", False), (2, "circular", True)])
def test_fixed_conv_equals_a_dense_conv(stride, multiplier, padding, mode, bias):
    torch.manual_seed(4)
    c = 6
    conv = nn.Conv2d(c, c * multiplier, 3, stride=stride, padding=padding, groups=c,
                     bias=bias, padding_mode=mode, dilation=2 if mode == "circular" else 1)
    channels = [c * multiplier - 1, 0, 3]
    block, fixed = _fixed_from(conv, channels)
    assert block.fixed_indices == sorted(channels)
    dense = block.to_dense()
    assert dense.shape == conv.weight.shape
    for ch in range(c * multiplier):
        expected = fixed[ch] if ch in fixed else conv.weight[ch, 0]
        assert torch.equal(dense[ch, 0], expected.to(dense.dtype)), ch
    oracle = nn.Conv2d(c, c * multiplier, 3, stride=stride, padding=padding, groups=c,
                       bias=bias, padding_mode=mode, dilation=conv.dilation)
    with torch.no_grad():
        oracle.weight.copy_(dense)
        if bias:
            oracle.bias.copy_(conv.bias)
    x = torch.randn(2, c, 11, 10)
    torch.testing.assert_close(block(x), oracle(x), rtol=1e-5, atol=1e-5)


def test_fixed_kernels_get_no_gradient_and_are_not_parameters():
    torch.manual_seed(5)
    conv = nn.Conv2d(4, 8, 3, padding=1, groups=4)
    block, _ = _fixed_from(conv, [1, 6])
    assert {n for n, _ in block.named_parameters()} == {"weight", "bias"}
    assert block.weight.shape == (6, 1, 3, 3)
    assert set(block.state_dict()) == {"weight", "bias", "fixed_weight"}
    assert not block.fixed_weight.requires_grad
    before = block.fixed_weight.clone()
    optimizer = torch.optim.SGD(block.parameters(), lr=0.5)
    block(torch.randn(2, 4, 7, 7)).square().sum().backward()
    assert block.weight.grad is not None and block.weight.grad.abs().sum() > 0
    assert block.fixed_weight.grad is None
    optimizer.step()
    assert torch.equal(block.fixed_weight, before)
    dense = block.to_dense()
    assert torch.equal(dense[[1, 6]], before)
    assert not torch.equal(dense[0], conv.weight[0])  # learnable kernels moved


def test_empty_like_rebuilds_from_json_and_loads_the_state_dict():
    torch.manual_seed(6)
    conv = nn.Conv2d(5, 10, 3, stride=2, padding=1, groups=5, bias=False)
    block, _ = _fixed_from(conv, [9, 2, 4])
    record = json.loads(json.dumps({"fixed": block.fixed_indices}))
    rebuilt = FixedKernelConv.empty_like(conv, record["fixed"])
    rebuilt.load_state_dict(block.state_dict())
    x = torch.randn(3, 5, 9, 9)
    assert torch.equal(rebuilt(x), block(x))
    assert torch.equal(rebuilt.to_dense(), block.to_dense())
    # the analysis sees the fixed channels as exact bank members
    report = inspect_kernels(nn.Sequential(rebuilt))
    assert report.layers[0].kind == "fixed"
    assert all(abs(report.layers[0].rho[c]) == pytest.approx(1, abs=1e-6) for c in (2, 4, 9))
    # all fixed, none fixed
    for channels in ([], list(range(10))):
        b, _ = _fixed_from(conv, channels)
        assert b(x).shape == conv(x).shape


def test_fixed_conv_rejects_bad_input():
    dw = nn.Conv2d(4, 4, 3, groups=4)
    with pytest.raises(ValueError, match="depthwise"):
        FixedKernelConv.from_conv(nn.Conv2d(4, 4, 3), {0: torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="outside"):
        FixedKernelConv.from_conv(dw, {4: torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="shape"):
        FixedKernelConv.from_conv(dw, {0: torch.zeros(5, 5)})
    with pytest.raises(ValueError, match="repeat"):
        FixedKernelConv.empty_like(dw, [1, 1])
    block = FixedKernelConv.from_conv(dw, ([0, 2], torch.zeros(2, 3, 3)))
    assert block.fixed_indices == [0, 2]


def test_fixed_conv_exports_to_onnx_with_parity(tmp_path):
    torch.manual_seed(7)
    conv = nn.Conv2d(6, 12, 3, stride=2, padding=1, groups=6, padding_mode="reflect")
    block, _ = _fixed_from(conv, [0, 5, 11])
    model = nn.Sequential(nn.Conv2d(3, 6, 1), block, nn.ReLU())
    report = export_onnx(model, [1, 3, 12, 12], tmp_path / "fixed.onnx")
    assert report.passed and (tmp_path / "fixed.onnx").exists()


# --------------------------------------------------------------------------------- CLI


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def ckpt(tmp_path) -> Path:
    torch.manual_seed(8)
    net = TinyNet()
    plant(net.features[4].weight)  # the depthwise conv: 32 channels, stride 1
    path = tmp_path / "tiny.pt"
    torch.save(net.state_dict(), path)
    return path


def test_cli_kernels_table_json_and_plot(ckpt, tmp_path):
    result = invoke("inspect", ckpt, "--arch", SPEC, "--kernels", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert "features.4" in result.stdout and "stride 1" in result.stdout
    assert "gaussian σ=1" in result.stdout or "sobel" in result.stdout

    png = tmp_path / "gallery.png"
    result = invoke("inspect", ckpt, "--arch", SPEC, "--kernels", "--match", "0.95", "--json",
                    "--plot", png)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["match"] == 0.95
    (layer,) = data["layers"]
    assert (layer["name"], layer["kind"], layer["stage"]) == ("features.4", "depthwise",
                                                              "features")
    check_planted(layer["best"], layer["rho"], layer["scale"])
    assert data["total"]["matched"] >= len(PLANTED)
    assert png.read_bytes()[:4] == b"\x89PNG"
    result = invoke("inspect", ckpt, "--arch", SPEC, "--kernels", "--plot", png)
    assert result.exit_code == 2 and "--force" in result.stderr

    # without --kernels, inspect is unchanged
    result = invoke("inspect", ckpt, "--arch", SPEC, "--json", "--no-analysis")
    assert result.exit_code == 0 and "layers" in json.loads(result.stdout)


def test_cli_kernels_bad_input_exits_2(ckpt, tmp_path):
    plain = tmp_path / "plain.py"
    plain.write_text("from torch import nn\n\ndef net():\n    return nn.Conv2d(8, 8, 3)\n")
    result = invoke("inspect", f"{plain}:net", "--kernels")
    assert result.exit_code == 2 and "no depthwise" in result.stderr
    assert "Traceback" not in result.output
    for match in ("0", "1.2"):
        result = invoke("inspect", ckpt, "--arch", SPEC, "--kernels", "--match", match)
        assert result.exit_code == 2 and "--match" in result.stderr
    result = invoke("inspect", ckpt, "--arch", SPEC, "--match", "0.8")
    assert result.exit_code == 2 and "--kernels" in result.stderr

"""decompose(): plans, exactness at full rank, archives, the CLI, and the torchvision zoo."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

from bscompress.app.cli import app
from bscompress.compress.decomposition import decompose
from bscompress.core.errors import BadInput
from bscompress.core.surgery import Eligibility, eligibility
from bscompress.io.arch import ArchSpec
from bscompress.io.archive import load, load_model, save_archive
from bscompress.methods import METHODS, RankOptions
from tests.nets import TinyNet

NETS_SPEC = f"{Path(__file__).parent / 'nets.py'}:TinyNet"
CONV_METHODS = [m for m in METHODS if m != "svd"]
# CP has no closed-form full rank (ALS); its blocks are checked against to_dense() elsewhere
EXACT_METHODS = [m for m in METHODS if m not in ("cp", "cp4")]
# full rank; the HOSVD alone is exact at full Tucker ranks, so no HOOI iterations are needed
FULL = RankOptions(rank=10_000, p=1.0, tucker_ranks=1.0, allow_growth=True, tucker_iters=0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.fixture
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet(width=16).double().eval()


@pytest.mark.parametrize("method", EXACT_METHODS)
def test_full_rank_reproduces_the_model(tiny, method):
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ref = tiny(x)
    model, plan = decompose(copy.deepcopy(tiny), method, (1, 3, 16, 16), FULL)
    assert plan.replaced(), plan.layers
    assert _rel(model(x), ref) < 1e-10
    for entry in plan.replaced():
        assert entry.predicted_error == pytest.approx(0, abs=1e-20)


@pytest.mark.parametrize("method", CONV_METHODS)
def test_rank_one_shrinks_and_archives_reload_exactly(tiny, method, tmp_path):
    model, plan = decompose(copy.deepcopy(tiny).float(), method, (1, 3, 16, 16),
                            RankOptions(rank=1))
    assert plan.summary.macs_after < plan.summary.macs_before
    for entry in plan.replaced():
        assert entry.macs_after < entry.macs_before
        assert 0 <= entry.predicted_error <= 1
    out = tmp_path / "a.pt"
    save_archive(out, model, ArchSpec(NETS_SPEC),
                 plan)
    again = load(out)
    block = plan.replaced()[0].name
    inside = {k: v for k, v in eligibility(again, plan=plan).items()
              if k.startswith(block + ".")}
    assert inside and set(inside.values()) == {f"part of the {method} block of {block}"}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_skip_reasons_and_growth(tiny):
    _, plan = decompose(copy.deepcopy(tiny), "bsconv-u", (1, 3, 16, 16), RankOptions(rank=9))
    reasons = {entry.name: entry.skip_reason for entry in plan.layers}
    assert reasons["stem"].startswith("first layer")
    assert reasons["features.4"] == "depthwise conv: already separable"
    # full-rank BSConv-U of a 16→32 3×3 conv costs more than the conv itself
    assert reasons["features.0"].startswith("would not reduce MACs")
    _, plan = decompose(copy.deepcopy(tiny), "bsconv-u", (1, 3, 16, 16),
                        RankOptions(rank=1), Eligibility(exclude=("features.2",)))
    assert {e.name for e in plan.replaced()} == {"features.0"}


def test_energy_picks_the_smallest_sufficient_rank(tiny):
    energy = 0.6
    conv = tiny.features[0]
    _, plan = decompose(copy.deepcopy(tiny), "bsconv-u", (1, 3, 16, 16),
                        RankOptions(energy=energy, allow_growth=True))
    chosen = {e.name: e.ranks["rank"] for e in plan.replaced()}["features.0"]
    w = conv.weight.detach().numpy()
    spectra = np.stack([np.linalg.svd(f.reshape(f.shape[0], -1), compute_uv=False) for f in w])
    kept = (spectra**2).sum(0).cumsum() / (spectra**2).sum()
    assert kept[chosen - 1] >= energy
    assert chosen == 1 or kept[chosen - 2] < energy


def test_bad_rank_options():
    with pytest.raises(BadInput, match="either rank or energy"):
        RankOptions(rank=2, energy=0.5)
    with pytest.raises(BadInput, match=r"RankOptions.energy must be in \(0, 1\]"):
        RankOptions(energy=1.5)
    with pytest.raises(BadInput, match="unknown"):
        decompose(TinyNet(), "magic", (1, 3, 16, 16))


def test_cli_decompose_writes_archive_and_json(tmp_path):
    ckpt = tmp_path / "tiny.pt"
    torch.save(TinyNet().state_dict(), ckpt)
    out = tmp_path / "tiny.bsc.pt"
    spec = NETS_SPEC
    runner = CliRunner()
    result = runner.invoke(app, ["decompose", str(ckpt), "--arch", spec, "--method", "dsc",
                                 "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["plan"]["meta"]["macs_after"] < data["plan"]["meta"]["macs_before"]
    assert load(out) is not None
    again = runner.invoke(app, ["decompose", str(ckpt), "--arch", spec, "-o", str(out)])
    assert again.exit_code == 2 and "--force" in again.stderr
    bad = runner.invoke(app, ["decompose", str(ckpt), "--arch", spec, "--method", "nope",
                              "-o", str(tmp_path / "x.pt")])
    assert bad.exit_code == 2 and "unknown" in bad.stderr
    assert not (tmp_path / "x.pt").exists()


ZOO = ["resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "efficientnet_b0",
       "regnet_x_400mf", "resnext50_32x4d", "densenet121", "shufflenet_v2_x1_0",
       "squeezenet1_0"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_torchvision_zoo(name, tmp_path):
    """Every method at full rank reproduces the model; at rank 1 it runs, is smaller and its
    archive reloads to identical outputs."""
    shape = (1, 3, 64, 64)
    torch.manual_seed(0)
    base = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        ref = base.double()(x.double())
        # An SVD of VGG's 4096×25088 classifier takes minutes on 2 cores: Linear layers
        # that large are left to the TinyNet tests.
        huge = tuple(n for n, m in base.named_modules()
                     if isinstance(m, nn.Linear) and m.weight.numel() > 4_000_000)
        for method in METHODS:
            select = Eligibility(exclude=huge)
            if method in EXACT_METHODS:
                model, plan = decompose(copy.deepcopy(base), method, shape, FULL, select)
                assert _rel(model(x.double()), ref) < 1e-8, method
            small, plan = decompose(copy.deepcopy(base).float(), method, shape,
                                    RankOptions(rank=1, cp_iters=5), select)
            assert plan.summary.params_after <= plan.summary.params_before, method
            assert plan.summary.macs_after <= plan.summary.macs_before, method
            out = tmp_path / f"{method}.pt"
            save_archive(out, small, ArchSpec(f"torchvision:{name}"), plan)
            assert torch.equal(load(out)(x), small(x)), method


def test_cli_decompose_calibrated(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pt"
    torch.save(TinyNet().state_dict(), ckpt)
    out = tmp_path / "tiny.calib.pt"
    runner = CliRunner()
    args = ["decompose", str(ckpt), "--arch", NETS_SPEC, "--method", "bsconv-u", "--rank", "2",
            "--calib", "synthetic:3x16x16:10", "--calib-samples", "48", "--calib-batch", "16",
            "--mean", "0.1", "--std", "0.9"]
    result = runner.invoke(app, [*args, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)["plan"]
    replaced = [e for e in plan["layers"] if e["method"]]
    assert replaced and all(e["fit"].startswith("als") for e in replaced)
    replaced_names = [e["name"] for e in replaced]
    assert all(0 <= e["output_error"] < 1 for e in replaced)
    calibration = plan["meta"]["calibration"]
    assert calibration["samples"] == 48 and calibration["batchnorm_reestimated"] == 1
    loaded = load_model(out)
    assert loaded.metadata["preprocessing"] == {"mean": [0.1], "std": [0.9]}
    assert loaded.metadata["calibration"]["data"] == "synthetic:3x16x16:10"
    # the table names the fit and the output error
    table = runner.invoke(app, [*args, "-o", str(tmp_path / "t.pt"), "--calib-max-mb", "1"])
    assert table.exit_code == 0 and "output error" in table.stdout
    assert "calibrated on 48 samples" in table.stdout
    rebuilt = runner.invoke(app, [*args, "-o", str(tmp_path / "r.pt"), "--reconstruct",
                                  "--reconstruct-steps", "5"])
    assert rebuilt.exit_code == 0, rebuilt.stderr
    assert f"reconstructed {len(replaced)} blocks (5 Adam steps each" in rebuilt.stdout
    meta = load_model(tmp_path / "r.pt").plan.summary.reconstruction
    assert [b.layers for b in meta.blocks] == [[n] for n in replaced_names]
    assert meta.blocks[0].name == "features[2:6]"  # the conv with its ReLU, a window
    assert all(b.samples == 32 for b in meta.blocks)  # the last batch held out
    no_cuda = runner.invoke(app, [*args, "--reconstruct", "--device", "cuda:7", "-o",
                                  str(tmp_path / "c.pt")])
    if not torch.cuda.is_available():
        assert no_cuda.exit_code == 2 and "no CUDA device" in no_cuda.stderr
    no_data = runner.invoke(app, [*args[:8], "--reconstruct", "-o", str(tmp_path / "n.pt")])
    assert no_data.exit_code == 2 and "add --calib" in no_data.stderr
    assert not (tmp_path / "n.pt").exists()
    bad = runner.invoke(app, [*args[:-4], "--calib", "nowhere:x", "-o", str(tmp_path / "b.pt")])
    assert bad.exit_code == 2 and "unknown dataset kind" in bad.stderr
    assert not (tmp_path / "b.pt").exists()


def test_cli_budget_and_auto(tmp_path):
    ckpt = tmp_path / "tiny.pt"
    torch.save(TinyNet(width=32).state_dict(), ckpt)
    runner = CliRunner()
    base = ["decompose", str(ckpt), "--arch", NETS_SPEC, "--arch-kwargs", '{"width": 32}']
    result = runner.invoke(app, [*base, "-m", "auto", "--budget", "macs=0.6", "-o",
                                 str(tmp_path / "a.pt"), "--json"])
    assert result.exit_code == 0, result.stderr
    meta = json.loads(result.stdout)["plan"]["meta"]
    assert meta["macs_after"] <= 0.6 * meta["macs_before"] and meta["budget"]["kind"] == "macs"
    table = runner.invoke(app, [*base, "-m", "dsc", "--budget", "params=0.7", "-o",
                                str(tmp_path / "b.pt")])
    assert table.exit_code == 0 and "budget params=0.7" in table.stdout
    subspace = runner.invoke(app, [*base, "-m", "bsconv-s", "--budget", "macs=0.5", "-o",
                                   str(tmp_path / "s.pt"), "--json"])
    assert subspace.exit_code == 0, subspace.stderr
    meta = json.loads(subspace.stdout)["plan"]["meta"]
    assert meta["macs_after"] <= 0.5 * meta["macs_before"]
    for args, message in [(["--budget", "macs=0.5", "--rank", "2"], "drop --rank"),
                          (["-m", "auto"], "add --budget"),
                          (["--budget", "macs=2"], "0 < F ≤ 1"),
                          (["--sequential"], "needs calibration"),
                          (["--budget", "macs=0.5", "--sensitivity"], "add --calib"),
                          (["--budget", "latency=0.5", "--sensitivity"], "add --calib")]:
        bad = runner.invoke(app, [*base, *args, "-o", str(tmp_path / "x.pt")])
        assert bad.exit_code == 2 and message in bad.stderr, (args, bad.stderr)
    assert not (tmp_path / "x.pt").exists()


def test_cli_latency_budget_and_sensitivity(tmp_path):
    ckpt = tmp_path / "tiny.pt"
    torch.save(TinyNet(width=32).state_dict(), ckpt)
    runner = CliRunner()
    base = ["decompose", str(ckpt), "--arch", NETS_SPEC, "--arch-kwargs", '{"width": 32}']
    cache = tmp_path / "latency.json"
    # latency=1.0 is always reachable (all dense): the plumbing, the cache, the report
    result = runner.invoke(app, [*base, "-m", "tucker2", "--budget", "latency=1.0",
                                 "--latency-cache", str(cache), "-o", str(tmp_path / "l.pt")])
    assert result.exit_code == 0, result.stderr
    assert "budget latency=1.0: ONNX Runtime CPU, whole model" in result.stdout
    assert cache.exists()
    calib = ["--calib", "synthetic:3x16x16:10", "--calib-samples", "16", "--calib-batch", "8"]
    sens = tmp_path / "sens"
    for _ in range(2):
        result = runner.invoke(app, [*base, "-m", "bsconv-u", "--budget", "macs=0.6", *calib,
                                     "--sensitivity", "--sensitivity-cache", str(sens),
                                     "-o", str(tmp_path / "s.pt"), "--force", "--json"])
        assert result.exit_code == 0, result.stderr
    meta = json.loads(result.stdout)["plan"]["meta"]
    assert meta["sensitivity"]["measured"] == 0 and len(list(sens.iterdir())) == 1
    assert meta["budget"]["error"].startswith("network KL")

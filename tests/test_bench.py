"""bench: the JSON report, agreement/KL against the first model, and the CI gates."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bscompress.app.cli import app
from bscompress.deploy.bench import BenchResult, Latency, gate_failures
from tests.nets import TinyNet

runner = CliRunner()
SPEC = f"{Path(__file__).parent / 'nets.py'}:TinyNet"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    ckpt = tmp / "tiny.pt"
    torch.save(TinyNet().state_dict(), ckpt)
    archive = tmp / "tiny.dsc.pt"
    result = runner.invoke(app, ["decompose", str(ckpt), "--arch", SPEC, "--method", "dsc",
                                 "-o", str(archive)])
    assert result.exit_code == 0, result.stderr
    return ckpt, archive


def test_bench_json_and_markdown(models, tmp_path):
    ckpt, archive = models
    out, md, png = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    result = runner.invoke(app, ["bench", str(ckpt), str(archive), "--arch", SPEC, "--runs", "3",
                                 "--warmup", "1", "--batch", "4", "--data",
                                 "synthetic:3x16x16:10", "--limit", "64", "--json", str(out),
                                 "--markdown", str(md), "--plot", str(png), "--quiet"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(out.read_text())
    assert [d["name"] for d in data] == [str(ckpt), str(archive)]
    ref, small = data
    assert ref["agreement"] == 1.0 and ref["kl"] == pytest.approx(0, abs=1e-6)
    assert 0 <= small["agreement"] <= 1 and small["kl"] >= 0
    assert small["macs"] < ref["macs"] and small["samples"] == 64
    assert set(ref["latency"]) >= {"ort_b1", "ort_b4", "eager_b1", "eager_b4"}
    assert set(ref["latency"]["ort_b1"]) == {"p50", "p90", "p99", "mean", "runs"}
    assert 0 <= ref["top1"] <= 1
    for res in data:
        modules = [layer["module"] for layer in res["profile"]]
        assert 0 < len(modules) <= 5 and all(layer["ms"] >= 0 for layer in res["profile"])
    assert any(m.startswith("features.") for m in modules)  # the slowest are convs
    assert md.read_text().startswith("| model |")
    assert md.read_text().count("\n- ") == 2  # one profile line per model
    assert "slowest in ONNX Runtime" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "b.md", "b.png"]


def test_gates_exit_1_and_name_the_bound(models):
    """One run with a gate it fails and one it passes: exit 1, only the failed one named."""
    ckpt, archive = models
    result = runner.invoke(app, ["bench", str(ckpt), str(archive), "--arch", SPEC, "--runs", "2",
                                 "--warmup", "0", "--batch", "2", "--quiet",
                                 "--min-speedup", "1000", "--max-agreement-drop", "100"])
    assert result.exit_code == 1
    assert "gate failed" in result.stderr and "speedup at batch 1" in result.stderr
    assert "agreement" not in result.stderr


@pytest.mark.parametrize(("option", "message"), [
    (["--threads", "1000000"], "more than four threads per CPU core"),
    (["--batch", "100000000"], "GiB of activations, more than half of this machine's memory"),
])
def test_thread_counts_and_batches_beyond_the_machine_exit_2_before_timing(models, option,
                                                                          message):
    """A million threads crashed the thread pools (a segmentation fault, exit 139); a batch
    of a hundred million ended in ONNX Runtime's allocation failure (exit 3)."""
    ckpt, _ = models
    result = runner.invoke(app, ["bench", *option, str(ckpt), "--arch", SPEC, "--quiet"])
    assert result.exit_code == 2, result.stderr
    assert message in " ".join(result.stderr.split())


def _result(name: str, top1: float, p50: float, agreement: float) -> BenchResult:
    lat = Latency(p50, p50, p50, p50, 1)
    return BenchResult(name, 1, 1, 1, {"ort_b1": lat}, top1=top1, agreement=agreement)


def test_gate_arithmetic():
    ref, small = _result("a", 0.90, 2.0, 1.0), _result("b", 0.885, 1.0, 0.97)
    assert gate_failures([ref, small], max_accuracy_drop=2.0, min_speedup=1.9,
                         max_agreement_drop=3.5) == []
    failures = gate_failures([ref, small], max_accuracy_drop=1.0, min_speedup=2.5,
                             max_agreement_drop=2.0)
    assert len(failures) == 3
    assert "top-1 drops 1.50 points" in failures[0]
    assert "2.00×" in failures[1] and "drop 3.00" in failures[2]
    assert math.isclose(100 * (1 - small.agreement), 3.0)


@pytest.mark.slow  # inductor compiles C++: seconds
def test_compile_latency_at_batch_one():
    """--compile times torch.compile at batch 1, in its own column."""
    from bscompress.deploy import bench

    results = bench.bench_models([("tiny", TinyNet().eval())], [1, 3, 16, 16], batch=2, runs=2,
                                 warmup=0, profile_top=0, torch_compile=True)
    assert results[0].latency["compile_b1"].p50 > 0 and results[0].notes == []
    assert "compile b1" in bench.markdown_table(results, 2).splitlines()[0]


def test_channels_last_times_eager_pytorch_in_nhwc_in_columns_of_its_own():
    """--channels-last adds eager PyTorch figures with the model and inputs channels-last at
    batch 1 and the serving batch, leaves the model it was given in its own layout, and a
    model whose input is not 4-D gets a note instead."""
    from bscompress.deploy import bench

    model = TinyNet().eval()
    results = bench.bench_models([("tiny", model)], [1, 3, 16, 16], batch=2, runs=2,
                                 warmup=0, profile_top=0, channels_last=True)
    assert {"eager_cl_b1", "eager_cl_b2"} <= set(results[0].latency) and not results[0].notes
    assert all(p.is_contiguous() for p in model.parameters())
    head, rule, row = bench.markdown_table(results, 2).splitlines()[:3]
    assert "| eager CL b1 p50 ms | eager CL b2 p50 ms |" in head
    assert head.count("|") == rule.count("|") == row.count("|")
    conv1d = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    conv1d(torch.zeros(1, 3, 16))
    results = bench.bench_models([("1d", conv1d.eval())], [1, 3, 16], batch=2, runs=2,
                                 warmup=0, profile_top=0, channels_last=True)
    assert "eager_cl_b1" not in results[0].latency and "eager_b1" in results[0].latency
    assert "not 4-D" in results[0].notes[0]
    plain = bench.bench_models([("tiny", model)], [1, 3, 16, 16], batch=2, runs=2, warmup=0,
                               profile_top=0)
    assert "eager CL" not in bench.markdown_table(plain, 2)


def test_a_model_that_does_not_compile_gets_a_note(monkeypatch):
    """A model inductor fails on gets a note, not an internal error, and its other figures
    stay."""
    from bscompress.deploy import bench

    def broken(*args, **kwargs):
        raise RuntimeError("inductor: no C++ compiler\nmore detail")

    monkeypatch.setattr(bench, "compiled_latency", broken)
    results = bench.bench_models([("tiny", TinyNet().eval())], [1, 3, 16, 16], batch=2, runs=2,
                                 warmup=0, profile_top=0, torch_compile=True)
    assert "compile_b1" not in results[0].latency and "ort_b1" in results[0].latency
    assert results[0].notes == ["torch.compile failed: RuntimeError: inductor: no C++ compiler"]
    table = bench.markdown_table(results, 2)
    assert "compile b1" not in table.splitlines()[0]  # no model has the figure: no column
    assert "- tiny: torch.compile failed" in table

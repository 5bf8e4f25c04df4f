"""The benchmark scripts of ``make bench`` run end to end (tiny settings, bundled data), and the
peers they compare against are brought to the MAC budget they are compared at."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from peers import PEERS, macs  # noqa: E402

from bscompress.io.archive import load_model  # noqa: E402

SHAPE = [1, 1, 28, 28]


@pytest.fixture(scope="module")
def demo():
    return load_model(str(ROOT / "bscompress/demo/fmnist_resnet.pt"),
                      arch="bscompress.demo:fmnist_resnet").model.eval()


@pytest.mark.parametrize("peer", list(PEERS))
def test_peers_meet_the_mac_budget(demo, peer):
    fraction = 0.12
    before = {k: v.clone() for k, v in demo.state_dict().items()}
    model, note = PEERS[peer](demo, fraction, SHAPE)
    assert all(torch.equal(before[k], v) for k, v in demo.state_dict().items())  # untouched
    assert macs(model, SHAPE) <= fraction * macs(demo, SHAPE)
    assert note
    with torch.no_grad():
        assert model(torch.randn(2, *SHAPE[1:])).shape == (2, 10)


def test_bsconv_scratch_is_randomly_initialised(demo):
    model, note = PEERS["bsconv-scratch"](demo, 0.5, SHAPE)
    assert "BSConv-U" in note and "random init" in note
    trained = list(demo.parameters())
    for p in model.parameters():
        if p.dim() > 1:
            assert not any(p.shape == q.shape and torch.equal(p, q) for q in trained)


def _run(*args: str, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow  # every benchmark script in a subprocess
def test_quality_latency_report_end_to_end(tmp_path):
    out = tmp_path / "results"
    _run(str(ROOT / "benchmarks/quality.py"), "--name", "demo", "--test", "demo",
         "--train", "demo", "--samples", "64", "--budgets", "0.12", "--methods", "bsconv-u",
         "auto", "--peers", "torch-pruning", "tltorch-cp", "--ft-samples", "256",
         "--reconstruct-steps", "20", "--out", str(out / "quality-demo.json"),
         "--onnx-dir", str(out / "onnx"), cwd=ROOT)
    result = json.loads((out / "quality-demo.json").read_text())
    # accuracies are computed by ONNX Runtime: the original's is PyTorch's 94.10% (README)
    assert result["original"]["top1"] == pytest.approx(0.941, abs=1e-9)
    rows = {(r["method"], r["calibration"]): r for r in result["rows"]}
    assert set(rows) == {("bsconv-u", "data-free"), ("bsconv-u", "data-aware"),
                         ("auto", "data-free"), ("auto", "data-aware"),
                         ("auto", "data-aware, sequential"),
                         ("auto", "data-aware, sequential, reconstructed"),
                         ("torch-pruning", "data-free"),
                         ("tltorch-cp", "data-free")}
    # BSConv-U's smallest ranks keep more than 12% of the demo model: run there, said so
    assert rows["bsconv-u", "data-free"]["note"].startswith("budget out of reach")
    assert rows["bsconv-u", "data-free"]["macs_kept"] > 0.12
    assert rows["auto", "data-aware"]["macs_kept"] <= 0.12 + 1e-9
    for (method, calibration), row in rows.items():
        assert 0.0 <= row["zero_shot"] <= 1.0
        if calibration == "data-free" and method in ("bsconv-u", "auto"):
            assert row["kd"] is None and 0.0 <= row["bn"] <= 1.0  # --finetune-data-free
        else:
            assert 0.0 <= row["kd"] <= 1.0
    assert Path(rows["auto", "data-aware"]["onnx"]).is_file()
    assert rows["auto", "data-free"]["onnx"] is None  # only the data-aware ones are timed

    _run(str(ROOT / "benchmarks/latency.py"), "--results", str(out), "--runs", "5",
         "--threads", "1", cwd=ROOT)
    timed = json.loads((out / "latency.json").read_text())["models"]["demo"]
    assert {"original", "auto@0.12", "auto+seq@0.12", "auto+seq+rec@0.12",
            "torch-pruning@0.12"} <= set(timed)
    assert timed["original"]["1"]["p90"] >= timed["original"]["1"]["p50"] > 0

    docs = tmp_path / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    (tmp_path / "discussion.md").write_text("Hand-written discussion.")
    _run(str(ROOT / "benchmarks/report.py"), "--results", str(out), "--out", str(docs),
         "--img", str(tmp_path / "docs" / "img"), "--discussion",
         str(tmp_path / "discussion.md"), cwd=ROOT)
    text = docs.read_text()
    assert "Hand-written discussion." in text
    assert "| 12% | auto | data-aware |" in text
    assert "| 12% | auto | data-aware, sequential, reconstructed |" in text
    assert "*torch-pruning*" in text and "## Latency" in text
    assert (tmp_path / "docs" / "img" / "quality-demo.png").stat().st_size > 1000
    assert "](img/speedup-vs-macs.png)" in text

    # one model's section rewritten in place (quality.py run alone)
    result["rows"] = [r for r in result["rows"] if r["method"] != "bsconv-u"]
    (out / "quality-demo.json").write_text(json.dumps(result))
    _run(str(ROOT / "benchmarks/report.py"), "--results", str(out), "--out", str(docs),
         "--img", str(tmp_path / "docs" / "img"), "--splice-model", "demo", cwd=ROOT)
    spliced = docs.read_text()
    assert spliced.count("<!-- quality demo: generated by benchmarks/report.py -->") == 1
    assert "| 12% | bsconv-u |" in text and "| 12% | bsconv-u |" not in spliced
    assert "| 12% | auto | data-aware |" in spliced
    assert "Hand-written discussion." in spliced and "## Latency" in spliced


@pytest.mark.slow  # two calibrated decompositions, the guard timing its candidates
def test_guard_accuracy_end_to_end(tmp_path):
    """benchmarks/guard_accuracy.py on the demo ResNet: both variants under the budget, the
    guard's row with what it timed, top-1 on the bundled test images, and its section in the
    report."""
    out = tmp_path / "results"
    out.mkdir()
    _run(str(ROOT / "benchmarks/guard_accuracy.py"), "--models", "resnet", "--budgets", "0.25",
         "--samples", "64", "--runs", "2", "--test", "demo",
         "--out", str(out / "guard-accuracy.json"), cwd=ROOT)
    result = json.loads((out / "guard-accuracy.json").read_text())
    (row,) = result["rows"]
    variants = row["variants"]
    assert variants["original"]["top1"] == pytest.approx(0.941, abs=1e-9)  # README's figure
    assert variants["guard"]["checked"] >= variants["guard"]["rejected"] >= 0
    assert "checked" not in variants["no guard"]
    for name in ("guard", "no guard"):
        assert variants[name]["macs_kept"] <= 0.25 + 1e-9
        assert 0.0 <= variants[name]["top1"] <= 1.0
        assert variants[name]["speedup_b1"] > 0 and variants[name]["speedup_b32"] > 0
    docs = tmp_path / "benchmarks.md"
    _run(str(ROOT / "benchmarks/report.py"), "--results", str(out), "--out", str(docs),
         "--img", str(tmp_path / "img"), cwd=ROOT)
    text = docs.read_text()
    assert "## What the latency guard costs in accuracy" in text
    assert "| resnet | 25% | guard |" in text and "2,000 test images of `demo`" in text


def test_scale_calibration_folder_reads_back_as_the_cli_reads_it(tmp_path):
    """``benchmarks/scale.py`` calibrates on crops of the bundled photos written as an image
    folder: as many 224² RGB images as asked, one class folder per photo."""
    from scale import write_folder

    from bscompress.data import open_data_spec

    write_folder(tmp_path, 20)
    source = open_data_spec(f"imagefolder:{tmp_path}", split="train", limit=20)
    (x, _), = list(source.loader(32))
    assert x.shape == (20, 3, 224, 224)
    assert len([d for d in tmp_path.iterdir() if d.is_dir()]) == 18


def test_channel_layout_table_splits_the_kernel_time_by_op():
    """benchmarks/channel_layout.py's table: speed-up = original ÷ variant kernel ms,
    realized = speed-up × MACs kept, one column per op type and the rest as "other"."""
    from channel_layout import render

    result = {"command": "benchmarks/channel_layout.py", "device": "cpu", "onnxruntime": "1",
              "threads": 1, "rows": [{"model": "resnet50", "budget": 0.25, "variants": {
                  "original": {"ops": {"Conv": 90.0, "other": 10.0}, "total": 100.0},
                  "widths ×1": {"ops": {"Conv": 25.0, "Add": 2.0, "ReorderInput": 1.0,
                                        "other": 2.0}, "total": 30.0, "macs_kept": 0.25},
                  "widths ×8": {"ops": {"Conv": 25.0}, "total": 25.0, "macs_kept": 0.25}}}]}
    lines = render(result).splitlines()
    original = next(line for line in lines if "| original |" in line)
    assert "| 100.00 | 1.00× | 1.00 | 90.00 |" in original and original.endswith("| 10.00 |")
    free = next(line for line in lines if "| widths ×1 |" in line)
    assert "| 30.00 | 3.33× | 0.83 | 25.00 | 0.00 | 1.00 | 0.00 | 2.00 | 0.00 | 2.00 |" in free
    assert next(line for line in lines if "| widths ×8 |" in line).count("| 1.00 |") == 1


def test_guard_latency_table_speed_ups_and_realized_fraction(tmp_path):
    """benchmarks/guard_latency.py's table: speed-up = original ÷ model per column, realized
    = ORT b1 speed-up × MACs kept; the section is spliced once, then replaced."""
    from guard_latency import BEGIN, END, render, splice

    times = {"ort_b1": 10.0, "ort_b32": 300.0, "eager_b1": 20.0, "eager_b32": 600.0}
    result = {"command": "benchmarks/guard_latency.py", "device": "cpu", "onnxruntime": "1",
              "torch": "2", "size": 224, "rows": [{"model": "resnet18", "budget": 0.5,
              "variants": {"original": {"ms": times},
                           "guard": {"ms": {k: v / 2 for k, v in times.items()},
                                     "macs_kept": 0.5, "decompose_s": 3, "checked": 4,
                                     "rejected": 1},
                           "no guard": {"ms": {**times, "eager_b32": 750.0},
                                        "macs_kept": 0.5, "decompose_s": 2}}}]}
    table = render(result)
    guard = next(line for line in table.splitlines() if "| guard (1 of 4 blocks" in line)
    assert "5.0 (2.00×)" in guard and guard.endswith("| 1.00 |")
    slower = next(line for line in table.splitlines() if "| no guard |" in line)
    assert "750.0 (0.80×)" in slower and slower.endswith("| 0.50 |")
    assert "| — |" in slower  # no torch.compile figure
    result["rows"][0]["variants"]["guard"]["runtime"] = "eager, 1 thread"  # --latency-runtime
    assert "| guard (1 of 4 blocks timed slower in eager, 1 thread, left out) |" in render(result)
    result["rows"][0]["variants"]["guard"]["runtime"] = "onnxruntime, 1 thread"  # unsaid
    del result["rows"][0]["variants"]["no guard"]  # a run of --variants guard
    assert [line.split(" | ")[2] for line in render(result).splitlines()
            if line.startswith("| resnet18")] == ["original", "guard (1 of 4 blocks timed "
                                                  "slower, left out)"]
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n")
    splice(doc, table)
    splice(doc, table)
    assert doc.read_text().count(BEGIN) == 1 and doc.read_text().count(END) == 1


def test_guard_accuracy_table_difference_and_realized_fraction():
    """benchmarks/guard_accuracy.py's table: the guard's row says its accuracy difference to
    the unguarded model in points, realized = batch-1 speed-up × MACs kept; a refused budget
    shows its reason."""
    from guard_accuracy import render

    row = {"model": "resnet", "budget": 0.5, "variants": {
        "original": {"top1": 0.93, "speedup_b1": 1.0, "speedup_b32": 1.0},
        "guard": {"macs_kept": 0.5, "forms": ["cp", "dsc"], "top1": 0.9275, "checked": 10,
                  "rejected": 4, "speedup_b1": 1.8, "speedup_b32": 1.7},
        "no guard": {"macs_kept": 0.5, "forms": ["bsconv-u"], "top1": 0.93,
                     "speedup_b1": 1.2, "speedup_b32": 0.9}}}
    refused = {"model": "mobilenet", "budget": 0.25, "variants": {
        "original": {"top1": 0.92, "speedup_b1": 1.0, "speedup_b32": 1.0},
        "guard": {"error": "--budget macs=0.25: out of reach; raise it"}}}
    result = {"command": "benchmarks/guard_accuracy.py", "device": "cpu", "onnxruntime": "1",
              "torch": "2", "test_images": 10000, "samples": 512, "rows": [row, refused]}
    lines = render(result).splitlines()
    guard = next(line for line in lines if "| resnet | 50% | guard |" in line)
    assert "| 4 of 10 |" in guard and "| -0.25 points |" in guard and guard.endswith("| 0.90 |")
    unguarded = next(line for line in lines if "| no guard |" in line)
    assert "| 0.90× |" in unguarded and unguarded.endswith("| 0.60 |")
    assert any("| mobilenet | 25% | guard | --budget macs=0.25: out of reach |" in line
               for line in lines)


def test_guard_latency_rows_of_other_methods_follow_the_original():
    """--methods: a method's rows are labelled with it, after the original, in run order
    (the JSON holds the original last: ``bench`` runs after the decompositions)."""
    from guard_latency import label, render

    times = {"ort_b1": 10.0, "ort_b32": 300.0}
    variants = {label("bsconv-u", "guard"): {"ms": times, "macs_kept": 0.5},
                label("auto", "guard"): {"ms": times, "macs_kept": 0.5},
                "original": {"ms": times}}
    result = {"command": "c", "device": "cpu", "onnxruntime": "1", "torch": "2",
              "rows": [{"model": "resnet18", "budget": 0.5, "variants": variants}]}
    assert [line.split(" | ")[2] for line in render(result).splitlines()
            if line.startswith("| resnet18")] == ["original", "-m bsconv-u, guard", "guard"]


@pytest.mark.parametrize("stride", [1, 2])
def test_block_forms_candidates_and_grouped_forms_match_the_blocks(stride):
    """benchmarks/block_forms.py: each method's form is its allocator candidate with the
    most MACs under the fraction (widths in the block), and the other executions (grouped
    blueprint and multiplier stages, a folded BSConv-S's chain) compute what the block
    computes."""
    from block_forms import chain, forms, grouped, variants

    from bscompress.core.stats import module_macs
    from bscompress.deploy.latency import materialize

    conv = torch.nn.Conv2d(32, 32, 3, stride=stride, padding=1, bias=False)
    shape = (1, 32, 8, 8)
    dense = module_macs(conv, shape).macs
    chosen = forms(conv, shape, 0.5, round_to=8)
    assert {"tucker2", "cp", "bsconv-u", "bsconv-s", "dsc"} <= {m for m, *_ in chosen}
    folded = []
    for method, ranks, kept, structure in chosen:
        assert 0 < kept <= 0.5 * dense
        if method == "tucker2":
            assert ranks["in"] % 8 == 0 and ranks["out"] % 8 == 0
        block = materialize(structure)
        slow = grouped(block)
        assert (slow is not None) == (method in ("bsconv-u", "bsconv-s", "dsc")
                                      and ranks["rank"] > 1)
        if slow is not None:
            assert not any(type(m).__name__.startswith(("Blueprint", "Multiplier"))
                           for m in slow.modules())
            x = torch.randn(shape)
            with torch.no_grad():
                torch.testing.assert_close(slow(x), block(x), rtol=1e-4, atol=1e-5)
        names = [name for name, _ in variants(method, block)]  # each checked equal
        assert names[0] == method
        if getattr(block, "folded", False):  # BSConv-S running pw2 in its blueprints
            folded.append(method)
            assert chain(block).folded is False and f"{method} chain" in names
    # at stride 2, pw2 would run on 4× the positions: the allocator's BSConv-S folds
    assert folded == (["bsconv-s"] if stride == 2 else [])


def test_block_forms_table_speed_ups_over_the_dense_conv():
    """benchmarks/block_forms.py's table: dense rows give ms, form rows dense ÷ form (bold
    when slower), realized = ORT b1 speed-up × MACs kept."""
    from block_forms import COLUMNS, render

    dense = {key: 10.0 for key, *_ in COLUMNS}
    form = {**{key: 5.0 for key, *_ in COLUMNS}, "eager_b32": 20.0}
    result = {"command": "c", "machine": "x86_64", "onnxruntime": "1", "torch": "2",
              "threads": 1, "round_to": 8,
              "rows": [{"shape": "3×3", "form": "dense", "fraction": 1.0, "macs_kept": 1.0,
                        "ranks": {}, **dense},
                       {"shape": "3×3", "form": "cp", "fraction": 0.5, "macs_kept": 0.4,
                        "ranks": {"rank": 16}, **form}]}
    line = next(x for x in render(result).splitlines() if "| cp |" in x)
    assert "| rank 16 | 40.0% | 2.00× | 2.00× | 2.00× | **0.50×** |" in line
    assert line.endswith("| 0.80 |")


def test_guard_latency_interleaved_speed_up_is_the_median_of_paired_rounds(monkeypatch):
    """The interleaved column's speed-up is the median of the per-round speed-ups (a round
    twice as slow for every model leaves them as they are), and the table and the realized
    fraction use it where the JSON holds it."""
    import guard_latency
    from guard_latency import render

    from bscompress.deploy import latency

    rounds = {"original": [10.0, 20.0, 10.0], "model": [5.0, 10.0, 5.0]}
    monkeypatch.setattr(latency, "ort_call", lambda model, shape, threads: model)
    monkeypatch.setattr(latency, "median_ms", lambda call, warmup, runs: 0.0)
    monkeypatch.setattr(latency, "interleaved", lambda calls, r, runs: [rounds[c] for c in calls])
    ms, speedups = guard_latency.interleaved_ms([("original", "original"), ("model", "model")],
                                                (1, 3, 8, 8), 1, 2)
    assert ms == {"original": 10.0, "model": 5.0} and speedups["model"] == 2.0
    times = {"ort_b1": 10.0, "ort_ab_b1": 10.0, "eager_ab_b32": 100.0}
    guard = {"ms": {"ort_b1": 5.0, "ort_ab_b1": 4.0, "eager_ab_b32": 60.0}, "macs_kept": 0.5,
             "paired": {"ort_ab_b1": 2.2, "eager_ab_b32": 1.5}}
    result = {"command": "c", "device": "cpu", "onnxruntime": "1", "torch": "2",
              "rows": [{"model": "resnet18", "budget": 0.5, "variants": {
                  "original": {"ms": times}, "guard": guard}}]}
    line = next(line for line in render(result).splitlines() if "| guard |" in line)
    assert "4.0 (2.20×)" in line and "60.0 (1.50×)" in line and line.endswith("| 1.10 |")
    guard["ort_ab_speedup"] = guard.pop("paired")["ort_ab_b1"]  # an earlier run's JSON
    line = next(line for line in render(result).splitlines() if "| guard |" in line)
    assert "4.0 (2.20×)" in line and "60.0 (1.67×)" in line


def test_eager_layout_table_times_each_model_in_the_layout_of_its_column(monkeypatch):
    """benchmarks/eager_layout.py: the channels-last columns time a channels-last copy of each
    model (the model given keeps its layout), and the table gives each target's speed-ups
    over the original per column, the kernels' NCHW ÷ channels-last, and a refused budget's
    reason."""
    import eager_layout
    import guard_latency

    from bscompress.deploy import latency

    formats = []

    def fake_eager_call(model, shape, device="cpu", memory_format=torch.contiguous_format):
        formats.append(memory_format)
        model.to(memory_format=memory_format)  # as the real one does, in place
        return model

    monkeypatch.setattr(latency, "eager_call", fake_eager_call)
    monkeypatch.setattr(latency, "median_ms", lambda call, warmup, runs: 0.0)
    monkeypatch.setattr(latency, "interleaved", lambda calls, r, runs: [[1.0] for _ in calls])
    conv = torch.nn.Conv2d(4, 4, 3)
    guard_latency.interleaved_ms([("original", conv)], (1, 4, 8, 8), 1, 2,
                                 runtime="eager-channels-last")
    assert formats == [torch.channels_last] and conv.weight.is_contiguous()
    speedups = {"original": 1.0, "onnxruntime": 1.8}
    row = {"model": "resnet18", "budget": 0.5, "targets": {
        "onnxruntime": {"macs_kept": 0.497, "checked": 30, "rejected": 12},
        "eager": {"error": "--budget macs=0.5: out of reach; raise it"}},
        "ms": {k: {"original": 10.0, "onnxruntime": 5.0} for k in eager_layout.COLUMNS},
        "speedup": {k: speedups for k in eager_layout.COLUMNS}}
    kernel = {"batch": 32, "in": 32, "out": 64, "side": 56, "groups": 1, "nchw": 35.0,
              "nhwc": 5.0}
    result = {"command": "c", "device": "cpu", "onnxruntime": "1", "torch": "2",
              "kernels": [kernel], "rows": [row]}
    lines = eager_layout.render(result).splitlines()
    assert "| 1×1, 32 → 64 | 32 | 56² | 35.00 | 5.00 | 7.0× |" in lines
    target = next(line for line in lines if "| onnxruntime |" in line)
    assert "| 49.7% | 12 of 30 |" in target
    assert target.count("5.0 (1.80×)") == len(eager_layout.COLUMNS)
    assert any("| eager | --budget macs=0.5: out of reach; raise it |" in line for line in lines)

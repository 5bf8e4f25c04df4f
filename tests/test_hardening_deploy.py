"""Hardening of the deployment commands (issue 18): export, bench, upcycle and the latency
cache refuse bad input with exit 2 and one sentence, before any work, never clobbering an
input and leaving no output behind; good input keeps working."""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest
import torch
from typer.testing import CliRunner

from bscompress.app.cli import app
from bscompress.core.errors import BadInput
from bscompress.deploy.export import MIN_OPSET, export_onnx, max_opset
from bscompress.deploy.latency import LatencyTimer
from tests.nets import TinyNet

runner = CliRunner()
SPEC = f"{Path(__file__).parent / 'nets.py'}:TinyNet"
FAST = ("--runs", "2", "--warmup", "0", "--profile-top", "0", "--quiet")

NETS = '''
import torch
from torch import nn

INPUT_SHAPE = (1, 3, 8, 8)


class TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        f = self.conv(x).relu().mean((2, 3))
        return self.fc(f), f


class DictNet(TupleNet):
    def forward(self, x):
        f = self.conv(x).relu().mean((2, 3))
        return {"logits": self.fc(f), "features": f}


class IntNet(TupleNet):
    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3))), 3


class Batch1Net(TupleNet):
    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)).view(1, -1))
'''


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` and its bytes: equal before and after means no input
    changed and no output (or temporary file) appeared."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture
def work(tmp_path) -> Path:
    """A folder with a TinyNet checkpoint (twice), small nets and an image folder."""
    torch.manual_seed(0)
    torch.save(TinyNet().state_dict(), tmp_path / "a.pt")
    torch.save(TinyNet().state_dict(), tmp_path / "b.pt")
    (tmp_path / "nets2.py").write_text(NETS)
    (tmp_path / "images" / "cat").mkdir(parents=True)
    (tmp_path / "images" / "cat" / "note.txt").write_text("not an image")
    (tmp_path / "link.pt").symlink_to(tmp_path / "a.pt")
    return tmp_path


def refused(result, code: int, *words: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "internal error" not in result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


# -- 1. outputs never an input, never two outputs on one file --------------------------------
def test_bench_outputs_are_never_an_input(work):
    a, b, nets = work / "a.pt", work / "b.pt", work / "nets2.py"
    before = snapshot(work)
    base = ("bench", a, b, "--arch", SPEC, *FAST, "--force")
    for option in ("--json", "--markdown", "--plot"):
        for target in (a, b, work / "link.pt"):
            refused(invoke(*base, option, target), 2, "input")
    refused(invoke("bench", f"{nets}:TupleNet", *FAST, "--json", nets, "--force"), 2, "input")
    refused(invoke(*base, "--data", f"imagefolder:{work / 'images'}", "--json",
                   work / "images" / "out.json"), 2, "inside")
    refused(invoke(*base, "--json", work / "x", "--markdown", work / "x"), 2, "--json",
            "--markdown", "both")
    assert snapshot(work) == before


def test_export_and_upcycle_outputs_are_never_an_input(work):
    a, nets = work / "a.pt", work / "nets2.py"
    before = snapshot(work)
    for target in (a, work / "link.pt"):
        refused(invoke("export", a, "--arch", SPEC, "-o", target, "--force"), 2, "input")
        refused(invoke("upcycle", a, "--arch", SPEC, "-o", target, "--force",
                       "--include", "features.*"), 2, "input")
    refused(invoke("export", f"{nets}:TupleNet", "-o", nets, "--force"), 2, "input")
    refused(invoke("export", a, "--arch", SPEC, "-o", work / "images" / "m.onnx", "--data",
                   f"imagefolder:{work / 'images'}"), 2, "inside")
    refused(invoke("upcycle", f"{nets}:TupleNet", "-o", nets, "--force"), 2, "input")
    assert snapshot(work) == before


# -- 2. --opset: the range up front, exactly the opset asked for -----------------------------
def test_export_opset_outside_the_range_exits_2(work, monkeypatch):
    before = snapshot(work)
    for opset in (99, MIN_OPSET - 1, max_opset() + 1):
        refused(invoke("export", work / "a.pt", "--arch", SPEC, "-o", work / "m.onnx",
                       "--opset", opset), 2, "--opset", f"{MIN_OPSET}–{max_opset()}")
    assert snapshot(work) == before
    # the file holds the opset asked for, or the export is refused
    path = work / "m19.onnx"
    report = export_onnx(TinyNet().eval(), (1, 3, 16, 16), path, opset=19)
    assert report.opset == 19 and onnx.load(str(path)).opset_import[0].version == 19
    # an exporter that writes another opset than asked (here: the file above, for 20)
    monkeypatch.setattr("bscompress.deploy.export._export", lambda *args: args[2].write_bytes(
        path.read_bytes()))
    with pytest.raises(BadInput, match="opset 20: the installed exporter wrote opset 19"):
        export_onnx(TinyNet().eval(), (1, 3, 16, 16), work / "m20.onnx", opset=20)
    # the library speaks of its fields, not of the command's flags
    with pytest.raises(BadInput, match=f"^'opset' 99 is outside .*{MIN_OPSET}–"):
        export_onnx(TinyNet().eval(), (1, 3, 16, 16), work / "m99.onnx", opset=99)
    with pytest.raises(BadInput, match="'rtol': input should be a finite number"):
        export_onnx(TinyNet().eval(), (1, 3, 16, 16), work / "m99.onnx", rtol=float("nan"))
    assert sorted(p.name for p in work.iterdir() if p.suffix == ".onnx") == ["m19.onnx"]
    assert not any(p.name.endswith(".tmp") for p in work.iterdir())


# -- 3. a model that runs at batch 1 only; 9. one file mode for every output ----------------
def test_batch_one_model_exits_2_with_what_to_do(work):
    spec = f"{work / 'nets2.py'}:Batch1Net"
    before = snapshot(work)
    refused(invoke("export", spec, "-o", work / "m.onnx"), 2, "--static")
    refused(invoke("bench", spec, spec, *FAST, "--json", work / "b.json"), 2, "--batch 1",
            "any batch size")
    assert snapshot(work) == before
    previous = os.umask(0o022)  # every output, ONNX and its weights too, is 0666 & ~umask
    try:
        ok = invoke("export", spec, "-o", work / "m.onnx", "--static", "--external-data")
        assert ok.exit_code == 0, ok.stderr
        ok = invoke("bench", spec, *FAST, "--batch", "1", "--json", work / "b.json",
                    "--markdown", work / "b.md")
        assert ok.exit_code == 0, ok.stderr
    finally:
        os.umask(previous)
    assert json.loads((work / "b.json").read_text())[0]["agreement"] == 1.0
    for name in ("m.onnx", "m.onnx.data", "b.json", "b.md"):
        assert (work / name).stat().st_mode & 0o777 == 0o644, name


# -- 4. and 6. a shape the model does not run on, or that cannot fit in memory ---------------
def test_bad_or_huge_input_shape_exits_2_everywhere(work):
    a = work / "a.pt"
    before = snapshot(work)
    for shape, word in (("1,1,16,16", "does not run"), ("1,3,100000,100000", "memory")):
        refused(invoke("export", a, "--arch", SPEC, "-o", work / "m.onnx", "--input-shape",
                       shape), 2, word)
        refused(invoke("inspect", a, "--arch", SPEC, "--input-shape", shape), 2, word)
        refused(invoke("bench", a, "--arch", SPEC, *FAST, "--input-shape", shape, "--json",
                       work / "b.json"), 2, word)
        refused(invoke("upcycle", a, "--arch", SPEC, "-o", work / "u.pt", "--input-shape",
                       shape, "--include", "features.*"), 2, word)
    assert snapshot(work) == before


# -- 5. tolerances and gates checked before any work -----------------------------------------
def test_bad_tolerances_and_gates_exit_2_before_any_work(work):
    a, b = work / "a.pt", work / "b.pt"
    before = snapshot(work)
    export = ("export", a, "--arch", SPEC, "-o", work / "m.onnx")
    refused(invoke(*export, "--rtol", "-1"), 2, "--rtol")
    refused(invoke(*export, "--atol", "-1e-3"), 2, "--atol")
    refused(invoke(*export, "--atol", "nan"), 2, "--atol")
    bench = ("bench", a, b, "--arch", SPEC, *FAST, "--json", work / "b.json")
    refused(invoke(*bench, "--max-accuracy-drop", "1"), 2, "--max-accuracy-drop", "--data")
    refused(invoke(*bench, "--min-speedup", "0"), 2, "--min-speedup")
    refused(invoke(*bench, "--max-agreement-drop", "nan"), 2, "--max-agreement-drop")
    refused(invoke("bench", a, "--arch", SPEC, *FAST, "--min-speedup", "1.5"), 2,
            "two models")
    assert snapshot(work) == before


# -- 7. models that return a tuple or a dict -------------------------------------------------
def test_tuple_and_dict_models_export_every_output_and_bench_their_logits(work):
    nets = work / "nets2.py"
    out = work / "tuple.onnx"
    result = invoke("export", f"{nets}:TupleNet", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)  # parity on each output, at each batch
    assert report["passed"] and len({c["output"] for c in report["checks"]}) == 2
    assert len(report["checks"]) == 4 and len(onnx.load(str(out)).graph.output) == 2
    before = snapshot(work)
    refused(invoke("export", f"{nets}:IntNet", "-o", work / "i.onnx"), 2, "tensors")
    refused(invoke("bench", f"{nets}:IntNet", *FAST), 2, "tensors")
    assert snapshot(work) == before
    spec = f"{nets}:TupleNet"  # the dict model is exported (with parity) by bench
    result = invoke("bench", spec, f"{nets}:DictNet", *FAST, "--batch", "2", "--data",
                    "synthetic:3x8x8:5", "--limit", "16", "--json", work / "t.json")
    assert result.exit_code == 0, result.stderr
    ref, other = json.loads((work / "t.json").read_text())
    assert ref["agreement"] == other["agreement"] == 1.0 and ref["top1"] is not None


# -- 8. upcycle: a sane number of experts, and a size that fits ------------------------------
def test_upcycle_refuses_absurd_experts_and_models_too_big(work, monkeypatch):
    a = work / "a.pt"
    before = snapshot(work)
    up = ("upcycle", a, "--arch", SPEC, "-o", work / "u.pt", "--include", "features.*")
    refused(invoke(*up, "--experts", "100000"), 2, "--experts", "64")
    monkeypatch.setattr("bscompress.transforms.upcycle.memory_bytes", lambda: 2**20)
    refused(invoke(*up, "--experts", "64"), 2, "--experts", "GiB", "memory")
    assert snapshot(work) == before

    from bscompress.transforms.upcycle import _upcycle_block

    block = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1))
    for spec, word in (({"paths": ["0"], "experts": 10**6, "routing": "softmax"}, "64"),
                       ({"paths": ["9"], "experts": 2, "routing": "softmax"}, "damaged"),
                       ({"paths": "0", "experts": 2, "routing": "softmax"}, "damaged"),
                       ({"paths": ["0"], "experts": 2, "routing": "x"}, "damaged")):
        with pytest.raises(BadInput, match=word):
            _upcycle_block(block, spec)


# -- 10. the latency cache -------------------------------------------------------------------
def test_latency_cache_that_is_a_folder_or_garbled_exits_2_and_damaged_entries_are_redone(
        work, capsys):
    before = snapshot(work)
    folder = work / "images"
    refused(invoke("decompose", work / "a.pt", "--arch", SPEC, "-m", "auto", "--budget",
                   "latency=0.8", "--latency-cache", folder, "-o", work / "d.pt"), 2,
            "directory")
    with pytest.raises(BadInput, match="lies below"):
        LatencyTimer(work / "a.pt" / "cache.json")
    assert snapshot(work) == before

    cache = work / "latency.json"
    conv = torch.nn.Conv2d(4, 4, 1)
    for garbage in (b"\xff\xfe\x00 not json", b"[1, 2]", b'{"entries": "x"}'):
        cache.write_bytes(garbage)  # some other file: refused, never written over
        refused(invoke("decompose", work / "a.pt", "--arch", SPEC, "-m", "auto", "--budget",
                       "latency=0.8", "--latency-cache", cache, "-o", work / "d.pt"), 2,
                "not a file of bscompress's timings")
        assert cache.read_bytes() == garbage and not (work / "d.pt").exists()
    cache.unlink()
    LatencyTimer(cache, runs=1, warmup=0).time(conv, (1, 4, 4, 4))
    entries = json.loads(cache.read_text())["entries"]
    cache.write_text(json.dumps({"format": 1, "entries": {**entries, "bad": "fast",
                                                          "neg": -1.0}}))
    timer = LatencyTimer(cache, runs=1, warmup=0)
    assert "2 damaged entries" in capsys.readouterr().err
    timer.time(conv, (1, 4, 4, 4))
    assert timer.measured == 0  # the good entries were kept


# -- 11. an output's extension tells its format -----------------------------------------------
@pytest.mark.parametrize(("args", "name", "ext"), [
    (("pack", "{work}/a.pt", "--arch", SPEC), "a.onnx", ".pt or .pth or .safetensors"),
    (("decompose", "{work}/a.pt", "--arch", SPEC, "-m", "dsc"), "d.txt",
     ".pt or .pth or .safetensors"),
    (("export", "{work}/a.pt", "--arch", SPEC), "e.pt", ".onnx"),
    (("bench", "{work}/a.pt", "--arch", SPEC, *FAST, "--plot"), "p.txt", ".png"),
])
def test_an_output_named_with_another_formats_extension_is_refused(work, args, name, ext):
    """A torch zip written as x.onnx, or ONNX as x.pt, is misread by the next command (which
    tells formats by extension): refused before any work, nothing written."""
    before = snapshot(work)
    args = [str(a).replace("{work}", str(work)) for a in args]
    option = [] if args[0] == "bench" else ["-o"]
    refused(invoke(*args, *option, work / name), 2, f"does not end in {ext}")
    assert snapshot(work) == before


def test_an_upper_case_safetensors_extension_writes_safetensors(work):
    out = work / "a.SAFETENSORS"
    assert invoke("pack", work / "a.pt", "--arch", SPEC, "-o", out).exit_code == 0
    assert out.read_bytes()[8:9] == b"{"  # a safetensors header, not a zip

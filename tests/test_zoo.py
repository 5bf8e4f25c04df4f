"""benchmarks/zoo.py, the zoo matrix of `make zoo`: it runs the CLI's steps on a model and
writes a table with no internal error. The full matrix is docs/zoo.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "benchmarks" / "zoo.py"
TINY = "tests/nets.py:TinyNet"

sys.path.insert(0, str(ROOT / "benchmarks"))
import zoo  # noqa: E402


def _run_zoo(tmp_path: Path, *args: str) -> tuple[str, list[dict]]:
    out = tmp_path / "zoo.md"
    work = tmp_path / "work"
    done = subprocess.run([sys.executable, str(ZOO), *args, "--out", str(out), "--work",
                           str(work)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return out.read_text(), json.loads((work / "zoo.json").read_text())["results"]


def _table_rows(text: str) -> list[list[str]]:
    rows = [line.strip("|").split(" | ") for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| model")]
    return [[c.strip() for c in row] for row in rows]


@pytest.mark.slow  # an end-to-end run (13–20 s): the slow tier, which CI runs
def test_zoo_writes_the_table(tmp_path):
    text, results = _run_zoo(tmp_path, "--models", TINY, "--methods", "dsc", "--size", "16")
    assert "**1 of 1 models pass every step**; 0 INTERNAL cells." in text
    assert "torch " in text and "bscompress " in text and "benchmarks/zoo.py" in text
    [row] = _table_rows(text)
    assert row[0] == TINY and row[1] == "16"
    # inspect, dsc, reload, export: one cell each, all passed
    assert all(c.startswith("pass") for c in row[2:6]), row
    assert "## Failures" not in text
    steps = [r["step"] for r in results[0]["rows"]]
    assert steps == ["probe", "inspect", "dsc", "reload", "export"]
    assert results[0]["rows"][2]["command"].startswith(f"bscompress decompose {TINY} -m dsc")
    # --render writes the same table again from zoo.json
    again = tmp_path / "again.md"
    subprocess.run([sys.executable, str(ZOO), "--render", str(tmp_path / "work" / "zoo.json"),
                    "--out", str(again)], cwd=ROOT, check=True, capture_output=True)
    assert again.read_text() == text


def test_cells_name_refusals_failures_and_internal_errors():
    rows = [{"step": "export", "archive": "cp", "status": "pass", "seconds": 2.0},
            {"step": "export", "archive": "cp4", "status": "FAIL", "seconds": 1.0,
             "message": "parity failed."}]
    status, seconds, text = zoo.cell(rows)
    assert status == "FAIL" and seconds == 3.0
    assert text == "1/2 pass; cp4: FAIL: parity failed. (3 s)"
    same = [{"step": "export", "archive": a, "status": "FAIL", "seconds": 1.0,
             "message": "no dynamic batch."} for a in ("cp", "dsc")]
    assert zoo.cell(same)[2] == "0/2 pass; all: FAIL: no dynamic batch. (2 s)"
    assert zoo.cell(same[:1])[2] == "cp: FAIL: no dynamic batch. (1 s)"
    assert zoo.cell([])[2] == "—"
    assert zoo.first_sentence("noise\nerror: layer x is odd. Do this: y\n") == "layer x is odd."
    assert zoo.first_sentence(f"internal error: KeyError: 'a' {zoo.DEBUG_HINT}") == (
        "KeyError: 'a'")


def test_model_selection():
    models, notes = zoo.select_models(["torchvision:resnet1*", "mobilenet_v3_small"], False)
    names = [m["name"] for m in models]
    assert names == ["torchvision:resnet101", "torchvision:resnet152", "torchvision:resnet18",
                     "torchvision:mobilenet_v3_small"]
    [timm] = zoo.select_models(["timm:tf_efficientnet_b0"], False)[0]
    assert timm == {"name": "timm:tf_efficientnet_b0", "spec": "timm:tf_efficientnet_b0",
                    "kwargs": {}}
    assert zoo.select_models([TINY], False)[0] == [{"name": TINY, "spec": TINY, "kwargs": {}}]
    default, notes = zoo.select_models(None, False)
    assert "torchvision:resnet18" in [m["name"] for m in default]
    assert any("--all" in note for note in notes)
    with pytest.raises(SystemExit, match="matches no model"):
        zoo.select_models(["nosuchnet*"], False)
    if zoo.timm_available():  # a timm model off the zoo's list runs as given
        assert "dla34" not in zoo.TIMM_MODELS
        assert zoo.select_models(["timm:dla34"], False)[0] == [
            {"name": "timm:dla34", "spec": "timm:dla34", "kwargs": {}}]
        with pytest.raises(SystemExit, match="matches no model"):
            zoo.select_models(["timm:no_such_net"], False)


def test_a_budget_the_latency_guard_refused_is_rerun_without_it():
    """The auto cell counts the rerun with --no-latency-guard and names the refusal."""
    refusal = ("--budget macs=0.5: even the smallest ranks of svd keep 55.0% of the model's "
               "macs (the latency guard left out 17 candidate blocks …).")
    rows = [{"step": "probe", "size": 64},
            {"step": "inspect", "status": "pass", "seconds": 1.0},
            {"step": "auto", "status": "exit 2", "seconds": 6.0, "message": refusal},
            {"step": zoo.UNGUARDED, "status": "pass", "seconds": 9.0},
            {"step": "reload", "archive": "auto", "status": "pass", "seconds": 1.0},
            {"step": "export", "archive": "auto", "status": "pass", "seconds": 2.0}]
    summary = zoo.summarise({"rows": rows, "worker": None}, ["auto"])
    assert summary["verdict"] == "pass"
    status, seconds, text = summary["columns"]["auto"]
    assert (status, seconds) == ("pass", 15.0)
    assert text == f"pass 9 s with --no-latency-guard; with the guard: exit 2: {refusal} (6 s)"
    failed = [*rows[:3], {"step": zoo.UNGUARDED, "status": "exit 2", "seconds": 9.0,
                          "message": "no eligible layer."}]
    summary = zoo.summarise({"rows": failed, "worker": None}, ["auto"])
    assert summary["verdict"] == "exit 2"
    assert summary["columns"]["auto"][2].startswith("exit 2: no eligible layer. (9 s) with")


@pytest.mark.slow
def test_zoo_on_a_torchvision_and_a_timm_model(tmp_path):
    """A real torchvision model and timm's TensorFlow-padded MobileNetV3 (Conv2dSame) through
    a method and the calibrated auto budget (the two quickest of the zoo: about two minutes)."""
    pytest.importorskip("timm")
    text, results = _run_zoo(tmp_path, "--models", "torchvision:shufflenet_v2_x0_5",
                             "timm:tf_mobilenetv3_small_minimal_100", "--methods", "dsc,auto",
                             "--jobs", "2")
    rows = _table_rows(text)
    assert len(rows) == 2
    assert not any("INTERNAL" in c for row in rows for c in row), text
    for result in results:
        statuses = {r["step"]: r["status"] for r in result["rows"] if "status" in r}
        assert statuses["inspect"] == "pass", result


def test_update_reruns_the_models_that_did_not_pass():
    def result(name: str, dsc: str) -> dict:
        rows = [{"step": "probe", "size": 64}] + [
            {"step": step, "status": status, "seconds": 1.0}
            for step, status in (("inspect", "pass"), ("dsc", dsc), ("reload", "pass"),
                                 ("export", "pass"))]
        return {"name": name, "spec": name, "kwargs": {}, "rows": rows, "worker": None}

    previous = {"results": [result("timm:a", "pass"), result("timm:b", "TIMEOUT")]}
    models, _ = zoo.update_selection(previous, None, ["dsc"])
    assert models == [{"name": "timm:b", "spec": "timm:b", "kwargs": {}}]
    assert [m["name"] for m in zoo.update_selection(previous, ["timm:a"], ["dsc"])[0]] == [
        "timm:a"]
    with pytest.raises(SystemExit, match="no model"):
        zoo.update_selection({"results": [result("timm:a", "pass")]}, None, ["dsc"])

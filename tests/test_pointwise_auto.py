"""``auto`` on 1×1 convs and Linear layers: the low-rank pair competes under the budget, data-free
and data-aware; the output layer stays dense unless asked for."""

from __future__ import annotations

import copy

import pytest
import torch

from bscompress.compress.decomposition import Budget, decompose, plan_decomposition
from bscompress.core.surgery import CLASSIFIER_REASON, Eligibility
from bscompress.io.arch import ArchSpec
from bscompress.io.archive import load, save_archive
from bscompress.methods import RankOptions
from tests.nets import INPUT_SHAPE, PointwiseNet

NETS = "tests/nets.py:PointwiseNet"


def _net() -> PointwiseNet:
    torch.manual_seed(0)
    return PointwiseNet().eval()


def test_auto_rewrites_pointwise_layers_under_a_mac_budget_and_keeps_the_classifier():
    plan = plan_decomposition(_net(), "auto", INPUT_SHAPE, RankOptions(), Eligibility(),
                              Budget("macs", 0.75))
    entries = {e.name: e for e in plan.layers}
    assert entries["fc"].skip_reason == CLASSIFIER_REASON
    assert "hidden" in entries and "head.0" in entries  # Linear and 1×1 convs are considered
    methods = {e.name: e.method for e in plan.replaced()}
    assert "svd" in methods.values()
    pointwise = {"blocks.0.0", "blocks.0.6", "blocks.1.0", "blocks.1.6", "head.0", "hidden"}
    assert {n for n, m in methods.items() if m == "svd"} <= pointwise
    assert entries["blocks.0.3"].skip_reason == "depthwise conv: already separable"
    assert plan.summary.budget.achieved <= 0.75 * plan.summary.macs_before


def test_the_classifier_is_rewritten_when_asked_or_named():
    for eligibility in (Eligibility(classifier=True), Eligibility(include=("fc",))):
        plan = plan_decomposition(_net(), "svd", INPUT_SHAPE, RankOptions(rank=2),
                                  eligibility)
        assert [e.name for e in plan.replaced()][-1] == "fc"
    plan = plan_decomposition(_net(), "svd", INPUT_SHAPE, RankOptions(rank=2), Eligibility())
    assert "fc" not in {e.name for e in plan.replaced()}


@pytest.mark.parametrize("sequential", [False, True])
def test_data_aware_auto_on_pointwise_layers_builds_and_archives(tmp_path, sequential):
    torch.manual_seed(1)
    calib = [torch.randn(16, *INPUT_SHAPE[1:]) for _ in range(4)]
    base = _net()
    model, plan = decompose(copy.deepcopy(base), "auto", INPUT_SHAPE, RankOptions(),
                            budget=Budget("macs", 0.75), calibration=calib,
                            sequential=sequential)
    svd = [e for e in plan.replaced() if e.method == "svd"]
    assert svd and all(e.output_error is not None and e.held_out_error is not None
                       for e in svd)
    assert plan.summary.macs_after <= 0.75 * plan.summary.macs_before + 1
    out = tmp_path / "auto.pt"
    save_archive(out, model, ArchSpec(NETS, {}), plan)
    x = torch.randn(2, *INPUT_SHAPE[1:])
    assert torch.equal(load(out, trust_code=True)(x), model(x))


def test_cli_include_classifier(tmp_path):
    import json

    from typer.testing import CliRunner

    from bscompress.app.cli import app

    torch.manual_seed(0)
    ckpt = tmp_path / "net.pt"
    torch.save(PointwiseNet().state_dict(), ckpt)
    args = ["decompose", str(ckpt), "--arch", NETS, "-m", "svd", "--rank", "2", "--json",
            "--input-shape", ",".join(map(str, INPUT_SHAPE))]
    replaced = {}
    for flag in ([], ["--include-classifier"]):
        result = CliRunner().invoke(app, [*args, *flag, "-o", str(tmp_path / f"{len(flag)}.pt")])
        assert result.exit_code == 0, result.stderr
        layers = json.loads(result.stdout)["plan"]["layers"]
        replaced[bool(flag)] = {e["name"] for e in layers if e["method"]}
        if not flag:
            assert next(e for e in layers if e["name"] == "fc")["skip_reason"] == \
                CLASSIFIER_REASON
    assert replaced[True] - replaced[False] == {"fc"}

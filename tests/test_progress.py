"""Progress reports of ``decompose`` (``progress.Step``) and the CLI's bar that draws them."""

from __future__ import annotations

import copy

import torch

from bscompress.app.cli import StageBar
from bscompress.compress.decomposition import Budget, decompose
from bscompress.compress.reconstruct import ReconstructionOptions
from bscompress.core.progress import Step
from bscompress.methods import RankOptions
from tests.nets import PointwiseNet


def _run(**kwargs) -> tuple[list[Step], object]:
    torch.manual_seed(0)
    model = PointwiseNet().eval()
    calib = [torch.randn(8, 3, 16, 16) for _ in range(4)]
    steps: list[Step] = []
    _, plan = decompose(copy.deepcopy(model), "auto", (1, 3, 16, 16), RankOptions(),
                        budget=Budget("macs", 0.7), calibration=calib, progress=steps.append,
                        **kwargs)
    return steps, plan


def test_every_stage_reports_how_far_it_is():
    steps, plan = _run(reconstruction=ReconstructionOptions(steps=2, batch=8))
    stages = list(dict.fromkeys(s.stage for s in steps))
    assert stages == ["collecting statistics", "measuring candidates", "factorizing",
                      "measuring the layers' errors in the network", "correcting BatchNorm",
                      "reconstructing"]
    for stage in ("measuring candidates", "factorizing"):
        done = [s.done for s in steps if s.stage == stage]
        totals = {s.total for s in steps if s.stage == stage}
        assert done == list(range(len(done))) and totals == {len(done)}
    assert [s.item for s in steps if s.stage == "factorizing"] == [
        e.name for e in plan.replaced()]
    statistics = [s for s in steps if s.stage == "collecting statistics"]
    assert all(s.done <= s.total for s in statistics)
    # one pass over the calibration batches (the held-out quarter's statistics are
    # collected apart and added up, not collected twice)
    assert [(s.done, s.total) for s in statistics if s.done == s.total] == [(32, 32)]
    assert [s.done for s in statistics] == sorted(s.done for s in statistics)
    # the BatchNorm correction is measured again on the trained blocks, last
    assert str(steps[-2]).startswith("reconstructing ")
    assert str(steps[-1]) == "correcting BatchNorm"


def test_the_bar_takes_steps_and_plain_descriptions():
    with StageBar(disabled=True) as bar:
        bar(Step("measuring candidates", "conv", 0, 3))
        bar(Step("measuring candidates", "conv", 2, 3))
        bar(Step("correcting BatchNorm"))
        bar("planning")
        task = bar.progress.tasks[0]
        assert task.description == "planning" and task.total is None

"""The plan's summary: typed records, written and read as the ``meta`` object archives have
always held (an archive written before the records reads the same), validated as the untrusted
data it is."""

from __future__ import annotations

import json

import pytest

from bscompress.core.plan import Plan
from bscompress.core.records import (
    BlockResult,
    BudgetRecord,
    CalibrationRecord,
    ReconstructionRecord,
    Summary,
)

#: the ``plan.meta`` of an archive written before the records (keys as decompose wrote them)
OLD_META = {
    "method": "auto", "ranks": {"rank": None}, "eligibility": {"include": []},
    "params_before": 440, "macs_before": 9000, "params_after": 200, "macs_after": 4400,
    "budget": {"kind": "macs", "fraction": 0.5, "target": 4500.0, "achieved": 4400,
               "error": "held-out relative output error (data-aware or data-free)"},
    "calibration": {"layers": 2, "full_covariance_layers": 2, "covariance_mb": 0.1,
                    "batchnorm_reestimated": 1, "batchnorm": {"corrected": 1, "kept": True},
                    "als_iters": 2, "sequential": False, "data": "demo", "split": "train",
                    "samples": 64},
    "reconstruction": {"steps": 5, "lr": 0.001, "batch": 64, "max_bytes": 1024, "seed": 0,
                       "device": None, "blocks": [
                           {"name": "features[2:6]", "layers": ["features.2"], "samples": 32,
                            "error_before": 0.2, "error_after": 0.1, "held_out_before": None,
                            "held_out_after": None, "restored": False, "skipped": None}]},
    "written_by_a_newer_version": {"x": 1},
}


def _plan(meta: dict) -> Plan:
    return Plan.from_dict({"layers": [], "input_shape": [1, 3, 8, 8], "meta": meta})


def test_an_old_meta_reads_into_records_and_writes_back_the_same():
    plan = _plan(json.loads(json.dumps(OLD_META)))
    summary = plan.summary
    assert isinstance(summary.budget, BudgetRecord) and summary.budget.achieved == 4400
    assert isinstance(summary.calibration, CalibrationRecord)
    assert summary.calibration.samples == 64 and summary.calibration.batchnorm["kept"]
    [block] = summary.reconstruction.blocks
    assert isinstance(block, BlockResult) and block.error_after == 0.1
    assert summary.reconstruction.model_extra["device"] is None  # options kept as they were
    written = plan.to_dict()["meta"]
    # what was set is written as it was read; unset optional fields stay absent
    for key in ("method", "params_before", "macs_after", "budget", "calibration",
                "written_by_a_newer_version"):
        assert written[key] == OLD_META[key], key
    assert written["reconstruction"]["blocks"][0]["name"] == "features[2:6]"
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.to_dict() == plan.to_dict()


def test_a_plan_without_meta_has_an_empty_summary():
    plan = Plan.from_dict({"layers": [], "input_shape": None})
    assert plan.summary == Summary() and plan.summary.budget is None
    assert plan.to_dict()["meta"] == {}


@pytest.mark.parametrize("meta,field", [
    ({"budget": {"kind": "macs", "fraction": "half", "target": 1, "achieved": 1}},
     "budget.fraction"),
    ({"macs_after": "fewer"}, "macs_after"),
    ({"calibration": {"layers": [], "full_covariance_layers": 0, "covariance_mb": 0}},
     "calibration.layers"),
    ({"reconstruction": {"steps": 1, "lr": 1e-3, "blocks": [{"layers": []}]}},
     "reconstruction.blocks.0.name"),
])
def test_a_bad_field_is_named(meta, field):
    with pytest.raises(ValueError, match=rf"plan meta\.{field}"):
        _plan(meta)


def test_records_validate_what_the_steps_write():
    record = ReconstructionRecord(steps=3, lr=0.01, blocks=[BlockResult("b", ["b.conv"])])
    with pytest.raises(ValueError):
        record.steps = "many"
    budget = BudgetRecord(kind="latency", fraction=0.5, target=1.0, achieved=0.9)
    budget.measured = 0.8
    assert budget.to_dict() == {"kind": "latency", "fraction": 0.5, "target": 1.0,
                                "achieved": 0.9, "error": "relative weight error",
                                "measured": 0.8}

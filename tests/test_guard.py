"""The latency guard: under a budget, a candidate block is offered only where it is timed
faster than its layer at every serving batch. Its logic is tested with a fake timer (timing
stays out of unit tests; the figures come from make bench), its wiring once with the real
ONNX Runtime timer on a tiny net (slow tier)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bscompress.app.cli import app
from bscompress.compress.decomposition import Budget, decompose
from bscompress.compress.guard import LatencyGuard, time_bound
from bscompress.core import recipe
from bscompress.core.errors import BadInput
from tests.nets import INPUT_SHAPE, TinyNet

SLOW = 1e9


class FakeTimer:
    """ms = batch × (the weights of its convs and Linear layers + SLOW per module of a slow
    class): a block with fewer weights than its layer is faster, unless its class is slow."""

    def __init__(self, slow: set[str] = frozenset()) -> None:
        self.slow, self.calls = set(slow), []

    def time(self, module: nn.Module, input_shape: tuple[int, ...]) -> float:
        self.calls.append((type(module).__name__, input_shape[0]))
        work = sum(m.weight.numel() for m in module.modules()
                   if isinstance(m, (nn.Conv2d, nn.Linear)))
        work += SLOW * sum(type(m).__name__ in self.slow for m in module.modules())
        return input_shape[0] * float(work)


def _auto(guard: LatencyGuard | None, fraction: float = 0.6):
    torch.manual_seed(0)
    return decompose(TinyNet(width=32), "auto", INPUT_SHAPE, budget=Budget("macs", fraction),
                     guard=guard)


@functools.cache
def _unguarded():
    """``_auto(None)``, built once for the tests that only read it."""
    return _auto(None)


def _block_classes(model: nn.Module, plan) -> set[str]:
    return {type(model.get_submodule(e.name)).__name__ for e in plan.replaced()}


def test_a_block_slower_at_batch_one_is_not_timed_at_the_serving_batch():
    layer, block = nn.Conv2d(8, 8, 3), nn.Sequential(nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 3))
    timer = FakeTimer()
    guard = LatencyGuard(timer, batches=(1, 32))
    assert guard.keeps(layer, block, (1, 8, 6, 6))
    assert guard.ratios(layer, block, (1, 8, 6, 6)) == pytest.approx(
        {1: (16 + 144) / 576, 32: (16 + 144) / 576})
    timer.slow, timer.calls = {"Sequential"}, []
    assert not guard.keeps(layer, block, (1, 8, 6, 6))
    assert ("Sequential", 32) not in timer.calls  # slower at batch 1: not timed again
    assert (guard.checked, guard.rejected) == (2, 1)


def test_the_time_bound_is_a_share_of_the_mac_saving():
    assert time_bound(0.3, 0.5) == pytest.approx(0.65)
    assert time_bound(0.3, 0.0) == 1.0 and time_bound(0.3, 1.0) == pytest.approx(0.3)
    assert time_bound(1.5, 0.5) == 1.0 and time_bound(-1.0, 0.5) == pytest.approx(0.5)


class BarelyFaster(FakeTimer):
    """FakeTimer, but a module of a class in ``barely`` takes 0.95 of the time of the layer
    last timed on the same input shape (the guard times the layer first)."""

    def __init__(self, barely: set[str]) -> None:
        super().__init__()
        self.barely, self.layer_ms = set(barely), {}

    def time(self, module: nn.Module, input_shape: tuple[int, ...]) -> float:
        ms = super().time(module, input_shape)
        if type(module).__name__ in self.barely:
            return 0.95 * self.layer_ms[input_shape]
        self.layer_ms[input_shape] = ms
        return ms


def test_a_block_barely_faster_for_many_fewer_macs_is_left_out_at_a_share():
    layer, block = nn.Conv2d(8, 8, 3), nn.Sequential(nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 3))
    for share, kept in ((0.0, True), (0.5, False)):
        guard = LatencyGuard(BarelyFaster({"Sequential"}), share=share)
        assert guard.keeps(layer, block, (1, 8, 6, 6), macs=0.3) is kept
        assert guard.ratios(layer, block, (1, 8, 6, 6)) == pytest.approx({1: 0.95, 32: 0.95})
    guard = LatencyGuard(BarelyFaster({"Sequential"}), share=0.5)
    assert guard.keeps(layer, block, (1, 8, 6, 6), macs=0.92)  # 0.95 < 1 − 0.5 · 0.08


def test_the_allocator_takes_the_macs_elsewhere_than_a_barely_faster_form():
    """With every block of one class barely faster than its layer, a share of 0 lets that
    class in where the allocation wants it, a share of 0.5 keeps it out; the record says
    the share."""
    unguarded, plan = _unguarded()
    chosen = sorted(_block_classes(unguarded, plan))
    for share in (0.0, 0.5):
        guarded, plan = _auto(LatencyGuard(BarelyFaster({chosen[0]}), share=share))
        assert (chosen[0] in _block_classes(guarded, plan)) == (share == 0.0)
        assert plan.summary.guard.share == share
        assert plan.summary.macs_after <= 0.6 * plan.summary.macs_before


def test_the_guard_leaves_out_the_forms_timed_slower_and_records_the_ratios():
    model, plan = _unguarded()
    chosen = _block_classes(model, plan)
    assert chosen and plan.summary.guard is None
    timer = FakeTimer(slow=chosen)  # what the allocator picked is now slower than its layer
    guarded, plan = _auto(LatencyGuard(timer))
    record = plan.summary.guard
    assert plan.replaced() and not _block_classes(guarded, plan) & chosen
    assert record.rejected > 0 and record.checked > record.rejected
    assert record.batches == [1, 32] and set(record.layers) == {e.name for e in plan.replaced()}
    assert all(0 < r < 1 for ratios in record.layers.values() for r in ratios.values())
    assert set(record.whole) == {"1", "32"} and all(0 < r < 1 for r in record.whole.values())
    assert plan.summary.macs_after <= 0.6 * plan.summary.macs_before


def test_the_guard_times_only_the_blocks_the_allocation_chooses():
    """Lazy timing: where every block is faster, one allocation, and only its chosen blocks
    are timed (not every candidate of every layer); the plan is the unguarded one."""
    model, plan = _unguarded()
    timer = FakeTimer()
    guard = LatencyGuard(timer)
    guarded, guarded_plan = _auto(guard)
    assert [(e.name, e.method, e.ranks) for e in guarded_plan.replaced()] == [
        (e.name, e.method, e.ranks) for e in plan.replaced()]
    assert (guard.checked, guard.rejected) == (len(plan.replaced()), 0)


class FailingTimer(FakeTimer):
    """Fails (as an exporter would) on the modules of the classes in ``broken``."""

    def __init__(self, broken: set[str]) -> None:
        super().__init__()
        self.broken = broken

    def time(self, module, input_shape):
        if type(module).__name__ in self.broken:
            raise RuntimeError("Exporting the operator 'aten::odd' is not supported\nmore")
        return super().time(module, input_shape)


def test_blocks_the_timer_fails_on_are_kept_and_counted_not_an_error():
    """The guard leaves out only what it measured slower: a block (or a whole model) the
    timer cannot run is kept, counted, and its first failure recorded."""
    model, plan = _unguarded()
    chosen = _block_classes(model, plan)
    guard = LatencyGuard(FailingTimer(broken=chosen | {"TinyNet"}))
    guarded, guarded_plan = _auto(guard)
    record = guarded_plan.summary.guard
    assert [(e.name, e.method, e.ranks) for e in guarded_plan.replaced()] == [
        (e.name, e.method, e.ranks) for e in plan.replaced()]
    assert record.untimed == len(plan.replaced()) and record.rejected == 0
    assert "RuntimeError: Exporting the operator 'aten::odd'" in record.untimed_why
    assert record.whole == {} and record.layers == {}


def test_a_budget_out_of_reach_says_the_guard_left_blocks_out():
    timer = FakeTimer(slow={"BSConvU", "BSConvS", "DSConv", "Tucker2Conv", "CPConv", "CP4Conv",
                            "LowRankConv", "LowRankLinear", "Sequential"})
    with pytest.raises(BadInput, match="the latency guard left out [0-9]+ candidate blocks"):
        _auto(LatencyGuard(timer), fraction=0.3)


def test_the_guard_needs_a_budget(tmp_path):
    result = CliRunner().invoke(app, ["decompose", "torchvision:resnet18", "-m", "dsc",
                                      "--latency-guard", "-o", str(tmp_path / "x.pt")])
    assert result.exit_code == 2
    assert "--latency-guard times the candidates of a budget: add --budget" in " ".join(
        result.stderr.split())


def _decompose_cli(tmp_path, monkeypatch, *extra: str):
    """``decompose`` of TinyNet by the CLI, timed by a fake timer; its plan's summary."""
    from bscompress.deploy import latency
    from tests.nets import __file__ as nets

    monkeypatch.setattr(latency, "make_timer", lambda *a, **k: FakeTimer())
    ckpt = tmp_path / "tiny.pt"
    torch.manual_seed(0)
    torch.save(TinyNet(width=32).state_dict(), ckpt)
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}.pt"
    result = CliRunner().invoke(app, ["decompose", str(ckpt), "--arch", f"{nets}:TinyNet",
                                      "--arch-kwargs", '{"width": 32}', "--input-shape",
                                      "1,3,16,16", *extra, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["plan"]["meta"]


@pytest.mark.default_guard
def test_the_guard_runs_by_default_under_a_macs_or_params_budget(tmp_path, monkeypatch):
    for budget in ("macs=0.6", "params=0.6"):
        summary = _decompose_cli(tmp_path, monkeypatch, "-m", "auto", "--budget", budget)
        assert summary["guard"]["checked"] >= 1 and summary["guard"]["batches"] == [1, 32]
        assert summary["guard"]["share"] == recipe.GUARD_SHARE
    shared = _decompose_cli(tmp_path, monkeypatch, "-m", "auto", "--budget", "macs=0.6",
                            "--guard-share", "0")
    assert shared["guard"]["share"] == 0.0
    off = _decompose_cli(tmp_path, monkeypatch, "-m", "auto", "--budget", "macs=0.6",
                         "--no-latency-guard")
    assert off.get("guard") is None
    plain = _decompose_cli(tmp_path, monkeypatch, "-m", "tucker2")  # no budget: no guard
    assert plain.get("guard") is None


@pytest.mark.default_guard
def test_widths_are_rounded_to_the_runtimes_channel_block_where_time_is_measured(
        tmp_path, monkeypatch):
    """Under the guard the bottleneck widths default to multiples of the runtime's channel
    block (a rank of 27 would take the layer and its neighbours out of ONNX Runtime's NCHWc
    layout); ``--round-to`` overrides it, and without a timer nothing is rounded."""
    from bscompress.deploy import latency

    monkeypatch.setattr(latency, "channel_block", lambda runtime: 8)
    guarded = _decompose_cli(tmp_path, monkeypatch, "-m", "auto", "--budget", "macs=0.6")
    assert guarded["ranks"]["round_to"] == 8
    plan = _decompose_cli(tmp_path, monkeypatch, "-m", "tucker2", "--budget", "macs=0.6")
    assert plan["ranks"]["round_to"] == 8
    given = _decompose_cli(tmp_path, monkeypatch, "-m", "auto", "--budget", "macs=0.6",
                           "--round-to", "4")
    assert given["ranks"]["round_to"] == 4
    for extra in (["--no-latency-guard"], []):
        summary = _decompose_cli(tmp_path, monkeypatch, "-m", "auto" if extra else "tucker2",
                                 *(["--budget", "macs=0.6"] if extra else []), *extra)
        assert summary["ranks"]["round_to"] == 1


@pytest.mark.default_guard
def test_the_table_says_when_narrower_widths_were_let_in(tmp_path, monkeypatch):
    from bscompress.deploy import latency
    from tests.nets import __file__ as nets

    monkeypatch.setattr(latency, "channel_block", lambda runtime: 16)
    monkeypatch.setattr(latency, "make_timer", lambda *a, **k: FakeTimer())
    ckpt = tmp_path / "tiny.pt"
    torch.manual_seed(0)
    torch.save(TinyNet(width=32).state_dict(), ckpt)
    result = CliRunner().invoke(app, ["decompose", str(ckpt), "--arch", f"{nets}:TinyNet",
                                      "--arch-kwargs", '{"width": 32}', "--input-shape",
                                      "1,3,16,16", "-m", "tucker2", "--budget", "macs=0.3",
                                      "-o", str(tmp_path / "out.pt")])
    assert result.exit_code == 0, result.stderr
    assert ("widths rounded up to multiples of 16 could not reach the budget: narrower forms "
            "were offered too") in " ".join(result.stdout.split())


def test_the_channel_block_follows_the_cpus_vector_width(monkeypatch):
    from bscompress.deploy.latency import channel_block

    for capability, ort, eager in (("AVX512", 16, 16), ("AVX512_BF16", 16, 16),
                                   ("AVX2", 16, 8), ("DEFAULT", 1, 1), ("SVE256", 1, 1)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert channel_block("onnxruntime") == ort and channel_block("eager") == eager
    assert channel_block("eager-cuda") == 8


@pytest.mark.default_guard
def test_a_recipe_turns_the_default_guard_off_or_on():
    from bscompress.core.recipe import Decompose

    assert Decompose(method="auto", budget="macs=0.5").guarded
    assert not Decompose(method="auto", budget="macs=0.5", latency_guard=False).guarded
    assert not Decompose(method="auto", budget="latency=0.5").guarded  # time is the cost
    assert not Decompose(method="dsc").guarded
    assert Decompose(method="auto", budget="latency=0.5", latency_guard=True).guarded


def test_the_suite_runs_without_the_default_guard():
    from bscompress.core.recipe import Decompose

    assert not Decompose(method="auto", budget="macs=0.5").guarded


@pytest.mark.slow
def test_the_command_times_with_onnx_runtime(tmp_path):
    """The real timer, on a tiny net: the line under the plan and the record in the JSON."""
    from tests.nets import __file__ as nets

    ckpt = tmp_path / "tiny.pt"
    torch.manual_seed(0)
    torch.save(TinyNet(width=32).state_dict(), ckpt)
    args = ["decompose", str(ckpt), "--arch", f"{nets}:TinyNet", "--arch-kwargs",
            '{"width": 32}', "--input-shape", "1,3,16,16", "-m", "tucker2", "--budget",
            "macs=0.7", "--latency-guard", "--serving-batch", "8", "--latency-cache",
            str(tmp_path / "latency.json")]
    table = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "a.pt")])
    assert table.exit_code == 0, table.stderr
    assert "latency guard (ONNX Runtime CPU, 1 thread; batch 1, 8)" in table.stdout
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "b.pt"), "--json"])
    record = json.loads(result.stdout)["plan"]["meta"]["guard"]
    assert record["checked"] >= 1 and set(record["whole"]) == {"1", "8"}
    assert json.loads((tmp_path / "latency.json").read_text())["entries"]  # cached


def test_the_eager_timer_times_pytorch_and_caches_apart_from_onnx_runtime(tmp_path):
    from bscompress.deploy.latency import EagerTimer, LatencyTimer, make_timer

    cache = tmp_path / "latency.json"
    eager = EagerTimer(cache, runs=3, warmup=1)
    conv = nn.Conv2d(8, 8, 3, padding=1).to("meta")  # the timer draws the weights
    first = eager.time(conv, (2, 8, 8, 8))
    assert first > 0 and eager.measured == 2  # the block and the empty call
    assert eager.time(conv, (2, 8, 8, 8)) == first and eager.measured == 2  # cached
    assert eager.key(conv, (2, 8, 8, 8)) != LatencyTimer(cache).key(conv, (2, 8, 8, 8))
    assert EagerTimer(cache).time(conv, (2, 8, 8, 8)) == first  # from the file
    assert isinstance(make_timer("eager", cache), EagerTimer)
    # the empty call: eager returns its input (no pass over it); ONNX Runtime needs an op
    x = torch.randn(2, 8, 8, 8)
    assert eager._empty()(x) is x and LatencyTimer._empty()(x) is not x
    if not torch.cuda.is_available():
        with pytest.raises(BadInput, match="eager-cuda needs a CUDA device"):
            make_timer("eager-cuda", cache)


def test_a_whole_model_that_is_not_faster_is_named_in_a_warning(capsys):
    """The blocks were each faster than their layer; the network is not: the command says
    so (on stderr) instead of leaving it to a ratio in the summary line."""
    from bscompress.app.cli.common import _print_guard
    from bscompress.core.records import GuardRecord, Summary

    totals = Summary(macs_before=100, macs_after=50)
    _print_guard(GuardRecord(runtime="ONNX Runtime CPU, 1 thread", batches=[1, 32],
                             checked=4, whole={"1": 1.09, "32": 0.74}), totals)
    out, err = capsys.readouterr()
    assert "1.09× (batch 1)" in out
    warning = " ".join(err.split())
    assert "not faster than the original at batch 1 (1.09×)" in warning
    assert "batch 32" not in warning
    _print_guard(GuardRecord(runtime="ONNX Runtime CPU, 1 thread", batches=[1],
                             checked=4, whole={"1": 0.8}), totals)
    assert "warning" not in capsys.readouterr().err


def test_a_whole_model_that_saves_too_little_time_for_its_macs_is_named_in_a_warning(capsys):
    """At share s, each block met 1 − s·(1 − its MAC fraction); a network that misses that
    bound for its own MAC fraction (layers no block replaces hold its time) gets a warning;
    at share 0 only a network that is not faster at all does."""
    from bscompress.app.cli.common import _print_guard
    from bscompress.core.records import GuardRecord, Summary

    totals = Summary(macs_before=100, macs_after=50)  # bound at share 0.5: 0.75
    record = GuardRecord(runtime="eager", batches=[1, 32], share=0.5, checked=4,
                         whole={"1": 0.7, "32": 0.96})
    _print_guard(record, totals)
    warning = " ".join(capsys.readouterr().err.split())
    assert "with 50.0% of its MACs the compressed model saves less than 0.5" in warning
    assert "batch 32 (1.04× faster)" in warning and "batch 1" not in warning
    assert "0.75× the time" in warning
    _print_guard(record.model_copy(update={"whole": {"1": 0.74, "32": 0.75}}), totals)
    assert "warning" not in capsys.readouterr().err  # at the bound: met
    _print_guard(record.model_copy(update={"share": 0.0}), totals)
    assert "warning" not in capsys.readouterr().err


class PairOnly(FakeTimer):
    """A timer that times pairs in turn (``ratio``): the guard must ask it for ratios, the
    blocks against their layers and the built model against the original, and never for a
    lone time."""

    def time(self, module, input_shape):
        raise AssertionError("a pair timer is asked for ratios")

    def ratio(self, block, reference, input_shape):
        return FakeTimer.time(self, block, input_shape) / FakeTimer.time(
            self, reference, input_shape)


def test_a_timer_that_times_pairs_is_asked_for_ratios():
    unguarded, plan = _unguarded()
    timer = PairOnly(slow=_block_classes(unguarded, plan))
    guard = LatencyGuard(timer)
    guarded, plan = _auto(guard)
    record = plan.summary.guard
    assert record.rejected > 0 and set(record.layers) == {e.name for e in plan.replaced()}
    plain = FakeTimer()
    whole = plain.time(guarded, INPUT_SHAPE) / plain.time(TinyNet(width=32), INPUT_SHAPE)
    assert record.whole == pytest.approx({"1": whole, "32": whole}) and whole < 1

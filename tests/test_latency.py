"""The latency budget: blocks timed once in ONNX Runtime and cached on disk, never a block
slower than its layer, the whole model measured within the budget."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from bscompress.compress.decomposition import AUTO_METHODS, Budget, decompose
from bscompress.core.errors import BadInput
from bscompress.deploy.latency import LatencyTimer, materialize
from tests.nets import INPUT_SHAPE, TinyNet


def test_timings_are_cached_on_disk_and_reused(tmp_path):
    cache = tmp_path / "latency.json"
    conv = nn.Conv2d(16, 16, 3, padding=1).to("meta")
    first = LatencyTimer(cache, runs=3, warmup=1)
    ms = first.time(conv, (1, 16, 8, 8))
    assert ms >= 0 and first.measured == 2  # the block and the empty-call overhead
    again = LatencyTimer(cache, runs=3, warmup=1)
    assert again.time(conv, (1, 16, 8, 8)) == ms and again.measured == 0
    again.time(conv, (1, 16, 9, 9))  # another shape is another entry
    assert again.measured == 2
    assert again.time(nn.Conv2d(16, 16, 3, padding=1), (1, 16, 8, 8)) == ms  # weights: no
    assert again.time(nn.Conv2d(16, 16, 3, padding=1, bias=False), (1, 16, 8, 8)) is not None
    assert again.measured == 3  # ... structure: yes
    assert len(json.loads(cache.read_text())["entries"]) == 5
    entries = json.loads(cache.read_text())
    first_key = next(iter(entries["entries"]))
    entries["entries"][first_key] = -1.0  # a damaged entry is measured again, never trusted
    cache.write_text(json.dumps(entries))
    damaged = LatencyTimer(cache, runs=3, warmup=1)
    assert first_key not in damaged._entries and len(damaged._entries) == 4


@pytest.mark.parametrize("content", [b"{not json", b"PK\x03\x04 a zip: a checkpoint",
                                     b"import torch\n", b'{"a": 1}'])
def test_a_file_that_is_no_latency_cache_is_refused_and_left_as_it_is(tmp_path, content):
    """--latency-cache naming the model, its source or any other file by mistake: refused in
    a sentence before any timing, the file unchanged (it was rebuilt over before)."""
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(BadInput, match="is not a file of bscompress's timings"):
        LatencyTimer(path)
    assert path.read_bytes() == content


def test_timers_sharing_a_cache_keep_each_others_entries(tmp_path):
    """Two timers on one file (two runtimes, or two processes): each save merges into the
    file, so neither loses the other's timings."""
    from bscompress.deploy.latency import EagerTimer

    cache = tmp_path / "latency.json"
    conv = nn.Conv2d(4, 4, 3).to("meta")
    ort, eager = LatencyTimer(cache, runs=2, warmup=0), EagerTimer(cache, runs=2, warmup=0)
    ort.time(conv, (1, 4, 6, 6))
    eager.time(conv, (1, 4, 6, 6))  # loaded an empty file, saves after ort did
    assert len(json.loads(cache.read_text())["entries"]) == 4  # both blocks, both overheads
    for timer in (LatencyTimer(cache), EagerTimer(cache)):
        timer.time(conv, (1, 4, 6, 6))
        assert timer.measured == 0


def test_the_channels_last_eager_timer_times_nhwc_under_keys_of_its_own(tmp_path, monkeypatch):
    """--latency-runtime eager-channels-last: the block and its input channels-last (a
    Conv1d's 3-D input in its own layout), cached apart from the NCHW eager timings."""
    from bscompress.deploy import latency

    seen = []
    real = latency.eager_call

    def spy(block, input_shape, device="cpu", memory_format=torch.contiguous_format):
        seen.append((len(input_shape), memory_format))
        return real(block, input_shape, device, memory_format)

    monkeypatch.setattr(latency, "eager_call", spy)
    cache = tmp_path / "latency.json"
    nhwc = latency.make_timer("eager-channels-last", cache)
    assert isinstance(nhwc, latency.ChannelsLastEagerTimer) and "channels-last" in nhwc.runtime
    nhwc.time(nn.Conv2d(4, 4, 3), (1, 4, 6, 6))
    nhwc.time(nn.Conv1d(4, 4, 3), (1, 4, 6))  # runs: the layout is for 4-D maps only
    assert seen and all(fmt == torch.channels_last for _, fmt in seen)
    nchw = latency.make_timer("eager", cache)
    nchw.time(nn.Conv2d(4, 4, 3), (1, 4, 6, 6))
    assert nchw.measured == 2  # not the channels-last entries
    assert seen[-1] == (4, torch.contiguous_format)
    assert latency.channel_block("eager-channels-last") == latency.channel_block("eager")


def test_timing_leaves_the_block_untouched():
    conv = nn.Conv2d(4, 4, 3)
    before = copy.deepcopy(conv.state_dict())
    LatencyTimer(None, runs=2, warmup=0).time(conv, (1, 4, 6, 6))
    assert all(torch.equal(before[k], v) for k, v in conv.state_dict().items())
    copy_ = materialize(conv.to("meta"))
    assert not any(p.is_meta for p in copy_.parameters()) and not copy_.training


class FakeTimer:
    """Latency by rule: BSConv-U and DSC blocks are slower than any dense conv, the others
    cost their parameter share; the whole model is its layers' sum."""

    def __init__(self) -> None:
        self.calls = 0

    def time(self, block: nn.Module, shape) -> float:
        self.calls += 1
        if isinstance(block, TinyNet):
            return sum(self.time(m, shape) for m in block.modules()
                       if m is not block and not list(m.children()))
        name = type(block).__name__
        if name in ("BSConvU", "DSConv"):
            return 1e6
        return float(sum(p.numel() for p in block.parameters()))


def test_latency_budget_never_picks_a_block_slower_than_its_layer():
    torch.manual_seed(0)
    timer = FakeTimer()
    model, plan = decompose(TinyNet(width=32), "auto", INPUT_SHAPE,
                            budget=Budget("latency", 0.8), latency=timer)
    chosen = {entry.method for entry in plan.replaced()}
    assert chosen and chosen <= set(AUTO_METHODS) - {"bsconv-u", "dsc"}
    budget = plan.summary.budget
    assert budget.measured <= 0.8 * plan.summary.latency_before_ms + 1e-9
    with pytest.raises(BadInput, match="--budget latency=0.01"):
        decompose(TinyNet(width=32), "bsconv-u", INPUT_SHAPE, budget=Budget("latency", 0.01),
                  latency=FakeTimer())


def test_latency_budget_on_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1)).eval()
    timer = LatencyTimer(tmp_path / "latency.json", runs=20, warmup=3)
    _, plan = decompose(copy.deepcopy(base), "tucker2", (1, 64, 32, 32),
                        budget=Budget("latency", 0.9), latency=timer)
    assert plan.summary.budget.measured <= 0.9 * plan.summary.latency_before_ms
    measured = timer.measured
    again = LatencyTimer(tmp_path / "latency.json", runs=20, warmup=3)
    _, replan = decompose(copy.deepcopy(base), "tucker2", (1, 64, 32, 32),
                          budget=Budget("latency", 0.9), latency=again)
    assert measured > 0 and again.measured == 0  # the second run times nothing
    assert [e.ranks for e in replan.layers] == [e.ranks for e in plan.layers]


def test_a_slow_block_is_timed_fewer_times():
    """A call of a second (a whole 224² model at batch 32) is timed a few times, not 50; a
    fast block all ``runs`` times."""
    from bscompress.deploy.latency import MIN_RUNS, TIME_BUDGET_MS, median_ms, runs_within

    assert runs_within(0.05, 50) == 50
    assert runs_within(TIME_BUDGET_MS / 10, 50) == 10
    assert runs_within(1000.0, 50) == MIN_RUNS == runs_within(1e9, 50)
    assert runs_within(0.0, 3) == 3
    calls = []
    assert median_ms(lambda: calls.append(1), warmup=5, runs=7) >= 0
    assert len(calls) == 1 + 0 + 7  # the probing call, warm-up min(5, 7 // 5) - 1, 7 timed


def test_a_ratio_timed_in_turn_cancels_the_drift_of_the_cores():
    """Per-round ratios: a machine three times slower in the later rounds moves both times
    of a round alike, so the paired ratio stays exact where medians taken apart would not;
    the overhead (the empty call) is taken off both."""
    from bscompress.deploy.latency import interleaved, paired_ratio

    drift = [1.0, 1.0, 3.0, 3.0, 3.0]
    empty = [0.1 * d for d in drift]
    reference = [1.1 * d for d in drift]
    block = [0.6 * d for d in drift]
    assert paired_ratio(empty, reference, block) == pytest.approx(0.5)
    assert paired_ratio([0.0], [1.0], [0.0]) == 1e-6  # never zero
    order = []
    calls = [lambda: order.append("a"), lambda: order.append("b")]
    times = interleaved(calls, rounds=2, runs=2)
    assert order == ["a", "a", "b", "b"] * 2 and [len(t) for t in times] == [2, 2]


def test_pair_ratios_are_cached_and_order_blocks_by_their_work(tmp_path):
    """A ratio is one cached measurement of the pair (block, reference); a 1×1 conv keeping
    1/72 of a 3×3 conv's MACs is timed well under it, the conv against itself near 1
    (within 4×: 0.48 was seen on a loaded machine)."""
    cache = tmp_path / "latency.json"
    conv = nn.Conv2d(64, 64, 3, padding=1).to("meta")
    small = nn.Conv2d(64, 8, 1).to("meta")
    timer = LatencyTimer(cache, runs=10, warmup=1)
    ratio = timer.ratio(small, conv, (1, 64, 32, 32))
    assert 0 < ratio < 0.5 and timer.measured == 1
    assert 0.25 < timer.ratio(conv, conv, (1, 64, 32, 32)) < 4  # (wide: a loaded machine)
    again = LatencyTimer(cache)
    assert again.ratio(small, conv, (1, 64, 32, 32)) == ratio and again.measured == 0
    again.ratio(conv, small, (1, 64, 32, 32))  # the pair is ordered
    assert again.measured == 1


def test_a_dilated_same_padded_conv_is_timed_with_explicit_pads(tmp_path):
    """The TorchScript exporter writes padding="same" as auto_pad, which ONNX Runtime refuses
    on a dilated conv; the timer exports the same conv with its pads written out."""
    from bscompress.deploy.latency import explicit_same_padding

    convs = nn.Sequential(nn.Conv2d(8, 8, (1, 7), padding="same", dilation=(1, 2)),
                          nn.Conv2d(8, 8, 3, padding="same", dilation=2, groups=8))
    explicit = explicit_same_padding(convs)
    assert [c.padding for c in explicit] == [(0, 6), (2, 2)]
    assert [c.padding for c in convs] == ["same", "same"]  # a copy: the model is untouched
    x = torch.randn(2, 8, 9, 10)
    torch.testing.assert_close(explicit(x), convs(x))
    timer = LatencyTimer(tmp_path / "latency.json", runs=3, warmup=1)
    assert timer.time(convs, (1, 8, 9, 10)) > 0
    uneven = nn.Conv2d(8, 8, 2, padding="same")  # 1 pad on one side only: kept as it is
    assert explicit_same_padding(uneven) is uneven

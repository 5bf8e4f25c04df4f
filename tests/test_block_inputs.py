"""The sequential fit's statistics from cached block inputs equal those of running both whole
networks (paired.collect_paired_covariance, the oracle), layer after layer, while layers
are replaced in order, out of order, in models that edit tensors between blocks or in place."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from bscompress.compress.block_inputs import PairedStatistics, SpilledInputs, probe_links
from bscompress.compress.calibrate import collect_patch_covariances
from bscompress.compress.paired import collect_paired_covariance, through_outputs
from bscompress.core.covariance import centred
from bscompress.demo import FMNISTResNet


def _convs(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _batches(shape, count=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


def _assert_same(a, b):
    for key in ("full", "cross", "target_energy", "target_mean", "mean"):
        assert torch.allclose(getattr(a, key), getattr(b, key), rtol=1e-6, atol=1e-9), key
    assert a.patches == b.patches


def _replace(model: nn.Module, name: str, scale: float = 0.8) -> None:
    """A new module object in ``name``'s place (as apply_plan leaves), computing something
    else, so that its error reaches the layers after it."""
    parent, _, child = name.rpartition(".")
    layer = copy.deepcopy(model.get_submodule(name))
    with torch.no_grad():
        layer.weight.mul_(scale).add_(0.05 * torch.randn_like(layer.weight))
    setattr(model.get_submodule(parent), child, layer)


def _check_in_order(original, compressed, layers, batches, order, **kwargs):
    stats = PairedStatistics(original, compressed, layers, batches, **kwargs)
    for name in order:
        _assert_same(stats.covariance(name),
                     collect_paired_covariance(original, compressed, name, batches))
        _replace(compressed, name)
    return stats


@pytest.mark.parametrize("cached", [True, False])
def test_the_one_shot_statistics_stand_for_the_originals_own(cached):
    """E[p pᵀ] and E[p] of the original layer, given as its one-shot Σ over the same
    batches, are not computed again: the same statistics either way."""
    original = _resnet()
    compressed = copy.deepcopy(original)
    layers = _convs(original)[1:]
    batches = _batches((4, 3, 12, 12))
    one_shot = collect_patch_covariances(original, batches, layers)
    stats = PairedStatistics(original, compressed, layers, batches,
                             **({} if cached else {"max_bytes": 0}))
    tested = layers[:7]
    # the cross moment through the outputs, and through the input pairs (the 1×1 shortcut)
    assert {through_outputs(original.get_submodule(name)) for name in tested} == {True, False}
    for name in tested:
        _assert_same(stats.covariance(name, reference=one_shot[name]),
                     collect_paired_covariance(original, compressed, name, batches))
        _replace(compressed, name)
    other = collect_patch_covariances(original, batches[:2], layers)  # other batches
    with pytest.raises(ValueError, match="patches"):
        stats.covariance(layers[7], reference=other[layers[7]])
    with pytest.raises(ValueError, match="uncentred"):
        stats.covariance(layers[7], reference=centred(one_shot[layers[7]]))


def _resnet():
    """The demo's ResNet, narrow: a stem in an nn.Sequential, two blocks per stage,
    projection shortcuts."""
    torch.manual_seed(0)
    model = FMNISTResNet(widths=(8, 16, 32), in_channels=3, blocks=(2, 2, 2)).eval()
    with torch.no_grad():  # BatchNorm statistics and scales that are not the identity
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    return model


def test_resnet_layer_after_layer_from_the_cache():
    original = _resnet()
    compressed = copy.deepcopy(original)
    layers = _convs(original)
    stats = _check_in_order(original, compressed, layers, _batches((4, 3, 16, 16)), layers)
    assert stats.from_network == 0 and stats.from_cache == len(layers)
    original_inputs, compressed_inputs = stats.networks
    # the stem's inputs are captured (the network's input); every later block's inputs are
    # the previous block's outputs
    assert compressed_inputs.captured == 1 and compressed_inputs.advanced == 6
    assert original_inputs.captured == 1


def test_the_original_runs_each_of_its_layers_once_a_batch():
    """The original network does not change: one run of each unit gives its layers' inputs
    and the next unit's, instead of a run up to each layer and one more to move on."""
    original = _resnet()
    compressed = copy.deepcopy(original)
    layers = _convs(original)
    batches = _batches((4, 3, 16, 16), count=2)
    runs = dict.fromkeys(layers, 0)

    def count(name):
        def hook(_module, _args, _output):
            runs[name] += 1
        return hook

    stats = PairedStatistics(original, compressed, layers, batches)  # (probes an example)
    for name in layers:
        original.get_submodule(name).register_forward_hook(count(name))
    for name in layers:
        stats.covariance(name)
        _replace(compressed, name)
    assert runs == dict.fromkeys(layers, len(batches))
    assert stats.tapped == 7 and stats.from_cache == len(layers)


def test_a_layer_given_its_units_input_needs_no_run_of_the_unit():
    """A block's first conv and its projection shortcut receive the block's input itself:
    the compressed block does not run up to them (before, the shortcut's statistics ran the
    block's whole main path), and the statistics are the oracle's."""
    original = _resnet()
    compressed = copy.deepcopy(original)
    layers = _convs(original)
    batches = _batches((4, 3, 16, 16), count=3)
    stats = PairedStatistics(original, compressed, layers, batches)
    shortcuts = [n for n in layers if ".shortcut." in n]
    assert shortcuts and stats.given_input[0] == stats.given_input[1] == {
        n for n in layers if n.endswith(".conv1") or n == "stem.0"} | set(shortcuts)
    blocks = [n.rpartition(".shortcut")[0] for n in shortcuts]
    runs, counting = dict.fromkeys(blocks, 0), [False]

    def count(block):
        def hook(_module, _args, _output):
            runs[block] += counting[0]
        return hook

    for block in blocks:  # the end of the main path, never replaced
        compressed.get_submodule(f"{block}.bn2").register_forward_hook(count(block))
    for name in layers:
        counting[0] = True
        ours = stats.covariance(name)
        counting[0] = False
        _assert_same(ours, collect_paired_covariance(original, compressed, name, batches))
        _replace(compressed, name)
    # once a batch to move on to the next block's inputs, and once on the first batch, which
    # shows that the shortcut is given the block's input (before: twice a batch)
    assert runs == dict.fromkeys(blocks, len(batches) + 1)
    assert not original.training and not compressed.training


def test_a_layer_replaced_out_of_order_upstream_makes_the_cache_stale():
    original = _resnet()
    compressed = copy.deepcopy(original)
    layers = _convs(original)
    order = [n for n in layers if not n.startswith("layer2.0")]
    order.insert(order.index("layer3.0.conv2"), "layer2.0.conv1")  # late, upstream
    stats = _check_in_order(original, compressed, layers, _batches((2, 3, 16, 16)), order)
    assert stats.networks[1].captured > 1  # recaptured for the late request


def test_a_layer_replaced_upstream_without_a_request_makes_the_cache_stale():
    """A layer fitted without paired statistics (no full covariance) is replaced without a
    request: the cache of a later block computed before no longer holds."""
    original = _resnet()
    compressed = copy.deepcopy(original)
    layers = _convs(original)
    batches = _batches((2, 3, 16, 16))
    stats = _check_in_order(original, compressed, layers, batches,
                            ["stem.0", "layer1.0.conv1", "layer3.0.conv1"])
    _replace(compressed, "layer2.1.conv2")
    _assert_same(stats.covariance("layer3.0.conv2"),
                 collect_paired_covariance(original, compressed, "layer3.0.conv2", batches))
    _replace(compressed, "layer3.0.conv2")  # inside the cached block itself: still valid
    captured = stats.networks[1].captured
    _assert_same(stats.covariance("layer3.1.conv1"),
                 collect_paired_covariance(original, compressed, "layer3.1.conv1", batches))
    assert stats.networks[1].captured == captured


class _Block(nn.Module):
    """Starts with in-place operations: it edits the tensor it is given."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.act = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.tanh(self.conv1(self.act(x.sub_(0.1))))) + 0.5


class _Edits(nn.Module):
    """Edits the tensor between its blocks in place: b's input is a's output object, but
    not its values."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a, self.b, self.c = _Block(), _Block(), _Block()

    def forward(self, x):
        x = self.a(self.stem(x))
        x.mul_(-2)
        return self.c(self.b(x))


def test_links_need_the_same_tensor_unchanged():
    model = _Edits().eval()
    links, sizes, edits = probe_links(model, ["a", "b", "c"], torch.randn(2, 3, 6, 6))
    assert links == [False, False, True]
    assert sizes == [4 * 36 * 4] * 3
    assert edits == [True] * 3  # each block starts with x.sub_
    assert probe_links(model, ["stem"], torch.randn(2, 3, 6, 6))[2] == [False]


def test_in_place_edits_between_and_inside_blocks():
    torch.manual_seed(0)
    original = _Edits().eval()
    compressed = copy.deepcopy(original)
    layers = ["stem", "a.conv1", "a.conv2", "b.conv1", "b.conv2", "c.conv1", "c.conv2"]
    stats = _check_in_order(original, compressed, layers, _batches((3, 3, 8, 8)), layers)
    assert stats.from_cache == len(layers)
    assert stats.networks[1].captured == 2  # stem, and b (its input edited after a)


class _Unit(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.add_(1) if len(x) > 2 else x)


@pytest.mark.parametrize("spill", [False, True], ids=["in memory", "on disk"])
def test_a_unit_editing_its_input_where_the_probe_did_not_see_it(spill, tmp_path,
                                                                  monkeypatch):
    """Cached inputs are given to a unit without a copy where the probe saw no in-place
    edit; a unit that edits them after all (a branch the probe did not take) gives the
    oracle's statistics, and its cache is captured again for the next layer. Its first
    layer, which the probe saw given the unit's input, is not (the input is edited first):
    the original's tap of it is not the unit's input, nor does the compressed unit's run
    stop short of it."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                             _Unit(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                                                 nn.Conv2d(4, 4, 3, padding=1))),
                             nn.Conv2d(4, 4, 3, padding=1)).eval()
    compressed = copy.deepcopy(original)
    layers = ["0", "1.inner.0", "1.inner.2", "2"]
    stats = _check_in_order(original, compressed, layers, _batches((3, 3, 8, 8)), layers,
                            **({"max_bytes": 0} if spill else {}))
    assert stats.given_input == ({"0", "1.inner.0", "2"},) * 2
    assert stats.networks[1].edits == [False, False, False]  # the probe's batch of 2
    assert stats.from_cache == 4
    # in memory, the edited cache is captured again after each of the unit's two layers;
    # read from disk, an input is a copy
    assert stats.networks[1].captured == (1 if spill else 3)
    stats.close()
    assert not any(tmp_path.iterdir())


def test_a_layer_given_its_units_input_on_disk_is_tapped_without_a_copy(tmp_path,
                                                                      monkeypatch):
    """Where the original's unit inputs are on disk, its first conv and its shortcut conv
    are given those files, and no copy of them is written."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    original = _resnet()
    compressed = copy.deepcopy(original)
    layers = _convs(original)
    assert layers[5:8] == ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.shortcut.0"]
    stats = _check_in_order(original, compressed, layers, _batches((4, 3, 16, 16)),
                            layers[:8], max_bytes=0)
    taps = stats._taps[1]  # layer2.0's, the last unit requested
    assert taps["layer2.0.conv1"] is taps["layer2.0.shortcut.0"]
    assert Path(taps["layer2.0.conv1"]._dir.name).name.startswith("bscompress-inputs-")
    assert Path(taps["layer2.0.conv2"]._dir.name).name.startswith("bscompress-taps-")
    stats.close()
    assert not any(tmp_path.iterdir())


def test_a_plain_sequential_in_windows():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True),
                             nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(inplace=True),
                             nn.MaxPool2d(2), nn.Conv2d(6, 6, 3, padding=1)).eval()
    compressed = copy.deepcopy(original)
    layers = ["0", "2", "5"]
    stats = _check_in_order(original, compressed, layers, _batches((3, 3, 8, 8)), layers)
    assert stats.from_cache == 3 and stats.networks[1].captured == 1


@pytest.mark.parametrize("max_bytes", [0, 4 * 16 * 8 * 8 * 4])
def test_inputs_over_the_bound_run_the_whole_networks_without_spilling(max_bytes):
    """With no room, every layer runs both networks; with room for the inputs of 16 × 8²
    (not those of layer1 and layer2.0), those layers run both networks and the rest come
    from the cache."""
    original = _resnet()
    compressed = copy.deepcopy(original)
    layers = _convs(original)
    stats = _check_in_order(original, compressed, layers, _batches((4, 3, 16, 16), count=1),
                            layers, max_bytes=max_bytes, spill=False)
    if max_bytes == 0:
        assert stats.from_cache == 0 and stats.from_network == len(layers)
    else:
        assert 0 < stats.from_network < len(layers) and stats.from_cache > 0


@pytest.mark.parametrize("max_bytes", [0, 4 * 16 * 8 * 8 * 4])
def test_inputs_over_the_bound_are_kept_on_disk(max_bytes, tmp_path, monkeypatch):
    """Spilled to disk (every unit, or those of layer1 and layer2.0), the inputs give the
    oracle's statistics; no layer runs the whole networks, and close() removes the files."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR is read again
    original = _resnet()
    compressed = copy.deepcopy(original)
    layers = _convs(original)
    stats = _check_in_order(original, compressed, layers, _batches((4, 3, 16, 16), count=2),
                            layers, max_bytes=max_bytes)
    assert stats.from_network == 0 and stats.from_cache == len(layers)
    spilled = [network.spilled for network in stats.networks]
    assert all(spilled) if max_bytes == 0 else all(0 < n < 7 for n in spilled)
    # the last unit's inputs: on disk with no room, else in memory (earlier ones removed);
    # the original's layer inputs of the last unit (its taps) over their share: on disk
    on_disk = [path.name for path in tmp_path.iterdir()]
    assert any(n.startswith("bscompress-inputs-") for n in on_disk) == (max_bytes == 0)
    assert stats.tapped == 7 and any(n.startswith("bscompress-taps-") for n in on_disk)
    stats.close()
    assert not any(tmp_path.iterdir())


def test_spilled_inputs_read_back_mapped_are_copies_on_write(tmp_path, monkeypatch):
    """Items come back memory-mapped: a unit working in place on one changes the tensor it
    was given, not the file, and the directory goes with close() while one is still held."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    x = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    store = SpilledInputs(torch.device("cpu"))
    store.append(x)
    first = store[0]
    assert torch.equal(first, x) and first.is_contiguous(memory_format=torch.channels_last)
    first.add_(1.0)
    assert torch.equal(store[0], x) and torch.equal(first, x + 1.0)
    store.close()
    assert not any(tmp_path.iterdir()) and torch.equal(first, x + 1.0)


def test_a_disk_that_cannot_take_the_inputs_falls_back_to_the_networks(monkeypatch):
    def full(self, x):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SpilledInputs, "append", full)
    original = _resnet()
    compressed = copy.deepcopy(original)
    layers = _convs(original)
    stats = _check_in_order(original, compressed, layers, _batches((4, 3, 16, 16), count=1),
                            layers, max_bytes=4 * 16 * 8 * 8 * 4)
    assert 0 < stats.from_network < len(layers) and stats.from_cache > 0
    assert isinstance(stats.networks[0].spill_error, OSError)


def test_sequential_decompose_is_the_same_with_and_without_the_cache(monkeypatch):
    """decompose(sequential=True) builds the same model whether the statistics come from
    cached block inputs or from running both networks for every layer."""
    from bscompress.compress import block_inputs
    from bscompress.compress.decomposition import decompose
    from bscompress.methods import RankOptions

    calls = []
    oracle = block_inputs.collect_paired_covariance
    monkeypatch.setattr(block_inputs, "collect_paired_covariance",
                        lambda *a, **k: calls.append(1) or oracle(*a, **k))

    def run():
        model, plan = decompose(_resnet(), "tucker2", (1, 3, 16, 16), RankOptions(tucker_ranks=0.5),
                                calibration=_batches((8, 3, 16, 16)), reestimate_bn=False,
                                sequential=True)
        return model.state_dict(), plan

    cached, plan = run()
    assert plan.replaced() and all(", sequential" in e.fit for e in plan.replaced())
    assert calls == []  # every layer from the cache
    monkeypatch.setattr(block_inputs, "DEFAULT_MAX_BYTES", 0)
    spilled, _ = run()  # every unit's inputs on disk
    assert calls == []
    monkeypatch.setattr(block_inputs, "SPILL", False)
    uncached, _ = run()
    assert len(calls) == len(plan.replaced())
    for other in (spilled, uncached):
        assert cached.keys() == other.keys()
        for key, value in cached.items():
            assert torch.allclose(value, other[key], rtol=1e-5, atol=1e-6), key

"""What a network feeds each of its blocks on the calibration batches, computed block to block.

The sequential fit (``--sequential``) needs, for every replaced layer in turn, its input in
the partly compressed network and in the original. Running both networks from their input up
to each layer costs a forward pass of half the network per layer on average (on ResNet-50 at
224², 70% of a layer's time). This module caches instead the inputs of the *unit* (block)
holding the layer — the units of block-wise reconstruction (``reconstruct.find_blocks``): a
layer's input depends only on its unit's input, so its statistics come from running that
unit alone on the cached inputs. The next unit's inputs are the current unit's outputs on
them, where the network passes them on unchanged; elsewhere (a stem's pooling between the
first conv and the first block, a model that edits a tensor between blocks) they are captured
by running the network up to that unit. The original network does not change: one run of a
unit keeps what each of its layers receives (``BlockInputs.tap``) and moves on, instead of a
run up to each layer.

Whether a unit's input is the previous unit's output is seen on a probe batch: the same
tensor object, holding the same values when the next unit receives it (so an in-place edit
between the two is caught). The probe also sees whether a unit edits its input in place (an
in-place activation first): such a unit runs on copies of the cached inputs, the others on
the inputs themselves (an edit the probe did not see makes the cache start again). A cache
is valid as long as no watched layer of an earlier unit has been replaced since it was
computed (checked by module identity at each request); a stale or out-of-order request
captures afresh. Inputs that would take more than ``max_bytes`` in memory are kept on disk
instead (:class:`SpilledInputs`: a file per batch in a temporary directory, read back one
batch at a time); without a disk to spill to, or with ``spill=False``, they are not cached
and the caller falls back to running the whole network.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from bscompress.compress.calibrate import StopForward
from bscompress.compress.paired import collect_paired_covariance, paired_covariance
from bscompress.compress.reconstruct import capture, probe_calls, resolve_unit
from bscompress.core.covariance import PatchCovariance
from bscompress.core.stats import module_device

#: default bound on one network's unit inputs cached in memory. 1 GiB: on ResNet-50 at 512
#: samples the inputs of layer1.1, layer1.2 and layer2.0 (1.6 GB a network) go to disk; the
#: sequential run's peak fell from 8.5 to 6.8 GB against 2 GiB in memory (docs/benchmarks.md,
#: scale)
DEFAULT_MAX_BYTES = 1 << 30
#: whether inputs over the bound are kept on disk (else their layers run both networks from
#: the input: on ResNet-50 at 512 samples that was 39% of the sequential fit's time)
SPILL = True
#: the original network's layer inputs of one unit (``BlockInputs.tap``) are kept in memory
#: up to this fraction of the bound on a unit's inputs, on disk past it (the peak rises by at
#: most this much: the original's next unit inputs are held beside them)
TAP_FRACTION = 0.25


class SpilledInputs:
    """An append-only list of tensors kept on disk, one ``torch.save`` file per item in a
    temporary directory (``tempfile``: ``TMPDIR``), read back on each access: only the item
    in use is in memory. Read back memory-mapped, copy-on-write (``torch.load`` with
    ``weights_only=True, mmap=True``):
    a unit reads its input from the page cache without a copy (a 100 MB input: 6 against
    50 ms), and writing to it does not change the file. The directory is removed by
    :meth:`close` (or when the object is collected).

    Raises:
        OSError: from ``append`` when the disk cannot take an item.
    """

    def __init__(self, device: torch.device, prefix: str = "bscompress-inputs-") -> None:
        self._dir = tempfile.TemporaryDirectory(prefix=prefix)
        self.device, self._count = device, 0

    def _path(self, index: int) -> Path:
        return Path(self._dir.name) / f"{index}.pt"

    def append(self, x: torch.Tensor) -> None:
        torch.save(x.detach().cpu(), self._path(self._count))
        self._count += 1

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self._count:
            raise IndexError(index)
        return torch.load(self._path(index), map_location=self.device, weights_only=True,
                          mmap=True)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(self._count))

    def close(self) -> None:
        self._dir.cleanup()


def _inside(unit: str, name: str) -> bool:
    """Whether module ``name`` lies in ``unit`` (a module name, or ``"PARENT[i:j]"``: the
    children i to j−1 of PARENT)."""
    if not unit.endswith("]"):
        return name == unit or name.startswith(unit + ".")
    parent, _, bounds = unit[:-1].partition("[")
    i, j = (int(b) for b in bounds.split(":"))
    prefix = f"{parent}." if parent else ""
    if not name.startswith(prefix):
        return False
    child = name[len(prefix):].split(".")[0]
    return child.isdigit() and i <= int(child) < j


def probe_links(model: nn.Module, units: Sequence[str], example: torch.Tensor
                ) -> tuple[list[bool], list[int], list[bool]]:
    """Run ``model`` (eval, no grad) on ``example`` ``[B, ...]`` and return, per unit, whether
    its input is the previous unit's output (the same tensor, unchanged in between; always
    False for the first), the bytes of its input per sample, and whether it edits its input
    in place (the tensor's version counter moves while it runs)."""
    return _probe(model, units, example)[:3]


def _probe(model: nn.Module, units: Sequence[str], example: torch.Tensor,
           layers_of: Mapping[int, Sequence[str]] | None = None
           ) -> tuple[list[bool], list[int], list[bool], set[str]]:
    """:func:`probe_links`, and the layers of ``layers_of`` (unit index → names of modules
    inside it) that receive their unit's input itself, unedited (a Bottleneck's first conv
    and its downsample conv): their input needs no run of the unit, whose cached input it
    is."""
    outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    links, sizes = [False] * len(units), [0] * len(units)
    edits, given, receive = [False] * len(units), {}, set()
    handles = []

    def pre(index: int):
        def hook(_m, args):
            x = args[0]
            sizes[index] = x[0].numel() * x.element_size() if x.dim() else x.element_size()
            previous = outputs.get(index - 1)
            links[index] = (previous is not None and x is previous[0]
                            and torch.equal(x, previous[1]))
            given[index] = (x, x._version)
        return hook

    def post(index: int):
        def hook(_m, _args, output):
            if index in given:
                x, version = given[index]
                edits[index] = x._version != version
            if isinstance(output, torch.Tensor):
                outputs[index] = (output, output.detach().clone())
        return hook

    def layer(index: int, name: str):
        def hook(_m, args):
            x, version = given.get(index, (None, None))
            if args and args[0] is x and x._version == version:
                receive.add(name)
        return hook

    for index, unit in enumerate(units):
        _, first, last = resolve_unit(model, unit)
        handles.append(first.register_forward_pre_hook(pre(index)))
        handles.append(last.register_forward_hook(post(index)))
        handles += [model.get_submodule(name).register_forward_pre_hook(layer(index, name))
                    for name in (layers_of or {}).get(index, ())]
    mode = model.training
    try:
        with torch.no_grad():
            model.eval()
            model(example)
    finally:
        model.train(mode)
        for handle in handles:
            handle.remove()
    return links, sizes, edits, receive


class BlockInputs:
    """The inputs ``model`` feeds its ``units`` on ``batches``, one unit at a time.

    Args:
        model: the network (its units are looked up by name at each request, so layers
            replaced inside them since are used).
        units: unit names in execution order (``reconstruct.find_blocks``: each runs once
            per forward pass on one tensor).
        batches: the input batches ``[B, ...]`` (moved to the model's device).
        example: a small batch for the probe.
        watch: names of modules that may be replaced between requests (the replaced
            layers); replacing one inside an earlier unit makes the cache stale.
        max_bytes: bound on the inputs of one unit for all batches kept in memory.
        spill: keep the inputs of a unit over ``max_bytes`` on disk (:class:`SpilledInputs`)
            rather than not at all.
        layers_of: unit index → names of modules inside it whose probe says whether they
            receive their unit's input itself (``given_input``).
    """

    def __init__(self, model: nn.Module, units: Sequence[str], batches: Sequence[torch.Tensor],
                 example: torch.Tensor, watch: Sequence[str] = (),
                 max_bytes: int = DEFAULT_MAX_BYTES, spill: bool = True,
                 layers_of: Mapping[int, Sequence[str]] | None = None) -> None:
        self.model, self.units, self.batches = model, list(units), list(batches)
        #: ``given_input``: the layers of ``layers_of`` given their unit's input (``_probe``)
        self.links, self.sample_bytes, self.edits, self.given_input = _probe(
            model, self.units, example, layers_of)
        self.samples = sum(len(x) for x in self.batches)
        self.watch, self.max_bytes, self.spill = list(watch), max_bytes, spill
        self.captured = self.advanced = 0  # units whose inputs were captured / run on to
        self.spilled = 0  # units whose inputs were kept on disk
        #: the first failure to write to disk: later units over the bound are not cached
        self.spill_error: OSError | None = None
        self._index: int | None = None
        self._inputs: list[torch.Tensor] | SpilledInputs = []
        self._modules: dict[str, nn.Module] = {}

    def in_memory(self, index: int) -> bool:
        """Whether unit ``index``'s inputs for every batch fit in ``max_bytes``."""
        return self.sample_bytes[index] * self.samples <= self.max_bytes

    def fits(self, index: int) -> bool:
        """Whether unit ``index``'s inputs can be cached: in memory, or on disk."""
        return self.in_memory(index) or (self.spill and self.spill_error is None)

    def inputs(self, index: int) -> Sequence[torch.Tensor] | None:
        """Unit ``index``'s input for each batch (``None`` when they cannot be cached): do
        not modify them (run the unit on copies)."""
        if not self.fits(index):
            self._drop()
            return None
        try:
            if (self._index is not None and self._index <= index
                    and not self._stale(self._index)):
                if self._index == index:
                    return self._inputs
                if all(self.links[k] and self.fits(k)
                       for k in range(self._index + 1, index + 1)):
                    while self._index < index:
                        self._advance()
                    return self._inputs
            self._capture(index)
        except OSError as error:  # the disk is full or not writable: no cache from now on
            self.spill_error = error
            self._drop()
            return None
        return self._inputs

    def _store(self, index: int) -> list[torch.Tensor] | SpilledInputs:
        """An empty store for unit ``index``'s inputs: a list, or files on disk."""
        if self.in_memory(index):
            return []
        self.spilled += 1
        return SpilledInputs(module_device(self.model))

    def _stale(self, index: int) -> bool:
        """Whether a watched module of a unit before ``index`` (the cached unit: what ran to
        compute its inputs), or of no unit, changed since the cache was computed."""
        for name, before in self._modules.items():
            if self.model.get_submodule(name) is not before:
                units = [k for k, unit in enumerate(self.units) if _inside(unit, name)]
                if not units or units[0] < index:
                    return True
        return False

    def _snapshot(self) -> None:
        self._modules = {name: self.model.get_submodule(name) for name in self.watch}

    def close(self) -> None:
        """Drop the cached inputs (and remove those on disk)."""
        self._drop()

    def _drop(self) -> None:
        if isinstance(self._inputs, SpilledInputs):
            self._inputs.close()
        self._index, self._inputs, self._modules = None, [], {}

    def _capture(self, index: int) -> None:
        """Run the network from its input up to unit ``index`` on every batch."""
        self._drop()
        device, mode = module_device(self.model), self.model.training
        inputs = self._store(index)
        try:
            self.model.eval()
            for x in self.batches:
                inputs.append(capture(self.model, self.units[index], x.to(device), "input"))
        except BaseException:
            if isinstance(inputs, SpilledInputs):
                inputs.close()
            raise
        finally:
            self.model.train(mode)
        self._index, self._inputs = index, inputs
        self.captured += 1
        self._snapshot()

    def _advance(self, hand_over: bool = False) -> None:
        """From unit k's inputs to unit k+1's: unit k's outputs, batch by batch (in memory,
        each input freed as its output replaces it). ``hand_over``: unit k's inputs kept on
        disk are not removed; whoever holds them closes them."""
        unit, _, _ = resolve_unit(self.model, self.units[self._index])
        before, mode = self._inputs, unit.training
        after = before if (isinstance(before, list) and self.in_memory(self._index + 1)) \
            else self._store(self._index + 1)
        try:
            unit.eval()
            with torch.no_grad():
                for i in range(len(before)):
                    output = unit(before[i]).detach()
                    if after is before:
                        before[i] = output  # the input is dropped: no copy
                    else:
                        after.append(output)
        except BaseException:  # half advanced: nothing cached
            if after is not before and isinstance(after, SpilledInputs):
                after.close()
            self._drop()
            raise
        finally:
            unit.train(mode)
        index = self._index + 1
        if after is not before:
            if hand_over:
                self._inputs = []
            self._drop()
        self._index, self._inputs = index, after
        self.advanced += 1
        self._snapshot()

    def tap(self, index: int, layers: Sequence[str], max_bytes: int, given: Sequence[str] = ()
            ) -> dict[str, Sequence[torch.Tensor]] | None:
        """What each of ``layers`` (modules inside unit ``index``) receives on every batch,
        from one run of the unit on its inputs: ``{layer: its first positional input, per
        batch}``, copies kept in memory up to ``max_bytes`` in all and on disk past it. The
        same run moves the cache on to unit ``index + 1``'s inputs where the network passes
        them on (:meth:`_advance`). A layer the unit did not run once per batch is left out;
        ``None`` when the unit's inputs cannot be cached.

        ``given``: those of ``layers`` that receive the unit's input itself
        (``BlockInputs.given_input``). Where the unit's inputs are on disk and the run moves
        on, these layers get the unit's input files instead of copies of them: a Bottleneck's
        first conv and downsample conv of ResNet-50's first blocks wrote 1.6 GB each at
        512 images. (Items read from disk are copies, so the unit cannot edit them.)

        For a network that does not change (the original), this replaces a run of the unit
        up to each of its layers, and the run that moves on, by one run."""
        inputs = self.inputs(index)
        if inputs is None:
            return None
        stores: dict[str, list[torch.Tensor] | SpilledInputs] = {}
        room = max_bytes
        moves_on = (index + 1 < len(self.units) and self.links[index + 1]
                    and self.fits(index + 1))
        shared = ([name for name in layers if name in given]
                  if moves_on and isinstance(inputs, SpilledInputs) else [])

        def grab(name: str):
            def hook(_module, args):
                nonlocal room
                x = args[0].detach()
                if name not in stores:
                    size = x.numel() * x.element_size() * len(self.batches)
                    if size <= room:
                        room -= size
                        stores[name] = []
                    else:
                        stores[name] = SpilledInputs(module_device(self.model),
                                                     prefix="bscompress-taps-")
                store = stores[name]
                # a copy: the unit may later work in place on what a layer was given
                store.append(x if isinstance(store, SpilledInputs) else x.clone())
            return hook

        # a shared layer must be given the unit's input itself, unedited, once a batch
        current: list[tuple[torch.Tensor, int]] = []
        calls, wrong = dict.fromkeys(shared, 0), set()

        def unit_input(_module, args):
            current[:] = [(args[0], args[0]._version)] if args else []

        def check(name: str):
            def hook(_module, args):
                calls[name] += 1
                x, version = current[0] if current else (None, None)
                if not (args and args[0] is x and x._version == version):
                    wrong.add(name)
            return hook

        handles = [self.model.get_submodule(name).register_forward_pre_hook(grab(name))
                   for name in layers if name not in shared]
        if shared:
            handles.append(resolve_unit(self.model, self.units[index])[1]
                           .register_forward_pre_hook(unit_input))
            handles += [self.model.get_submodule(name).register_forward_pre_hook(check(name))
                        for name in shared]
        try:
            if moves_on:
                self._advance(hand_over=bool(shared))
            else:  # the cached inputs stay as they are (:func:`_passes`)
                for _ in _passes([_unit_run(self, index)]):
                    pass
        except BaseException as error:
            for store in stores.values():
                if isinstance(store, SpilledInputs):
                    store.close()
            if shared and self._inputs is not inputs:  # handed over: ours to remove
                inputs.close()
            if isinstance(error, OSError):  # the disk is full or not writable
                self.spill_error = error
                return None
            raise
        finally:
            for handle in handles:
                handle.remove()
        kept = {name: inputs for name in shared
                if name not in wrong and calls[name] == len(self.batches)}
        if shared and not kept:
            inputs.close()
        for name, store in stores.items():
            if len(store) == len(self.batches):
                kept[name] = store
            elif isinstance(store, SpilledInputs):
                store.close()
        return kept


class PairedStatistics:
    """``paired.collect_paired_covariance`` for the layers of a network being compressed
    in execution order (``--sequential``), from cached unit inputs of both networks: the
    compressed network's unit runs up to each layer, the original's once per unit (its
    layers' inputs tapped, :data:`TAP_FRACTION` of ``max_bytes`` in memory, the rest on disk).

    Args:
        original: the network before compression (left as it is).
        compressed: the network being compressed, still whole when this is built; its
            ``layers`` are replaced one after the other between requests.
        layers: the names of the layers that will be replaced.
        batches: the calibration batches ``[B, ...]``.
        max_bytes: bound on each network's unit inputs cached in memory (default
            :data:`DEFAULT_MAX_BYTES`); over it they are kept on disk.
        spill: whether inputs over the bound go to disk (default :data:`SPILL`); where they
            cannot, and for a layer in no unit, its statistics come from running both whole
            networks, as ``collect_paired_covariance`` does.

    Call :meth:`close` when done: it removes the files on disk.
    """

    def __init__(self, original: nn.Module, compressed: nn.Module, layers: Sequence[str],
                 batches: Sequence[torch.Tensor], max_bytes: int | None = None,
                 spill: bool | None = None) -> None:
        from bscompress.compress.reconstruct import find_blocks

        max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
        spill = SPILL if spill is None else spill
        self.original, self.compressed, self.batches = original, compressed, list(batches)
        example = self.batches[0][:2].to(module_device(compressed))
        blocks = [b for b in find_blocks(compressed, original, layers, example)
                  if b.skipped is None]
        self.unit_of = {name: index for index, block in enumerate(blocks)
                        for name in block.layers}
        self.layers_of = {index: list(block.layers) for index, block in enumerate(blocks)}
        units = [block.name for block in blocks]
        self.networks = (BlockInputs(original, units, self.batches, example, (), max_bytes,
                                     spill, self.layers_of),
                         BlockInputs(compressed, units, self.batches, example, layers,
                                     max_bytes, spill, self.layers_of))
        self.from_cache = self.from_network = 0  # layers served each way
        self.tapped = 0  # units whose original layers' inputs came from one run of the unit
        self.tap_bytes = int(max_bytes * TAP_FRACTION)
        self._taps: tuple[int | None, dict[str, Sequence[torch.Tensor]]] = (None, {})
        #: layers the network runs more than once a pass, with their calls: they have no one
        #: input stream to pair with the original's, and get no paired statistics
        self.reused = {name: probe.calls for name, probe
                       in probe_calls(compressed, layers, example).items() if probe.calls > 1}

    @property
    def given_input(self) -> tuple[set[str], set[str]]:
        """Per network, the layers given their unit's input: the original's taps of them are
        its unit's inputs, the compressed unit does not run for them."""
        return self.networks[0].given_input, self.networks[1].given_input

    def close(self) -> None:
        """Drop the cached inputs (and remove those on disk)."""
        for network in self.networks:
            network.close()
        self._drop_taps()

    def _drop_taps(self) -> None:
        for store in self._taps[1].values():
            if isinstance(store, SpilledInputs):
                store.close()
        self._taps = (None, {})

    def _tapped(self, index: int) -> dict[str, Sequence[torch.Tensor]]:
        """The inputs of unit ``index``'s layers in the original network on every batch
        (``BlockInputs.tap``; kept for the unit's layers, which come one after the other)."""
        if self._taps[0] != index:
            self._drop_taps()
            layers = [name for name in self.layers_of[index] if name not in self.reused]
            taps = self.networks[0].tap(index, layers, self.tap_bytes,
                                        self.networks[0].given_input)
            self._taps = (index, taps or {})
            self.tapped += taps is not None
        return self._taps[1]

    def covariance(self, layer: str, max_patches_per_batch: int = 1 << 16,
                   reference: PatchCovariance | None = None) -> PatchCovariance:
        """The paired statistics of ``layer`` (``paired.collect_paired_covariance``;
        ``reference``: the original layer's one-shot Σ over the same batches, not
        recomputed)."""
        index = self.unit_of.get(layer)
        layers = (self.original.get_submodule(layer), self.compressed.get_submodule(layer))
        original, compressed = self.networks
        runs = None
        if index is not None and all(net.fits(index) for net in self.networks):
            taps = self._tapped(index).get(layer)
            # the original layer itself on what it was given, else the original's unit
            runs = [(layers[0], taps, None, False) if taps is not None
                    else _unit_run(original, index),
                    _unit_input_run(compressed, index, layers[1])
                    if layer in compressed.given_input else _unit_run(compressed, index)]
        if runs is None or any(inputs is None for _, inputs, _, _ in runs):
            self.from_network += 1
            return collect_paired_covariance(self.original, self.compressed, layer,
                                             self.batches, max_patches_per_batch, reference)
        self.from_cache += 1
        return paired_covariance(*layers, lambda: _passes(runs), max_patches_per_batch,
                                 reference)


def _unit_run(net: BlockInputs, index: int
              ) -> tuple[nn.Module, Sequence[torch.Tensor] | None, BlockInputs, bool]:
    """:func:`_passes`' run of ``net``'s unit ``index`` on its cached inputs (``None`` when
    they cannot be cached), on copies where the probe saw the unit edit its input."""
    return (resolve_unit(net.model, net.units[index])[0], net.inputs(index), net,
            net.edits[index])


class _GivenUnitInput(nn.Module):
    """Runs a layer that the probe saw receive its unit's input (``BlockInputs.given_input``)
    on the unit's cached inputs, without the unit: after a first batch through the unit
    shows it too (the same tensor, not edited before the layer sees it). Otherwise (a branch
    the probe did not take) every batch goes through the unit."""

    def __init__(self, unit: nn.Module, layer: nn.Module) -> None:
        super().__init__()
        self.unit, self.layer = unit, layer
        self.training = unit.training  # (:func:`_passes` gives the unit's mode back)
        self.given: bool | None = None  # not checked yet

    def forward(self, x: torch.Tensor) -> object:
        if self.given:
            return self.layer(x)
        if self.given is False:
            return self.unit(x)
        version = x._version

        def check(_module, args):
            self.given = bool(args) and args[0] is x and x._version == version

        # before the hooks already there (the statistics' hook ends the run at the layer)
        handle = self.layer.register_forward_pre_hook(check, prepend=True)
        try:
            return self.unit(x)
        finally:
            handle.remove()
            self.given = bool(self.given)


def _unit_input_run(net: BlockInputs, index: int, layer: nn.Module
                    ) -> tuple[nn.Module, Sequence[torch.Tensor] | None, BlockInputs, bool]:
    """:func:`_unit_run` for a layer given its unit's input: the layer alone runs on the
    cached inputs, once a first batch has shown it (:class:`_GivenUnitInput`); the unit runs
    as :func:`_unit_run` where it edits its input."""
    if net.edits[index]:
        return _unit_run(net, index)
    unit = resolve_unit(net.model, net.units[index])[0]
    return _GivenUnitInput(unit, layer), net.inputs(index), net, False


def _passes(runs: Sequence[tuple[nn.Module, Sequence[torch.Tensor], BlockInputs | None, bool]]
            ) -> Iterator[None]:
    """Run each ``(module, inputs, cache, copy)`` of ``runs`` on its inputs batch by batch (on
    copies where ``copy``: a unit the probe saw edit its input, ``BlockInputs.edits``), in
    eval mode without grad, a :class:`StopForward` ending a run; yield after each batch.

    Other inputs are not copied (a copy of every unit input was a tenth of the runs' time on
    ResNet-50). Should such a unit still edit a cached input in memory (its version counter
    moves: a branch the probe did not take), the cache it came from starts again at the next
    request; the statistics are those of a run on a copy either way, as the unit sees the
    cached values first."""
    modules = [module for module, _, _, _ in runs]
    modes = [module.training for module in modules]
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            for batch in zip(*(inputs for _, inputs, _, _ in runs), strict=True):
                for (module, inputs, cache, copy), x in zip(runs, batch, strict=True):
                    version = x._version
                    with contextlib.suppress(StopForward):
                        module(x.clone() if copy else x)
                    if (cache is not None and x._version != version
                            and not isinstance(inputs, SpilledInputs)):
                        cache.close()  # (read from disk, an input is a copy already)
                yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)


__all__ = ["DEFAULT_MAX_BYTES", "SPILL", "TAP_FRACTION", "BlockInputs", "PairedStatistics",
           "SpilledInputs", "probe_links"]

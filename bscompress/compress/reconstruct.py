"""Block-wise reconstruction: after the closed-form fits, train each block of the compressed
network on calibration data to reproduce the original network's block output.

The closed-form factors (``data_aware``) minimise each *layer's* linear output error. A block
(a ResNet BasicBlock, a MobileNet inverted residual) also holds BatchNorm, nonlinearities and
several factorized layers whose errors interact; fitting the whole block by gradient descent
removes part of what the per-layer fits cannot. The objective is the one of BRECQ (Li et al.,
ICLR 2021) and of few-sample compression by block-wise distillation (MiR, Wang et al., CVPR
2022), with the plain mean squared error:

    min_θ  E_x ‖ B_θ(x̂) − B(x) ‖²,

where ``B`` is the original block, ``B_θ`` the compressed one, ``x`` the original network's
input to the block and ``x̂`` the compressed network's (blocks are visited in execution order,
so each one also compensates the error its predecessors left, as ``--sequential`` does for
single layers).

The unit of reconstruction is found without knowing the architecture: for every replaced
layer, its outermost ancestor that is not a container (``nn.Sequential``, ``nn.ModuleList``,
``nn.ModuleDict``); an ancestor that runs more than once per forward pass, or takes or returns
something other than one tensor, is split into its children, down to the replaced layer
itself. A layer that is a child of a plain ``nn.Sequential`` (a VGG stack) takes the run of
children after it up to the next replaced one with it — its BatchNorm, activation and
pooling — as a window named ``"PARENT[i:j]"``. BatchNorm keeps its running statistics while
a block trains (the block is in eval mode); every parameter of the block trains. A block
whose error on the cached data ends above where it started is restored, so reconstruction
never makes a block worse on its data; given held-out batches, the block is restored unless
its error on them went down, so that a block that overfits a small calibration set is not kept.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bscompress.core.records import BlockResult
from bscompress.core.stats import module_device

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class ReconstructionOptions:
    """How each block is trained.

    Args:
        steps: Adam steps per block (cosine-decayed learning rate).
        lr: Adam's initial learning rate.
        batch: samples per step, drawn from the cached calibration set.
        max_bytes: bound on the cache of one block (its inputs and the original's outputs
            for every calibration sample, on the device it trains on); fewer samples are
            used when the whole set would not fit.
        seed: seed of the sample order.
        device: where the blocks train (``"cuda"``, ``"cpu"`` ...); both networks move there
            for the step and back afterwards. ``None``: the compressed network's device.
    """

    steps: int = 500
    lr: float = 1e-3
    batch: int = 64
    max_bytes: int = 2**30
    seed: int = 0
    device: str | None = None


@dataclass
class _Probe:
    calls: int = 0
    single_tensor: bool = True
    order: int = -1


class _Stop(BaseException):
    """Raised by a hook to end a forward pass once the block of interest has run (a
    BaseException, so that a model's own ``except Exception`` does not swallow it)."""


def _unit(model: nn.Module, path: Sequence[str], start: int) -> str:
    """The first module on ``path`` at depth ≥ ``start`` that is not a container (the layer
    itself at the latest)."""
    module = model
    for depth, part in enumerate(path, 1):
        module = module.get_submodule(part)
        if depth >= start and not isinstance(module, CONTAINERS):
            return ".".join(path[:depth])
    return ".".join(path)


def _plain_sequential(module: nn.Module) -> bool:
    """An ``nn.Sequential`` whose forward is Sequential's own: children run in order, once."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _window(model: nn.Module, layer: str, layers: Sequence[str]) -> str:
    """For a replaced ``layer`` that is a child of a plain ``nn.Sequential``: the run of that
    Sequential's children from the layer up to the next child holding a replaced layer (its
    BatchNorm, activation, pooling), as ``"PARENT[i:j]"``; otherwise the layer itself."""
    parent_name, _, index = layer.rpartition(".")
    parent = model.get_submodule(parent_name)
    if not _plain_sequential(parent) or not index.isdigit():
        return layer
    names = [name for name, _ in parent.named_children()]
    i = names.index(index)
    prefix = f"{parent_name}." if parent_name else ""
    held = {other[len(prefix):].split(".")[0] for other in layers if other.startswith(prefix)}
    j = next((k for k in range(i + 1, len(names)) if names[k] in held), len(names))
    return f"{parent_name}[{i}:{j}]" if j - i > 1 else layer


def resolve_unit(model: nn.Module, unit: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    """``(module to train, module whose input is the unit's, module whose output is)``: one
    module for a named unit, an ``nn.Sequential`` view of the children for a window."""
    if not unit.endswith("]"):
        module = model.get_submodule(unit)
        return module, module, module
    parent_name, _, bounds = unit[:-1].partition("[")
    i, j = (int(b) for b in bounds.split(":"))
    children = list(model.get_submodule(parent_name).children())[i:j]
    return nn.Sequential(*children), children[0], children[-1]


def probe_calls(model: nn.Module, names: Iterable[str], x: torch.Tensor
                ) -> dict[str, _Probe]:
    """Run ``model`` on ``x`` and record, per named module, how often it ran, whether every call
    took one tensor and returned one, and the order of its first call."""
    probes = {name: _Probe() for name in names}
    counter = iter(range(len(probes)))
    handles = []

    def pre(name: str):
        def hook(_m, args, kwargs):
            probe = probes[name]
            probe.calls += 1
            if probe.order < 0:
                probe.order = next(counter)
            if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
                probe.single_tensor = False
        return hook

    def post(name: str):
        def hook(_m, _args, output):
            if not isinstance(output, torch.Tensor):
                probes[name].single_tensor = False
        return hook

    for name in probes:
        _, first, last = resolve_unit(model, name)
        handles.append(first.register_forward_pre_hook(pre(name), with_kwargs=True))
        handles.append(last.register_forward_hook(post(name)))
    mode = model.training
    try:
        with torch.no_grad():
            model.eval()  # no BatchNorm statistics move
            model(x)
    finally:
        model.train(mode)
        for handle in handles:
            handle.remove()
    return probes


def find_blocks(model: nn.Module, original: nn.Module, layers: Sequence[str],
                example: torch.Tensor) -> list[BlockResult]:
    """The reconstruction units of ``model`` (compressed) for its replaced ``layers``, in
    execution order, each with the layers it holds. ``example`` is a small input batch used to
    see which modules run once on one tensor in both networks; a replaced layer that itself
    does not comes back with ``skipped`` set.
    """
    depth = {name: 1 for name in layers}
    skipped: dict[str, str] = {}
    alone: set[str] = set()  # layers whose window failed the probe: on their own
    while True:
        units: dict[str, list[str]] = {}
        for name in layers:
            if name not in skipped:
                unit = _unit(model, name.split("."), depth[name])
                if unit == name and name not in alone:
                    unit = _window(model, name, layers)
                units.setdefault(unit, []).append(name)
        in_original = {u for u in units if _has(original, u)}
        probes = probe_calls(model, units, example)
        reference = probe_calls(original, in_original, example)
        bad = [u for u in units if not (u in in_original and _runs_once(probes[u])
                                        and _runs_once(reference[u]))]
        if not bad:
            break
        for unit in bad:
            for name in units[unit]:
                if unit.endswith("]"):
                    alone.add(name)
                elif unit == name:
                    skipped[name] = _why(probes[unit], reference.get(unit))
                else:
                    depth[name] = unit.count(".") + 2
    blocks = sorted((BlockResult(u, held) for u, held in units.items()),
                    key=lambda b: probes[b.name].order)
    return blocks + [BlockResult(name, [name], skipped=why) for name, why in skipped.items()]


def _has(model: nn.Module, unit: str) -> bool:
    try:
        resolve_unit(model, unit)
    except (AttributeError, IndexError):
        return False
    return True


def _runs_once(probe: _Probe) -> bool:
    return probe.calls == 1 and probe.single_tensor


def _why(probe: _Probe, reference: _Probe | None) -> str:
    """Why a replaced layer cannot be reconstructed on its own."""
    if reference is None:
        return "not in the original network"
    calls = max(probe.calls, reference.calls)
    if calls == 0:
        return "never runs"
    if calls > 1:
        return "runs more than once per forward pass"
    return "does not take and return one tensor"


def capture(model: nn.Module, name: str, x: torch.Tensor, what: str) -> torch.Tensor:
    """The input (``what="input"``) or output (``"output"``) of ``model``'s module ``name`` on
    ``x``, computed without grad and without running the rest of the network."""
    box: list[torch.Tensor] = []

    def pre(_m, args):
        if what == "input":
            box.append(args[0].detach().clone())
            raise _Stop

    def post(_m, _args, output):
        box.append(output.detach().clone())
        raise _Stop

    _, first, last = resolve_unit(model, name)
    handle = (first.register_forward_pre_hook(pre) if what == "input"
              else last.register_forward_hook(post))
    try:
        with torch.no_grad():
            model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return box[0]


def _relative_error(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                    batch: int) -> float:
    num = den = 0.0
    with torch.no_grad():
        for i in range(0, len(inputs), batch):
            y = targets[i:i + batch]
            x = inputs[i:i + batch].clone()  # a copy: the block may work on it in place
            num += float((block(x) - y).pow(2).sum())
            den += float(y.pow(2).sum())
    return num / max(den, 1e-30)


def reconstruct_block(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                      options: ReconstructionOptions,
                      held: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> tuple[float, float, bool, tuple[float, float] | None]:
    """Train ``block`` (in eval mode: BatchNorm on its running statistics) by Adam on the
    mean squared error between ``block(inputs[i])`` and ``targets[i]``, ``[N, ...]`` each.
    Returns the relative errors before and after, whether the block was restored (its
    error — on the ``held`` ``(inputs, targets)`` when given — did not go down), and the
    held-out errors before and after (``None`` without ``held``)."""
    mode = block.training
    block.eval()
    before = _relative_error(block, inputs, targets, options.batch * 4)
    held_before = None if held is None else _relative_error(block, *held, options.batch * 4)
    saved = copy.deepcopy(block.state_dict())
    params = [p for p in block.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(options.seed)
    optimizer = torch.optim.Adam(params, lr=options.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * k / options.steps)))
    n = len(inputs)
    with torch.enable_grad():
        for _ in range(options.steps):
            index = torch.randint(0, n, (min(options.batch, n),), generator=generator)
            index = index.to(inputs.device)
            loss = F.mse_loss(block(inputs[index]), targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    after = _relative_error(block, inputs, targets, options.batch * 4)
    held_errors = None
    restored = not after < before
    if held is not None:
        held_after = _relative_error(block, *held, options.batch * 4)
        held_errors = (held_before, held_after)
        restored = not held_after < held_before
    if restored:
        block.load_state_dict(saved)
        after = before
    block.train(mode)
    return before, after, restored, held_errors


def reconstruct(
    model: nn.Module,
    original: nn.Module,
    calibration: Sequence[torch.Tensor],
    layers: Sequence[str],
    options: ReconstructionOptions = ReconstructionOptions(),
    progress: Callable[[str], None] | None = None,
    held: Sequence[torch.Tensor] = (),
) -> list[BlockResult]:
    """Reconstruct, in place, every block of ``model`` that holds one of the replaced
    ``layers``, against ``original`` (the network before compression, same module names
    above the replaced layers).

    Args:
        model: the compressed network (modified in place).
        original: the network it was compressed from (left as it is).
        calibration: input batches ``[B, ...]``; all of them are cached per block, up to
            ``options.max_bytes``.
        layers: qualified names of the replaced layers (``plan.replaced()``).
        options: steps, learning rate, batch, cache bound, seed and device; both networks
            move to the device for the step and back to their own afterwards.
        progress: called with each block name before it trains.
        held: held-out input batches (not in ``calibration``): a block stays trained only
            where its error on them goes down (cached up to a quarter of ``max_bytes``).

    Returns:
        One ``BlockResult`` per block (in execution order), then one per replaced layer that
        could not be reconstructed (``skipped`` says why).
    """
    if not layers or not calibration:
        return []
    homes = [module_device(model), module_device(original)]
    device = torch.device(options.device) if options.device else homes[0]
    original_mode, mode = original.training, model.training
    original.eval().to(device)
    model.eval().to(device)
    try:
        example = calibration[0][:2].to(device)
        blocks = find_blocks(model, original, layers, example)
        for result in blocks:
            if result.skipped is not None:
                continue
            block, _, _ = resolve_unit(model, result.name)
            if not any(p.requires_grad for p in block.parameters()):
                result.skipped = "no trainable parameters"
                continue
            if progress is not None:
                progress(result.name)
            inputs, targets = _cache(model, original, result.name, calibration, device,
                                     options.max_bytes)
            result.samples = len(inputs)
            held_data = None if not held else _cache(model, original, result.name, held,
                                                     device, options.max_bytes // 4)
            (result.error_before, result.error_after, result.restored,
             held_errors) = reconstruct_block(block, inputs, targets, options, held_data)
            if held_errors is not None:
                result.held_out_before, result.held_out_after = held_errors
            del inputs, targets, held_data
    finally:
        original.train(original_mode).to(homes[1])
        model.train(mode).to(homes[0])
    return blocks


def _cache(model: nn.Module, original: nn.Module, name: str,
           calibration: Sequence[torch.Tensor], device: torch.device,
           max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The compressed network's inputs to block ``name`` and the original's outputs of it, for
    as many calibration samples as fit in ``max_bytes``."""
    inputs, targets, used = [], [], 0
    for batch in calibration:
        x = batch.to(device)
        xs = capture(model, name, x, "input")
        yt = capture(original, name, x, "output")
        per_sample = xs[0].numel() * xs.element_size() + yt[0].numel() * yt.element_size()
        take = min(len(x), (max_bytes - used) // per_sample) if inputs else len(x)
        if take <= 0:
            break
        inputs.append(xs[:take])
        targets.append(yt[:take])
        used += take * per_sample
        if take < len(x):
            break
    return torch.cat(inputs), torch.cat(targets)


__all__ = ["BlockResult", "ReconstructionOptions", "capture", "find_blocks", "probe_calls",
           "reconstruct", "reconstruct_block", "resolve_unit"]

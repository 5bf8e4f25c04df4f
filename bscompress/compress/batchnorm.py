"""BatchNorm statistics after compression, corrected by the shift compression causes.

Re-estimating every BatchNorm's running statistics on the calibration data
(``calibrate.reestimate_batchnorm``) replaces the statistics of the training set by those of
the calibration set. When the calibration set does not cover what the model will see (a few
classes, one source of photos), that throws away the trained statistics: on the demo ResNet
calibrated on 512 images of two Fashion-MNIST classes, re-estimation alone costs 5.8 points
of test accuracy at 50% of the MACs (issue 19).

:func:`correct_batchnorm` keeps the trained statistics and moves them only by what
compression changed. Per BatchNorm channel, the input of the compressed network is modelled as
an affine map of the original's, x̂ ≈ a·x + b, with a and b read off the two networks' input
moments on the calibration data (m, v: mean and variance; o original, c compressed):

    a = sqrt(v_c / v_o),   b = m_c − a·m_o,
    μ' = a·μ₀ + b = m_c + a·(μ₀ − m_o),   σ'² = a²·σ₀² = σ₀² · v_c / v_o,

so that the BatchNorm normalises x̂ as the original normalised x. With calibration data that
matches the training data (m_o ≈ μ₀, v_o ≈ σ₀²) this is plain re-estimation (μ' = m_c,
σ'² = v_c); with narrow data the trained statistics stay the anchor. A channel whose
original variance on the data is (nearly) zero keeps a = 1.

Both networks run in eval mode. The compressed network's moments are accumulated batch by
batch in a pre-hook that also updates the running statistics before the BatchNorm runs, so that
each BatchNorm sees the corrections of those before it within one pass over the data.

:func:`held_out_output_error` measures the network-level relative output error on held-out
batches; :mod:`bscompress.compress.decomposition` keeps the correction unless it raises it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from bscompress.compress.calibrate import BATCHNORMS, check_batchnorm_samples, run_hooked
from bscompress.core.stats import evaluating, first_tensor, module_device

#: a channel whose original variance on the data is under this fraction of the layer's mean
#: variance keeps its trained variance (a = 1): the ratio would be noise
DEAD_VARIANCE = 1e-6
#: a and a² are kept within [1/LIMIT, LIMIT]
LIMIT = 1e3
#: the elements of a channels-last map whose moments are summed at once (``_Moments.of_rows``:
#: 1 MB of float32, in cache; 4× as many took 2–2.5× longer on 28² to 112² maps)
CHUNK_ELEMENTS = 1 << 18


class _Moments:
    """Per-channel mean and variance of a BatchNorm's input over every value seen: each
    batch's (float32, Welford's within the batch: ``torch.var_mean``) merged into float64
    running moments by Chan's formula, so that no float64 copy of an activation is made."""

    def __init__(self, channels: int) -> None:
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.m2 = torch.zeros(channels, dtype=torch.float64)  # Σ (x − mean)²
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """``x``: ``[B, C, ...]``."""
        self.merge(*self.of(x))

    @staticmethod
    def of(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(var, mean, n)`` of one batch ``x [B, C, ...]`` per channel (float64, CPU)."""
        x = x.detach()
        dims = [d for d in range(x.dim()) if d != 1]
        n = x.numel() // max(x.shape[1], 1)
        if n == 0:
            return torch.zeros(x.shape[1], dtype=torch.float64), torch.zeros(
                x.shape[1], dtype=torch.float64), 0
        if (x.dim() == 4 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last)):
            return _Moments.of_rows(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]))
        var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
        return var.double().cpu(), mean.double().cpu(), n

    @staticmethod
    def of_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """:meth:`of` for the rows ``[P, C]`` of a channels-last map (contiguous), where
        ``torch.var_mean`` over the strided dimensions reads at about 1 GB/s: sums of the
        rows less the first chunk's mean, a chunk of :data:`CHUNK_ELEMENTS` at a time (in
        cache), added up in float64; 3–5× faster on 7² to 112² maps of 64 to 2048
        channels."""
        n, channels = rows.shape
        rows = rows.float()
        step = max(1, CHUNK_ELEMENTS // max(channels, 1))
        shift = rows[:step].mean(0)
        total = torch.zeros(channels, dtype=torch.float64, device=rows.device)
        square = torch.zeros_like(total)
        for start in range(0, n, step):
            d = rows[start:start + step] - shift
            total += d.sum(0)
            square += torch.linalg.vector_norm(d, dim=0).double().square()
        m = total / n
        return ((square / n - m.square()).clamp_min(0.0).cpu(), (m + shift).cpu(), n)

    def merge(self, var: torch.Tensor, mean: torch.Tensor, n: int) -> None:
        """Add one batch's moments (:meth:`of`)."""
        if n == 0:
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += var * n + delta.square() * (self.count * n / total)
        self.count = total

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean.clone(), (self.m2 / max(self.count, 1)).clamp_min(0.0)


class OriginalSeen:
    """What a pass of the original network over the calibration data records for the
    BatchNorm correction, so that the correction need not run the original again (the
    statistics pass runs it anyway, ``calibrate.collect_patch_covariances(observe=)``):
    every BatchNorm's input moments per batch on one list of batches (``moments``, replayed
    batch by batch: the same correction as with the original running beside), or the first
    output tensors on another (``outputs``, float64 on the CPU, up to
    :data:`MAX_TARGET_BYTES`; ``None`` past it). ``batches`` are the batches seen, in order:
    a correction on other batches runs the original itself."""

    def __init__(self) -> None:
        self.moments: dict[str, list[tuple[torch.Tensor, torch.Tensor, int]]] = {}
        self.outputs: list[torch.Tensor] | None = []
        self._output_bytes = 0
        self.batches: dict[str, list[torch.Tensor]] = {"moments": [], "outputs": []}

    def moment_hooks(self, model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """Hooks recording ``model``'s BatchNorm inputs (for :func:`correct_batchnorm`)."""
        def record(name: str):
            def hook(_module, args):
                self.moments[name].append(_Moments.of(args[0]))
            return hook

        handles = []
        for name, module in model.named_modules():
            if (isinstance(module, BATCHNORMS) and module.track_running_stats
                    and module.running_mean is not None):
                self.moments[name] = []
                handles.append(module.register_forward_pre_hook(record(name)))
        handles.append(model.register_forward_pre_hook(
            lambda _m, args: self.batches["moments"].append(args[0])))
        return handles

    def output_hooks(self, model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """A hook keeping ``model``'s first output tensor per batch (the targets of
        :func:`held_out_output_error`)."""
        def keep(_module, args, output):
            self.batches["outputs"].append(args[0])
            if self.outputs is None:
                return
            self.outputs.append(first_tensor(output).detach().double().cpu())
            self._output_bytes += self.outputs[-1].numel() * self.outputs[-1].element_size()
            if self._output_bytes > MAX_TARGET_BYTES:
                self.outputs = None
        return [model.register_forward_hook(keep)]

    def covers(self, kind: str, batches: Sequence[torch.Tensor]) -> bool:
        """Whether the ``kind`` (``moments`` or ``outputs``) was recorded on exactly
        ``batches`` (the same tensors' values, in order)."""
        seen = self.batches[kind]
        return len(seen) == len(batches) and all(
            a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
            for a, b in zip(seen, batches, strict=True))


def _norms(model: nn.Module, reference: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
    """The BatchNorms with running statistics that both networks hold under the same name and
    width: ``name -> (compressed, original)``."""
    originals = dict(reference.named_modules())
    pairs = {}
    for name, module in model.named_modules():
        other = originals.get(name)
        if (isinstance(module, BATCHNORMS) and isinstance(other, BATCHNORMS)
                and module.track_running_stats and other.running_mean is not None
                and module.num_features == other.num_features):
            pairs[name] = (module, other)
    return pairs


def corrected(mean0: torch.Tensor, var0: torch.Tensor, original: _Moments,
              compressed: _Moments) -> tuple[torch.Tensor, torch.Tensor]:
    """``(μ', σ'²)`` from the trained ``(μ₀, σ₀²)`` and the two networks' input moments."""
    m_o, v_o = original.mean_var()
    m_c, v_c = compressed.mean_var()
    scale = float(v_o.mean()) if v_o.numel() else 0.0
    ratio = torch.where(v_o > DEAD_VARIANCE * scale, v_c / v_o.clamp_min(1e-300),
                        torch.ones_like(v_o)).clamp(1 / LIMIT, LIMIT)
    mean0, var0 = mean0.detach().to(torch.float64).cpu(), var0.detach().to(torch.float64).cpu()
    return m_c + ratio.sqrt() * (mean0 - m_o), var0 * ratio


def correct_batchnorm(model: nn.Module, reference: nn.Module,
                      batches: Iterable[torch.Tensor], seen: OriginalSeen | None = None) -> int:
    """Move the running statistics of ``model``'s BatchNorms by the shift compression causes
    (the module docstring's affine correction), measured on ``batches`` ``[B, ...]`` against
    ``reference``, the network before compression (left as it is; BatchNorms paired by name).
    Returns the number of BatchNorms corrected; both networks return to their modes.

    ``seen``: the original's BatchNorm input moments, when a pass over the same ``batches``
    recorded them (:class:`OriginalSeen`); the original then does not run here.

    Raises:
        BadInput: fewer than ``calibrate.MIN_BATCHNORM_SAMPLES`` samples.
    """
    pairs = _norms(model, reference)
    if not pairs:
        return 0
    batches = list(batches)
    check_batchnorm_samples(sum(len(x) for x in batches))
    # the anchor is the original's trained statistics (a mean already moved here by
    # ``data_aware.absorb_mean`` is measured again in m_c)
    trained = {name: (orig.running_mean.clone(), orig.running_var.clone())
               for name, (_, orig) in pairs.items()}
    known = (seen is not None and set(pairs) <= set(seen.moments)
             and seen.covers("moments", batches)
             and all(len(seen.moments[name]) == len(batches) for name in pairs))
    originals = {name: _Moments(mod.num_features) for name, (mod, _) in pairs.items()}
    compressed = {name: _Moments(mod.num_features) for name, (mod, _) in pairs.items()}

    def record(name: str):
        def hook(_module, args):
            originals[name].add(args[0])
        return hook

    def correct(name: str):
        def hook(module, args):
            compressed[name].add(args[0])
            mean, var = corrected(*trained[name], originals[name], compressed[name])
            module.running_mean.copy_(mean.to(module.running_mean))
            module.running_var.copy_(var.to(module.running_var))
        return hook

    modes = (model.training, reference.training)
    hooks = [] if known else [orig.register_forward_pre_hook(record(name))
                              for name, (_, orig) in pairs.items()]
    hooks += [mod.register_forward_pre_hook(correct(name)) for name, (mod, _) in pairs.items()]
    device, reference_device = module_device(model), module_device(reference)
    model.eval()
    reference.eval()
    try:
        with torch.no_grad():
            if known:  # the original's moments of each batch, as if it ran beside
                for i, x in enumerate(batches):
                    for name, moments in originals.items():
                        moments.merge(*seen.moments[name][i])
                    model(x.to(device))
            else:
                for x in batches:
                    reference(x.to(reference_device))
                    model(x.to(device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(modes[0])
        reference.train(modes[1])
    return len(pairs)


def correct_batchnorm_checked(model: nn.Module, reference: nn.Module,
                              batches: Sequence[torch.Tensor],
                              held: Sequence[torch.Tensor] = (),
                              seen: OriginalSeen | None = None) -> dict:
    """:func:`correct_batchnorm` on ``batches``, kept unless it raises the network's output
    error on the ``held`` batches. Returns what was done, for the Plan:
    ``{"corrected": n, "held_out_error": {"before": e0, "after": e1}, "kept": bool}``, and
    ``"in_sample": True`` where no batch could be held out (``held`` empty: the error is
    checked on ``batches`` themselves; with a handful of samples a channel's variance can
    fall by orders of magnitude where compression removed its signal, and its BatchNorm would
    then amplify what is left a hundredfold). ``seen``: what a pass of the original over these
    batches recorded (:class:`OriginalSeen`: the BatchNorm moments on ``batches``, the
    outputs on ``held``), used where it covers them."""
    in_sample = not held
    if in_sample:
        held = batches
    pairs = _norms(model, reference)
    saved = {name: (mod.running_mean.clone(), mod.running_var.clone())
             for name, (mod, _) in pairs.items()}
    targets = original_outputs(reference, held, seen)  # once for both errors
    before = held_out_output_error(model, targets, held)
    count = correct_batchnorm(model, reference, batches, seen)
    after = held_out_output_error(model, targets, held)
    result = {"corrected": count, "held_out_error": {"before": before, "after": after},
              "kept": True, **({"in_sample": True} if in_sample else {})}
    if count and after > before:  # ties: the correction did no harm
        for name, (mean, var) in saved.items():
            pairs[name][0].running_mean.copy_(mean)
            pairs[name][0].running_var.copy_(var)
        result.update(corrected=0, kept=False)
    return result


def following_batchnorms(model: nn.Module, layers: Sequence[str],
                         example: torch.Tensor) -> dict[str, nn.Module]:
    """The BatchNorm (with running statistics) whose input is each named layer's output
    itself, found by running ``model`` once on ``example`` ``[B, ...]`` (eval mode, no grad):
    ``{layer name: BatchNorm}`` for the layers that have one. Such a BatchNorm takes up a
    change of the layer's mean output exactly (``data_aware.absorb_mean``). The same tensor
    changed in place in between (``relu_``, ``+=``) does not count: its version moved."""
    modules = dict(model.named_modules())
    outputs: dict[str, tuple[torch.Tensor, int]] = {}
    found: dict[str, nn.Module] = {}

    def version(tensor: torch.Tensor) -> int:
        try:
            return tensor._version
        except RuntimeError:  # an inference-mode tensor has no version counter
            return -1

    def keep(name: str):
        def hook(_module, _args, output):
            if isinstance(output, torch.Tensor):
                outputs[name] = (output, version(output))
        return hook

    def match(module, args):
        for name, (output, seen) in outputs.items():
            if args and args[0] is output and version(output) == seen and name not in found:
                found[name] = module

    handles = [modules[name].register_forward_hook(keep(name)) for name in layers]
    handles += [m.register_forward_pre_hook(match) for m in model.modules()
                if isinstance(m, BATCHNORMS) and m.track_running_stats
                and m.running_mean is not None]
    for _ in run_hooked([model], [example], handles):
        pass
    return found


#: the most bytes of the original's held-out outputs kept for the two errors of
#: :func:`correct_batchnorm_checked` (more, e.g. a dense prediction's maps: run it twice)
MAX_TARGET_BYTES = 256 << 20


def _output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model``'s first output tensor on ``x`` (no grad), float64 on the CPU. (No generator
    holds a ``no_grad`` open: one left unfinished would restore the grad mode it saw when
    collected, out of order.)"""
    with torch.no_grad():
        return first_tensor(model(x.to(module_device(model)))).double().cpu()


def network_outputs(model: nn.Module, batches: Sequence[torch.Tensor],
                    max_bytes: int = MAX_TARGET_BYTES) -> list[torch.Tensor] | nn.Module:
    """``model``'s first output tensors on ``batches`` (eval mode, no grad; float64, CPU),
    the targets :func:`held_out_output_error` compares with; ``model`` itself when they would
    take more than ``max_bytes`` (they are then computed again where needed)."""
    outputs, held = [], 0
    with evaluating(model):
        for x in batches:
            outputs.append(_output(model, x))
            held += outputs[-1].numel() * outputs[-1].element_size()
            if held > max_bytes:
                return model
    return outputs


def original_outputs(reference: nn.Module, batches: Sequence[torch.Tensor],
                     seen: OriginalSeen | None = None) -> list[torch.Tensor] | nn.Module:
    """The targets :func:`held_out_output_error` compares with on ``batches``: the outputs
    the statistics pass recorded (``seen``) where it covers them, else
    :func:`network_outputs` of ``reference``."""
    if seen is not None and seen.outputs is not None and seen.covers("outputs", batches):
        return seen.outputs
    return network_outputs(reference, batches)


def held_out_output_error(model: nn.Module, reference: nn.Module | Sequence[torch.Tensor],
                          batches: Sequence[torch.Tensor]) -> float:
    """Σ‖f(x) − f₀(x)‖² / Σ‖f₀(x)‖² over ``batches``: ``model`` (f) against ``reference``
    (f₀: the network, or its outputs on ``batches`` from :func:`network_outputs`), both in
    eval mode, on their first output tensor."""
    network = isinstance(reference, nn.Module)
    num = den = 0.0
    with evaluating(model), (evaluating(reference) if network
                              else contextlib.nullcontext()):
        for i, x in enumerate(batches):
            y0 = _output(reference, x) if network else reference[i]
            y = _output(model, x)
            num += float((y - y0).square().sum())
            den += float(y0.square().sum())
    return num / den if den > 0 else num


__all__ = ["OriginalSeen", "correct_batchnorm", "correct_batchnorm_checked", "corrected",
           "following_batchnorms", "held_out_output_error", "network_outputs"]

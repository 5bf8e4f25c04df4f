"""VGNet's fixed kernels on a trained model: depthwise kernels (of any model) and blueprints
(of the factorized blocks) that match a fixed bank member are replaced by that member with
their own sign and least-squares scale, and stop being trained.

* A kernel ``k`` whose best bank member ``b`` has sign-invariant normalised correlation
  ``|ρ| ≥ match`` becomes ``s·b`` with ``s = ⟨k, b⟩/‖b‖²`` (held in a buffer of a
  :class:`~bscompress.layers.fixed.FixedKernelConv`).
* A factorized block whose every spatial kernel is identity-like (stride 1, size-preserving
  padding) computes a 1×1 conv: it is replaced by that conv (``W = to_dense()`` at the
  kernel's centre, the block's bias), with fewer params and MACs.

Blueprints are fixed where they form a depthwise stage (the ``spatial_stage`` of the method
that built the block): BSConv-U/-S at rank 1, DSC at any channel multiplier, 3-mode CP. BSConv
at rank > 1 (blueprints summed in groups) and 4-mode CP (pairs of 1-D kernels) are counted and
left alone.

Modes: ``strided-gaussian`` (only strided kernels, only Gaussian members: VGNet's
downsampling), ``bank`` (every kernel against the whole bank), ``identity`` (only the
identity: drops blocks). The Plan records every change, so archives reload.

Depthwise convs of a subclass of ``nn.Conv2d`` count like ``nn.Conv2d`` when their ``forward``
is a plain or "same"-padded conv (the padding is kept, and recorded in the entry's
``options["pad"]``; :mod:`bscompress.core.padding`); the others are refused, each with an entry
giving the reason, and counted in ``meta["fixed_kernels"]["refused"]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bscompress.analysis.kernels import fixed_assignments, is_depthwise
from bscompress.compress.batchnorm import OriginalSeen, network_outputs, original_outputs
from bscompress.compress.calibrate import collect_patch_covariances
from bscompress.compress.data_aware import unsupported
from bscompress.core.computed_weight import stood_in
from bscompress.core.covariance import centred
from bscompress.core.errors import BadInput
from bscompress.core.padding import PAD_ATTR, SAME, as_plain_conv, pad_options, refusal
from bscompress.core.plan import Plan
from bscompress.core.records import FixedKernelsRecord
from bscompress.core.stats import module_device, module_dtype
from bscompress.core.surgery import (
    layer_entry,
    register_modifier,
    register_structure,
    rewrite_finish,
    rewrite_start,
)
from bscompress.factorize.kernel_bank import family, kernel_bank
from bscompress.layers.fixed import FixedKernelConv
from bscompress.methods import block_method

FIXED = "fixed-kernels"
DROP = "drop-spatial"

#: mode → (bank families allowed, strided kernels only)
MODES = {
    "strided-gaussian": (("gaussian",), True),
    "bank": (("gaussian", "edge", "identity"), False),
    "identity": (("identity",), False),
}

@dataclass(frozen=True)
class FixedKernelOptions:
    """Which kernels are fixed.

    Attributes:
        mode: one of :data:`MODES`.
        match: the |ρ| a kernel's best bank member must reach (0 < match ≤ 1).
        drop_identity: replace a factorized block whose spatial kernels are all identity by
            its 1×1 equivalent.
    """

    mode: str = "strided-gaussian"
    match: float = 0.9
    drop_identity: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise BadInput(f"--fixed-kernels {self.mode!r} is unknown; choose one of "
                           f"{', '.join(MODES)}")
        if not 0 < self.match <= 1:
            raise BadInput(f"--match must be in (0, 1], got {self.match}")


def _spatial_stage(block: nn.Module) -> str | None:
    """The path of the depthwise stage of a factorized block, when it has one we can fix
    (its method's ``spatial_stage``)."""
    method = block_method(block)
    return method.spatial_stage(block) if method is not None else None


def _has_spatial_kernels(block: nn.Module) -> bool:
    """A factorized block holding single-channel spatial kernels (its method's
    ``spatial_kernels``), fixable or not."""
    method = block_method(block)
    return method is not None and method.spatial_kernels


def _is_depthwise(conv: nn.Module) -> bool:
    """A depthwise Conv2d with a spatial kernel (FixedKernelConv is 2-D only)."""
    return isinstance(conv, nn.Conv2d) and is_depthwise(conv)


def _keeps_size(conv: nn.Conv2d) -> bool:
    """A stride-1 conv whose padding keeps the kernel's centre on each output pixel."""
    if any(s != 1 for s in conv.stride):
        return False
    pad = getattr(conv, PAD_ATTR, None)
    if pad is not None:  # an input padding: 'same' at stride 1 centres an odd span only
        spans = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        amounts = [(span // 2, span - span // 2) for span in reversed(spans)]
        centred = [p for pair in amounts for p in pair]
        return (all(span % 2 == 0 for span in spans)
                and (pad == SAME or list(pad) == centred) and not any(conv.padding))
    if conv.padding == "same":
        return True
    return all(2 * p == d * (k - 1) for p, d, k in
               zip(conv.padding, conv.dilation, conv.kernel_size, strict=True))


def _targets(model: nn.Module, plan: Plan, foreign: dict[str, str]
             ) -> tuple[list[tuple[str, str | None]], int, dict[str, str]]:
    """``(entry or conv name, path inside it)`` of every spatial stage that may be fixed, the
    number of blocks whose spatial stage is not depthwise (BSConv at rank > 1, whose
    blueprints are summed in groups; 4-mode CP, whose kernels are 1-D pairs): left alone, and
    the depthwise convs refused because of their ``forward`` or because the model reads
    their weight outside it (``foreign``: their reasons, from ``rewrite_start``), with the
    reason."""
    blocks = {e.name for e in plan.replaced()}
    out, unsupported, refused = [], 0, {}
    for name, module in model.named_modules():
        if name in blocks:
            path = _spatial_stage(module)
            if path is not None and _is_depthwise(module.get_submodule(path)):
                out.append((name, path))
            elif _has_spatial_kernels(module):
                unsupported += 1
        elif (isinstance(module, nn.Conv2d) and is_depthwise(module)
              and not any(name.startswith(b + ".") for b in blocks)):
            reason = refusal(module) or foreign.get(name)
            if reason is None:
                out.append((name, None))
            else:
                refused[name] = reason
    return out, unsupported, refused


#: The covariance of each kernel's input patches is shrunk this far toward its scaled
#: identity before matching on calibration data: directions the inputs never spanned count
#: 1% of an average direction, so a kernel is not matched on the few directions the data
#: happened to take alone
INPUT_SHRINKAGE = 0.01
#: ``decompose`` warns that the fixed kernels need fine-tuning where the model's top-1
#: agreement with itself before them falls under this on the data measured (classifiers), or
#: else its output change Σ‖f − f₀‖² / Σ‖f₀‖² exceeds :data:`CHANGE_WARNING`. On ImageNet
#: EfficientNet-Lite0 a change of 1.2% of the logits' energy (93% agreement) on calibration
#: crops already meant 89% agreement on other photos (``docs/benchmarks.md``, "Fixed kernels
#: on an ImageNet-trained network").
AGREEMENT_WARNING = 0.99
CHANGE_WARNING = 0.01


def _input_moments(model: nn.Module, convs: dict[str, nn.Conv2d],
                   calibration: Sequence[torch.Tensor], max_bytes: int, seen: OriginalSeen
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor] | str]:
    """Per named depthwise conv (its path in ``model``), ``(Σ [C_out, K, K], μ [C_out, K])``:
    the second moment and mean of each kernel's input patches over ``calibration`` (one pass,
    which also records the model's outputs in ``seen``; the covariance shrunk by
    :data:`INPUT_SHRINKAGE`), or the reason the data cannot support matching on them
    (``data_aware.unsupported``: never reached, zero inputs, fewer patches than taps)."""
    covariances = collect_patch_covariances(model, calibration, list(convs), max_bytes,
                                            observe=lambda: seen.output_hooks(model))
    out: dict[str, tuple[torch.Tensor, torch.Tensor] | str] = {}
    for name, cov in covariances.items():
        why = unsupported(cov)
        if why is not None:
            out[name] = why
            continue
        conv = convs[name]
        repeat = conv.out_channels // conv.in_channels  # the channel multiplier
        mean = cov.mean.reshape(cov.groups, cov.kernel)                 # [C_in, K]
        covariance = centred(cov).blocks[:, 0]                           # [C_in, K, K]
        level = covariance.diagonal(dim1=-2, dim2=-1).mean(-1)          # tr / K
        eye = torch.eye(cov.kernel, dtype=covariance.dtype, device=covariance.device)
        covariance = covariance + INPUT_SHRINKAGE * level[:, None, None] * eye
        sigma = covariance + mean[:, :, None] * mean[:, None, :]
        out[name] = (sigma.repeat_interleave(repeat, 0), mean.repeat_interleave(repeat, 0))
    return out


def _probe_batches(model: nn.Module, input_shape: Sequence[int],
                   calibration: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
    """What the output change is measured on: the calibration batches, else a seeded random
    batch of two samples of ``input_shape``."""
    if calibration:
        return list(calibration)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *input_shape[1:], generator=generator)
    return [x.to(device=module_device(model), dtype=module_dtype(model))]


@stood_in  # convs whose forward computes their weight (weight standardisation)
def fix_kernels(model: nn.Module, plan: Plan | None, input_shape: Sequence[int],
                options: FixedKernelOptions = FixedKernelOptions(),
                calibration: Sequence[torch.Tensor] | None = None,
                max_bytes: int = 1 << 30) -> tuple[nn.Module, Plan]:
    """Fix, in place, the kernels of ``model`` that ``options`` selects (module docstring).

    With ``calibration`` (input batches ``[B, ...]``), kernels are matched in the metric of
    their inputs on that data (``kernel_bank.match_bank``): ``options.match`` then bounds
    each fixed kernel's relative output error, 1 − ρ², instead of its weight error; a conv
    whose statistics cannot support it (``data_aware.unsupported``) is matched on its
    weights, and named in the record. The relative change of the model's output,
    Σ‖f(x) − f₀(x)‖² / Σ‖f₀(x)‖², is measured on ``calibration`` (else on a random batch)
    and recorded.

    Returns ``(model, plan)``; the plan gains ``fixed-kernels`` / ``drop-spatial`` modifiers
    on factorized blocks, a ``fixed-kernels`` entry per plain depthwise conv, and
    ``meta["fixed_kernels"]`` with the counts per family; a depthwise conv refused because of
    its ``forward`` gets an entry with the reason (``skip_reason``).
    """
    families, strided_only = MODES[options.mode]
    plan, before, foreign = rewrite_start(model, plan, input_shape)
    entries = {e.name: e for e in plan.layers}
    modules = dict(model.named_modules())
    counts = {"kernels": 0, "gaussian": 0, "edge": 0, "identity": 0, "negative": 0,
              "layers": 0, "dropped_blocks": 0}
    targets, counts["unsupported_blocks"], refused = _targets(model, plan, foreign)
    counts["refused"] = len(refused)
    for name, reason in refused.items():
        entry = layer_entry(plan, name, modules[name], before)
        if not entry.replaced:
            entry.skip_reason = f"fixed kernels: {reason}"
    convs = {f"{name}.{path}" if path else name: modules[f"{name}.{path}" if path else name]
             for name, path in targets}
    if strided_only:
        convs = {key: conv for key, conv in convs.items() if any(s != 1 for s in conv.stride)}
    seen = OriginalSeen()
    moments = (_input_moments(model, convs, calibration, max_bytes, seen)
               if calibration and convs else {})
    probe = _probe_batches(model, input_shape, calibration)
    # the outputs before, recorded by the statistics pass where it ran on these batches (the
    # model itself where they would not fit)
    reference = original_outputs(model, probe, seen)
    touched = []
    for name, path in targets:
        owner = modules[name]
        key = f"{name}.{path}" if path else name
        if key not in convs:
            continue
        conv = convs[key]
        counts["kernels"] += conv.out_channels
        names, bank = kernel_bank(tuple(conv.kernel_size))
        kernels = conv.weight.detach().reshape(conv.out_channels, *conv.kernel_size)
        measured = moments.get(key)
        chosen = fixed_assignments(kernels, names, bank.to(kernels.dtype), options.match,
                                   families, None if isinstance(measured, str) else measured)
        if not chosen:
            continue
        indices = [c for c, _, _ in chosen]
        members = [m for _, m, _ in chosen]
        fixed = torch.stack([s * bank[names.index(m)] for _, m, s in chosen]).to(kernels)
        for _, member, scale in chosen:
            counts[family(member)] += 1
            counts["negative"] += int(scale < 0)
        counts["layers"] += 1
        touched.append(name)
        if path is None:
            entry = layer_entry(plan, name, conv, before)
            entry.method, entry.skip_reason = FIXED, None
            pad = pad_options(conv)
            entry.options = {"indices": indices, "members": members, **pad}
            model.set_submodule(name, FixedKernelConv.from_conv(
                as_plain_conv(conv, pad.get("pad")), (indices, fixed)))
            continue
        entries[name].modifiers.append(
            {"kind": FIXED, "paths": [path], "indices": indices, "members": members})
        if (options.drop_identity and len(indices) == conv.out_channels
                and all(family(m) == "identity" for m in members) and _keeps_size(conv)):
            dense = _to_pointwise(owner, conv, fixed)
            entries[name].modifiers.append({"kind": DROP, "in": dense.in_channels,
                                            "out": dense.out_channels, "groups": dense.groups})
            model.set_submodule(name, dense)
            counts["dropped_blocks"] += 1
        else:
            owner.set_submodule(path, FixedKernelConv.from_conv(conv, (indices, fixed)))
    rewrite_finish(model, plan, input_shape, touched)
    change, agreement = _output_change(model, reference, probe)
    agreement = agreement if calibration else None  # two random samples: no agreement
    plan.summary.fixed_kernels = FixedKernelsRecord(
        mode=options.mode, match=options.match, **counts,
        metric="inputs" if calibration else "weights",
        weight_metric={key: why for key, why in moments.items() if isinstance(why, str)},
        output_change=change, agreement=agreement,
        measured_on="calibration data" if calibration else "a random batch")
    return model, plan


def _output_change(model: nn.Module, reference: list[torch.Tensor] | nn.Module,
                   probe: list[torch.Tensor]) -> tuple[float | None, float | None]:
    """``(Σ‖f − f₀‖² / Σ‖f₀‖², top-1 agreement)`` of ``model`` (f) on the ``probe`` batches
    against ``reference``, f₀'s outputs on them (``None``, ``None`` when they were too large
    to keep); the agreement only for outputs ``[B, classes]`` with two classes or more."""
    if isinstance(reference, nn.Module):
        return None, None
    outputs = network_outputs(model, probe)
    if isinstance(outputs, nn.Module):
        return None, None
    num = sum(float((y - y0).square().sum()) for y, y0 in zip(outputs, reference, strict=True))
    den = sum(float(y0.square().sum()) for y0 in reference)
    classes = all(y.dim() == 2 and y.shape[1] > 1 for y in reference)
    same = sum(int((y.argmax(1) == y0.argmax(1)).sum())
               for y, y0 in zip(outputs, reference, strict=True)) if classes else 0
    total = sum(len(y0) for y0 in reference)
    return (num / den if den > 0 else num), (same / total if classes and total else None)


def _to_pointwise(block: nn.Module, conv: nn.Conv2d, kernels: torch.Tensor) -> nn.Conv2d:
    """The 1×1 conv equal to ``block`` once its spatial stage ``conv`` holds the scaled
    identities ``kernels`` ``[C, kh, kw]``: the dense weight's centre tap, and the block's
    output on zeros as the bias."""
    kh, kw = conv.kernel_size
    with torch.no_grad():
        saved = conv.weight.detach().clone()
        conv.weight.copy_(kernels.reshape(conv.weight.shape))
        try:
            dense = block.to_dense()                                   # [N, M/g, kh, kw]
            first = next(m for m in block.modules() if isinstance(m, nn.Conv2d))
            probe = torch.zeros(1, first.in_channels, kh, kw, dtype=dense.dtype,
                                device=dense.device)
            bias = block(probe)[0, :, kh // 2, kw // 2]
        finally:
            conv.weight.copy_(saved)
    out = _empty_pointwise({"in": first.in_channels, "out": dense.shape[0],
                            "groups": first.in_channels // dense.shape[1]}).to(dense)
    with torch.no_grad():
        out.weight.copy_(dense[:, :, kh // 2, kw // 2, None, None])
        out.bias.copy_(bias)
    return out


def _empty_pointwise(spec: dict) -> nn.Conv2d:
    return nn.Conv2d(spec["in"], spec["out"], 1, groups=spec["groups"], bias=True)


def _fixed_modifier(block: nn.Module, spec: dict) -> nn.Module:
    for path in spec["paths"]:
        block.set_submodule(path, FixedKernelConv.empty_like(block.get_submodule(path),
                                                             spec["indices"]))
    return block


register_structure(FIXED, lambda conv, entry: FixedKernelConv.empty_like(
    as_plain_conv(conv, entry.options.get("pad")), entry.options["indices"]))
register_modifier(FIXED, _fixed_modifier)
register_modifier(DROP, lambda block, spec: _empty_pointwise(spec))

__all__ = ["AGREEMENT_WARNING", "CHANGE_WARNING", "FIXED", "INPUT_SHRINKAGE", "MODES",
           "FixedKernelOptions", "fix_kernels"]

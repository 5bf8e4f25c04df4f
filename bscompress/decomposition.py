"""``decompose``: plan and apply a closed-form factorization to every eligible layer."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict

import torch
from torch import nn

from bscompress.calibrate import PatchCovariance
from bscompress.data_aware import fit_block, grouped_weight, output_sigma
from bscompress.factorize.gsvd import relative_output_error
from bscompress.methods import RankOptions, get_method, relative_error
from bscompress.plan import LayerPlan, Plan
from bscompress.stats import count_params, format_count, module_macs
from bscompress.surgery import Eligibility, apply_plan, conv_layers


def plan_decomposition(
    model: nn.Module,
    method: str,
    input_shape: Sequence[int],
    ranks: RankOptions = RankOptions(),
    eligibility: Eligibility = Eligibility(),
) -> Plan:
    """Decide, without building anything heavy, what happens to every layer ``method`` handles.

    The ranks come from the options (fixed, or by energy from the singular values); a layer
    whose block would not cost fewer MACs than the layer at its real input shape is skipped
    with a reason unless ``ranks.allow_growth``.
    """
    impl = get_method(method)
    layers = [(name, mod) for name, mod in model.named_modules() if impl.handles(mod)]
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str):
        def hook(_module, args):
            if name not in shapes and args and isinstance(args[0], torch.Tensor):
                shapes[name] = tuple(args[0].shape)
        return hook

    handles = [mod.register_forward_pre_hook(recorder(name)) for name, mod in layers]
    try:
        stats = module_macs(model, input_shape)
    finally:
        for handle in handles:
            handle.remove()
    convs = conv_layers(model)
    first_conv = convs[0][0] if convs else None

    entries = []
    for name, mod in layers:
        entry = LayerPlan(name, type(mod).__name__, params_before=count_params(mod),
                          macs_before=stats.module_macs.get(name, 0))
        reason = impl.skip_reason(name, mod, eligibility, name == first_conv)
        if reason is None and name not in shapes:
            reason = "not called in the forward pass"
        if reason is None:
            entry.ranks, entry.options = impl.choose(mod, ranks)
            # counted on the meta device: shapes only, no weight init and no arithmetic
            block = impl.structure(copy.deepcopy(mod).to("meta"), entry)
            macs_after = module_macs(block, shapes[name]).macs
            if macs_after >= entry.macs_before and not ranks.allow_growth:
                reason = (f"would not reduce MACs ({format_count(entry.macs_before)} → "
                          f"{format_count(macs_after)}); --allow-growth rewrites it anyway")
        if reason is None:
            entry.method = method
        else:
            entry.skip_reason, entry.ranks, entry.options = reason, {}, {}
        entries.append(entry)
    return Plan(
        layers=entries,
        input_shape=[int(s) for s in input_shape],
        meta={"method": method, "ranks": asdict(ranks), "eligibility": asdict(eligibility),
              "params_before": stats.params, "macs_before": stats.macs},
    )


def decompose(
    model: nn.Module,
    method: str = "bsconv-u",
    input_shape: Sequence[int] = (1, 3, 224, 224),
    ranks: RankOptions = RankOptions(),
    eligibility: Eligibility = Eligibility(),
    progress: Callable[[str], None] | None = None,
    covariances: dict[str, PatchCovariance] | None = None,
    als_iters: int = 1,
) -> tuple[nn.Module, Plan]:
    """Rewrite ``model`` in place: every eligible layer becomes ``method``'s block with weights
    computed in closed form from its trained kernel.

    Args:
        model: a trained model (eval mode is used for counting).
        method: ``bsconv-u``, ``bsconv-s``, ``dsc``, ``svd`` (and the tensor methods).
        input_shape: input shape with batch, for the MAC counts and the growth check.
        ranks: how ranks are chosen (fixed, by energy, BSConv-S ``p``, rounding ...).
        eligibility: which layers may be rewritten (globs, channel floor).
        progress: called with each layer name before it is factorized.
        covariances: input-patch statistics per layer name (``calibrate.
            collect_patch_covariances``); the layers found there get data-aware weights
            (``data_aware.fit_block``) and their relative output error on that data.
        als_iters: alternating least-squares rounds of the data-aware BSConv-U fit.

    Returns:
        ``(model, plan)``; the plan records, per layer, the ranks, params and MACs before and
        after, and the relative truncation error ‖W − Ŵ‖²/‖W‖² (or the skip reason).
    """
    impl = get_method(method)
    plan = plan_decomposition(model, method, input_shape, ranks, eligibility)

    def build(module: nn.Module, entry: LayerPlan) -> nn.Module:
        if progress is not None:
            progress(entry.name)
        with torch.no_grad():
            block, error = impl.build(module, entry)
            entry.fit = "svd"
            cov = (covariances or {}).get(entry.name)
            if cov is not None:
                entry.fit = fit_block(module, block, cov, als_iters)
                error = relative_error(module.weight, block.to_dense())
                entry.output_error = relative_output_error(
                    grouped_weight(module), _grouped_dense(block, module), output_sigma(cov))
        entry.predicted_error = error
        entry.params_after = count_params(block)
        return block

    apply_plan(model, plan, build=build)
    after = module_macs(model, input_shape)
    for entry in plan.replaced():
        entry.macs_after = after.module_macs.get(entry.name, 0)
    plan.meta.update(params_after=after.params, macs_after=after.macs)
    return model, plan


def _grouped_dense(block: nn.Module, original: nn.Module) -> torch.Tensor:
    """The block's dense weight as ``[g, N/g, M/g·K]`` float64."""
    dense = block.to_dense().detach().to(torch.float64)
    groups = getattr(original, "groups", 1)
    return dense.reshape(groups, dense.shape[0] // groups, -1)

"""``decompose``: plan and apply a closed-form factorization to every eligible layer.

The run in stages, each its own function: the calibration data split and checked
(``_calibration_batches``), the statistics of the layers on it (``_Statistics``), the
candidates' measured errors under a budget (``_candidate_error``), the plan
(``planning.plan_decomposition``), the layers built and fitted (``_build_layers``:
one-shot, or sequential on the partly compressed network's inputs), then the BatchNorm
correction (``_correct``) and the block reconstruction (``_reconstruct``), each kept only
where the held-out error says so, and the report written into the plan (``_report``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bscompress.compress.batchnorm import (
    OriginalSeen,
    correct_batchnorm_checked,
    following_batchnorms,
    held_out_output_error,
    original_outputs,
)
from bscompress.compress.block_inputs import PairedStatistics
from bscompress.compress.calibrate import (
    DEFAULT_MAX_BYTES,
    MIN_BATCHNORM_SAMPLES,
    check_batchnorm_samples,
    check_calibration_fits,
    collect_patch_covariances,
    distinct_samples,
    in_fast_layout,
    measure_output_errors,
)
from bscompress.compress.data_aware import merged
from bscompress.compress.guard import LatencyGuard
from bscompress.compress.layer_fit import (
    HOLDOUT,
    CandidateScorer,
    as_candidate,
    fit_layer,
    split_calibration,
)
from bscompress.compress.planning import (
    AUTO,
    FEW_SAMPLES_ERROR,
    HELD_OUT_ERROR,
    OUTPUT_ERROR,
    SENSITIVITY,
    Budget,
    CandidateError,
    eligible_layers,
    plan_decomposition,
)
from bscompress.compress.reconstruct import ReconstructionOptions, reconstruct
from bscompress.compress.sensitivity import SensitivityProbe
from bscompress.core.computed_weight import stood_in
from bscompress.core.covariance import PatchCovariance
from bscompress.core.errors import BadInput
from bscompress.core.plan import FitReport, LayerPlan, Plan
from bscompress.core.progress import Reporter, Step
from bscompress.core.records import CalibrationRecord, ReconstructionRecord, SensitivityRecord
from bscompress.core.stats import check_finite, count_params, module_dtype, module_macs
from bscompress.core.surgery import Eligibility, apply_plan
from bscompress.deploy.latency import LatencyTimer, default_cache_path
from bscompress.methods import RankOptions, auto_methods, get_method

#: the public names of the decomposition API (``Budget`` and ``plan_decomposition`` live in
#: ``planning``; ``AUTO_METHODS`` is read through ``__getattr__``)
__all__ = ["AUTO", "FEW_SAMPLES_ERROR", "HELD_OUT_ERROR", "OUTPUT_ERROR", "SENSITIVITY",
           "Budget", "decompose", "plan_decomposition"]


def __getattr__(name: str):
    if name == "AUTO_METHODS":
        return auto_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: The calibration samples the in-network errors of the replaced layers are measured on (a
#: diagnostic of the Plan; two forward passes, 109 s of a 918 s ResNet-50 run on 512 images)
MEASURED_SAMPLES = 128


def _first_samples(batches: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """The leading batches holding ``count`` samples (the last one cut)."""
    head, seen = [], 0
    for x in batches:
        if seen >= count:
            break
        head.append(x if len(x) <= count - seen else x[:count - seen])
        seen += len(head[-1])
    return head


@stood_in  # convs whose forward computes their weight (weight standardisation)
def decompose(
    model: nn.Module,
    method: str = "bsconv-u",
    input_shape: Sequence[int] = (1, 3, 224, 224),
    ranks: RankOptions = RankOptions(),
    eligibility: Eligibility = Eligibility(),
    progress: Reporter | None = None,
    budget: Budget | None = None,
    covariances: dict[str, PatchCovariance] | None = None,
    als_iters: int = 1,
    calibration: Iterable[torch.Tensor] | None = None,
    calib_max_bytes: int = DEFAULT_MAX_BYTES,
    reestimate_bn: bool = True,
    sequential: bool = False,
    latency: LatencyTimer | None = None,
    sensitivity: bool = False,
    sensitivity_cache: str | Path | None = None,
    reconstruction: ReconstructionOptions | None = None,
    holdout: float = HOLDOUT,
    guard: LatencyGuard | None = None,
) -> tuple[nn.Module, Plan]:
    """Rewrite ``model`` in place: every eligible layer becomes ``method``'s block with weights
    computed in closed form from its trained kernel.

    Args:
        model: a trained model (eval mode is used for counting). A conv whose forward
            convolves with a weight it computes (weight standardisation: timm's
            ``StdConv2d``, ``ScaledStdConv2d``) is factorized from that weight, and kept as it
            is where it stays dense (``core.computed_weight``).
        method: the name of a registered method (``bscompress.methods.METHODS``:
            ``bsconv-u``, ``bsconv-s``, ``dsc``, ``tucker2``, ``cp``, ``cp4``, ``svd``, and any
            plug-in) or ``auto``.
        input_shape: input shape with batch, for the MAC counts and the growth check.
        ranks: how ranks are chosen (fixed, by energy, BSConv-S ``p``, rounding ...).
        eligibility: which layers may be rewritten (globs, channel floor).
        progress: called with each unit of work before it runs (``progress.Step``: its
            stage, layer or block, and how many of how many): calibration batches, budget
            candidates, layers factorized, blocks reconstructed.
        budget: allocate ranks across layers to meet a whole-model MACs, params or latency
            target instead of using ``ranks.rank`` / ``ranks.energy`` (see
            ``plan_decomposition``); with ``calibration`` each candidate is charged its
            data-aware relative output error instead of its weight error.
        covariances: input-patch statistics per layer name (``calibrate.
            collect_patch_covariances``); the layers found there get data-aware weights
            (``data_aware.fit_block``) and their relative output error on that data.
        als_iters: alternating least-squares rounds of the data-aware BSConv-U fit.
        calibration: re-iterable input batches ``[B, C, H, W]`` (e.g. a list). When given,
            the covariances of the replaced layers are collected on them first (full Σ for
            layers under ``calib_max_bytes``), and afterwards every BatchNorm's running
            statistics are moved by the shift compression causes on them
            (``batchnorm.correct_batchnorm``; kept only where the network's output error on
            the held-out batches goes down) unless ``reestimate_bn`` is false.
        sequential: with ``calibration``, fit each layer on the inputs the partly compressed
            network gives it, against the original network's outputs (multi-layer error
            compensation; two passes over the calibration data per layer). Layers whose
            full covariance is over ``calib_max_bytes`` fall back to the one-shot statistics.
        latency: the ONNX Runtime timer of a latency budget (``latency.LatencyTimer``; one
            with the default on-disk cache when ``None``); the compressed model is timed too.
        guard: with ``budget``, offer only candidate blocks timed faster than their layer
            (``guard.LatencyGuard``); the chosen blocks and the whole model are timed
            against the original once built (the plan summary's ``guard`` record).
        sensitivity: with ``budget`` and ``calibration``, allocate by each candidate's
            measured network KL divergence (``sensitivity.SensitivityProbe``, data-aware
            blocks) instead of its weight error.
        sensitivity_cache: folder of the sensitivity results, reused by the next run with
            the same model and data (``None``: not kept).
        reconstruction: with ``calibration``, train each block holding replaced layers to
            reproduce the original's block output on the calibration data once the closed-form
            fits (and BatchNorm correction) are done (``reconstruct.reconstruct``); with a
            hold-out, on the other batches, each block kept trained only where its error on
            the held-out batches went down.
        holdout: with ``calibration``, the share of its batches held out to choose, per
            layer, between the data-free fit and the data-aware fits at each
            :data:`SHRINKAGE` strength (``split_calibration``; 0: always the data-aware fit
            at full strength, as before); the chosen one is refitted on all the data and its
            held-out output error recorded (``LayerPlan.held_out_error``). The same batches
            decide whether the BatchNorm correction and each reconstructed block are kept.

    Returns:
        ``(model, plan)``; the plan records, per layer, the ranks, params and MACs before and
        after, and the relative truncation error ‖W − Ŵ‖²/‖W‖² (or the skip reason).
    """
    if method != AUTO:
        get_method(method)
    check_finite(model)
    if sequential and calibration is None:
        raise BadInput("--sequential needs calibration data (--calib)")
    if reconstruction is not None and calibration is None:
        raise BadInput("--reconstruct trains blocks on calibration data: add --calib")
    if sensitivity and (budget is None or calibration is None):
        raise BadInput("--sensitivity measures candidates on calibration data to allocate a "
                       "budget: add --calib and --budget")

    def report(stage: str, item: str = "", done: int = 0, total: int | None = None) -> None:
        if progress is not None:
            progress(Step(stage, item, done, total))

    stats, norms, eligible = None, {}, []
    if calibration is not None:
        stats = _Statistics(model, *_calibration_batches(model, calibration, holdout,
                                                         reestimate_bn),
                            calib_max_bytes, report)
        eligible = eligible_layers(model, method, eligibility)
        if reestimate_bn:  # where a layer without bias can give its mean output error back
            norms = following_batchnorms(model, eligible, stats.batches[0][:1])
    if budget is not None and budget.kind == "latency" and latency is None:
        latency = LatencyTimer(default_cache_path())
    given = covariances is not None  # (ours are over all the calibration batches)
    held_covs: dict[str, PatchCovariance] = {}  # the held-out batches' statistics per layer
    measured = probe = None
    # too few samples to hold any out: a candidate's in-sample output error is about 0 on the
    # data its fit was made on, and would rank the candidates by nothing (the layers that then
    # fail on other inputs): the budget is allocated by the weight errors, and the chosen
    # blocks are still fitted on the data
    unranked = stats is not None and not stats.held and holdout > 0 and not sensitivity
    if budget is not None and stats is not None and not unranked:  # errors measured on data
        if covariances is None:
            covariances, held_covs = stats.both(eligible)
        if held_covs == {} and covariances and stats.held and not sensitivity:
            held_covs = stats.held_only(list(covariances))  # for the statistics given
        measured, probe = _candidate_error(model, covariances, held_covs, norms, stats,
                                           als_iters, sensitivity, sensitivity_cache,
                                           progress)
    plan = plan_decomposition(model, method, input_shape, ranks, eligibility, budget,
                              latency=latency, error=measured, guard=guard)
    if unranked and plan.summary.budget is not None:
        plan.summary.budget.error = FEW_SAMPLES_ERROR
    if probe is not None:
        plan.summary.sensitivity = SensitivityRecord(
            measured=probe.measured, cache=str(probe.cache) if probe.cache else None)
    names = [entry.name for entry in plan.replaced()]
    original = copy.deepcopy(model) if stats is not None else None
    if stats is not None:
        if covariances is None:
            covariances, held_covs = stats.both(names)
        elif measured is not None:  # keep the statistics of the layers replaced
            covariances = {name: covariances[name] for name in names if name in covariances}
        if stats.held and names and not held_covs:
            # (a budget measured on data collected them for every candidate layer already)
            held_covs = stats.held_only(names)
    fits = _build_layers(model, plan, covariances or {}, held_covs, norms, als_iters,
                         original if sequential else None, stats, given, report)
    in_network: dict[str, float] = {}
    if stats is not None:
        if names:  # before BatchNorm re-estimation: the layer outputs themselves
            report("measuring the layers' errors in the network")
            in_network = measure_output_errors(
                original, model, names, _first_samples(stats.batches, MEASURED_SAMPLES))
        fitting, scoring = stats.fitting_and_held()
        batchnorm = {"corrected": 0}
        if reestimate_bn:
            report("correcting BatchNorm")
            batchnorm = correct_batchnorm_checked(model, original, fitting, scoring,
                                                  stats.observed)
        plan.summary.calibration = CalibrationRecord(
            layers=len(covariances), full_covariance_layers=sum(
                1 for c in covariances.values() if c.full is not None),
            covariance_mb=round(sum(c.nbytes for c in covariances.values()) / 2**20, 1),
            batchnorm_reestimated=batchnorm["corrected"], batchnorm=batchnorm,
            als_iters=als_iters, sequential=sequential, repeated=stats.repeated or None,
            held_out_samples=sum(len(x) for x in stats.held), holdout=holdout)
        if reconstruction is not None:
            plan.summary.reconstruction = _reconstruct(
                model, original, names, reconstruction, fitting, scoring, stats.observed,
                reestimate_bn, report)
    if budget is not None and budget.kind == "latency":
        plan.summary.budget.measured = latency.time(model, tuple(input_shape))
    if guard is not None and plan.summary.guard is not None:  # the built model, timed
        plan.summary.guard.whole = {str(b): r for b, r in guard.whole(model, input_shape).items()}
        plan.summary.guard.untimed_why = guard.why
    _report(plan, model, input_shape, fits, in_network)
    return model, plan


def _calibration_batches(model: nn.Module, calibration: Iterable[torch.Tensor],
                         holdout: float, reestimate_bn: bool
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """``(batches, held, repeated)``: the calibration data checked (not empty, finite, runs
    on the model, enough samples for the BatchNorm statistics), without the samples that
    repeat others (``calibrate.distinct_samples``; ``repeated`` of them), in the layout the
    model runs fastest on (``calibrate.in_fast_layout``), and its held-out part
    (``split_calibration``)."""
    dtype = module_dtype(model)  # (a float64 or half model takes float32 data as its own)
    calibration = [x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point()
                   and x.dtype != dtype else x for x in calibration]
    if not calibration:
        raise BadInput("the calibration data is empty: give at least one batch (--calib)")
    if not all(bool(torch.isfinite(x).all()) for x in calibration):
        raise BadInput("the calibration data holds NaN or infinite values: check the "
                       "data and its --mean/--std")
    check_calibration_fits(model, calibration)  # the batches as the user gave them
    calibration, repeated = distinct_samples(calibration)
    if reestimate_bn and any(isinstance(m, _BatchNorm) for m in model.modules()):
        check_batchnorm_samples(sum(len(x) for x in calibration),  # before the work
                                repeated=repeated)
    return (*split_calibration(in_fast_layout(model, calibration), holdout), repeated)


class _Statistics:
    """The calibration batches of one run and the passes that collect the layers' input
    statistics on them (``calibrate.collect_patch_covariances``), reporting progress.

    The statistics pass also records what the BatchNorm correction needs of the original
    network (``observed``): its BatchNorm inputs on the fitting batches and its outputs on
    the held-out ones."""

    def __init__(self, model: nn.Module, batches: list[torch.Tensor],
                 held: list[torch.Tensor], repeated: int, max_bytes: int,
                 report: Callable[..., None]) -> None:
        self.model, self.batches, self.held, self.repeated = model, batches, held, repeated
        self.max_bytes, self.report = max_bytes, report
        self.observed = OriginalSeen()

    def collect(self, batches: list[torch.Tensor], layers: list[str], before: int = 0,
                total: int | None = None, observe: Callable | None = None
                ) -> dict[str, PatchCovariance]:
        total = total or sum(len(x) for x in batches)
        self.report("collecting statistics", "", before, total)
        return collect_patch_covariances(
            self.model, batches, layers, self.max_bytes,
            progress=lambda seen: self.report("collecting statistics", "", before + seen,
                                              total),
            observe=observe)

    def both(self, layers: list[str]) -> tuple[dict[str, PatchCovariance],
                                              dict[str, PatchCovariance]]:
        """``(all, held)``: the statistics of ``layers`` on all the calibration batches
        and on the held-out ones, in one pass over the data: the held-out batches' and the
        others' are collected apart, and added up (``merged``)."""
        rest = self.fitting
        total = sum(len(x) for x in self.batches)
        fitted = self.collect(rest, layers, 0, total,
                              lambda: self.observed.moment_hooks(self.model))
        if not self.held:
            return fitted, {}
        held = self.collect(self.held, layers, sum(len(x) for x in rest), total,
                            lambda: self.observed.output_hooks(self.model))
        return {name: merged(fitted[name], held[name]) for name in layers}, held

    @property
    def fitting(self) -> list[torch.Tensor]:
        """The batches not held out."""
        return [x for x in self.batches if not any(x is h for h in self.held)]

    def held_only(self, layers: list[str]) -> dict[str, PatchCovariance]:
        """The statistics of ``layers`` on the held-out batches alone."""
        return self.collect(self.held, layers)

    def fitting_and_held(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(fitting, held)``: the batches the BatchNorm correction and the reconstruction
        fit on, and those that decide whether to keep them (all of them fit, and none
        decides, when too few samples are left to fit on)."""
        fitting = self.fitting
        if sum(len(x) for x in fitting) < MIN_BATCHNORM_SAMPLES:
            return self.batches, []
        return fitting, self.held


def _candidate_error(model: nn.Module, covariances: dict[str, PatchCovariance],
                     held: dict[str, PatchCovariance], norms: dict[str, nn.Module],
                     stats: _Statistics, als_iters: int, sensitivity: bool,
                     sensitivity_cache: str | Path | None, progress: Reporter | None
                     ) -> tuple[CandidateError | None, SensitivityProbe | None]:
    """The measured error of a budget's candidates: the network's KL divergence with the
    candidate swapped in (``sensitivity``), else its held-out (or, without a hold-out, its
    in-sample) relative output error (``layer_fit.CandidateScorer``); ``None`` without
    statistics."""
    if sensitivity:
        def fitted(name: str, module: nn.Module, entry: LayerPlan) -> nn.Module:
            return fit_layer(module, as_candidate(entry), covariances.get(name), als_iters,
                             centre=True)[0]

        probe = SensitivityProbe(model, stats.batches, fitted, sensitivity_cache,
                                 tag=f"als={als_iters}|max_bytes={stats.max_bytes}")
        return CandidateError(lambda name, entry: probe(name, entry)["kl"], SENSITIVITY,
                              progress), probe
    if not covariances:
        return None, None
    return CandidateError(CandidateScorer(model, covariances, held, norms),
                          HELD_OUT_ERROR if held else OUTPUT_ERROR, progress), None


def _build_layers(model: nn.Module, plan: Plan, covariances: dict[str, PatchCovariance],
                  held: dict[str, PatchCovariance], norms: dict[str, nn.Module],
                  als_iters: int, reference: nn.Module | None, stats: _Statistics | None,
                  given: bool, report: Callable[..., None]) -> dict[str, FitReport]:
    """Replace the plan's layers by their blocks (``apply_plan``), each fitted on its
    statistics (``layer_fit.fit_layer``): one-shot, or with the original network as
    ``reference``, sequentially on the inputs the partly compressed network gives it
    (``block_inputs.PairedStatistics``; the original layer's E[p pᵀ] is its one-shot Σ
    unless the statistics were ``given``). Returns each layer's fit report."""
    names = [entry.name for entry in plan.replaced()]
    position = {name: i for i, name in enumerate(names)}
    paired = (PairedStatistics(reference, model, names, stats.batches)
              if reference is not None and stats is not None and names else None)
    reused = paired.reused if paired is not None else {}  # fitted one-shot
    fits: dict[str, FitReport] = {}

    def build(module: nn.Module, entry: LayerPlan) -> nn.Module:
        report("factorizing", entry.name, position[entry.name], len(names))
        cov = one_shot = covariances.get(entry.name)
        if (paired is not None and cov is not None and cov.full is not None
                and entry.name not in reused):
            cov = paired.covariance(entry.name, reference=None if given else one_shot)
        block, fits[entry.name] = fit_layer(
            module, entry, cov, als_iters, held.get(entry.name) if one_shot is not None
            else None, one_shot, centre=True, norm=norms.get(entry.name))
        if entry.name in reused and cov is not None:
            fits[entry.name] = dataclasses.replace(
                fits[entry.name], fit=f"{fits[entry.name].fit}, one-shot (the network runs "
                f"this layer {reused[entry.name]} times a pass: no sequential fit)")
        return block

    try:
        apply_plan(model, plan, build=build)
    finally:
        if paired is not None:
            paired.close()
    return fits


def _reconstruct(model: nn.Module, original: nn.Module, names: list[str],
                 options: ReconstructionOptions, fitting: list[torch.Tensor],
                 held: list[torch.Tensor], observed: OriginalSeen, reestimate_bn: bool,
                 report: Callable[..., None]) -> ReconstructionRecord:
    """Train the blocks holding the replaced layers ``names`` to the original's outputs
    (``reconstruct.reconstruct``), correct the BatchNorms again where they trained, and
    keep it all only where the network's output error on the ``held`` batches (the fitting
    ones without a hold-out) does not rise: each block's own error can fall while the
    network's rises (a flat CNN whose BatchNorms stand outside the blocks)."""
    scored = held or fitting
    targets = original_outputs(original, scored, observed)
    error_before = held_out_output_error(model, targets, scored)
    saved = copy.deepcopy(model.state_dict())
    count = iter(range(len(names)))  # a block holds one or more of the layers
    blocks = reconstruct(model, original, fitting, names, options,
                         progress=lambda block: report("reconstructing", block, next(count)),
                         held=held)
    again = {}
    if reestimate_bn and any(not b.restored and b.skipped is None for b in blocks):
        # a block trained to the original's output with a BatchNorm outside it (a flat
        # CNN's conv1/bn1 siblings) undid the mean error that the correction, and the
        # fit's mean → BatchNorm, had moved into that BatchNorm: measured again on the
        # trained blocks, from the original's statistics, and kept where the held-out
        # error says so
        report("correcting BatchNorm")
        again = correct_batchnorm_checked(model, original, fitting, held, observed)
    error_after = held_out_output_error(model, targets, scored)
    kept = error_after <= error_before
    if not kept:
        model.load_state_dict(saved)
    return ReconstructionRecord(
        **asdict(options), blocks=blocks, batchnorm=again, kept=kept,
        network_error={"before": error_before, "after": error_after,
                       **({"in_sample": True} if not held else {})})


def _report(plan: Plan, model: nn.Module, input_shape: Sequence[int],
            fits: dict[str, FitReport], in_network: dict[str, float]) -> None:
    """The one place the outcome of the fits and of the built model is written into the
    plan's entries (whose decisions planning and allocation made): each replaced layer's
    fit, its error in the network (``in_network``, calibrated runs), its params and MACs,
    and the whole model's."""
    modules = dict(model.named_modules())
    after = module_macs(model, input_shape)
    for entry in plan.replaced():
        if entry.name in fits:  # every replaced layer was built (apply_plan)
            entry.record(fits[entry.name])
        entry.measured_error = in_network.get(entry.name)
        entry.params_after = count_params(modules[entry.name])
        entry.macs_after = after.module_macs.get(entry.name, 0)
    plan.summary.params_after, plan.summary.macs_after = after.params, after.macs



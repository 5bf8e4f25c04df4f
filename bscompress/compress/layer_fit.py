"""One layer's block fitted on calibration statistics, and the choice between fits: the
data-free block and the data-aware fits at each shrinkage strength, scored on a held-out
part of the calibration data (``fit_layer``); the same scores for a budget's candidate
blocks (``CandidateScorer``)."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bscompress.compress.data_aware import (
    absorb_mean,
    conditioned,
    degenerate_statistics,
    fit_block,
    grouped,
    grouped_weight,
    output_bias,
    shrunk,
    unsupported,
    without,
)
from bscompress.core.covariance import PatchCovariance, centred, output_sigma
from bscompress.core.errors import BadInput
from bscompress.core.plan import FitReport, LayerPlan
from bscompress.factorize.gsvd import (
    conditioning,
    output_error,
    paired_relative_error,
    relative_output_error,
)
from bscompress.factorize.linalg import quadratic_trace
from bscompress.factorize.memo import Reuse
from bscompress.methods import get_method, relative_error

#: Shrinkage strengths of Σ toward a scaled identity (``data_aware.shrunk``) tried for every
#: data-aware fit, the data-free fit being the other candidate; the held-out error decides.
SHRINKAGE = (0.0, 0.3)
#: The share of the calibration batches held out to choose between the candidates.
HOLDOUT = 0.25
#: ``als_iters`` of the data-aware fits that measure budget candidates: the cheapest refit
#: of each method (``Method.fit_data_aware``); the chosen blocks get the user's rounds
CANDIDATE_ALS_ITERS = 0


def split_calibration(batches: list[torch.Tensor], holdout: float
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(batches, held)``: every ``round(1/holdout)``-th batch is held out (``held`` is a
    sub-list of the returned ``batches``, which hold all the data); a single batch is split
    in two first. No hold-out (``held`` empty) under 8 samples or with ``holdout`` 0."""
    total = sum(len(x) for x in batches)
    if holdout <= 0 or total < 8:
        return batches, []
    if len(batches) == 1:
        cut = max(1, round(len(batches[0]) * (1 - holdout)))
        batches = [batches[0][:cut], batches[0][cut:]]
    step = max(2, round(1 / holdout))
    held = [x for i, x in enumerate(batches) if i % step == step - 1]
    return batches, held or [batches[-1]]


def split_statistics(cov: PatchCovariance, held: PatchCovariance, centre: bool
           ) -> tuple[PatchCovariance, PatchCovariance]:
    """``(rest, held)``: the statistics outside the held-out part ``held`` of ``cov`` (to fit
    on) and ``held`` (to score on), both centred with ``centre``."""
    rest = without(cov, held)
    rest, held = (centred(rest), centred(held)) if centre else (rest, held)
    return conditioned(rest), conditioned(held)


@dataclass(frozen=True)
class HeldScore:
    """The relative output error of a block on held-out statistics, tr(E Σ Eᵀ) / tr(W Σ Wᵀ)
    with E = W − Ŵ (``gsvd.relative_output_error``), prepared once per layer for the many
    blocks scored on it: Σ is kept in float32, where E Σ costs a quarter of float64 (the
    scores only rank fits: relative accuracy about 1e-6), the denominator in float64; the
    trace takes the tiles of Σ on and above its diagonal only (``linalg.quadratic_trace``).
    """

    weight: torch.Tensor  # [g, N/g, D] float64
    sigma: torch.Tensor  # [g, D, D] float32
    total: float
    groups: int

    @classmethod
    def of(cls, module: nn.Module, held: PatchCovariance) -> HeldScore:
        weight, sigma = grouped_weight(module), output_sigma(held)
        total = output_error(weight, torch.zeros_like(weight), sigma)
        return cls(weight, sigma.float(), total, getattr(module, "groups", 1))

    def __call__(self, block: nn.Module) -> float:
        if self.total <= 0:
            return 0.0
        e = (self.weight - grouped(block.to_dense(), self.groups).double()).float()
        return self.relative(quadratic_trace(e, self.sigma))

    def relative(self, error: float) -> float:
        """An output error e(Ŵ) on the held-out Σ as a fraction of the layer's."""
        return error / self.total if self.total > 0 else 0.0


def select_fit(module: nn.Module, entry: LayerPlan, free: nn.Module, rest: PatchCovariance,
               score: HeldScore, als_iters: int, strengths: Sequence[float] | None = None
               ) -> tuple[float | None, float]:
    """``(strength, error)``: the shrinkage strength of ``strengths`` whose fit (from the
    data-free block ``free``, left as it is) on ``rest`` has the smallest output error on the
    held-out part (``score``; ``split_statistics``; ``None``: the data-free fit beats every
    data-aware one), and that held-out error."""
    method = get_method(entry.method)
    strengths = SHRINKAGE if strengths is None else strengths
    scores: dict[float | None, float] = {None: score(free)}
    for alpha in strengths if rest.full is not None else strengths[:1]:
        block = copy.deepcopy(free)
        fit_block(module, block, shrunk(rest, alpha), als_iters, method)
        scores[alpha] = score(block)
    choice = min(scores, key=lambda a: (scores[a], a is not None))  # ties: data-free
    return choice, scores[choice]


def absorbable(module: nn.Module, block: nn.Module, norm: nn.Module | None) -> bool:
    """Whether ``block``'s mean output error can be given back (``data_aware.absorb_mean``):
    to its output bias when ``module`` has a bias, else to the BatchNorm ``norm``."""
    if getattr(module, "bias", None) is not None:
        return output_bias(block) is not None
    return norm is not None


def fit_layer(module: nn.Module, entry: LayerPlan, cov: PatchCovariance | None,
              als_iters: int, held: PatchCovariance | None = None,
              one_shot: PatchCovariance | None = None, centre: bool = False,
              norm: nn.Module | None = None) -> tuple[nn.Module, FitReport]:
    """``entry``'s block for ``module`` (the entry is read, not written) and how it was
    fitted: closed form from the kernel, then fitted to the input statistics ``cov`` when
    given (paired ones for the sequential fit), with the output error on them.

    With ``held`` (the statistics of a held-out part of the calibration data, included in
    ``one_shot``, the layer's one-shot statistics, which default to ``cov``), the data-free
    fit and the data-aware fits at each :data:`SHRINKAGE` strength are fitted without the
    held-out part and scored on it; the best is then fitted on all the data (the data-free
    one needs none), and its held-out error is reported.

    Statistics that cannot support a data-aware fit (``data_aware.unsupported``: a layer
    the calibration data never reached, or fewer patches than dimensions with nothing held
    out) give the data-free block, its ``fit`` saying why.

    With ``centre`` (statistics with a mean only), the fits and errors use the
    covariances of the patches, and the mean output error is then given back
    (``data_aware.absorb_mean``): to the block's bias when the layer has one, else to the
    running mean of ``norm``, the BatchNorm after the layer; with neither, no centring."""
    method = get_method(entry.method)
    output = statistics = held_error = None
    with torch.no_grad():
        block, error = method.build(module, entry)
        fit = method.closed_form_fit
        why = unsupported(one_shot or cov, held) if cov is not None else None
        if why is not None:  # statistics that cannot support a fit: the data-free block
            statistics = degenerate_statistics(one_shot or cov)
            fit, cov = f"{method.closed_form_fit} (data-free: {why})", None
        centre = (centre and cov is not None and cov.mean is not None
                  and absorbable(module, block, norm))
        if cov is not None:
            alpha: float | None = 0.0
            if held is not None:
                with conditioning():
                    rest, scored = split_statistics(one_shot or cov, held, centre)
                    alpha, held_error = select_fit(module, entry, block, rest,
                                                   HeldScore.of(module, scored), als_iters)
            raw = cov
            with conditioning() as record:
                cov = conditioned(centred(cov) if centre else cov)
                if alpha is None:  # the data-free block as built
                    fit = (f"{method.closed_form_fit} (the data-aware fits were worse "
                           "on held-out data)")
                else:
                    fit = fit_block(module, block,
                                    shrunk(cov, alpha, grouped_weight(module)), als_iters,
                                    method)
                    fit += f", Σ shrunk {alpha:g}" if alpha else ""
                    error = relative_error(module.weight, block.to_dense())
            statistics = degenerate_statistics(raw, record["floored"])
            dense = grouped(block.to_dense(), getattr(module, "groups", 1))
            if cov.cross is not None:
                fit += ", sequential" if alpha is not None else ""
                output = paired_relative_error(dense, cov.full, cov.cross,
                                               cov.target_energy)
            else:
                output = relative_output_error(grouped_weight(module), dense,
                                               output_sigma(cov))
            if centre:
                fit += f", centred ({absorb_mean(module, block, raw, norm)})"
    if not math.isfinite(error) or not all(bool(torch.isfinite(p).all())
                                           for p in block.parameters()):
        raise BadInput(f"factorizing layer {entry.name!r} with {entry.method} "
                       f"(ranks {entry.ranks}) gave non-finite factors: its weights or its "
                       "calibration statistics are degenerate; exclude it with --exclude or "
                       "try another method")
    return block, FitReport(fit, error, output, statistics, held_error)


def as_candidate(entry: LayerPlan) -> LayerPlan:
    """A copy of ``entry`` with the options its method measures a candidate with (CP: fewer
    ALS iterations, Tucker-2: no HOOI; ``Method.candidate_options``): the allocator keeps
    its own entry."""
    return dataclasses.replace(
        entry, options=get_method(entry.method).candidate_options(entry.options))


class CandidateScorer:
    """The measured error of a budget's candidate blocks on calibration statistics
    (``decompose``'s ``CandidateError`` with calibration data).

    With the held-out part's statistics of a layer (``held``), the better of its data-free
    fit and its data-aware fit on the rest, scored on the held-out part (every rank's at
    once where the method has them: ``Method.held_out_errors``); without, the data-aware
    fit's output error on all the statistics. Centred where the block's own bias or the
    next BatchNorm (``norms``) takes the mean error: the network runs the candidate with
    the BatchNorms as they are. The candidates come layer by layer, so each layer's split
    of the statistics and its rank-independent decompositions (the kernel's SVDs, Σ's
    whitening: ``memo.Reuse``) are computed once for all of its candidates.
    """

    def __init__(self, model: nn.Module, covariances: dict[str, PatchCovariance],
                 held: dict[str, PatchCovariance], norms: dict[str, nn.Module]) -> None:
        self.model, self.covariances, self.held, self.norms = model, covariances, held, norms
        self._reuse, self._layer = Reuse(), None
        self._splits: dict[tuple[str, bool], tuple[PatchCovariance, HeldScore]] = {}

    def fit(self, name: str, module: nn.Module, entry: LayerPlan,
            als_iters: int = CANDIDATE_ALS_ITERS) -> tuple[nn.Module, FitReport]:
        """The candidate ``entry`` of layer ``name`` fitted on all its statistics."""
        return fit_layer(module, as_candidate(entry), self.covariances.get(name), als_iters,
                         centre=True)

    def __call__(self, name: str, entry: LayerPlan) -> float:
        if self._layer != name:
            self._reuse.clear()
            self._layer = name
        with self._reuse.active():
            return self._error(name, entry)

    def _error(self, name: str, entry: LayerPlan) -> float:
        trial = as_candidate(entry)
        module, held = self.model.get_submodule(name), self.held.get(name)
        cov = self.covariances.get(name)
        if held is None or cov is None or unsupported(cov, held) is not None:
            # in-sample, or data-free (its weight error) where the data cannot support a fit
            report = self.fit(name, module, entry)[1]
            return (report.output_error if report.output_error is not None
                    else report.predicted_error)
        with torch.no_grad(), conditioning():
            method = get_method(trial.method)
            block, _ = method.build(module, trial)
            cov = self.covariances[name]
            centre = cov.mean is not None and absorbable(module, block, self.norms.get(name))
            if (name, centre) not in self._splits:
                self._splits.clear()  # the candidates come layer by layer
                rest, scored = split_statistics(cov, held, centre)
                self._splits[name, centre] = rest, HeldScore.of(module, scored)
            rest, score = self._splits[name, centre]
            errors = method.held_out_errors(module, trial, rest, score.sigma)
            if errors is not None:  # every rank's from one product
                return score.relative(min(errors))
            return select_fit(module, trial, block, rest, score, CANDIDATE_ALS_ITERS,
                              strengths=SHRINKAGE[:1])[1]

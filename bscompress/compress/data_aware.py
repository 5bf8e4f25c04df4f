"""Fit the weights of a factorized block to calibration statistics (the GSVD of DESIGN.md).

``fit_block(original, block, cov, als_iters)`` rewrites ``block``'s weights in place so that
its output error on the calibration patches, tr((W − Ŵ) Σ (W − Ŵ)ᵀ), is minimised for its
structure, and returns a note of what was done. The fit itself is the method's
(``Method.fit_data_aware`` of the method that built the block, :mod:`bscompress.methods`):

* ``svd`` (``LowRankLinear`` / ``LowRankConv1x1``): whitened SVD, the exact optimum at that rank.
* ``dsc``: whitened SVD per input channel (its K×K block of Σ), then the pointwise refit by
  least squares with the full Σ (cross-channel compensation).
* ``bsconv-u``: alternating least squares from the SVD factors, ``als_iters`` rounds of
  pointwise refit (when each filter's (M/g·r)² system is at most
  ``methods.bsconv_u.MAX_POINTWISE_SYSTEM``) then blueprint refit.
* ``bsconv-s``: the blueprints refit given its pw2·pw1 pointwise.
* ``tucker2`` / ``cp`` / ``cp4``: the last 1×1 (``pw2``) refit given the front stages.

Every refit is exact least squares for its stage, so the error never grows (up to the ridge).
In sequential mode (``cov.cross`` set) the target is W_eff = Y Σ⁻¹ (``sequential_target``,
Y = E[y p̃ᵀ] with y = W p the original layer's outputs):
the block then reproduces the original layer's outputs from the compressed network's inputs.
Layers whose full Σ was over the memory bound get the steps that need only the K×K blocks
(the DSC whitening), else stay data-free; the note says which.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from bscompress.core.covariance import PatchCovariance, block_diagonal, output_sigma
from bscompress.core.errors import BadInput
from bscompress.factorize.gsvd import noise_floored, note_floored, sequential_target
from bscompress.methods import Method, block_method

__all__ = ["absorb_mean", "block_diagonal", "conditioned", "degenerate_statistics", "fit_block",
           "grouped", "grouped_weight", "mean_shift", "merged", "output_bias", "output_sigma",
           "shrunk", "unsupported", "without"]


def grouped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A dense weight ``[N, M/g, *kernel]`` (or ``[N, M]``) as ``[g, N/g, M/g·K]`` float64."""
    w = weight.detach().to(torch.float64)
    return w.reshape(groups, w.shape[0] // groups, -1)


def grouped_weight(module: nn.Module) -> torch.Tensor:
    """``[g, N/g, M/g·K]`` float64 weight of a conv or Linear (rows = output channels)."""
    return grouped(module.weight, getattr(module, "groups", 1))


def degenerate_statistics(cov: PatchCovariance, floored: int = 0) -> dict | None:
    """What is degenerate about a layer's calibration statistics (the Plan's
    ``statistics``), or ``None``: fewer patches than patch dimensions, dimensions that were
    always zero (dead channels, zero padding), solves that needed the eigenvalue floor."""
    diag = cov.blocks.diagonal(dim1=-2, dim2=-1)  # [g, M/g, K]
    scale = float(diag.mean()) if diag.numel() else 0.0
    dead = int((diag <= 1e-12 * scale).sum()) if scale > 0 else int(diag.numel())
    dims = cov.channels * cov.kernel
    if cov.patches >= dims and not dead and not floored:
        return None
    return {"dimensions": dims, "patches": int(cov.patches), "dead": dead,
            "floored": int(floored)}


def unsupported(cov: PatchCovariance, held: PatchCovariance | None = None) -> str | None:
    """Why a layer's calibration statistics ``cov`` cannot support a data-aware fit, the
    layer being fitted and scored data-free instead, or ``None``.

    * The calibration data never reached the layer (a branch they do not take), or gave it
      only zeros: every fit has output error 0 on them, and a budget charged that would cut
      the layer to its smallest rank.
    * The held-out part ``held`` never reached it: nothing scores the fits.
    * Fewer patches than patch dimensions and nothing held out (under 8 samples): a fit
      can then reproduce the calibration outputs exactly at a low rank, and its in-sample
      error, about 0, says nothing of other inputs (one calibration image gave a model
      agreeing with the original on 0% of other photos, data-free 31%).
    """
    energy = float(cov.blocks.diagonal(dim1=-2, dim2=-1).sum()) if cov.patches else 0.0
    if cov.patches == 0 or energy <= 0:
        return ("the calibration data never reached the layer" if cov.patches == 0 else
                "its inputs were zero on all of the calibration data")
    if held is not None and held.patches == 0:
        return "the held-out calibration data never reached the layer"
    dims = cov.channels * cov.kernel
    if held is None and cov.patches < dims:
        return (f"{cov.patches} calibration patches for {dims} dimensions, and too few "
                "samples to hold some out and check a fit on them")
    return None


def shrunk(cov: PatchCovariance, alpha: float, weight: torch.Tensor | None = None
           ) -> PatchCovariance:
    """Σ shrunk toward a scaled identity: (1 − α) Σ + α · (tr Σ / D) · I, per group.

    α = 0 is Σ itself; α = 1 makes every whitened fit the data-free one (a Σ ∝ I weighs every
    patch direction alike), so α blends the data-aware fit toward the data-free fit. Directions
    the calibration data never spanned get weight α·tr Σ/D instead of the ridge's ~0, which
    is what keeps a fit on a few hundred images from being arbitrary outside their span.

    Sequential statistics (``cross`` set) are the statistics of the blended objective
    (1 − α) E‖y − Ŵ p̃‖² + α s ‖W − Ŵ‖², s = tr Σ̃ / D, with ``weight`` W ``[g, N/g, D]``
    (the layer's): Σ̃ as above, Y → (1 − α) Y + α s W, E‖y‖² → (1 − α) E‖y‖² + α s ‖W‖².
    Without it, the target W_eff = Y Σ̃⁻¹ is ~0 in the directions the compressed network's
    patches never took on the calibration data, and the fitted layer drops what the original
    passes on there.

    Raises:
        ValueError: sequential statistics to shrink without ``weight``.
    """
    if alpha == 0:
        return cov
    if cov.cross is not None and weight is None:
        raise ValueError("shrinking sequential statistics needs the layer's weight")
    k = cov.kernel
    diag = cov.blocks.diagonal(dim1=-2, dim2=-1)  # [g, M/g, K]
    level = diag.mean(dim=(1, 2))  # [g]: tr Σ / D per group
    eye_k = torch.eye(k, dtype=torch.float64)
    blocks = (1 - alpha) * cov.blocks + alpha * level[:, None, None, None] * eye_k
    full = None
    if cov.full is not None:
        eye = torch.eye(cov.full.shape[-1], dtype=torch.float64)
        full = (1 - alpha) * cov.full + alpha * level[:, None, None] * eye
    if cov.cross is None:
        return dataclasses.replace(cov, full=full, blocks=blocks)
    w = weight.to(torch.float64)
    cross = (1 - alpha) * cov.cross + alpha * level[:, None, None] * w
    energy = (1 - alpha) * cov.target_energy + alpha * level * w.square().sum((1, 2))
    return dataclasses.replace(cov, full=full, blocks=blocks, cross=cross,
                               target_energy=energy)


def conditioned(cov: PatchCovariance) -> PatchCovariance:
    """``cov`` with its full Σ and its K×K blocks positive semi-definite beyond their rounding
    noise (``gsvd.noise_floored``: unchanged where they are positive definite with the ridge;
    each change counted in the open ``gsvd.conditioning`` record). The fits and the
    held-out scores take their statistics through this, after any centring or split."""
    full, floored = (None, 0) if cov.full is None else noise_floored(cov.full)
    g, m, k = cov.groups, cov.channels, cov.kernel
    blocks, floored_blocks = noise_floored(cov.blocks.reshape(g * m, k, k))
    if not floored + floored_blocks:
        return cov
    note_floored(floored + floored_blocks)
    return dataclasses.replace(cov, full=full, blocks=blocks.reshape(g, m, k, k))


def without(cov: PatchCovariance, part: PatchCovariance) -> PatchCovariance:
    """The statistics of the patches in ``cov`` but not in ``part`` (a held-out subset of the
    same data): (n Σ − n_h Σ_h) / (n − n_h), for the fits that ``part`` then scores."""
    if cov.centred or part.centred:
        raise ValueError("without() combines second moments: give the statistics uncentred")
    n, h = cov.patches, part.patches
    rest = max(n - h, 1)

    def minus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
        return None if a is None or b is None else (n * a - h * b) / rest

    return dataclasses.replace(cov, full=minus(cov.full, part.full),
                               blocks=minus(cov.blocks, part.blocks), patches=rest,
                               mean=minus(cov.mean, part.mean), cross=None, target_energy=None,
                               target_mean=None)


def merged(a: PatchCovariance, b: PatchCovariance) -> PatchCovariance:
    """The statistics of the patches of ``a`` and ``b`` together (two disjoint parts of
    the data, one-shot and uncentred): (n_a Σ_a + n_b Σ_b) / (n_a + n_b), the inverse of
    :func:`without`."""
    if a.centred or b.centred or a.cross is not None or b.cross is not None:
        raise ValueError("merged() adds one-shot second moments: give them uncentred")
    n = max(a.patches + b.patches, 1)

    def plus(x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None or y is None else (a.patches * x + b.patches * y) / n

    return dataclasses.replace(a, full=plus(a.full, b.full), blocks=plus(a.blocks, b.blocks),
                               mean=plus(a.mean, b.mean), patches=a.patches + b.patches)


def output_bias(block: nn.Module) -> nn.Parameter | None:
    """The bias of ``block``'s output (the one bias parameter of ``out_channels`` entries of
    its last stage), or ``None`` when it has none or it is ambiguous."""
    width = getattr(block, "out_channels", None) or getattr(block, "out_features", None)
    found = [p for name, p in block.named_parameters()
             if name.rsplit(".", 1)[-1] == "bias" and p.dim() == 1 and p.numel() == width]
    return found[0] if len(found) == 1 else None


def mean_shift(original: nn.Module, block: nn.Module, cov: PatchCovariance) -> torch.Tensor:
    """``E[y] − Ŵ μ̃`` ``[N]`` float64: what the block's mean output lacks against the
    original's, with μ̃ = ``cov.mean`` ``[g, M/g·K]`` the mean of the block's patches and
    E[y] that of the original layer's outputs (``cov.target_mean`` in sequential mode, else
    W μ̃)."""
    groups = getattr(original, "groups", 1)
    mean = cov.mean.to(torch.float64)
    target = (torch.einsum("gnd,gd->gn", grouped_weight(original), mean)
              if cov.target_mean is None else cov.target_mean.to(torch.float64))
    dense = grouped(block.to_dense(), groups)
    return (target - torch.einsum("gnd,gd->gn", dense, mean)).reshape(-1)


def absorb_mean(original: nn.Module, block: nn.Module, cov: PatchCovariance,
                norm: nn.Module | None = None) -> str:
    """Give the mean output error (W − Ŵ) μ (``mean_shift``) back: added to the block's
    output bias when the original has a bias, else subtracted from the running mean of
    ``norm``, the BatchNorm that takes the layer's output (``batchnorm.
    following_batchnorms``). The error left is then tr((W − Ŵ) C (W − Ŵ)ᵀ) with C the
    covariance of the patches (``covariance.centred``), as in the bias correction of Nagel et
    al. (2019). Returns where it went (for the Plan)."""
    shift = mean_shift(original, block, cov)
    with torch.no_grad():
        if getattr(original, "bias", None) is not None:
            bias = output_bias(block)
            bias.add_(shift.to(bias))
            return "mean → bias"
        norm.running_mean.sub_(shift.to(norm.running_mean))
    return "mean → next BatchNorm"


def fit_block(original: nn.Module, block: nn.Module, cov: PatchCovariance,
              als_iters: int = 1, method: Method | None = None) -> str:
    """Refit ``block`` (built from ``original``) to the calibration statistics ``cov``.

    Args:
        method: the method that built ``block`` (default: the registered method of its
            type, :func:`bscompress.methods.block_method`).

    Returns:
        A short note (``"whitened svd"``, ``"pointwise refit"``, ``"data-free (Σ over the
        memory bound)"`` …) recorded in the Plan.

    Raises:
        BadInput: the method has no data-aware fit, or no method builds such a block.
    """
    if method is None:
        method = block_method(block)
    if method is None:
        raise BadInput(f"no method builds {type(block).__name__} blocks: they have no "
                       "data-aware fit")
    weight = grouped_weight(original)
    if cov.cross is not None:  # sequential: fit the original outputs from the new inputs
        weight = sequential_target(cov.cross, cov.full)
    return method.fit_data_aware(original, block, cov, weight, als_iters)

"""The calibration statistics of one layer's input patches (``PatchCovariance``), the type the
data-aware fits of every method consume, and the views of it they take: the block diagonal,
the Σ the output error is measured with, the centred covariance. Collected by
:mod:`bscompress.compress.calibrate`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class PatchCovariance:
    """Σ = E[p pᵀ] over the input patches of one layer, per group.

    Attributes:
        groups, channels, kernel: g, M/g and K = prod(kernel_size) (1 for Linear).
        full: ``[g, M/g·K, M/g·K]`` float64, or ``None`` when over the memory bound.
        blocks: ``[g, M/g, K, K]`` float64, the per-channel diagonal blocks of Σ (always).
        patches: number of patches averaged.
        cross, target_energy, target_mean: sequential mode only
            (``paired.collect_paired_covariance``): Σ above is E[p̃ p̃ᵀ] of the patches p̃
            the *compressed* network feeds the layer, ``cross`` is E[y p̃ᵀ] ``[g, N/g,
            M/g·K]`` with y = W p the original layer's output (without bias) on the original
            network's patch p at the same position, ``target_energy`` E‖y‖² ``[g]`` and
            ``target_mean`` E[y] ``[g, N/g]``.
        mean: ``[g, M/g·K]`` float64, the mean patch μ = E[p] (E[p̃] in sequential mode).
        centred: ``full``, ``blocks`` (and ``cross``, ``target_energy``) hold covariances,
            E[(p − μ)(p − μ)ᵀ] and so on, instead of second moments (:func:`centred`).
    """

    groups: int
    channels: int
    kernel: int
    full: torch.Tensor | None
    blocks: torch.Tensor
    patches: int
    cross: torch.Tensor | None = None
    target_energy: torch.Tensor | None = None
    target_mean: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    centred: bool = False

    @property
    def nbytes(self) -> int:
        tensors = (self.full, self.blocks, self.cross, self.target_energy, self.target_mean,
                   self.mean)
        return sum(t.numel() * 8 for t in tensors if t is not None)


def block_diagonal(cov: PatchCovariance) -> torch.Tensor:
    """Σ restricted to its per-channel K×K blocks, as ``[g, M/g·K, M/g·K]``."""
    g, m, k = cov.groups, cov.channels, cov.kernel
    eye = torch.eye(m, dtype=torch.float64)
    return torch.einsum("gmkl,mp->gmkpl", cov.blocks, eye).reshape(g, m * k, m * k)


def centred(cov: PatchCovariance) -> PatchCovariance:
    """``cov`` with the covariance E[(p − μ)(p − μ)ᵀ] = Σ − μμᵀ in place of the second moment
    Σ (``full`` and ``blocks``), for the layers whose mean output error is given back to a
    bias or the next BatchNorm (``data_aware.absorb_mean``): only the error in what varies is
    then left. Sequential statistics are centred alike (``cross`` = E[(y − E y)(p̃ − μ̃)ᵀ],
    ``target_energy`` = E‖y − E y‖²). Returned unchanged without a mean or when already
    centred."""
    if cov.mean is None or cov.centred or (cov.cross is not None and cov.target_mean is None):
        return cov

    mu = cov.mean.reshape(cov.groups, cov.channels, cov.kernel)
    blocks = cov.blocks - mu[..., :, None] * mu[..., None, :]
    full = None if cov.full is None else cov.full - outer(cov.mean, cov.mean)
    cross, energy = cov.cross, cov.target_energy
    if cross is not None:
        cross = cross - outer(cov.target_mean, cov.mean)
        energy = energy - cov.target_mean.square().sum(-1)
    return dataclasses.replace(cov, full=full, blocks=blocks, cross=cross,
                               target_energy=energy, centred=True)


def output_sigma(cov: PatchCovariance) -> torch.Tensor:
    """The Σ the output error is measured with: full, else block-diagonal."""
    return cov.full if cov.full is not None else block_diagonal(cov)



def outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a bᵀ`` per group: ``[g, D]`` × ``[g, E]`` → ``[g, D, E]``."""
    return a[:, :, None] * b[:, None, :]

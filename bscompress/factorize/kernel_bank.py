"""VGNet's fixed kernels: a bank of Gaussian, edge and identity kernels, and sign-invariant
matching of trained depthwise kernels (or blueprints) against it.

Shapes: a kernel is ``[kh, kw]``; a bank is ``[B, kh, kw]`` with one name per member; a set of
trained kernels is ``[C, kh, kw]`` (one per depthwise channel or blueprint).

Normalised correlation is the cosine of the flattened kernels,
``ρ(k, b) = ⟨k, b⟩ / (‖k‖ ‖b‖)``; the match is sign-invariant (|ρ|), and the least-squares
scale putting ``b`` closest to ``k`` is ``s = ⟨k, b⟩ / ‖b‖²`` (its sign is the sign of ρ), so a
negative Gaussian is a Gaussian with a negative scale.

On calibration data (``Σ_c = E[p pᵀ]`` and ``μ_c = E[p]`` over the ``[kh·kw]`` input patches p
of kernel c), the scale is the least-squares fit of the output, ``s = kᵀΣb / bᵀΣb``, whose
error ``e = E(kᵀp − s bᵀp)² = kᵀΣk − (kᵀΣb)² / bᵀΣb`` is measured against the variance of the
kernel's output, ``v = kᵀ(Σ − μμᵀ)k`` (what a BatchNorm after it normalises; the mean is in
the error): ``ρ² = 1 − e / v``, signed as ``s``. With Σ = I and μ = 0 these are the Euclidean
ρ and s above; ``1 − ρ²`` is the replacement's output error as a share of the output's
variance on the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Default σ of the Gaussian members of the bank (in pixels).
GAUSSIAN_SIGMAS = (0.5, 0.8, 1.0, 1.5, 2.0)

#: Family of each member name prefix: what ``inspect --kernels`` counts per stage.
FAMILIES = {"gaussian": "gaussian", "sobel": "edge", "laplacian": "edge", "identity": "identity"}


def gaussian_kernel(size: tuple[int, int], sigma: float) -> torch.Tensor:
    """A 2-D Gaussian ``[kh, kw]`` of standard deviation ``sigma``, centred, summing to 1."""
    axes = [torch.arange(n, dtype=torch.float64) - (n - 1) / 2 for n in size]
    yy, xx = torch.meshgrid(*axes, indexing="ij")
    kernel = torch.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def _centred(small: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``small`` (odd ``[h, w]``, no larger than ``size``) at the centre of a zero kernel."""
    kh, kw = size
    h, w = small.shape
    out = torch.zeros(kh, kw, dtype=torch.float64)
    top, left = (kh - h) // 2, (kw - w) // 2
    out[top:top + h, left:left + w] = small
    return out


def kernel_bank(size: tuple[int, int] = (3, 3),
                sigmas: tuple[float, ...] = GAUSSIAN_SIGMAS) -> tuple[list[str], torch.Tensor]:
    """VGNet's bank of fixed kernels for a ``size`` kernel.

    Members: a Gaussian of every σ in ``sigmas`` (``gaussian σ=1.0``), Sobel x and y, the 4- and
    8-neighbour Laplacians (``sobel x`` …, 3×3 stencils centred in larger kernels; left out of
    kernels smaller than 3×3 in either dimension) and the identity (a centred delta; only for
    odd sizes, where it has a centre).

    Returns:
        ``(names, bank)`` with ``bank`` float64 ``[B, kh, kw]``.
    """
    kh, kw = size
    names = [f"gaussian σ={s:g}" for s in sigmas]
    members = [gaussian_kernel(size, s) for s in sigmas]
    if kh >= 3 and kw >= 3:
        sobel_x = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=torch.float64)
        stencils = {
            "sobel x": sobel_x,
            "sobel y": sobel_x.T.clone(),
            "laplacian 4": torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=torch.float64),
            "laplacian 8": torch.tensor([[1.0, 1, 1], [1, -8, 1], [1, 1, 1]], dtype=torch.float64),
        }
        for name, stencil in stencils.items():
            names.append(name)
            members.append(_centred(stencil, size))
    if kh % 2 and kw % 2:
        names.append("identity")
        members.append(_centred(torch.ones(1, 1, dtype=torch.float64), size))
    return names, torch.stack(members)


def family(name: str) -> str:
    """``gaussian``, ``edge`` or ``identity`` for a bank member's name."""
    return FAMILIES[name.split(" ")[0]]


@dataclass(frozen=True)
class BankMatch:
    """The best bank member of each of C kernels.

    Attributes:
        index: ``[C]`` long, the member index in the bank.
        correlation: ``[C]``, the signed normalised correlation ρ with that member (|ρ| is
            the largest over the bank; 0 for an all-zero kernel).
        scale: ``[C]``, the least-squares scale s = ⟨k, b⟩/‖b‖² (signed).
    """

    index: torch.Tensor
    correlation: torch.Tensor
    scale: torch.Tensor


def match_bank(kernels: torch.Tensor, bank: torch.Tensor,
               moments: tuple[torch.Tensor, torch.Tensor] | None = None) -> BankMatch:
    """Match every kernel of ``kernels`` ``[C, kh, kw]`` against ``bank`` ``[B, kh, kw]`` by
    sign-invariant normalised correlation (see the module docstring): of the weights, or with
    ``moments`` = ``(Σ [C, K, K], μ [C, K])``, K = kh·kw (each kernel's input patch second
    moment and mean), of the outputs on the data. A kernel of zero norm, or of zero output
    variance on the data, has ρ = 0."""
    k = kernels.detach().to(torch.float64).flatten(1)                # [C, K]
    b = bank.to(torch.float64).flatten(1)                            # [B, K]
    if moments is None:
        dots = k @ b.T                                               # [C, B]
        kk = k.square().sum(1, keepdim=True)                         # [C, 1]
        bb = b.square().sum(1).expand_as(dots)                       # [C, B]
        variance = kk
    else:
        sigma, mean = (t.to(k) for t in moments)
        sk = torch.einsum("cij,cj->ci", sigma, k)                    # [C, K]: Σ_c k_c
        dots = sk @ b.T
        kk = (sk * k).sum(1, keepdim=True)
        bb = torch.einsum("bi,cij,bj->cb", b, sigma, b)
        variance = kk - (k * mean).sum(1, keepdim=True).square()
    fitted = torch.where(bb > 0, dots.square() / bb.clamp_min(1e-300), torch.zeros_like(dots))
    explained = torch.where(variance > 0, 1 - (kk - fitted) / variance.clamp_min(1e-300),
                            torch.zeros_like(dots))
    rho = explained.clamp(0, 1).sqrt() * torch.where(dots < 0, -1.0, 1.0)
    index = rho.abs().argmax(dim=1)
    picked = rho.gather(1, index[:, None]).squeeze(1)
    energy = bb.gather(1, index[:, None]).squeeze(1)
    scale = torch.where(energy > 0, dots.gather(1, index[:, None]).squeeze(1)
                        / energy.clamp_min(1e-300), torch.zeros_like(energy))
    return BankMatch(index, picked, scale)


__all__ = ["BankMatch", "FAMILIES", "GAUSSIAN_SIGMAS", "family", "gaussian_kernel",
           "kernel_bank", "match_bank"]

"""Data-aware factorization: minimise the output error on calibration inputs, not ‖W − Ŵ‖².

A layer maps an input patch p (length M·K per group, index ``m·K + k`` as in
``weight.reshape(N, -1)``) to ``W p``. With Σ = E[p pᵀ] over the calibration patches, the
expected squared output error of an approximation Ŵ is

    e(Ŵ) = tr((W − Ŵ) Σ (W − Ŵ)ᵀ)        (``output_error``)

and ``e(Ŵ) / tr(W Σ Wᵀ)`` is the relative output error (Σ = I gives back the weight error).

* ``whitened_lowrank``: the best rank-r Ŵ under e (the generalised SVD): with L Lᵀ = Σ
  (Cholesky), the SVD of W L truncated to r, mapped back by L⁻¹. Exact optimum; equal to the
  plain truncated SVD when Σ = I.
* ``refit_last``: the least-squares last stage. When Ŵ = P F with a fixed front map F
  (depthwise kernels, Tucker core, CP kernels …) and a free last matrix P (the pointwise),
  e is quadratic in P and P = W Σ Fᵀ (F Σ Fᵀ)⁻¹; for depthwise decomposition this is the
  cross-channel compensation of the pointwise.
* ``refit_blueprints`` / ``refit_blueprint_pointwise``: the two alternating least-squares
  steps of BSConv-U (per filter n: Ŵ_n = P_n V_nᵀ, M × K), each exact given the other.

Everything runs in float64 and takes batched (per group) tensors: ``W [g, N/g, M/g·K]``,
``Σ [g, M/g·K, M/g·K]``. A small ridge (``RIDGE`` times the mean diagonal) keeps the solves
well posed when Σ is rank deficient (fewer patches than M·K, dead channels).

Every whitening and SPD solve goes through one guarded routine (:func:`spd_root`,
:func:`spd_solve`): a Cholesky factorization of the ridged, symmetrised matrix; where it
fails (real statistics accumulated in floating point can be slightly indefinite beyond the
ridge: dead and saturated channels, fewer samples than dimensions), Cholesky again with the
larger jitters of ``JITTERS`` (a few times cheaper than an eigendecomposition, and what
settles the usual rank-deficient case), and only then a symmetric eigendecomposition whose
eigenvalues are floored at the ridge. Each fallback is counted in
the :func:`conditioning` record that is open, so that the Plan can say which layers had
degenerate statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar

import torch

from bscompress.factorize.linalg import quadratic_trace, thin_svd
from bscompress.factorize.memo import reusable

RIDGE = 1e-6
#: diagonal jitters (times the mean |diagonal|) a failed Cholesky factorization is retried with
#: before the floored eigendecomposition
JITTERS = (1e-5, 1e-4)

_RECORD: ContextVar[dict | None] = ContextVar("bscompress_conditioning", default=None)


@contextlib.contextmanager
def conditioning() -> Iterator[dict]:
    """Collect, while open, how many matrices the guarded routines had to floor
    (``{"floored": n}``): the eigenvalue floor replaced a failed Cholesky factorization."""
    record = {"floored": 0}
    token = _RECORD.set(record)
    try:
        yield record
    finally:
        _RECORD.reset(token)


def note_floored(count: int) -> None:
    """Count ``count`` floored matrices in the open :func:`conditioning` record."""
    record = _RECORD.get()
    if record is not None and count:
        record["floored"] += count


def _ridge(matrix: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``matrix + λ I`` with λ = RIDGE × mean diagonal (per batch entry)."""
    diag = matrix.diagonal(dim1=-2, dim2=-1)
    ref = diag.mean(-1) if scale is None else scale
    lam = (RIDGE * ref).clamp_min(1e-30)
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    return matrix + lam[..., None, None] * eye


def _symmetric(matrix: torch.Tensor) -> torch.Tensor:
    return 0.5 * (matrix + matrix.transpose(-1, -2))


def _floored_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(λ, Q)`` of the symmetric ``matrix`` with every eigenvalue raised to at least
    ``RIDGE`` times its mean |diagonal| (a floor relative to the matrix's own scale)."""
    values, vectors = torch.linalg.eigh(matrix)
    scale = matrix.diagonal(dim1=-2, dim2=-1).abs().mean(-1)
    floor = (RIDGE * scale).clamp_min(1e-300)[..., None]
    return torch.maximum(values, floor), vectors


def _cholesky_once(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    chol, info = torch.linalg.cholesky_ex(matrix)
    failed = (info != 0) | ~torch.isfinite(chol).flatten(-2).all(-1)
    return chol, failed


def _cholesky(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, failed)``: Cholesky factors of the batch (an entry that fails is retried with each
    of :data:`JITTERS` on its diagonal, counted as floored when that succeeds) and a bool
    mask of the entries that are still not numerically positive definite (their L is
    garbage)."""
    chol, failed = _cholesky_once(matrix)
    if not failed.any():
        return chol, failed
    d = matrix.shape[-1]
    flat, chol, failed = matrix.reshape(-1, d, d), chol.reshape(-1, d, d).clone(), \
        failed.reshape(-1).clone()
    eye = torch.eye(d, dtype=matrix.dtype, device=matrix.device)
    for jitter in JITTERS:
        index = failed.nonzero().flatten()
        sub = flat[index]
        scale = sub.diagonal(dim1=-2, dim2=-1).abs().mean(-1)
        retry, still = _cholesky_once(sub + (jitter * scale)[:, None, None] * eye)
        settled = index[~still]
        note_floored(len(settled))
        chol[settled] = retry[~still]
        failed[settled] = False
        if not failed.any():
            break
    return chol.reshape(matrix.shape), failed.reshape(matrix.shape[:-2])


#: the ridges, times the mean |diagonal|, :func:`noise_floored` tries in turn: the first
#: under which Σ is positive definite measures its noise to within a factor of 10
NOISE_LADDER = (RIDGE, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def noise_floored(matrix: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(Σ', n)``: the second moments ``matrix [..., D, D]`` made positive definite beyond
    their rounding noise; ``n`` entries of the batch were changed.

    Statistics summed in float32 (``calibrate``), and centred ones most (Σ − μμᵀ of inputs
    that hardly vary: constant images, a channel a dead ReLU holds at its bias), carry
    rounding noise that can exceed the ridge by orders of magnitude. The noise shows as
    negative eigenvalues, and a fit minimising tr(E Σ Eᵀ) on such a Σ runs off along them:
    weights 10⁴–10⁸ times the layer's, negative "output errors", outputs wrong on the
    calibration data itself. An entry that is positive definite with the ridge is returned
    unchanged (the usual case: one Cholesky factorization). Any other gets the smallest
    ridge of :data:`NOISE_LADDER` under which it is positive definite added to its diagonal
    (Σ is known to no better than that: the directions the data did not resolve then weigh
    as little as the noise allows, and no less), found by a Cholesky factorization per rung
    — an eigendecomposition per matrix sent the 512-channel layers of a ResNet-18
    calibrated on 32 images (fewer patches than dimensions) through half of the run's time.
    Past the last rung, its eigenvalues are raised to the magnitude of the most negative.
    """
    sym = _symmetric(matrix)
    d = sym.shape[-1]
    flat = sym.reshape(-1, d, d)
    scale = flat.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1e-300)
    eye = torch.eye(d, dtype=sym.dtype, device=sym.device)
    _, failed = _cholesky_once(flat + (RIDGE * scale)[:, None, None] * eye)
    if not failed.any():
        return matrix, 0
    out, pending = flat.clone(), failed.nonzero().flatten()
    changed = len(pending)
    for rung in NOISE_LADDER[1:]:
        ridged = flat[pending] + (rung * scale[pending])[:, None, None] * eye
        _, failed = _cholesky_once(ridged)
        out[pending[~failed]] = ridged[~failed]
        pending = pending[failed]
        if not len(pending):
            break
    if len(pending):
        values, vectors = torch.linalg.eigh(flat[pending])
        floor = torch.maximum(-values[:, :1], (RIDGE * scale[pending])[:, None])
        out[pending] = (vectors * torch.maximum(values, floor)[:, None, :]) @ vectors.mT
    return out.reshape(sym.shape), changed


def spd_solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``matrix⁻¹ rhs`` for a symmetric positive (semi-)definite, ridged ``matrix``
    ``[..., D, D]``, ``rhs [..., D, C]``: Cholesky, with the floored eigendecomposition for
    the batch entries that are not numerically positive definite.

    ``torch.linalg.solve`` (LU) is avoided on purpose: in the pinned PyTorch's oneMKL build,
    batched float64 LU solves of 192×192 and larger fail ("Parameter 6 was incorrect on entry
    to DLASWP") and never return.
    """
    matrix = _symmetric(matrix)
    chol, failed = _cholesky(matrix)
    if not failed.any():
        return torch.cholesky_solve(rhs, chol)
    note_floored(int(failed.sum()))
    values, vectors = _floored_eigh(matrix)
    robust = vectors @ ((vectors.transpose(-1, -2) @ rhs) / values[..., None])
    if failed.all():
        return robust
    mask = failed.reshape(*failed.shape, 1, 1)
    good = torch.cholesky_solve(rhs, torch.where(mask, torch.eye(
        matrix.shape[-1], dtype=matrix.dtype, device=matrix.device), chol))
    return torch.where(mask, robust, good)


def spd_root(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, L⁻¹)`` with ``L Lᵀ = matrix`` for a symmetric positive (semi-)definite, ridged
    ``matrix [..., D, D]``: the lower Cholesky factor, or ``Q Λ^½`` of the floored
    eigendecomposition for the entries that are not numerically positive definite."""
    matrix = _symmetric(matrix)
    chol, failed = _cholesky(matrix)
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    if failed.any():
        note_floored(int(failed.sum()))
        values, vectors = _floored_eigh(matrix)
        root = vectors * values.sqrt()[..., None, :]
        inverse = (vectors / values.sqrt()[..., None, :]).transpose(-1, -2)
        if failed.all():
            return root, inverse
        mask = failed.reshape(*failed.shape, 1, 1)
        chol = torch.where(mask, eye.expand_as(chol), chol)
        inv = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
        return torch.where(mask, root, chol), torch.where(mask, inverse, inv)
    return chol, torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)


def output_error(weight: torch.Tensor, approx: torch.Tensor, sigma: torch.Tensor) -> float:
    """``Σ_g tr((W_g − Ŵ_g) Σ_g (W_g − Ŵ_g)ᵀ)`` for ``[g, N/g, D]`` weights, ``Σ [g, D, D]``."""
    e = (weight - approx).to(torch.float64)
    return quadratic_trace(e, sigma.to(torch.float64))


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor,
                          sigma: torch.Tensor) -> float:
    """``e(Ŵ) / tr(W Σ Wᵀ)`` (0 for a layer that outputs nothing on the calibration data)."""
    total = output_error(weight, torch.zeros_like(weight), sigma)
    return output_error(weight, approx, sigma) / total if total > 0 else 0.0


def sequential_target(cross: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The weight to approximate when the layer sees other inputs than the original did.

    With the original layer's outputs y = W p, the compressed network's patches p̃,
    Σ = E[p̃ p̃ᵀ] and Y = E[y p̃ᵀ]: E‖y − Ŵ p̃‖² = const + tr((Ŵ − W_eff) Σ (Ŵ − W_eff)ᵀ)
    with W_eff = Y Σ⁻¹, so every fit above runs unchanged on ``(W_eff, Σ)``.

    Args:
        cross: Y ``[g, N/g, D]``; sigma: ``[g, D, D]``.
    """
    c, s = cross.to(torch.float64), sigma.to(torch.float64)
    return spd_solve(_ridge(s), c.transpose(1, 2)).transpose(1, 2)


def paired_relative_error(approx: torch.Tensor, sigma: torch.Tensor, cross: torch.Tensor,
                          energy: torch.Tensor) -> float:
    """``E‖y − Ŵ p̃‖² / E‖y‖²`` from Σ = E[p̃ p̃ᵀ], Y = E[y p̃ᵀ] and E‖y‖² per group
    (``energy [g]``), y = W p the original layer's outputs."""
    a = approx.to(torch.float64)
    total = float(energy.sum())
    if total <= 0:
        return 0.0
    mixed = float(torch.einsum("gnd,gnd->", cross.to(torch.float64), a))
    own = float(torch.einsum("gnd,gde,gne->", a, sigma.to(torch.float64), a))
    return max(total - 2 * mixed + own, 0.0) / total


def whitening(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, L⁻¹)`` with ``L Lᵀ = Σ + λI`` (lower triangular where Σ + λI is numerically
    positive definite, else from its floored eigendecomposition), batched over leading
    dims. Answered from an active ``memo.Reuse`` table for a Σ whitened before (its floored
    count is noted again)."""
    chol, inv, floored = _counted_whitening(sigma)
    note_floored(floored)
    return chol, inv


@reusable
def _counted_whitening(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    with conditioning() as record:
        chol, inv = spd_root(_ridge(_symmetric(sigma.to(torch.float64))))
    return chol, inv, record["floored"]


def whitened_lowrank(matrix: torch.Tensor, sigma: torch.Tensor,
                     rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-r ``Ŵ = left @ rightᵀ`` of ``matrix [..., A, D]`` under the Σ-weighted error.

    Args:
        matrix: ``[..., A, D]``; the error is measured on the D side.
        sigma: ``[..., D, D]`` symmetric positive semi-definite.
        rank: kept rank r (at most min(A, D)).

    Returns:
        ``(left [..., A, r], right [..., D, r], spectrum [..., min(A, D)])``: ``left = U S``,
        ``right = L⁻ᵀ V``, and the singular values S of W L, whose dropped squares sum to the
        output error e(Ŵ) (up to the ridge).
    """
    chol, inv = whitening(sigma)
    u, s, vh = thin_svd(matrix.to(torch.float64) @ chol)
    left = u[..., :rank] * s[..., None, :rank]
    right = inv.transpose(-1, -2) @ vh[..., :rank, :].transpose(-1, -2)
    return left, right, s


def projection_errors(weight: torch.Tensor, sigma: torch.Tensor,
                      bases: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The output error e(Ŵ_r) on ``sigma`` of every rank r of the projections
    Ŵ_r = U_r U_rᵀ W of ``weight`` onto the first r columns of each orthonormal basis U.

    With M = W Σ Wᵀ, e(Ŵ_r) = tr((I − P_r) M (I − P_r)) = tr M − Σ_{i ≤ r} u_iᵀ M u_i: one
    product M for every rank and basis, where building and scoring each rank's block costs
    A·D² a rank. Both of the low-rank fits are such projections: the truncated SVD (U: W's
    left singular vectors) and the whitened one (U: those of W L, L Lᵀ = Σ_fit).

    Args:
        weight: W ``[g, A, D]``; sigma: ``[g, D, D]``; bases: each U ``[g, A, k]``.

    Returns:
        Per basis, ``[g, k + 1]`` float64: column r is e(Ŵ_r) per group (column 0: tr M,
        nothing kept).
    """
    w = weight.to(torch.float64)
    m = w @ sigma.to(torch.float64) @ w.transpose(-1, -2)  # [g, A, A]
    total = m.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)
    tables = []
    for basis in bases:
        u = basis.to(torch.float64).transpose(-1, -2)  # [g, k, A]
        kept = ((u @ m) * u).sum(-1)  # [g, k]: u_iᵀ M u_i
        tables.append(torch.cat([total, total - kept.cumsum(-1)], dim=-1))
    return tables


@reusable
def lowrank_projection_errors(weight: torch.Tensor, sigma: torch.Tensor, held: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`projection_errors` on ``held`` of the two low-rank fits of ``weight [g, A, D]``
    (float64) at every rank: ``(truncated SVD, whitened SVD on sigma)``, each ``[g, k + 1]``.
    Answered from an active ``memo.Reuse`` table for the ranks after the first."""
    chol, _ = whitening(sigma)
    truncated, whitened = projection_errors(
        weight, held, [thin_svd(weight)[0], thin_svd(weight @ chol)[0]])
    return truncated, whitened


def refit_last(weight: torch.Tensor, front: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Least-squares last stage ``P = W Σ Fᵀ (F Σ Fᵀ)⁻¹`` minimising e(P F).

    Args:
        weight: the original ``[g, N/g, D]``.
        front: the fixed front map ``[g, R, D]`` (what the block computes before its last
            linear stage, as rows over the patch).
        sigma: ``[g, D, D]``.

    Returns:
        ``P [g, N/g, R]``.
    """
    w, f, s = (t.to(torch.float64) for t in (weight, front, sigma))
    fs = f @ s
    gram = _ridge(fs @ f.transpose(1, 2))
    rhs = w @ fs.transpose(1, 2)  # [g, N/g, R]
    return spd_solve(gram, rhs.transpose(1, 2)).transpose(1, 2)


def refit_pointwise_after_depthwise(weight: torch.Tensor, depthwise: torch.Tensor,
                                    sigma: torch.Tensor) -> torch.Tensor:
    """:func:`refit_last` for a depthwise front (DSC's pointwise refit), using its structure.

    The front F maps the patch (m, k) to the depthwise outputs (m, j), F[(m, j), (m', k)] =
    δ_mm' D[m, j, k]: block diagonal, so F Σ costs M·r·M·K² instead of the M·r·(M·K)² of a
    dense product (the same solution, ridge included).

    Args:
        weight: the original ``[g, N/g, M/g·K]``.
        depthwise: the depthwise kernels ``[g, M/g, r, K]`` (r per input channel).
        sigma: ``[g, M/g·K, M/g·K]``.

    Returns:
        ``P [g, N/g, M/g·r]`` (the pointwise, its inputs ordered m-major like the block's).
    """
    w, d, s = (t.to(torch.float64) for t in (weight, depthwise, sigma))
    g, m, r, k = d.shape
    fs = torch.einsum("gmjk,gmkpl->gmjpl", d, s.reshape(g, m, k, m, k))  # F Σ [g,m,r,m,k]
    gram = _ridge(torch.einsum("gmjpl,gpil->gmjpi", fs, d).reshape(g, m * r, m * r))
    rhs = w @ fs.reshape(g, m * r, m * k).transpose(1, 2)  # W Σ Fᵀ [g, N/g, M/g·r]
    return spd_solve(gram, rhs.transpose(1, 2)).transpose(1, 2)


def refit_blueprints(weight: torch.Tensor, pointwise: torch.Tensor, sigma: torch.Tensor,
                     chunk: int = 64, precision: torch.dtype = torch.float64) -> torch.Tensor:
    """BSConv-U blueprints V_n given the pointwise P_n, exact least squares under Σ.

    Args:
        weight: ``[g, N/g, M/g, K]``.
        pointwise: ``[g, N/g, M/g, r]`` (P_n, the pointwise weights of filter n's r blueprints).
        sigma: ``[g, M/g·K, M/g·K]``.
        chunk: filters solved at once (bounds the ``[chunk, r, K, M/g, K]`` intermediate).
        precision: the dtype of the products with Σ, N·r·(M/g·K)² multiply-adds, most of the
            work (float32 for budget candidates, which only rank forms: up to 2× faster); the
            systems are solved in float64.

    Returns:
        ``V [g, N/g, K, r]`` such that Ŵ_n = P_n V_nᵀ.
    """
    g, n, m, k = weight.shape
    r = pointwise.shape[-1]
    chunk = _bounded_chunk(chunk, r * m * k * k)
    s, w = _blueprint_operands(weight, sigma, precision)
    out = torch.empty(g, n, k, r, dtype=torch.float64, device=weight.device)
    for gi in range(g):
        for start in range(0, n, chunk):  # the systems of a chunk of filters at a time
            system = _blueprint_system(s[gi], w[gi, start:start + chunk],
                                       pointwise[gi, start:start + chunk], precision)
            out[gi, start:start + chunk] = solve_blueprints(*system, r)
    return out


@reusable
def blueprint_normal_equations(weight: torch.Tensor, pointwise: torch.Tensor,
                               sigma: torch.Tensor, chunk: int = 64,
                               precision: torch.dtype = torch.float64
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares systems of :func:`refit_blueprints`, per filter n:
    G_n = (P_n ⊗ I_K)ᵀ Σ (P_n ⊗ I_K) and b_n = (P_n ⊗ I_K)ᵀ Σ w_n, for every filter at once.

    G_n's entry for blueprint taps (j, k) and (i, l) involves columns j and i of P_n only,
    so the system of the first r columns is the leading block of the system of all of them:
    the budget's candidates of BSConv-U (ranks 1, 2, … whose pointwise are the first columns
    of one SVD's) share one system at the largest rank (:func:`solve_blueprints` takes each
    one's block), N·R·(M/g·K)² multiply-adds instead of N·(1 + 2 + … + R)·(M/g·K)². The
    caller bounds its size (N·(R·K)² float64 values).

    Args: as :func:`refit_blueprints`.

    Returns:
        ``(G [g, N/g, r, K, r, K], b [g, N/g, r, K])``, float64.
    """
    g, n, m, k = weight.shape
    r = pointwise.shape[-1]
    chunk = _bounded_chunk(chunk, r * m * k * k)
    s, w = _blueprint_operands(weight, sigma, precision)
    gram = torch.empty(g, n, r, k, r, k, dtype=torch.float64, device=weight.device)
    rhs = torch.empty(g, n, r, k, dtype=torch.float64, device=weight.device)
    for gi in range(g):
        for start in range(0, n, chunk):
            gram[gi, start:start + chunk], rhs[gi, start:start + chunk] = _blueprint_system(
                s[gi], w[gi, start:start + chunk], pointwise[gi, start:start + chunk],
                precision)
    return gram, rhs


#: values of the ``[chunk, r, K, M/g, K]`` intermediate of the blueprint systems (256 MB in
#: float32): a 15×15 kernel on 16 channels at rank 16 took 3.3 GB at 64 filters a chunk
BLUEPRINT_CHUNK_VALUES = 2**26


def _bounded_chunk(chunk: int, per_filter: int) -> int:
    """``chunk`` filters at a time, fewer where their intermediate would pass
    :data:`BLUEPRINT_CHUNK_VALUES` (one at least)."""
    return max(1, min(chunk, BLUEPRINT_CHUNK_VALUES // max(per_filter, 1)))


def _blueprint_operands(weight: torch.Tensor, sigma: torch.Tensor, precision: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ as ``[g, M/g, K, M/g, K]`` and W as ``[g, N/g, M/g·K]``, in ``precision``."""
    g, n, m, k = weight.shape
    return (sigma.to(precision).reshape(g, m, k, m, k),
            weight.to(precision).reshape(g, n, m * k))


def _blueprint_system(s: torch.Tensor, w: torch.Tensor, p: torch.Tensor,
                      precision: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The blueprint systems ``(G [c, r, K, r, K], b [c, r, K])`` float64 of c filters of one
    group: Σ ``s [M/g, K, M/g, K]``, their weights ``w [c, M/g·K]``, pointwise ``p [c, M/g,
    r]``; ``[c, r, K, M/g, K]`` in between."""
    m, k = s.shape[:2]
    p = p.to(precision)
    sp = torch.einsum("cmj,mkpl->cjkpl", p, s)  # (P_n ⊗ I)ᵀ Σ
    gram = torch.einsum("cjkpl,cpi->cjkil", sp, p)
    rhs = torch.einsum("cjkd,cd->cjk", sp.reshape(*sp.shape[:3], m * k), w)
    return gram.double(), rhs.double()


def solve_blueprints(gram: torch.Tensor, rhs: torch.Tensor, rank: int) -> torch.Tensor:
    """The blueprints ``V [..., K, rank]`` of the first ``rank`` pointwise columns from the
    systems ``(G [..., r, K, r, K], b [..., r, K])`` of :func:`blueprint_normal_equations`
    (of as many columns or more): their leading blocks, ridged and solved in float64."""
    *lead, _, k = rhs.shape
    a = gram[..., :rank, :, :rank, :].reshape(-1, rank * k, rank * k)
    b = rhs[..., :rank, :].reshape(-1, rank * k, 1)
    v = spd_solve(_ridge(a), b).reshape(*lead, rank, k)
    return v.transpose(-1, -2)


def refit_blueprint_pointwise(weight: torch.Tensor, blueprints: torch.Tensor,
                              sigma: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """BSConv-U pointwise P_n given the blueprints V_n, exact least squares under Σ.

    Args:
        weight: ``[g, N/g, M/g, K]``.
        blueprints: ``[g, N/g, K, r]``.
        sigma: ``[g, M/g·K, M/g·K]``.

    Returns:
        ``P [g, N/g, M/g, r]``. Each filter solves an (M/g·r)² system.
    """
    g, n, m, k = weight.shape
    r = blueprints.shape[-1]
    s = sigma.to(torch.float64).reshape(g, m, k, m, k)
    w = weight.to(torch.float64).reshape(g, n, m * k)
    out = torch.empty(g, n, m, r, dtype=torch.float64, device=weight.device)
    for gi in range(g):
        for start in range(0, n, chunk):
            v = blueprints[gi, start:start + chunk].to(torch.float64)  # [c, k, r]
            sv = torch.einsum("ckj,mkpl->cmjpl", v, s[gi])  # [c, m, r, m, k]
            gram = torch.einsum("cmjpl,cli->cmjpi", sv, v).reshape(-1, m * r, m * r)
            rhs = torch.einsum("cmjd,cd->cmj", sv.reshape(-1, m, r, m * k),
                               w[gi, start:start + chunk]).reshape(-1, m * r, 1)
            out[gi, start:start + chunk] = spd_solve(_ridge(gram), rhs).reshape(-1, m, r)
    return out

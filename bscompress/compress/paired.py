"""The sequential fit's statistics of one layer: the compressed network's patches against the
original layer's outputs.

In sequential mode (``--sequential``) a layer is fitted to reproduce the original network's
output of that layer, y = W p (p: the original's input patch), from the patches p̃ that the
partly compressed network feeds it:

    E‖y − Ŵ p̃‖² = E‖y‖² − 2 tr(Ŵ E[p̃ yᵀ]) + tr(Ŵ Σ̃ Ŵᵀ),   Σ̃ = E[p̃ p̃ᵀ],

so a fit needs Σ̃ ``[D, D]``, the cross moment Y = E[y p̃ᵀ] ``[N, D]`` (per group) and, for
the error, E‖y‖² and E[y]; its target weight is W_eff = Y Σ̃⁻¹ (``gsvd.sequential_target``).
Y = W E[p p̃ᵀ], and it is computed the cheaper of two ways per layer:

* **through the outputs**: y from the original layer's input (one conv, ``F.conv2d`` on the
  padded input, no bias) and Y as the weight gradient of a conv whose output gradient is y
  (``torch.nn.grad.conv2d_weight``, for the stride-1 k×k convs whose Σ̃ comes from the map)
  or as yᵀ p̃ over the im2col columns: 2·N·D multiply-adds a patch (per group);
* **through the input pairs**: E[p p̃ᵀ] (D² a patch, ``patch_moments.patch_gram`` from the
  map at (2k_h − 1)(2k_w − 1)·M² instead) and then W times it, for layers with more outputs
  than half their patch length (a bottleneck's expanding 1×1 convs).

For a 3×3 conv with as many outputs as inputs that is 18·M² against 25·M² (from the map) or
81·M² (im2col) a position, and oneDNN's conv kernels run near the machine's peak: on 2 cores,
batch 32, 2–3× faster than ``patch_gram``'s cross product from 7² to 56² maps.

``collect_paired_covariance`` runs both whole networks; ``block_inputs.PairedStatistics`` runs
the blocks holding the layer on their cached inputs; both go through
:func:`paired_covariance`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from bscompress.compress.calibrate import (
    StopForward,
    _diagonal_blocks,
    _dims,
    _Shifted,
    _thin,
    from_map,
    map_of,
    padded_input,
    patches,
    run_hooked,
)
from bscompress.compress.data_aware import grouped_weight
from bscompress.compress.patch_moments import Geometry, patch_gram
from bscompress.core.covariance import PatchCovariance, outer
from bscompress.core.padding import Pad, input_padding
from bscompress.factorize.linalg import self_gram

__all__ = ["collect_paired_covariance", "paired_covariance", "through_outputs"]


def through_outputs(module: nn.Module) -> bool:
    """Whether the cross moment Y of ``module`` (conv or Linear) is cheaper through its
    outputs (2·N/g·D multiply-adds a patch) than through the input pairs (D², or
    (2k_h − 1)(2k_w − 1)·(M/g)² from the map)."""
    groups, channels, kernel = _dims(module)
    outputs = (module.out_features if isinstance(module, nn.Linear)
               else module.out_channels) // groups
    d = channels * kernel
    if from_map(module):
        pairs = math.prod(2 * k - 1 for k in module.kernel_size) * channels ** 2
    else:
        pairs = d * d
    return 2 * outputs * d < pairs


def _weight(module: nn.Module) -> torch.Tensor:
    """``module``'s weight as a 2-D conv's, ``[N, M/g, k_h, k_w]`` float32 (a Conv1d's with
    k_h = 1, a Linear's as 1×1)."""
    w = module.weight.detach().float()
    if isinstance(module, nn.Linear):
        return w[:, :, None, None]
    return w.unsqueeze(2) if w.dim() == 3 else w


def _outputs(module: nn.Module, weight: torch.Tensor, x: torch.Tensor, pad: Pad | None
             ) -> torch.Tensor:
    """y = W p at every patch of ``module``'s input ``x``: ``[B, N, H_o, W_o]`` float32 (a
    Linear's rows as ``[1, N, rows, 1]``), without the bias; ``weight``: :func:`_weight`."""
    if isinstance(module, nn.Linear):
        rows = x.detach().float().reshape(-1, module.in_features)
        return (rows @ weight[:, :, 0, 0].T).T[None, :, :, None]
    x, _, dilation, stride = padded_input(module, x.detach().float(), pad)
    return F.conv2d(x, weight, None, stride, 0, dilation, module.groups)


def _rows(y: torch.Tensor, groups: int) -> torch.Tensor:
    """A ``[B, N, H, W]`` output map as ``[g, B·H·W, N/g]``, in the order of
    ``calibrate.patches``' columns."""
    b, n, h, w = y.shape
    return y.reshape(b, groups, n // groups, h * w).permute(1, 0, 3, 2).reshape(
        groups, b * h * w, n // groups)


class _Targets(_Shifted):
    """Sums of the original layer's outputs y about a fixed shift t (the first batch's
    channel means): :class:`calibrate._Shifted`'s Σ (y − t) ``[g, N/g]``, and Σ ‖y − t‖²
    ``[g]``."""

    def __init__(self, groups: int, outputs: int) -> None:
        super().__init__(groups, outputs)
        self.square = torch.zeros(groups, dtype=torch.float64)

    def add_map(self, y: torch.Tensor) -> torch.Tensor:
        """All of the outputs ``y [B, N, H, W]`` → ``y − t`` (t set on the first call)."""
        groups = len(self.sum)
        if self.shift is None:
            self.shift = y.mean((0, 2, 3)).view(groups, 1, -1)
        y = y - self.shift.reshape(-1, 1, 1)
        self.sum += y.sum((0, 2, 3)).double().cpu().view(groups, -1)
        self.square += y.square().sum((0, 2, 3)).double().cpu().view(groups, -1).sum(1)
        return y

    def add(self, y: torch.Tensor) -> torch.Tensor:
        """Outputs as rows ``[g, P, N/g]`` (those at the patches kept) → ``y − t``."""
        y = super().add(y)
        self.square += y.square().sum((1, 2)).double().cpu()
        return y

    def moments(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(m, E[y], E‖y‖²)``: the mean about the shift and the mean ``[g, N/g]``, the
        second moment per group ``[g]``, float64."""
        m, mean = self.means(n)
        shift = mean - m
        energy = self.square / n + 2 * (shift * m).sum(1) + shift.square().sum(1)
        return m, mean, energy


def collect_paired_covariance(
    original: nn.Module,
    compressed: nn.Module,
    layer: str,
    batches: Iterable[torch.Tensor],
    max_patches_per_batch: int = 1 << 16,
    reference: PatchCovariance | None = None,
) -> PatchCovariance:
    """Statistics for fitting ``layer`` of ``compressed`` to the outputs of ``original``.

    Both networks run on every batch; the patches p̃ that ``compressed`` (whose earlier
    layers may already be factorized) feeds ``layer`` and the outputs y = W p of the
    original ``layer`` at the same positions give Σ̃ = E[p̃ p̃ᵀ] (``full``), ``cross`` =
    E[y p̃ᵀ], ``target_energy`` = E‖y‖² and ``target_mean`` = E[y], and the mean E[p̃]
    (``mean``). Each pass stops at ``layer`` (:class:`StopForward`): a layer's input needs
    the network before it only. ``block_inputs.PairedStatistics`` gives the same statistics
    from cached block inputs.

    ``reference``: the one-shot statistics of the original ``layer`` over the same
    ``batches`` (``collect_patch_covariances``, full Σ), when the caller has them: a layer
    whose cross moment goes through the input pairs (:func:`through_outputs`) then takes
    E[p pᵀ] and E[p] from them instead of computing them again.
    """
    return paired_covariance(original.get_submodule(layer), compressed.get_submodule(layer),
                             lambda: run_hooked([original, compressed], batches, []),
                             max_patches_per_batch, reference)


def paired_covariance(
    layer_a: nn.Module,
    layer_b: nn.Module,
    passes: Callable[[], Iterable[object]],
    max_patches_per_batch: int = 1 << 16,
    reference: PatchCovariance | None = None,
) -> PatchCovariance:
    """:func:`collect_paired_covariance` of the original network's ``layer_a`` and the
    compressed one's ``layer_b``, whatever runs them: ``passes()`` iterates once per batch,
    after running (eval, no grad) what feeds both layers that batch — the networks from their
    input, or their blocks from cached inputs. The hooks raise :class:`StopForward` once
    they have a layer's input.

    Raises:
        ValueError: ``reference`` (see :func:`collect_paired_covariance`) is not the full,
            uncentred one-shot Σ of as many patches as the passes give.
    """
    if reference is not None and (reference.full is None or reference.centred
                                  or reference.cross is not None or reference.mean is None):
        raise ValueError("the reference statistics must be the full, uncentred one-shot Σ "
                         "of the original layer")
    groups, channels, kernel = _dims(layer_a)
    d = channels * kernel
    outputs = through_outputs(layer_a)
    own = not outputs and reference is None  # E[p pᵀ] of the original's patches needed
    weight = _weight(layer_a)
    sums: dict[str, torch.Tensor] = {}
    firsts = {key: _Shifted(groups, d) for key in ("p", "q")}
    targets = _Targets(groups, len(weight) // groups)
    seen: dict[str, object] = {}
    count = 0
    pads = {"p": None if isinstance(layer_a, nn.Linear) else input_padding(layer_a).spec,
            "q": None if isinstance(layer_b, nn.Linear) else input_padding(layer_b).spec}
    # both layers are the original's conv (the compressed network's is not replaced yet)
    mapped = from_map(layer_a) and from_map(layer_b)

    def grab(key: str):
        def hook(module, args):
            x = args[0]
            if key == "p" and outputs:
                seen[key] = _outputs(module, weight, x, pads[key])
            elif mapped:
                seen[key] = map_of(module, x, pads[key])
            else:
                seen[key] = patches(module, x, pads[key]).detach().float()
            raise StopForward  # the layers after it do not change its input
        return hook

    def add(key: str, product: torch.Tensor) -> None:
        product = product.cpu()
        if key in sums:
            sums[key] += product  # promoted in place: no float64 copy
        else:
            sums[key] = product.double()

    handles = [layer_a.register_forward_pre_hook(grab("p")),
               layer_b.register_forward_pre_hook(grab("q"))]
    try:
        for _ in passes():
            p, q = seen.pop("p"), seen.pop("q")
            if mapped:  # no im2col, no thinning
                q_map, shape = q
                images = len(q_map)
                q = firsts["q"].add_map(q_map, shape, groups)
                count += images * shape.patches_per_image
                add("qq", patch_gram(q, q, shape, images, groups))
                if outputs:
                    if tuple(p.shape[-2:]) != shape.out:
                        raise ValueError(f"the layers' output grids differ: {shape.out}, "
                                         f"{tuple(p.shape[-2:])}")
                    add("yq", _cross_from_map(q, targets.add_map(p), shape, weight, groups))
                else:
                    p_map, other = p
                    if shape != other:
                        raise ValueError("the layers' patch geometries differ: "
                                         f"{shape}, {other}")
                    p = firsts["p"].add_map(p_map, shape, groups)
                    add("pq", patch_gram(p, q, shape, images, groups))
                    if own:
                        add("pp", patch_gram(p, p, shape, images, groups))
            else:
                if outputs:
                    y = _rows(p, groups)  # the outputs, as the patches are laid out
                    if y.shape[1] != q.shape[1]:
                        raise ValueError(f"the layers' patch counts differ: {q.shape[1]}, "
                                         f"{y.shape[1]} outputs")
                step = _thin(q.shape[1], max_patches_per_batch)
                q = firsts["q"].add(q[:, ::step])
                count += q.shape[1]
                add("qq", self_gram(q))
                if outputs:
                    add("yq", targets.add(y[:, ::step]).transpose(1, 2) @ q)
                else:
                    p = firsts["p"].add(p[:, ::step])
                    add("pq", p.transpose(1, 2) @ q)
                    if own:
                        add("pp", self_gram(p))
    finally:
        for handle in handles:
            handle.remove()
    if reference is not None and reference.patches != count:
        raise ValueError(f"the reference statistics hold {reference.patches} patches, the "
                         f"batches gave {count}: give the one-shot Σ of the same batches")
    n = max(count, 1)
    m_q, mean_q = firsts["q"].means(n)

    def raw(key: str, a: tuple, b: tuple) -> torch.Tensor:  # moments about the shifts → raw
        return sums[key] / n - outer(a[0], b[0]) + outer(a[1], b[1])

    full = raw("qq", (m_q, mean_q), (m_q, mean_q))
    if outputs:
        m_y, mean_y, energy = targets.moments(n)
        cross = raw("yq", (m_y, mean_y), (m_q, mean_q))
    else:
        m_p, mean_p = firsts["p"].means(n)
        pairs = raw("pq", (m_p, mean_p), (m_q, mean_q))
        if reference is None:
            second = raw("pp", (m_p, mean_p), (m_p, mean_p))
        else:
            second, mean_p = reference.full, reference.mean
        w = grouped_weight(layer_a).cpu()
        cross = w @ pairs
        energy = torch.einsum("gnd,gde,gne->g", w, second, w)
        mean_y = torch.einsum("gnd,gd->gn", w, mean_p)
    return PatchCovariance(groups, channels, kernel, full,
                           _diagonal_blocks(full, channels, kernel), count, cross=cross,
                           target_energy=energy, target_mean=mean_y, mean=mean_q)


def _cross_from_map(q: torch.Tensor, y: torch.Tensor, shape: Geometry, weight: torch.Tensor,
                    groups: int) -> torch.Tensor:
    """Σ (y − t)(p̃ − s)ᵀ ``[g, N/g, M/g·K]`` over the stride-1 patches p̃ of the map in the
    :func:`patch_moments.position_major` buffer ``q`` (shifted), from the shifted outputs
    ``y [B, N, H_o, W_o]``: the weight gradient of the conv ``p̃ ↦ W p̃`` for the output
    gradient y."""
    images, channels = len(y), q.shape[1]
    (hp, wp), margin = shape.size, shape.margin
    body = q.view(-1, images, channels)[margin:margin + hp * wp]
    x = body.view(hp, wp, images, channels).permute(2, 3, 0, 1)  # [B, C, H_p, W_p], a view
    x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.nn.grad.conv2d_weight(x, weight.shape, y, 1, 0, shape.dilation, groups)
    return grad.reshape(groups, -1, channels // groups * math.prod(shape.kernel))

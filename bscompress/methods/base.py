"""The method interface, its registry, and the helpers the built-in methods share.

A method is a plug-in: a :class:`Method` subclass holding everything the rest of bscompress
needs from a factorization (which layers it takes, how it picks ranks and budget candidates,
how it builds its block in closed form and as an empty structure for archives, how it fits the
block to calibration statistics, its fine-tuning learning-rate group, its spatial stage for
fixed kernels). The orchestration (``decomposition``, ``data_aware``, ``finetune``,
``fixed_kernels``, ``pipeline``) reads these hooks and never names a method or a block type.

Registration, either way:

* ``class MyMethod(Method, name="my-method"): ...`` registers one instance (made with no
  arguments) when the class is defined;
* ``register(MyMethod(...))`` registers an instance explicitly (CP registers two, ``cp`` and
  ``cp4``); :func:`unregister` takes one away again.

``register`` also gives the method's ``structure`` to :func:`bscompress.core.surgery.
register_structure`, so that archives whose plan names the method rebuild.

A conv subclass that pads its input in its own ``forward`` (TF "same", static or from the input
size; :mod:`bscompress.core.padding`) gets ``options["pad"]`` in its entry from ``choose`` and
``candidates``; ``build`` and ``structure`` give that padding to the block's spatial stage (see
:func:`plain_view`), so that archives rebuild it from the plan alone. A subclass whose
``forward`` cannot be reproduced is refused by ``skip_reason`` with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from bscompress.core.errors import BadInput
from bscompress.core.padding import as_plain_conv, pad_options
from bscompress.core.plan import LayerPlan
from bscompress.core.surgery import (
    Eligibility,
    register_structure,
    registered_methods,
    skip_reason,
    unregister_structure,
)
from bscompress.factorize.separable import relative_errors

if TYPE_CHECKING:
    from bscompress.core.covariance import PatchCovariance


@dataclass(frozen=True)
class RankOptions:
    """How ranks are chosen, per layer.

    Attributes:
        rank: fixed rank (BSConv-U/-S and DSC: per filter / channel multiplier; svd: rank).
        energy: instead of ``rank``, the smallest rank keeping this fraction of the squared
            singular values of each layer (0 < energy ≤ 1).
        p: BSConv-S bottleneck ratio M'/M.
        tucker_ranks: Tucker-2 ranks as a fraction of the channels (≤ 1) or absolute (> 1).
        cp_rank: CP rank as a fraction of the output channels (≤ 1) or absolute (> 1).
        round_to: round bottleneck widths (Tucker-2/CP/svd ranks, BSConv-S M') up to a
            multiple of this, for hardware efficiency.
        allow_growth: rewrite layers even when the block costs more MACs than the layer.
        tucker_iters: HOOI iterations after the HOSVD initialisation of Tucker-2.
        cp_iters: ALS iterations of CP (seeded, SVD initialisation).
    """

    rank: int | None = None
    energy: float | None = None
    p: float = 0.25
    tucker_ranks: float = 0.25
    cp_rank: float = 0.25
    round_to: int = 1
    allow_growth: bool = False
    tucker_iters: int = 5
    cp_iters: int = 50

    def __post_init__(self) -> None:
        # the fields by name: the command line and recipes check them first (recipe.Decompose)
        # and name them as flags or recipe keys; this is what a Python caller sees
        if self.rank is not None and self.energy is not None:
            raise BadInput("RankOptions: give either rank or energy, not both")
        if self.rank is not None and self.rank < 1:
            raise BadInput(f"RankOptions.rank must be at least 1, got {self.rank}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise BadInput(f"RankOptions.energy must be in (0, 1], got {self.energy}")
        if not 0 < self.p <= 1:
            raise BadInput(f"RankOptions.p must be in (0, 1], got {self.p}")
        for name, value in (("tucker_ranks", self.tucker_ranks), ("cp_rank", self.cp_rank)):
            if not _width(value):
                raise BadInput(f"RankOptions.{name} must be a fraction in (0, 1] or a whole "
                               f"number of channels, got {value}")
        if self.round_to < 1:
            raise BadInput(f"RankOptions.round_to must be at least 1, got {self.round_to}")


def _width(value: float) -> bool:
    """A fraction of the channels in (0, 1], or a whole number of them."""
    return 0 < value <= 1 or (value > 1 and value == int(value))


# -- helpers of the methods ---------------------------------------------------------------


def round_up(value: int, multiple: int, limit: int) -> int:
    """``value`` rounded up to a multiple of ``multiple``, at least 1, at most ``limit``."""
    return max(1, min(limit, math.ceil(value / multiple) * multiple))


def rank_for_energy(spectrum: torch.Tensor, energy: float) -> int:
    """Smallest rank whose relative truncation error is at most ``1 - energy``."""
    errors = relative_errors(spectrum)
    ok = (errors <= 1 - energy + 1e-12).nonzero()
    return max(1, int(ok[0]))


def plain_view(conv: nn.Module, entry: LayerPlan) -> tuple[nn.Module, dict]:
    """``conv`` as the plain conv its block is built from (padding its input as the entry's
    ``options["pad"]`` says, sharing the weights) and the entry's other options."""
    options = dict(entry.options)
    return as_plain_conv(conv, options.pop("pad", None)), options


def channels(value: float, count: int) -> int:
    """A fraction of ``count`` channels (value ≤ 1) or an absolute count, at least 1."""
    number = math.ceil(value * count) if value <= 1 else int(value)
    return max(1, number)


def relative_error(weight: torch.Tensor, dense: torch.Tensor) -> float:
    """‖W − Ŵ‖²_F / ‖W‖²_F (0 for an all-zero W)."""
    w = weight.detach().to(torch.float64)
    total = float(w.square().sum())
    if total == 0.0:
        return 0.0
    return float((w - dense.detach().to(torch.float64).reshape(w.shape)).square().sum()) / total


def set_weight(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` (any shape with as many elements, any dtype) into ``param``, no grad."""
    with torch.no_grad():
        param.copy_(value.reshape(param.shape).to(param.dtype))


#: the note of a data-aware fit that needs the full Σ when only its K×K blocks were kept
DATA_FREE = "data-free (Σ over the memory bound)"


# -- the interface ------------------------------------------------------------------------

#: the fine-tuning learning-rate groups a method's blocks may join (``finetune.param_groups``:
#: ``lr·factor_lr`` and ``lr·cp_lr``)
LR_GROUPS = ("factor", "cp")
#: names that are not methods (``--method auto`` and ``-m none``)
RESERVED = ("auto", "none")


class Method:
    """A factorization method (the module docstring says how to register one).

    Shapes: a conv weight is ``[N, M/g, *kernel]`` (N output and M input channels, g groups,
    K = prod(kernel)); a Linear weight is ``[N, M]`` (g = 1, K = 1). ``ranks`` and
    ``options`` are the JSON dicts of a plan entry (:class:`bscompress.core.plan.LayerPlan`):
    ``build`` and ``structure`` must rebuild the same block from them alone.

    Class attributes:
        name: what ``--method`` and the plan call it; the archive key of its structure.
        layers: the block types it builds: a built block finds its method by its type
            (:func:`block_method`), the first registered method of that type.
        in_auto: one of the methods ``--method auto`` chooses among, per layer.
        pointwise: it takes 1×1 convs and Linear layers: when no method of ``auto`` may
            rewrite such a layer, its skip reason is the one the plan gives.
        energy_supported: ``RankOptions.energy`` applies (it has singular values).
        lr_group: the fine-tuning learning-rate group of its blocks, one of
            :data:`LR_GROUPS` (``"factor"``: ``lr·factor_lr``; ``"cp"``: ``lr·cp_lr``).
        spatial_kernels: its blocks hold single-channel spatial kernels (blueprints):
            fixed kernels count a block of it whose :meth:`spatial_stage` is not a
            depthwise conv as unsupported (left alone).
        closed_form_fit: the plan's ``fit`` note of the closed-form (data-free) block.
    """

    name: str = ""
    layers: tuple[type[nn.Module], ...] = ()
    in_auto: bool = False
    pointwise: bool = False
    energy_supported: bool = True
    lr_group: str = "factor"
    spatial_kernels: bool = False
    closed_form_fit: str = "svd"

    def __init_subclass__(cls, name: str | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:  # ``class X(Method, name="x")``: registered with no arguments
            cls.name = name
            register(cls())

    # -- eligibility ----------------------------------------------------------------------

    def handles(self, module: nn.Module) -> bool:
        """Whether the method considers ``module`` at all (default: every conv)."""
        return isinstance(module, nn.modules.conv._ConvNd)

    def skip_reason(self, name: str, module: nn.Module, options: Eligibility,
                    first: bool) -> str | None:
        """Why the layer ``name`` (one ``handles`` took; ``first``: the model's first conv)
        stays as it is, or ``None`` (default: :func:`bscompress.core.surgery.skip_reason`)."""
        return skip_reason(name, module, options, first)

    # -- ranks ----------------------------------------------------------------------------

    def choose(self, module: nn.Module, options: RankOptions) -> tuple[dict, dict]:
        """``(ranks, options)`` of the layer's plan entry, from the user's ``options``
        (cheap: spectra at most, no block built)."""
        raise NotImplementedError

    def candidates(self, module: nn.Module, options: RankOptions,
                   errors: bool = True) -> list[tuple[dict, dict, float]]:
        """Every form the budget allocator may give the layer: ``(ranks, options, error)``,
        the error being the relative weight error ‖W − Ŵ‖²_F / ‖W‖²_F of that form.

        ``errors=False``: the caller measures the errors itself (data-aware or network
        errors); a method whose errors cost a fit each (CP) may then return NaN. A method
        that does not override this does not support ``--budget``."""
        raise NotImplementedError

    @property
    def budgetable(self) -> bool:
        """Whether the method offers budget candidates (overrides :meth:`candidates`)."""
        return type(self).candidates is not Method.candidates

    def candidate_options(self, options: dict) -> dict:
        """The options a budget candidate is fitted with to measure its error (data-aware or
        network error) from the entry's ``options``; a new dict when changed, as the
        allocator keeps the candidate's own (default: unchanged)."""
        return options

    # -- blocks ---------------------------------------------------------------------------

    def build(self, module: nn.Module, entry: LayerPlan) -> tuple[nn.Module, float]:
        """The block of ``entry`` with weights computed in closed form from ``module``'s,
        and its relative weight error ‖W − Ŵ‖²_F / ‖W‖²_F (:func:`relative_error`)."""
        raise NotImplementedError

    def structure(self, module: nn.Module, entry: LayerPlan) -> nn.Module:
        """The block ``build`` makes, without computing weights (archives load them; the
        planner counts its MACs on the meta device)."""
        raise NotImplementedError

    def held_out_errors(self, module: nn.Module, entry: LayerPlan, rest: PatchCovariance,
                        held_sigma: torch.Tensor) -> tuple[float, float] | None:
        """``(data-free, data-aware)`` output errors e(Ŵ) on the held-out Σ ``held_sigma``
        ``[g, D, D]`` of ``entry``'s block, closed form and fitted on ``rest``
        (:meth:`fit_data_aware` at the cheapest refit), where the method has them for every
        rank of a layer at once; ``None`` (the default): the caller builds, fits and scores
        each candidate."""
        return None

    def fit_data_aware(self, original: nn.Module, block: nn.Module, cov: PatchCovariance,
                       weight: torch.Tensor, als_iters: int) -> str:
        """Refit ``block`` (built from ``original``) in place so that its output error on the
        calibration patches, tr((W − Ŵ) Σ (W − Ŵ)ᵀ), is minimised for its structure.

        Args:
            original: the dense layer the block replaces.
            block: the closed-form block (``build``), to refit.
            cov: the statistics of the layer's input patches: ``cov.full``
                ``[g, M/g·K, M/g·K]`` (``None`` over the memory bound) and ``cov.blocks``
                ``[g, M/g, K, K]``, float64
                (:class:`bscompress.core.covariance.PatchCovariance`).
            weight: the target, ``[g, N/g, M/g·K]`` float64 (rows = output channels): the
                layer's weight, or Y Σ⁻¹ in sequential mode (``cov.cross`` = Y set).
            als_iters: rounds of alternating refits, for the methods that alternate; 0
                asks for the cheapest refit the method has (budget candidates are measured
                so: BSConv-U refits its blueprints alone).

        Returns:
            A short note for the plan's ``fit`` (``"whitened svd"``, ``"pw2 refit"`` …;
            :data:`DATA_FREE` when the block was left as built).
        """
        raise BadInput(f"method {self.name!r} has no data-aware fit: drop --calib, or "
                       "choose another method")

    def spatial_stage(self, block: nn.Module) -> str | None:
        """The path inside ``block`` of its spatial stage when that is one conv of
        single-channel kernels (a depthwise stage, which fixed kernels may fix), else
        ``None`` (default)."""
        return None


class ConvMethod(Method):
    """A method for k×k convs whose errors are read from a spectrum: rank r (``{"rank": r}``)
    from 1 to :meth:`full_rank`, relative error of rank r = the dropped share of the squared
    spectrum, block = ``layer.from_conv(conv, rank=r, **options)`` /
    ``layer.empty_like(...)``. Subclasses give ``layers`` (the first is built),
    :meth:`spectrum` and :meth:`full_rank`, and override what differs."""

    @property
    def layer(self) -> type[nn.Module]:
        """The block type ``build`` and ``structure`` make."""
        return self.layers[0]

    def spectrum(self, conv: nn.Module) -> torch.Tensor:
        """Singular values ``[..., full_rank]`` (descending on the last dimension) whose
        dropped squares, summed over the leading dimensions, are the truncation error."""
        raise NotImplementedError

    def full_rank(self, conv: nn.Module) -> int:
        """The rank at which the block is exact."""
        raise NotImplementedError

    def choose(self, conv, options):
        full = self.full_rank(conv)
        if options.energy is not None:
            rank = rank_for_energy(self.spectrum(conv), options.energy)
        else:
            rank = options.rank or 1
        return {"rank": min(rank, full)}, pad_options(conv)

    def candidates(self, conv, options, errors=True):
        """Every rank 1 … full, with the relative weight error from the singular values
        (exact for the SVD forms); they cost nothing, so ``errors`` is ignored."""
        spectrum_errors = relative_errors(self.spectrum(conv))
        pad = pad_options(conv)
        return [({"rank": r}, dict(pad), float(spectrum_errors[r]))
                for r in range(1, self.full_rank(conv) + 1)]

    def build(self, conv, entry):
        view, options = plain_view(conv, entry)
        block = self.layer.from_conv(view, **entry.ranks, **options)
        return block, relative_error(conv.weight, block.to_dense())

    def structure(self, conv, entry):
        view, options = plain_view(conv, entry)
        return self.layer.empty_like(view, **entry.ranks, **options)


# -- the registry -------------------------------------------------------------------------

#: every registered method by name, in registration order (``--method auto`` and the help
#: texts follow it)
METHODS: dict[str, Method] = {}
#: block type → the first registered method building it
_BLOCKS: dict[type, Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` available to ``decompose`` (by its name) and to archive loading.

    Registering another method under a registered name replaces it in place.

    Raises:
        ValueError: no name, a reserved name (``auto``, ``none``) or one another rewrite
            (CondConv, fixed kernels) uses, or an unknown ``lr_group``.
    """
    name = method.name
    if not name or name in RESERVED:
        raise ValueError(f"a method needs a name other than {', '.join(RESERVED)}, got "
                         f"{name!r}")
    if name not in METHODS and name in registered_methods():
        raise ValueError(f"{name!r} already names another rewrite of archives")
    if method.lr_group not in LR_GROUPS:
        raise ValueError(f"method {name!r}: lr_group must be one of {', '.join(LR_GROUPS)}, "
                         f"got {method.lr_group!r}")
    METHODS[name] = method
    register_structure(name, method.structure)
    _index_blocks()
    return method


def unregister(name: str) -> Method:
    """Take the method ``name`` away again (its archives no longer load); returns it."""
    method = METHODS.pop(name)
    unregister_structure(name)
    _index_blocks()
    return method


def _index_blocks() -> None:
    _BLOCKS.clear()
    for method in METHODS.values():
        for layer in method.layers:
            _BLOCKS.setdefault(layer, method)


def get_method(name: str) -> Method:
    """The method called ``name``; :class:`BadInput` listing the known ones otherwise."""
    if name not in METHODS:
        raise BadInput(f"--method {name!r} is unknown; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def block_method(block: nn.Module) -> Method | None:
    """The method that builds blocks of ``block``'s type (or of its nearest registered base
    class), or ``None`` for any other module."""
    for cls in type(block).__mro__:
        if cls in _BLOCKS:
            return _BLOCKS[cls]
    return None


def auto_methods() -> tuple[str, ...]:
    """The names of the methods ``--method auto`` chooses among, in registration order."""
    return tuple(name for name, method in METHODS.items() if method.in_auto)


def lr_group(name: str | None) -> str:
    """The learning-rate group of the blocks of the plan method ``name``: its
    ``lr_group``, ``"factor"`` for the other rewrites (CondConv, fixed kernels)."""
    method = METHODS.get(name or "")
    return method.lr_group if method is not None else "factor"

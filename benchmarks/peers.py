"""The peers bscompress is measured against, each brought to a whole-model MAC budget.

Every function takes the trained model (left untouched), the fraction of its MACs to keep
and the input shape ``[1, C, H, W]``, and returns ``(model, note)``: a new model at or just
under the budget (the closest the peer's own knobs get) and a short note on what was done.

* ``tensorly_torch``: tensorly-torch's ``FactorizedConv.from_conv`` (Tucker or CP, the
  ``factorized`` implementation) on the layers bscompress would rewrite, at the largest rank
  fraction within the budget (bisection on the structure, then one decomposition).
* ``torch_pruning``: Torch-Pruning's ``MetaPruner`` with L1 filter magnitude
  (``MagnitudeImportance(p=1)``, Li et al. 2017), one uniform channel ratio for every
  prunable group, the classifier's outputs kept, bisected to the MAC budget.
* ``bsconv_scratch``: the reference BSConv replacer (``bsconv`` package) on every 3×3/5×5
  conv, BSConv-U when it is within the budget, else BSConv-S with its ``p`` bisected, and
  every weight re-initialised: the from-scratch baseline of the BSConv paper.

``pip install -e '.[peers]'`` installs all three.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import nn

from bscompress.core.stats import module_macs
from bscompress.core.surgery import eligibility, replace_modules


def macs(model: nn.Module, shape: list[int]) -> int:
    return module_macs(model.eval(), shape).macs


def bisect(build: Callable[[float], nn.Module], fraction: float, shape: list[int],
           total: int, lo: float, hi: float, fits_high: bool, steps: int = 12) -> float:
    """The knob value in ``[lo, hi]`` closest to the budget that keeps the model within it;
    ``fits_high``: whether high values give fewer MACs (pruning ratios) or more (ranks)."""
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        within = macs(build(mid), shape) <= fraction * total
        if within:
            best = mid
        if within != fits_high:
            lo = mid
        else:
            hi = mid
    if best is None:
        raise RuntimeError(f"no setting within [{lo}, {hi}] reaches {fraction:.0%} of the MACs")
    return best


def tensorly_torch(base: nn.Module, fraction: float, shape: list[int],
                   factorization: str) -> tuple[nn.Module, str]:
    """tensorly-torch factorized convs on bscompress's eligible layers."""
    import tltorch

    eligible = {name for name, reason in eligibility(base).items() if reason is None}
    total = macs(base, shape)

    def convert(rank: float, weights: bool = False) -> nn.Module:
        model = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            replace_modules(model, lambda name, _m: name in eligible,
                            lambda _n, conv: tltorch.FactorizedConv.from_conv(
                                conv, rank=rank, factorization=factorization,
                                implementation="factorized", decompose_weights=weights))
        return model.eval()

    rank = bisect(convert, fraction, shape, total, 0.005, 1.0, fits_high=False, steps=10)
    return convert(rank, True), f"rank={rank:.3f} on {len(eligible)} convs"


def _classifier(model: nn.Module) -> list[nn.Module]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def torch_pruning(base: nn.Module, fraction: float, shape: list[int]) -> tuple[nn.Module, str]:
    """Torch-Pruning, L1 magnitude, one channel ratio for the whole model."""
    import torch_pruning as tp

    example = torch.randn(shape)
    total = macs(base, shape)

    def prune(ratio: float) -> nn.Module:
        model = copy.deepcopy(base).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MetaPruner(
                model, example, importance=tp.importance.MagnitudeImportance(p=1),
                pruning_ratio=ratio, ignored_layers=_classifier(model))
            pruner.step()
        return model

    ratio = bisect(prune, fraction, shape, total, 0.0, 0.95, fits_high=True)
    return prune(ratio), f"channel ratio {ratio:.3f} pruned (L1 magnitude)"


def bsconv_scratch(base: nn.Module, fraction: float, shape: list[int],
                   seed: int = 0) -> tuple[nn.Module, str]:
    """The ``bsconv`` replacer on the same architecture, randomly initialised."""
    import bsconv.pytorch

    total = macs(base, shape)

    def replace(p: float | None) -> nn.Module:
        replacer = (bsconv.pytorch.BSConvU_Replacer() if p is None
                    else bsconv.pytorch.BSConvS_Replacer(p=p))
        return replacer.apply(copy.deepcopy(base))

    model, note = replace(None), "BSConv-U replacer"
    if macs(model, shape) > fraction * total:
        p = bisect(replace, fraction, shape, total, 0.01, 1.0, fits_high=False, steps=10)
        model, note = replace(p), f"BSConv-S replacer, p={p:.3f}"
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model.eval(), note + ", random init"


#: name → function(trained model, MAC fraction, input shape) → (model, note)
PEERS: dict[str, Callable[[nn.Module, float, list[int]], tuple[nn.Module, str]]] = {
    "tltorch-tucker": lambda b, f, s: tensorly_torch(b, f, s, "tucker"),
    "tltorch-cp": lambda b, f, s: tensorly_torch(b, f, s, "cp"),
    "torch-pruning": torch_pruning,
    "bsconv-scratch": bsconv_scratch,
}

"""A method is a plug-in: a toy method defined here, outside the package (its math, its layer
and its plug-in, and no edit anywhere else), works under ``decompose`` with fixed ranks, a
budget, calibration (data-aware fit), archives, fine-tuning parameter groups and ONNX export.

The toy: rank-r SVD of the kernel matrix W ``[N, M·K]`` = U S Vᵀ as a k×k conv M→r (rows of
Vᵀ, the conv's geometry) followed by a 1×1 conv r→N (U·S, the bias). Exact at
r = min(N, M·K); its relative weight error at rank r is the dropped share of S².
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bscompress.compress import decomposition
from bscompress.compress.calibrate import collect_patch_covariances
from bscompress.compress.data_aware import grouped, grouped_weight
from bscompress.compress.decomposition import Budget, decompose
from bscompress.core.covariance import centred, output_sigma
from bscompress.core.errors import BadInput
from bscompress.core.padding import pad_options
from bscompress.core.recipe import Optimizer
from bscompress.core.surgery import registered_methods
from bscompress.demo import fmnist_resnet
from bscompress.deploy.export import export_onnx
from bscompress.factorize.gsvd import relative_output_error, whitened_lowrank
from bscompress.io.arch import ArchSpec
from bscompress.io.archive import load, save_archive
from bscompress.layers.base import ConvGeometry, spatial_conv
from bscompress.methods import (
    METHODS,
    Method,
    RankOptions,
    get_method,
    plain_view,
    register,
    relative_error,
    set_weight,
    unregister,
)
from bscompress.train.finetune import param_groups
from bscompress.transforms.fixed_kernels import FixedKernelOptions, fix_kernels

NAME = "toy-svd"
ARCH = ArchSpec("bscompress.demo:fmnist_resnet", {"widths": [8, 16, 16], "blocks": [1, 1, 1]})
SHAPE = (1, 1, 28, 28)


# -- the math (in the package it would live in bscompress/factorize/) -----------------------


def kernel_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of the kernel matrix ``W[N, M·K]`` in float64: ``(U [N, R], S [R], Vᵀ [R, M·K])``,
    R = min(N, M·K)."""
    return torch.linalg.svd(weight.detach().to(torch.float64).reshape(weight.shape[0], -1),
                            full_matrices=False)


def dropped_energy(s: torch.Tensor, rank: int) -> float:
    """Relative error of the rank-``rank`` truncation: Σ_{j ≥ r} S_j² / Σ S_j²."""
    return float(s[rank:].square().sum() / s.square().sum())


def full_rank(conv: nn.Module) -> int:
    return min(conv.weight.shape[0], conv.weight[0].numel())


# -- the layer (in the package: bscompress/layers/) -----------------------------------------


class KernelLowRank(nn.Module):
    """``spatial``: k×k conv M→r (the original conv's geometry, no bias), then ``pw``: 1×1
    conv r→N (the original bias). ``[B, M, H, W]`` → ``[B, N, H', W']`` like the conv."""

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.spatial = spatial_conv(ConvGeometry.of(conv), conv.in_channels, rank, groups=1,
                                    bias=False)
        self.pw = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None)
        self.to(device=conv.weight.device, dtype=conv.weight.dtype)

    @classmethod
    def empty_like(cls, conv: nn.Conv2d, rank: int) -> KernelLowRank:
        """The structure ``from_conv`` builds (rank clipped to full), weights not computed."""
        return cls(conv, min(rank, full_rank(conv)))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int) -> KernelLowRank:
        block = cls.empty_like(conv, rank)
        u, s, vh = kernel_svd(conv.weight)
        r = block.rank
        with torch.no_grad():
            block.spatial.weight.copy_(vh[:r].reshape(block.spatial.weight.shape))
            block.pw.weight.copy_((u[:, :r] * s[:r]).reshape(block.pw.weight.shape))
            if conv.bias is not None:
                block.pw.bias.copy_(conv.bias)
        return block

    def to_dense(self) -> torch.Tensor:
        """The equivalent dense weight ``[N, M, kh, kw]``."""
        dense = self.pw.weight.flatten(1) @ self.spatial.weight.flatten(1)
        return dense.reshape(-1, *self.spatial.weight.shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.spatial(x))


# -- the plug-in (in the package: bscompress/methods/) --------------------------------------


class ToySVD(Method):
    """Rank-r SVD of the kernel matrix, for ungrouped Conv2d layers."""

    name = NAME
    layers = (KernelLowRank,)

    def skip_reason(self, name, module, options, first):
        reason = super().skip_reason(name, module, options, first)
        if reason is None and (not isinstance(module, nn.Conv2d) or module.groups != 1):
            return f"{self.name} takes ungrouped Conv2d layers"
        return reason

    def choose(self, conv, options):
        return {"rank": min(options.rank or 1, full_rank(conv))}, pad_options(conv)

    def candidates(self, conv, options, errors=True):
        _, s, _ = kernel_svd(conv.weight)
        return [({"rank": r}, pad_options(conv), dropped_energy(s, r))
                for r in range(1, full_rank(conv) + 1)]

    def build(self, conv, entry):
        block = KernelLowRank.from_conv(plain_view(conv, entry)[0], entry.ranks["rank"])
        return block, relative_error(conv.weight, block.to_dense())

    def structure(self, conv, entry):
        return KernelLowRank.empty_like(plain_view(conv, entry)[0], entry.ranks["rank"])

    def fit_data_aware(self, original, block, cov, weight, als_iters):
        """Whitened SVD: the rank-r optimum of tr((W − Ŵ) Σ (W − Ŵ)ᵀ)."""
        left, right, _ = whitened_lowrank(weight, output_sigma(cov), block.rank)
        set_weight(block.spatial.weight, right[0].T)  # weight: [g, N/g, M/g·K], here g = 1
        set_weight(block.pw.weight, left[0])
        return "whitened svd"


# -- the tests ------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread for these tests (small SVDs on a loaded 2-core machine run orders of
    magnitude slower with two), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def toy():
    """The toy registered for one test, and gone afterwards."""
    method = register(ToySVD())
    try:
        yield method
    finally:
        unregister(NAME)
    assert NAME not in METHODS and NAME not in registered_methods()


def _model() -> nn.Module:
    """The demo ResNet, small, with random BatchNorm statistics (the zero-initialised last BN of
    each residual branch would hide its convs)."""
    torch.manual_seed(0)
    model = fmnist_resnet(**ARCH.kwargs)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _x(batch: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, *SHAPE[1:], generator=torch.Generator().manual_seed(seed))


def _dense_like(conv: nn.Conv2d, weight: torch.Tensor) -> nn.Conv2d:
    dense = copy.deepcopy(conv)
    with torch.no_grad():
        dense.weight.copy_(weight)
    return dense


def test_fixed_rank_is_exact_at_full_rank_and_drops_the_singular_values(toy):
    original = _model()
    exact, plan = decompose(copy.deepcopy(original), NAME, SHAPE,
                            RankOptions(rank=10**6, allow_growth=True))
    replaced = plan.replaced()
    assert replaced and {e.method for e in replaced} == {NAME}
    assert {e.name for e in plan.layers if e.skip_reason is None} == {e.name for e in replaced}
    x = _x()
    assert torch.allclose(exact(x), original(x), atol=1e-4, rtol=1e-4)
    assert all(e.predicted_error < 1e-10 for e in replaced)

    model, plan = decompose(copy.deepcopy(original), NAME, SHAPE, RankOptions(rank=2))
    modules = dict(original.named_modules())
    assert plan.replaced()
    for entry in plan.replaced():
        conv, block = modules[entry.name], model.get_submodule(entry.name)
        assert isinstance(block, KernelLowRank) and entry.ranks == {"rank": 2}
        _, s, _ = kernel_svd(conv.weight)
        assert entry.predicted_error == pytest.approx(dropped_energy(s, 2), rel=1e-5)
        # the oracle: a dense conv holding the block's weight
        inputs = torch.randn(2, conv.in_channels, 9, 9)
        assert torch.allclose(block(inputs), _dense_like(conv, block.to_dense())(inputs),
                              atol=1e-5)
        assert entry.fit == "svd"


def test_a_budget_allocates_the_toys_ranks(toy):
    model, plan = decompose(_model(), NAME, SHAPE, RankOptions(), budget=Budget("macs", 0.5))
    budget = plan.summary.budget
    assert budget.achieved <= 0.5 * plan.summary.macs_before
    assert plan.summary.macs_after <= 0.5 * plan.summary.macs_before + 1
    assert plan.replaced() and {e.method for e in plan.replaced()} == {NAME}
    assert len({e.ranks["rank"] for e in plan.replaced()}) > 1  # allocated, not uniform
    assert NAME not in decomposition.AUTO_METHODS  # not ``in_auto``: auto leaves it alone


def test_calibration_uses_the_toys_data_aware_fit(toy):
    original = _model()
    torch.manual_seed(2)
    calib = [torch.randn(16, *SHAPE[1:]) for _ in range(2)]
    model, plan = decompose(copy.deepcopy(original), NAME, SHAPE, RankOptions(rank=2),
                            calibration=calib, holdout=0)
    assert plan.replaced()
    names = [e.name for e in plan.replaced()]
    covs = collect_patch_covariances(original, calib, names)
    modules = dict(original.named_modules())
    for entry in plan.replaced():
        assert entry.fit.startswith("whitened svd, centred")  # mean error → the BatchNorm
        conv = modules[entry.name]
        free, _ = toy.build(conv, entry)
        free_error = relative_output_error(grouped_weight(conv), grouped(free.to_dense(), 1),
                                           output_sigma(centred(covs[entry.name])))
        assert entry.output_error <= free_error + 1e-9  # the optimum under Σ
    # with a budget, the candidates are charged their data-aware errors
    _, plan = decompose(copy.deepcopy(original), NAME, SHAPE, RankOptions(),
                        budget=Budget("macs", 0.6), calibration=calib)
    assert plan.replaced() and plan.summary.budget.error.startswith("held-out")


def test_a_method_without_a_data_aware_fit_says_so(toy):
    class NoFit(ToySVD, name="toy-nofit"):  # registered by subclassing
        fit_data_aware = Method.fit_data_aware

    try:
        assert get_method("toy-nofit").name == "toy-nofit"
        with pytest.raises(BadInput, match="'toy-nofit' has no data-aware fit"):
            decompose(_model(), "toy-nofit", SHAPE, RankOptions(rank=2),
                      calibration=[torch.randn(16, *SHAPE[1:])], holdout=0)
    finally:
        unregister("toy-nofit")


def test_registration_by_subclassing_joins_auto(toy):
    class AutoToy(ToySVD, name="toy-auto"):
        in_auto = True

    try:
        assert decomposition.AUTO_METHODS[-1] == "toy-auto"
        _, plan = decompose(_model(), "auto", SHAPE, RankOptions(cp_iters=5),
                            budget=Budget("macs", 0.5))
        assert plan.replaced()
    finally:
        unregister("toy-auto")
    assert "toy-auto" not in decomposition.AUTO_METHODS
    assert decomposition.AUTO_METHODS == ("bsconv-u", "dsc", "tucker2", "cp", "cp4", "svd")


def test_archives_fine_tuning_fixed_kernels_and_export(toy, tmp_path):
    model, plan = decompose(_model(), NAME, SHAPE, RankOptions(rank=3))
    x = _x()
    # archives: the plan rebuilds the toy's blocks, the weights load into them
    path = save_archive(tmp_path / "toy.bsc.pt", model, ARCH, plan)
    reloaded = load(path)
    assert isinstance(reloaded.get_submodule(plan.replaced()[0].name), KernelLowRank)
    assert torch.equal(reloaded(x), model(x))
    # fine-tuning: the toy's blocks train in the factor group
    groups = param_groups(model, plan, Optimizer(lr=0.1, factor_lr=0.5, cp_lr=0.25))
    toy_params = {id(p) for e in plan.replaced()
                  for p in model.get_submodule(e.name).parameters()}
    factor = {id(p) for g in groups if g["name"].startswith("factor") for p in g["params"]}
    assert toy_params and toy_params <= factor
    assert all(g["lr"] == pytest.approx(0.05) for g in groups if g["name"].startswith("factor"))
    # fixed kernels: the toy's blocks have no depthwise stage and are left alone
    _, fixed = fix_kernels(copy.deepcopy(model), copy.deepcopy(plan), SHAPE,
                           FixedKernelOptions("bank", 0.5))
    assert fixed.summary.fixed_kernels.unsupported_blocks == 0
    assert all(not e.modifiers for e in fixed.layers if e.method == NAME)
    # export: ONNX with parity
    report = export_onnx(model, SHAPE, tmp_path / "toy.onnx")
    assert report.passed

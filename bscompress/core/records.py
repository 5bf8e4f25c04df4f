"""What a rewrite did to the whole model: typed records that one place serialises.

A :class:`~bscompress.core.plan.Plan` holds per-layer entries and one :class:`Summary` of the
whole model. Each step writes its own record into the summary — planning the totals and the
method, the budget allocator a :class:`BudgetRecord`, the latency guard a
:class:`GuardRecord`, calibration a :class:`CalibrationRecord`, block reconstruction a
:class:`ReconstructionRecord`, VGNet's fixed kernels a :class:`FixedKernelsRecord`, CondConv
upcycling an :class:`UpcycleRecord` — and the report, the JSON output and the archive read
them back from there.

On disk the summary is the plan's ``meta`` object, with the same keys as the untyped dict it
replaces, so archives written before and after read alike. An archive is untrusted data:
:meth:`Summary.from_dict` validates every field (a tampered value raises ``ValueError``
naming it) and keeps keys it does not know (newer writers) as they are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class Record(BaseModel):
    """A validated, mutable record; unknown keys are kept and written back."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, without the optional fields left unset (``None``)."""
        return self.model_dump(mode="json", exclude_none=True)


class BudgetRecord(Record):
    """A whole-model budget (``planning._allocate``).

    ``target`` and ``achieved`` are in the budget's unit (MACs, parameters or milliseconds),
    summed over the candidates as priced; ``error`` names what the allocation minimised.
    Latency budgets only: ``goal`` (fraction × the whole model's ms), ``predicted`` (the
    chosen structure timed whole), ``measured`` (the built model timed whole) and the
    ``runtime`` timed in."""

    kind: str
    fraction: float
    target: float
    achieved: float
    error: str = "relative weight error"
    goal: float | None = None
    predicted: float | None = None
    measured: float | None = None
    runtime: str | None = None
    #: candidate forms with widths under ``round_to`` offered because those rounded up to it
    #: could not reach the budget (``planning._allocate``)
    under_block: int | None = None


class GuardRecord(Record):
    """The latency guard (``guard.LatencyGuard``): where it timed, at which batches, how many
    candidate blocks it timed and left out for being slower than their layer, and, with the
    model built, the time ratios (compressed ÷ original, per batch as a string key) of each
    replaced layer and of the whole model."""

    runtime: str
    batches: list[int]
    #: the share of a block's MAC saving it had to save in time (``guard.time_bound``)
    share: float = 0.0
    checked: int = 0
    rejected: int = 0
    layers: dict[str, dict[str, float]] = {}
    whole: dict[str, float] = {}
    #: candidate blocks kept untimed because the timer failed on them or their layer, and
    #: the first failure (also set when the whole model could not be timed)
    untimed: int = 0
    untimed_why: str | None = None


class SensitivityRecord(Record):
    """``--sensitivity``: candidates measured now (the others came from ``cache``)."""

    measured: int
    cache: str | None = None


class CalibrationRecord(Record):
    """``--calib``: the statistics and the BatchNorm correction.

    ``batchnorm`` is ``{"corrected": n, "held_out_error": {"before": e0, "after": e1},
    "kept": bool}``, with ``"in_sample": True`` where the errors are on the calibration
    batches themselves (``batchnorm.correct_batchnorm_checked``); ``data``, ``split`` and
    ``samples`` describe the calibration set where the command line or a recipe knows it;
    ``repeated`` counts its samples left out as copies of others."""

    layers: int
    full_covariance_layers: int
    covariance_mb: float
    batchnorm_reestimated: int = 0
    batchnorm: dict[str, Any] = {}
    als_iters: int | None = None
    sequential: bool = False
    data: str | None = None
    split: str | None = None
    samples: int | None = None
    #: samples left out as byte-for-byte copies of others (``calibrate.distinct_samples``)
    repeated: int | None = None
    #: samples held out to choose between the fits (0: too few to hold any out, or
    #: ``holdout`` 0)
    held_out_samples: int | None = None
    #: the share of the calibration batches asked to be held out (``--holdout``)
    holdout: float | None = None


@dataclass
class BlockResult:
    """One block's reconstruction (``reconstruct.reconstruct``): its relative error
    ‖B_θ(x̂) − B(x)‖²/‖B(x)‖² on the cached samples before and after (and on the held-out
    samples, when there are any), and whether it was restored because it got worse (on the
    held-out samples when there are any); ``skipped``: why it was not reconstructed."""

    name: str
    layers: list[str]
    samples: int = 0
    error_before: float | None = None
    error_after: float | None = None
    held_out_before: float | None = None
    held_out_after: float | None = None
    restored: bool = False
    skipped: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class ReconstructionRecord(Record):
    """``--reconstruct``: the options (``reconstruct.ReconstructionOptions``), a
    :class:`BlockResult` per block, the BatchNorm correction measured again on the
    trained blocks (``batchnorm``, as :class:`CalibrationRecord`'s; empty when none ran),
    and the network's relative output error on the held-out batches before and after
    (``network_error``; ``in_sample`` where none were held out): the reconstruction is
    ``kept`` only where it did not rise, else every weight and statistic is restored."""

    steps: int
    lr: float
    blocks: list[BlockResult] = []
    batchnorm: dict[str, Any] = {}
    kept: bool = True
    network_error: dict[str, Any] = {}


class FixedKernelsRecord(Record):
    """VGNet fixed kernels (``fixed_kernels.fix_kernels``): the mode and match threshold,
    the counts of kernels examined and fixed per family, the metric ρ was measured in
    (``inputs``: on calibration data, except the convs of ``weight_metric``, with the reason;
    ``weights``), and the relative change of the model's output,
    Σ‖f(x) − f₀(x)‖² / Σ‖f₀(x)‖², and its top-1 agreement with itself before (classifiers),
    on ``measured_on``."""

    mode: str
    match: float
    kernels: int = 0
    gaussian: int = 0
    edge: int = 0
    identity: int = 0
    negative: int = 0
    layers: int = 0
    dropped_blocks: int = 0
    unsupported_blocks: int = 0
    refused: int = 0
    metric: str = "weights"
    weight_metric: dict[str, str] = {}
    output_change: float | None = None
    agreement: float | None = None
    measured_on: str | None = None


class UpcycleRecord(Record):
    """CondConv upcycling (``upcycle.upcycle``): the options (``upcycle.UpcycleOptions``),
    the convs upcycled, those refused with their reason, and the largest output change on a
    random batch (``bscompress upcycle``)."""

    experts: int
    routing: str
    convs: int
    refused: dict[str, str] = {}
    max_relative_change: float | None = None


class Summary(Record):
    """The whole model before and after, and each step's record (``None`` where the step did
    not run). Stored as the plan's ``meta``."""

    method: str | None = None
    ranks: dict[str, Any] | None = None
    eligibility: dict[str, Any] | None = None
    params_before: int | None = None
    macs_before: int | None = None
    params_after: int | None = None
    macs_after: int | None = None
    latency_before_ms: float | None = None
    budget: BudgetRecord | None = None
    guard: GuardRecord | None = None
    sensitivity: SensitivityRecord | None = None
    calibration: CalibrationRecord | None = None
    reconstruction: ReconstructionRecord | None = None
    fixed_kernels: FixedKernelsRecord | None = None
    upcycle: UpcycleRecord | None = None

    @classmethod
    def from_dict(cls, data: Any) -> Summary:
        """Validate a plan's ``meta`` (an archive's: untrusted).

        Raises:
            ValueError: ``meta`` is not an object, or a field has the wrong type, named.
        """
        if not isinstance(data, dict):
            raise ValueError(f"plan meta is a {type(data).__name__}, not an object")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"plan meta.{where}: {first['msg']}") from None

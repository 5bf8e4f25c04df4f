"""The Plan: one plain-data entry per layer saying what happens to it.

A Plan is JSON-serialisable, printed as the report table, stored in archives, and enough to
rebuild the compressed architecture with :func:`bscompress.core.surgery.apply_plan`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from bscompress.core.records import Summary

#: 1: the first; 2: layer ``modifiers`` (CondConv upcycling, fixed kernels); 3: layer
#: ``statistics`` (degenerate calibration statistics). Older plans are read as they are and
#: written back in the current version.
PLAN_FORMAT_VERSION = 3


@dataclass(frozen=True)
class FitReport:
    """How one layer's block was fitted: what the fit returns, written into the layer's
    :class:`LayerPlan` (its fields of the same names, described there) once the model is
    built. The decisions (method, ranks, options) come from planning; this is the outcome."""

    fit: str
    predicted_error: float
    output_error: float | None = None
    statistics: dict[str, Any] | None = None
    held_out_error: float | None = None


@dataclass
class LayerPlan:
    """What happens to one layer.

    Attributes:
        name: dotted module path in the original model (``layer1.0.conv1``).
        module_type: class name of the original module (``Conv2d``).
        method: the factorization applied (``bsconv-u``, ``dsc``, ...) or ``None`` when the
            layer stays as it is.
        ranks: the ranks of the method, e.g. ``{"rank": 1}`` or ``{"in": 16, "out": 32}``.
        options: further method arguments needed to rebuild the block (e.g. ``{"p": 0.25}``).
        params_before, macs_before: of the original layer (MACs for the plan's input shape).
        params_after, macs_after: of the replacement; ``None`` when not replaced.
        predicted_error: relative weight error ‖W − Ŵ‖²/‖W‖² of the block.
        output_error: relative output error on the calibration inputs,
            tr((W − Ŵ) Σ (W − Ŵ)ᵀ) / tr(W Σ Wᵀ) (``--calib`` only).
        measured_error: relative output error of the replacement inside the compressed
            network, measured on the first 128 calibration samples against the original
            network's layer output (upstream errors included; ``--calib`` only).
        sensitivity: mean KL divergence (nats) of the network's outputs from the original's
            with this layer alone replaced, on the calibration data (``--sensitivity`` only).
        fit: how the weights were computed: ``svd`` (data-free, from the kernel alone) or the
            data-aware step (``whitened svd``, ``als ×2``, ``pw2 refit`` …).
        skip_reason: why the layer was left alone; ``None`` when it was replaced.
        modifiers: changes applied inside the built block after it is built, in order, each a
            dict with a ``kind`` registered by :func:`bscompress.core.surgery.register_modifier`
            (``{"kind": "condconv", "paths": ["pw"], "experts": 4, ...}`` upcycles the block's
            ``pw`` into a CondConv; ``fixed-kernels`` fixes some of its depthwise kernels).
        held_out_error: with ``--calib``, the relative output error of the chosen fit on the
            calibration data held out from its fitting (the honest figure; ``output_error``
            is in-sample), ``None`` without a hold-out.
        statistics: with ``--calib``, what was degenerate about the layer's input statistics,
            ``None`` when nothing was: ``{"dimensions": D, "patches": n, "dead": d,
            "floored": f}`` — patch dimensions D per group, patches averaged n (Σ has rank at
            most min(n, D)), dimensions that were always zero d (dead channels, padding),
            and f solves whose matrix was not numerically positive definite, so that its
            eigenvalues were floored at the ridge instead.
    """

    name: str
    module_type: str
    method: str | None = None
    ranks: dict[str, int] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    params_before: int = 0
    macs_before: int = 0
    params_after: int | None = None
    macs_after: int | None = None
    predicted_error: float | None = None
    output_error: float | None = None
    measured_error: float | None = None
    sensitivity: float | None = None
    fit: str | None = None
    skip_reason: str | None = None
    modifiers: list[dict[str, Any]] = field(default_factory=list)
    statistics: dict[str, Any] | None = None
    held_out_error: float | None = None

    @property
    def replaced(self) -> bool:
        return self.method is not None

    def record(self, fit: FitReport) -> None:
        """Write how the layer's block was fitted into the entry's fields of the same names."""
        for name, value in asdict(fit).items():
            setattr(self, name, value)

    def label(self) -> str:
        """The method with its modifiers, e.g. ``cp + condconv×4(pw1, pw2)``."""
        parts = [self.method or "—"]
        for spec in self.modifiers:
            experts = f"×{spec['experts']}" if "experts" in spec else ""
            paths = ", ".join(spec.get("paths", []))
            parts.append(f"{spec['kind']}{experts}({paths})" if paths else spec["kind"] + experts)
        return " + ".join(parts)


@dataclass
class Plan:
    """An ordered list of :class:`LayerPlan`, the input shape the MACs refer to, and the
    :class:`~bscompress.core.records.Summary` of the whole model (its totals and each step's
    record; the ``meta`` object on disk)."""

    layers: list[LayerPlan] = field(default_factory=list)
    input_shape: list[int] | None = None
    summary: Summary = field(default_factory=Summary)
    format_version: int = PLAN_FORMAT_VERSION

    def replaced(self) -> list[LayerPlan]:
        """The entries whose layer is rewritten."""
        return [entry for entry in self.layers if entry.replaced]

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [asdict(entry) for entry in self.layers],
                "input_shape": self.input_shape, "meta": self.summary.to_dict(),
                "format_version": self.format_version}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Rebuild a Plan from :meth:`to_dict` output (an archive's: untrusted data).

        Raises:
            ValueError: unknown fields, or a field of the wrong type or range, named.
        """
        if not isinstance(data, dict):
            raise ValueError(f"the plan is a {type(data).__name__}, not an object")
        _check_fields(cls, data, "plan", renamed={"summary": "meta"})
        version = data.get("format_version", PLAN_FORMAT_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"plan format_version {version!r} is not a version number")
        if version > PLAN_FORMAT_VERSION:
            raise ValueError(
                f"plan format version {version} is newer than this bscompress understands "
                f"({PLAN_FORMAT_VERSION}); upgrade bscompress"
            )
        raw_layers = data.get("layers", [])
        if not isinstance(raw_layers, list):
            raise ValueError("plan 'layers' must be a list")
        layers = []
        for i, raw in enumerate(raw_layers):
            if not isinstance(raw, dict):
                raise ValueError(f"plan layer {i} is a {type(raw).__name__}, not an object")
            _check_fields(LayerPlan, raw, f"plan layer {raw.get('name', '?')!r}")
            _check_layer(raw, i)
            layers.append(LayerPlan(**raw))
        shape = data.get("input_shape")
        if shape is not None and not (isinstance(shape, (list, tuple)) and shape and all(
                _is_int(s) and s > 0 for s in shape)):
            raise ValueError(f"plan input_shape {shape!r} is not a list of positive integers")
        shape = None if shape is None else list(shape)
        return cls(layers=layers, input_shape=shape,
                   summary=Summary.from_dict(data.get("meta", {})))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_layer(raw: dict[str, Any], index: int) -> None:
    """Type- and range-check one layer entry of an untrusted plan (``ValueError``)."""
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"plan layer {index} has no name")
    what = f"plan layer {name!r}"
    if not isinstance(raw.get("module_type"), str):
        raise ValueError(f"{what}: module_type must be a string")
    method = raw.get("method")
    if method is not None and not isinstance(method, str):
        raise ValueError(f"{what}: method must be a string or null")
    ranks = raw.get("ranks", {})
    if not isinstance(ranks, dict) or not all(
            isinstance(k, str) and _is_int(v) and v >= 1 for k, v in ranks.items()):
        raise ValueError(f"{what}: ranks {ranks!r} must map names to integers ≥ 1")
    if not isinstance(raw.get("options", {}), dict):
        raise ValueError(f"{what}: options must be an object")
    for key in ("params_before", "macs_before", "params_after", "macs_after"):
        value = raw.get(key)
        if value is not None and not (_is_int(value) and value >= 0):
            raise ValueError(f"{what}: {key} {value!r} must be an integer ≥ 0")
    for key in ("predicted_error", "output_error", "measured_error", "sensitivity",
                "held_out_error"):
        value = raw.get(key)
        if value is not None and not _is_number(value):
            raise ValueError(f"{what}: {key} {value!r} must be a number or null")
    for key in ("fit", "skip_reason"):
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{what}: {key} must be a string or null")
    stats = raw.get("statistics")
    if stats is not None and not isinstance(stats, dict):
        raise ValueError(f"{what}: statistics must be an object or null")
    modifiers = raw.get("modifiers", [])
    if not isinstance(modifiers, list) or not all(
            isinstance(m, dict) and isinstance(m.get("kind"), str) for m in modifiers):
        raise ValueError(f"{what}: modifiers must be a list of objects with a string 'kind'")


def _check_fields(cls: type, data: dict[str, Any], what: str,
                  renamed: dict[str, str] | None = None) -> None:
    """Refuse keys that are not fields of ``cls`` (``renamed``: field → its key on disk)."""
    known = {(renamed or {}).get(f.name, f.name) for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{what} has unknown fields {unknown}; known fields are {sorted(known)}")

"""ONNX export with verification: ``onnx.checker`` and ONNX Runtime parity against PyTorch.

The model is exported with the dynamo exporter (opset 18 or newer, a symbolic batch axis
unless ``dynamic_batch=False``), checked with ``onnx.checker.check_model(full_check=True)``,
then run in ONNX Runtime (CPU) on random inputs — at batch 1 and, for a dynamic batch, batch 3 —
and optionally on real samples. A run passes when every output satisfies
``max|ort − torch| ≤ atol + rtol · max|torch|`` (tolerances relative to the output's scale).
The file appears at its path only when it passed, unless ``keep_failed``. Weights over
protobuf's 2 GB limit (or all weights, when asked) go to ``<file>.data`` beside it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bscompress.errors import BadInput, CheckFailed
from bscompress.io import atomic_output_with_companions

MIN_OPSET = 18


@dataclass
class ParityCheck:
    """One comparison of an ONNX output with PyTorch's.

    Attributes:
        inputs: what was fed (``random batch 3``, ``data batch 0`` ...).
        output: output name.
        max_abs_error: ``max|ort − torch|``.
        scale: ``max|torch|``, the scale the relative tolerance refers to.
        bound: ``atol + rtol · scale``.
    """

    inputs: str
    output: str
    max_abs_error: float
    scale: float
    bound: float

    @property
    def passed(self) -> bool:
        return self.max_abs_error <= self.bound


@dataclass
class ExportReport:
    """What ``export_onnx`` wrote and how it was verified."""

    path: str
    opset: int
    dynamic_batch: bool
    input_shape: list[int]
    file_bytes: int = 0
    external_data: str | None = None
    checks: list[ParityCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def worst(self) -> ParityCheck:
        """The check closest to (or furthest past) its bound."""
        return max(self.checks, key=lambda c: c.max_abs_error / max(c.bound, 1e-30))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["passed"] = self.passed
        for item, check in zip(data["checks"], self.checks, strict=True):
            item["passed"] = check.passed
        return data


def _export(model: nn.Module, example: torch.Tensor, path: Path, opset: int,
            dynamic_batch: bool, external_data: bool | None) -> None:
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                model, (example,), dynamo=True, opset_version=opset,
                dynamic_shapes=dynamic_shapes, input_names=["input"], verbose=False,
            )
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckFailed(f"torch.onnx.export failed: {first}") from err
    # external data when asked, or when the weights pass protobuf's 2 GB limit (None)
    program.save(str(path), external_data=external_data)


def _run_parity(
    model: nn.Module, session, batches: Sequence[tuple[str, torch.Tensor]], rtol: float,
    atol: float,
) -> list[ParityCheck]:
    names = [o.name for o in session.get_outputs()]
    checks = []
    for label, x in batches:
        with torch.inference_mode():
            expected = model(x)
        if isinstance(expected, torch.Tensor):
            expected = [expected]
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        for name, ref, out in zip(names, expected, got, strict=False):
            ref = ref.detach().float().numpy()
            err = float(np.abs(out.astype(np.float32) - ref).max()) if ref.size else 0.0
            scale = float(np.abs(ref).max()) if ref.size else 0.0
            checks.append(ParityCheck(label, name, err, scale, atol + rtol * scale))
    return checks


def export_onnx(
    model: nn.Module,
    input_shape: Sequence[int],
    path: str | Path,
    *,
    opset: int = MIN_OPSET,
    dynamic_batch: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    samples: torch.Tensor | None = None,
    keep_failed: bool = False,
    force: bool = False,
    inputs: tuple[str | Path, ...] = (),
    seed: int = 0,
    external_data: bool | None = None,
) -> ExportReport:
    """Export ``model`` to ONNX at ``path`` and verify it.

    Args:
        model: the model (exported from CPU, in eval mode, float32).
        input_shape: example input shape with batch (the batch axis is symbolic unless
            ``dynamic_batch=False``).
        opset: ONNX opset, at least 18.
        rtol, atol: parity tolerances, relative to each output's scale.
        samples: optional real inputs ``[B, *input_shape[1:]]`` checked too (in batches of 64).
        keep_failed: keep the file when parity fails.
        force: overwrite an existing ``path``; ``inputs`` are never overwritten.
        external_data: write the weights to ``<path>.data`` beside the graph; ``None``: only
            when they exceed protobuf's 2 GB limit.

    Raises:
        BadInput: bad opset or output path.
        CheckFailed: export, ``onnx.checker`` or parity failed (names the worst output).
    """
    import onnx
    import onnxruntime as ort

    if opset < MIN_OPSET:
        raise BadInput(f"--opset {opset}: bscompress exports opset {MIN_OPSET} or newer")
    path = Path(path)
    model = model.cpu().float().eval()
    shape = [int(s) for s in input_shape]
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(shape, generator=generator)
    batches = [(f"random batch {shape[0]}", example)]
    if dynamic_batch:
        batches.append(("random batch 3", torch.randn([3, *shape[1:]], generator=generator)))
    if samples is not None:
        for i, start in enumerate(range(0, len(samples), 64)):
            batches.append((f"data batch {i}", samples[start:start + 64].float()))
    report = ExportReport(str(path), opset, dynamic_batch, shape)
    with atomic_output_with_companions(path, force=force, inputs=inputs) as tmp:
        _export(model, example, tmp, opset, dynamic_batch, external_data)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as err:
            raise CheckFailed(f"onnx.checker rejected the exported model: {err}") from err
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        report.checks = _run_parity(model, session, batches, rtol, atol)
        data = tmp.with_name(tmp.name + ".data")
        report.file_bytes = tmp.stat().st_size + (data.stat().st_size if data.exists() else 0)
        if data.exists():
            report.external_data = str(path.with_name(data.name))
        if not report.passed and not keep_failed:
            raise CheckFailed(_failure(report) + "; the file was not kept (--keep-failed "
                              "keeps it)")
    if not report.passed:
        raise CheckFailed(_failure(report) + f"; kept {path} as asked")
    return report


def _failure(report: ExportReport) -> str:
    worst = report.worst()
    return (f"ONNX Runtime output {worst.output!r} differs from PyTorch on {worst.inputs}: "
            f"max abs error {worst.max_abs_error:.3g} > {worst.bound:.3g} (atol + rtol × "
            f"output scale {worst.scale:.3g})")

"""ONNX export with verification: ``onnx.checker`` and ONNX Runtime parity against PyTorch.

The model is exported with the dynamo exporter (opset 18 up to :func:`max_opset`, checked
before any work and in the written file; a symbolic batch axis unless
``dynamic_batch=False``; every tensor of a tuple, list or dict output becomes an output),
checked with ``onnx.checker.check_model(full_check=True)``, then run in ONNX Runtime (CPU) on
random inputs — at batch 1 and, for a dynamic batch, batch 3 — and optionally on real
samples. A run passes when every output satisfies
``max|ort − torch| ≤ atol + rtol · max|torch|`` (tolerances relative to the output's scale).
The file appears at its path only when it passed, unless ``keep_failed``. Weights over
protobuf's 2 GB limit (or all weights, when asked) go to ``<file>.data`` beside it.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bscompress.core.errors import BadInput, CheckFailed
from bscompress.core.files import ONNX_SUFFIXES, atomic_output_with_companions, check_output_path
from bscompress.core.recipe import MIN_OPSET, Export, max_opset, validate_section
from bscompress.core.stats import check_input_shape, evaluating, example_input

#: terminal colour codes, removed from the messages of other libraries
ANSI = re.compile(r"\x1b\[[0-9;]*m")


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
    atol: float = 0.0

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def below_atol(self) -> dict[str, float]:
        """The outputs no larger than ``atol`` on every batch, with their largest scale: their
        check passes whatever ONNX Runtime returns within ``atol`` of zero, so it proves
        nothing about them (a randomly initialised network whose logits are 1e-11)."""
        scales: dict[str, float] = {}
        for check in self.checks:
            scales[check.output] = max(scales.get(check.output, 0.0), check.scale)
        return {name: scale for name, scale in scales.items() if scale <= self.atol}

    def worst(self) -> ParityCheck:
        """The check closest to (or furthest past) its bound."""
        def ratio(c: ParityCheck) -> float:
            value = c.max_abs_error / max(c.bound, 1e-30)
            return value if value == value else math.inf  # NaN errors are the worst

        return max(self.checks, key=ratio)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["passed"] = self.passed
        data["below_atol"] = self.below_atol()
        for item, check in zip(data["checks"], self.checks, strict=True):
            item["passed"] = check.passed
        return data


def check_export_outputs(path: str | Path, force: bool, inputs: Sequence[str | Path] = (),
                         external_data: bool | None = None) -> Path:
    """The output guard of an export, run before any work: ``path`` (and, with
    ``external_data``, its ``.data`` companion) is a new or ``force``-replaceable regular file
    in a writable folder and none of ``inputs``."""
    path = check_output_path(path, force, inputs, suffixes=ONNX_SUFFIXES)
    if external_data:
        check_output_path(path.with_name(path.name + ".data"), force, inputs)
    return path


def output_tensors(out: object, what: str = "the model") -> list[torch.Tensor]:
    """The tensors of a model's output in the order the ONNX exporter flattens them (a
    tensor; a tuple, list or dict of them, nested; ``None`` entries are dropped, as the
    exporter drops them)."""
    from torch.utils._pytree import tree_leaves

    leaves = [leaf for leaf in tree_leaves(out) if leaf is not None]
    odd = [type(leaf).__name__ for leaf in leaves if not isinstance(leaf, torch.Tensor)]
    if odd or not leaves:
        raise BadInput(
            f"{what} returns {'a ' + odd[0] if odd else 'no tensor'} among its outputs: ONNX "
            "export needs a model that returns tensors (a tensor, or a tuple, list or dict of "
            "tensors)")
    return leaves


def check_export_model(model: nn.Module, input_shape: Sequence[int],
                       dynamic_batch: bool = True) -> None:
    """Refuse, before any work, a model that cannot be exported at ``input_shape``: one that
    does not run on it, that runs at its batch but not at batch 3 when the batch axis is
    dynamic, or whose outputs are not tensors.

    Raises:
        BadInput: naming the shape, ``--static`` or the odd output.
    """
    shape = [int(s) for s in input_shape]
    check_input_shape(model, shape, batches=(shape[0],))
    if dynamic_batch and shape[0] != 3:
        try:
            check_input_shape(model, shape, batches=(3,))
        except BadInput as err:
            raise BadInput(
                f"the model runs at batch {shape[0]} but not at batch 3, so it cannot be "
                f"exported with a dynamic batch axis: pass --static to export it at batch "
                f"{shape[0]} (the batch of the input shape)") from err
    with evaluating(model), torch.inference_mode():
        output_tensors(model(example_input(model, shape)))


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
            text = ANSI.sub("", str(err)).strip()  # torch.export colours its messages
            first = text.splitlines()[0] if text else type(err).__name__
            hint = (" (with a dynamic batch axis: --static exports a fixed batch)"
                    if dynamic_batch else "")
            raise CheckFailed(f"torch.onnx.export failed{hint}: {first}") from err
    # external data when asked, or when the weights pass protobuf's 2 GB limit (None)
    program.save(str(path), external_data=external_data)


def _written_opset(path: Path) -> int | None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                None)


def _run_parity(
    model: nn.Module, session, batches: Sequence[tuple[str, torch.Tensor]], rtol: float,
    atol: float,
) -> list[ParityCheck]:
    names = [o.name for o in session.get_outputs()]
    checks = []
    for label, x in batches:
        with torch.inference_mode():
            expected = output_tensors(model(x))
        if len(expected) != len(names):
            raise CheckFailed(f"the exported model has {len(names)} outputs where the PyTorch "
                              f"model returns {len(expected)} tensors ({label})")
        try:
            got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        except Exception as err:
            text = ANSI.sub("", str(err)).strip()  # torch.export colours its messages
            first = text.splitlines()[0] if text else type(err).__name__
            raise CheckFailed(f"ONNX Runtime failed to run the exported model on {label}: "
                              f"{first}") from err
        for name, ref, out in zip(names, expected, got, strict=True):
            ref = ref.detach().float().numpy()
            if out.shape != ref.shape:
                raise CheckFailed(f"ONNX Runtime output {name!r} has shape {list(out.shape)} "
                                  f"where PyTorch's is {list(ref.shape)} ({label})")
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
        model: the model (exported from CPU, in eval mode, float32). A model that returns a
            tuple, list or dict of tensors (``(logits, aux)``) exports every tensor as an
            output, and parity is checked on each.
        input_shape: example input shape with batch (the batch axis is symbolic unless
            ``dynamic_batch=False``).
        opset: ONNX opset, from 18 to :func:`max_opset`; the file is written at exactly it.
        rtol, atol: parity tolerances (≥ 0), relative to each output's scale.
        samples: optional real inputs ``[B, *input_shape[1:]]`` checked too (in batches of 64;
            with a static batch, in batches of ``input_shape[0]``).
        keep_failed: keep the file when parity fails.
        force: overwrite an existing ``path``; ``inputs`` are never overwritten.
        external_data: write the weights to ``<path>.data`` beside the graph; ``None``: only
            when they exceed protobuf's 2 GB limit.

    Raises:
        BadInput: bad opset, tolerances or output path; an input shape (or batch size) the
            model does not run on; outputs that are not tensors; samples of another shape.
        CheckFailed: export, ``onnx.checker`` or parity failed (names the worst output).
    """
    import onnx
    import onnxruntime as ort

    validate_section(Export, {"opset": opset, "dynamic_batch": dynamic_batch, "rtol": rtol,
                              "atol": atol, "external_data": external_data,
                              "keep_failed": keep_failed}, repr)
    path = check_export_outputs(path, force, inputs, external_data)
    model = model.cpu().float().eval()
    shape = [int(s) for s in input_shape]
    check_export_model(model, shape, dynamic_batch)
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(shape, generator=generator)
    batches = [(f"random batch {shape[0]}", example)]
    if dynamic_batch:
        batches.append(("random batch 3", torch.randn([3, *shape[1:]], generator=generator)))
    if samples is not None:
        if list(samples.shape[1:]) != shape[1:]:
            raise BadInput(f"the --data samples are {list(samples.shape[1:])}, not the input "
                           f"shape {shape[1:]} the model is exported at: give data of that "
                           "shape (--resize/--crop) or the matching --input-shape")
        step = 64 if dynamic_batch else shape[0]
        stop = len(samples) if dynamic_batch else len(samples) - len(samples) % step
        if stop == 0:
            raise BadInput(f"--data gave {len(samples)} samples, fewer than the static batch "
                           f"{shape[0]}: give more samples (--limit) or a smaller batch")
        for i, start in enumerate(range(0, stop, step)):
            batches.append((f"data batch {i}", samples[start:start + step].float()))
    # torch.export specialises a batch of 1 (its 0/1 rule: some models, timm's ConvNeXt,
    # then fail with "Invalid ranges [2:1]"), so a dynamic axis is traced at batch 3, which
    # check_export_model ran
    traced = batches[1][1] if dynamic_batch else example
    report = ExportReport(str(path), opset, dynamic_batch, shape, atol=atol)
    with atomic_output_with_companions(path, force=force, inputs=inputs) as tmp:
        _export(model, traced, tmp, opset, dynamic_batch, external_data)
        written = _written_opset(tmp)
        if written != opset:
            raise BadInput(f"opset {opset}: the installed exporter wrote opset {written} "
                           f"instead; choose an opset from {MIN_OPSET} to {max_opset()}")
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as err:
            raise CheckFailed(f"onnx.checker rejected the exported model: {err}") from err
        try:
            session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        except Exception as err:
            text = ANSI.sub("", str(err)).strip()  # torch.export colours its messages
            first = text.splitlines()[0] if text else type(err).__name__
            raise CheckFailed(f"ONNX Runtime {ort.__version__} cannot load the exported model "
                              f"(opset {opset}): {first}") from err
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

"""Parameter and multiply-accumulate (MAC) counts, per module and in total.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2) on one forward
pass at the given input shape, so every op PyTorch knows how to count is counted, including
those in blocks bscompress builds. Bias additions, BatchNorm and activations count as zero,
as in the papers' tables.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bscompress.core.errors import BadInput


@dataclass(frozen=True)
class ModelStats:
    """Totals and per-module MACs of one forward pass.

    Attributes:
        params: number of parameters (shared parameters counted once).
        macs: total multiply-accumulates of one forward pass at ``input_shape``.
        input_shape: the shape used, batch included.
        module_macs: MACs of every module by dotted name (``""`` is the whole model); a module
            called twice counts twice.
    """

    params: int
    macs: int
    input_shape: tuple[int, ...]
    module_macs: dict[str, int]


def count_params(module: nn.Module) -> int:
    """Parameters of ``module``, each shared tensor once."""
    return sum(p.numel() for p in module.parameters())


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (the CPU when it has none)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first floating-point parameter (float32 when it has none):
    the dtype its floating inputs are given in (a float64 or half model takes float32 data
    cast to its own)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()),
                torch.float32)


def check_finite(model: nn.Module, what: str = "the model") -> None:
    """Refuse a model with NaN or infinite parameters or buffers, naming the first one.

    Raises:
        BadInput: the factorizations (SVD, ALS) cannot run on non-finite weights.
    """
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise BadInput(f"{what} holds NaN or infinite values in {name!r}: bscompress "
                           "factorizes trained, finite weights; pick another checkpoint")


def parse_shape(text: str) -> list[int]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) → ``[1, 3, 224, 224]``."""
    parts = [part.strip() for part in re.split(r"[,x×]", text)]
    shape = [int(part) for part in parts if part.isdigit()]
    if len(shape) != len(parts):
        shape = []
    if not shape or any(s <= 0 for s in shape):
        raise BadInput(
            f"--input-shape {text!r} is not a shape: write positive integers like 1,3,224,224"
        )
    check_input_size(shape)
    return shape


def module_macs(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> ModelStats:
    """Count MACs per module with one forward pass on zeros of ``input_shape``.

    Raises:
        BadInput: when the model cannot run on that shape.
    """
    shape = tuple(int(s) for s in input_shape)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(shape, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    # FlopCounterMode's module tracker hooks the autograd graph of every module's input
    # tensors that require grad, and asserts when one has none: a parametrized weight
    # (weight_norm, spectral_norm) in inference mode, a parameter passed on in a tuple
    # (timm's PiT: ``self.transformers((x, cls_tokens))``). With no parameter requiring grad,
    # no input does.
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        with torch.no_grad(), counter:
            model(x)
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BadInput(
            f"the model does not run on input shape {list(shape)} ({first}); "
            "pass the shape it was trained on with --input-shape"
        ) from None
    finally:
        model.train(was_training)
        for p, flag in grads:
            p.requires_grad_(flag)
    per_module: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        name = key.split(".", 1)[1] if "." in key else ""
        per_module[name] = int(sum(ops.values())) // 2
    total = int(counter.get_total_flops()) // 2
    per_module[""] = total
    return ModelStats(count_params(model), total, shape, per_module)


def format_count(value: float) -> str:
    """``11689512`` → ``11.69M``: params and MACs for tables and messages."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 16 * 2**30


def check_threads(threads: int | None, what: str = "--threads") -> None:
    """Refuse more intra-op threads than four per CPU core of this machine: timings on such
    a count mean nothing, and a million threads crash the thread pools (a segmentation
    fault in ONNX Runtime, an abort in libgomp).

    Raises:
        BadInput: naming the option and this machine's cores.
    """
    cores = os.cpu_count() or 1
    if threads is not None and threads > 4 * cores:
        raise BadInput(f"{what} {threads} is more than four threads per CPU core of this "
                       f"machine ({cores} cores): time on at most {cores}")


def activation_bytes(model: nn.Module, input_shape: Sequence[int]) -> int:
    """The bytes of every leaf module's output on one forward pass of ``input_shape``: an
    upper bound on what an inference runtime holds at once, for bounding a batch size
    before timing it."""
    total = 0

    def count(_module, _args, out):
        nonlocal total
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with evaluating(model), torch.inference_mode():
            model(example_input(model, list(input_shape)))
    finally:
        for handle in handles:
            handle.remove()
    return total


def check_input_size(input_shape: tuple[int, ...] | list[int], what: str = "--input-shape"
                     ) -> None:
    """Refuse an input shape whose float32 batch would not fit in a quarter of the memory."""
    numel = 1
    for s in input_shape:
        numel *= int(s)
    limit = memory_bytes() // 4
    if numel * 4 > limit:
        raise BadInput(
            f"{what} {list(input_shape)} is {numel * 4 / 2**30:.1f} GiB of float32 input, more "
            f"than a quarter of this machine's memory ({limit / 2**30:.1f} GiB): give the "
            "shape of one real input batch, e.g. 1,3,224,224"
        )


#: PyTorch's messages for operands of different dtypes
_DTYPE_MISMATCH = re.compile(r"type \(.*\) should be the same|expected scalar type|"
                             r"must have the same dtype|expected both .* same dtype|"
                             r"found at least two different dtypes|dtype mismatch", re.I)


def check_input_shape(model: nn.Module, input_shape: tuple[int, ...] | list[int],
                      batches: tuple[int, ...] = (1, 2), what: str = "--input-shape") -> None:
    """Run ``model`` once on zeros of ``input_shape`` at each batch size of ``batches``
    (before any expensive step): the shape must fit in memory, the model must run on it,
    and return a tensor (or a tuple/list/dict whose first entry is one).

    Raises:
        BadInput: naming the shape, the batch size and the model's error.
    """
    shape = [int(s) for s in input_shape]
    if not shape or any(s <= 0 for s in shape):
        raise BadInput(f"{what} {shape} is not a shape: write positive integers like "
                       "1,3,224,224")
    check_input_size(shape, what)
    with evaluating(model):
        for batch in batches:
            x = example_input(model, [batch, *shape[1:]])
            try:
                with torch.inference_mode():
                    out = model(x)
            except Exception as err:
                first = str(err).splitlines()[0] if str(err) else type(err).__name__
                if _DTYPE_MISMATCH.search(first):
                    raise BadInput(
                        f"the model does not run with {str(x.dtype).removeprefix('torch.')} "
                        f"inputs and parameters ({first}): its forward converts a tensor to "
                        "another dtype; bscompress runs a model in the dtype of its parameters "
                        "(ONNX export and benchmarks in float32), so remove the conversion "
                        "from forward"
                    ) from None
                if batch == shape[0] or batch == batches[0]:
                    raise BadInput(
                        f"the model does not run on input shape {[batch, *shape[1:]]} "
                        f"({first}); pass the shape it was trained on with {what}"
                    ) from None
                raise BadInput(
                    f"the model runs at batch {batches[0]} but not at batch {batch} ({first}): "
                    "bscompress needs a model that takes any batch size (calibration, "
                    "ONNX export with a dynamic batch, benchmarks)"
                ) from None
            if first_tensor(out) is None:
                raise BadInput(
                    f"the model returns a {type(out).__name__} without a tensor: bscompress "
                    "needs a model that returns its logits (or a tuple whose first entry is "
                    "the logits)"
                )


def example_input(model: nn.Module, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Zeros of ``shape`` on ``model``'s device, in its floating dtype (float32 without one)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.zeros(list(shape), device=device, dtype=dtype)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, its train/eval mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def first_tensor(out: object) -> torch.Tensor | None:
    """The model's main output: ``out`` itself, or the first entry of a tuple, list or dict
    (models that return ``(logits, aux)``, or a dict with the logits first)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return first_tensor(out[0])
    if isinstance(out, dict) and out:
        return first_tensor(next(iter(out.values())))
    return None

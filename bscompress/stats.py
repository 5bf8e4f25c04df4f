"""Parameter and multiply-accumulate (MAC) counts, per module and in total.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2) on one forward
pass at the given input shape, so every op PyTorch knows how to count is counted, including
those in blocks bscompress builds. Bias additions, BatchNorm and activations count as zero,
as in the papers' tables.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bscompress.errors import BadInput


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
    try:
        with torch.inference_mode(), counter:
            model(x)
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BadInput(
            f"the model does not run on input shape {list(shape)} ({first}); "
            "pass the shape it was trained on with --input-shape"
        ) from None
    finally:
        model.train(was_training)
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

"""Convs whose ``forward`` computes the weight it convolves with, stood in for by a plain conv.

Weight standardisation is the common case: timm's ``StdConv2d`` / ``StdConv2dSame`` (BiT,
ResNetV2 ``*_bit``) and ``ScaledStdConv2d`` (NFNet, NF-ResNet) convolve with
``gain · (W − mean W) / std W`` per output channel, not with ``W``. Their output is still one
conv of a fixed weight, so bscompress can factorize that weight, but every reader of
``conv.weight`` would see the stored one. The padding probe (``padding.input_padding``)
therefore refuses them, and the commands that rewrite layers stand them in:

* :func:`stand_in` runs the module's ``forward`` once under a ``TorchFunctionMode`` that
  records the conv call it makes, takes the weight and bias passed to that call (detached),
  and proves them with ``padding.probe``: on inputs of several sizes the module's output
  equals their conv after its own padding, a static one or TF's "same" one. The stand-in is an
  ``nn.Conv1d`` / ``nn.Conv2d`` (``padding.as_plain_conv`` for a padding of its own) holding
  them, its parameters frozen. A ``forward`` that makes no or several conv calls, changes the
  stride, dilation or groups, or does anything after the conv (a norm, an activation), or
  whose weight depends on the input, gets no stand-in and stays refused with its reason.
* :func:`standing_in` swaps the stand-ins into a model for the duration of a command and
  swaps the original modules back wherever the stand-in is still there afterwards (the layers
  left dense keep their class, weight standardisation and stored weight), so an archive
  rebuilds from the architecture as it is.

Frozen: a stand-in that stays dense is swapped back, so nothing may train it (block
reconstruction trains only parameters that require gradients).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _ntuple
from torch.overrides import TorchFunctionMode

from bscompress.core.padding import as_plain_conv, base_conv_class, input_padding, probe

#: the functions a conv's forward calls to convolve (``F.conv2d is torch.conv2d``)
_CONVS = {torch.conv1d, torch.conv2d, F.conv1d, F.conv2d}


class _ConvCalls(TorchFunctionMode):
    """Records the weight and bias of every conv call made under it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONVS:
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            bound = dict(zip(names, args, strict=False)) | kwargs
            self.calls.append(bound)
        return func(*args, **kwargs)


def _captured(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The weight and bias ``module``'s forward convolves with, when it makes exactly one conv
    call with its own stride, dilation and groups and a weight of its weight's shape."""
    weight = module.weight
    dims = len(module.kernel_size)
    size = [max(2 * ((k - 1) * d + 1), 8) for k, d in zip(module.kernel_size, module.dilation,
                                                            strict=True)]
    x = torch.randn(1, module.in_channels, *size,
                    generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(weight)
    recorder = _ConvCalls()
    try:
        with torch.no_grad(), recorder:
            module.forward(x)
    except Exception:  # the probe names why such a forward is refused
        return None
    if len(recorder.calls) != 1:
        return None
    call = recorder.calls[0]
    w, b = call.get("weight"), call.get("bias")
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != tuple(weight.shape):
        return None
    if b is not None and (not isinstance(b, torch.Tensor)
                          or tuple(b.shape) != (module.out_channels,)):
        return None
    as_tuple = _ntuple(dims)
    geometry = (as_tuple(call.get("stride", 1)), as_tuple(call.get("dilation", 1)),
                call.get("groups", 1))
    if geometry != (tuple(module.stride), tuple(module.dilation), module.groups):
        return None
    return w.detach().clone(), None if b is None else b.detach().clone()


def stand_in(module: nn.Module) -> nn.Module | None:
    """A plain conv computing what ``module`` does, with the weight its ``forward`` computes
    (module docstring); ``None`` when ``module`` needs none (a plain or padded conv the probe
    accepts) or cannot have one."""
    base = base_conv_class(module)
    # (a plain conv, bscompress's own padded ones and the padded subclasses are not refused)
    if base is None or input_padding(module).kind != "refused":
        return None
    weight = module.weight
    if not isinstance(weight, torch.Tensor) or weight.is_meta or not weight.is_floating_point():
        return None
    captured = _captured(module)
    if captured is None:
        return None
    weight, bias = captured
    found = probe(module, weight, bias)
    if found.kind == "refused":
        return None
    plain = found.kind == "plain"
    conv = base(module.in_channels, module.out_channels, tuple(module.kernel_size),
                stride=tuple(module.stride),
                padding=module.padding if plain else 0, dilation=tuple(module.dilation),
                groups=module.groups, bias=bias is not None,
                padding_mode=module.padding_mode if plain else "zeros",
                device=weight.device, dtype=weight.dtype)
    conv.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        conv.bias = nn.Parameter(bias, requires_grad=False)
    conv.train(module.training)
    return conv if plain else as_plain_conv(conv, found.spec)


Swapped = list[tuple[str, nn.Module, nn.Module]]


def swap_in(model: nn.Module) -> Swapped:
    """Put a stand-in in place of every conv of ``model`` that has one (the same stand-in
    wherever a module is reached under several names); ``(name, original, stand-in)`` each."""
    made: dict[int, nn.Module | None] = {}
    swapped: Swapped = []
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name or base_conv_class(module) is None:
            continue
        if id(module) not in made:
            made[id(module)] = stand_in(module)
        conv = made[id(module)]
        if conv is not None:
            model.set_submodule(name, conv)
            swapped.append((name, module, conv))
    return swapped


def swap_back(model: nn.Module, swapped: Swapped) -> None:
    """Put the original modules back wherever their stand-in still is."""
    for name, original, conv in swapped:
        try:
            here = model.get_submodule(name)
        except AttributeError:  # a parent of it was replaced
            continue
        if here is conv:
            model.set_submodule(name, original)


def original_classes(swapped: Swapped) -> dict[str, str]:
    """The class name of each stood-in layer's own module (``StdConv2d``), by layer name."""
    return {name: type(original).__name__ for name, original, _ in swapped}


@contextmanager
def standing_in(model: nn.Module) -> Iterator[Swapped]:
    """``model`` with its computed-weight convs stood in for while the block runs, the ones
    still there swapped back afterwards (also when it raises)."""
    swapped = swap_in(model)
    try:
        yield swapped
    finally:
        swap_back(model, swapped)


def stood_in(transform: Callable) -> Callable:
    """``transform(model, …) -> (model, plan)`` run with ``model``'s computed-weight convs
    stood in for (:func:`standing_in`); the plan's entries of those layers name their own
    class (``StdConv2d``), not the stand-in's."""

    @functools.wraps(transform)
    def run(model: nn.Module, *args, **kwargs):
        with standing_in(model) as swapped:
            model, plan = transform(model, *args, **kwargs)
        classes = original_classes(swapped)
        for entry in plan.layers:
            entry.module_type = classes.get(entry.name, entry.module_type)
        return model, plan

    return run


__all__ = ["Swapped", "original_classes", "stand_in", "standing_in", "stood_in", "swap_back",
           "swap_in"]

"""Layers whose weight the model's own code reads outside the layer's ``forward``.

A replacement block (``layers/``) is called like the layer it replaces, but it has no
``weight`` or ``bias`` of its own: code that reads them from outside, as timm's EdgeNeXt
does in its positional encoding (``device = self.token_projection.weight.device``, then
``self.token_projection(pos)``), or that convolves with ``self.conv.weight`` instead of
calling ``self.conv``, would break or bypass the block. Such layers stay as they are.

:func:`watch_reads` finds them during a forward pass the caller runs (the MAC count's): each
conv and Linear layer's class is swapped, while the context is open, for a subclass whose
``__getattr__`` (through which ``nn.Module`` serves its parameters and buffers) notes a read
of ``weight`` or ``bias`` made while the layer is not inside its own call (hooks count the
depth), with the file and line that made it. The classes are swapped back on exit.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

from torch import nn

#: the attributes a replacement block does not have
WATCHED = ("weight", "bias")
#: the layers watched: those the transforms replace
LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


class _Watch:
    """What one open :func:`watch_reads` has seen: per watched module (by id), its call
    depth, and the first read from outside it, ``name -> "weight (file.py:60)"``."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names = names
        self.depth = dict.fromkeys(names, 0)
        self.reads: dict[str, str] = {}

    def read(self, module: nn.Module, attribute: str, frame) -> None:
        key = id(module)
        if key in self.names and self.depth[key] == 0:
            where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
            self.reads.setdefault(self.names[key], f"{attribute} ({where})")


_ACTIVE: ContextVar[_Watch | None] = ContextVar("bscompress_foreign_reads", default=None)
_SUBCLASSES: dict[type, type] = {}


def _watched(cls: type) -> type:
    """``cls`` with a ``__getattr__`` that reports reads of :data:`WATCHED` to the active
    watch (one subclass per class, made once)."""
    if cls not in _SUBCLASSES:
        def __getattr__(self, name):  # noqa: N807 - the hook nn.Module serves parameters by
            if name in WATCHED:
                watch = _ACTIVE.get()
                if watch is not None:
                    watch.read(self, name, sys._getframe(1))
            return super(subclass, self).__getattr__(name)

        subclass = type(cls.__name__, (cls,), {"__getattr__": __getattr__,
                                                "__module__": cls.__module__,
                                                "__qualname__": cls.__qualname__})
        _SUBCLASSES[cls] = subclass
    return _SUBCLASSES[cls]


@contextlib.contextmanager
def watch_reads(model: nn.Module) -> Iterator[dict[str, str]]:
    """While open, the conv and Linear layers of ``model`` whose ``weight`` or ``bias`` is
    read by code outside their own call: ``{layer name: "weight (file.py:LINE)"}``, filled as
    the caller runs the model (complete once the context exits)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LAYERS)}
    watch = _Watch({id(m): name for name, m in layers.items()})
    classes, hooks = {}, []

    def enter(module, _args):
        watch.depth[id(module)] += 1

    def leave(module, _args, _output):
        watch.depth[id(module)] -= 1

    token = _ACTIVE.set(watch)
    try:
        for module in {id(m): m for m in layers.values()}.values():  # shared: once
            cls = type(module)
            try:  # a class that cannot be subclassed or swapped is not watched
                module.__class__ = _watched(cls)
            except Exception:  # noqa: BLE001, S112 - e.g. an __init_subclass__ with demands
                continue
            classes[id(module)] = (module, cls)
            hooks.append(module.register_forward_pre_hook(enter))
            hooks.append(module.register_forward_hook(leave, always_call=True))
        yield watch.reads
    finally:
        _ACTIVE.reset(token)
        for handle in hooks:
            handle.remove()
        for module, cls in classes.values():
            module.__class__ = cls


def read_reason(read: str) -> str:
    """The skip reason of a layer whose ``read`` (a :func:`watch_reads` value) was seen."""
    return (f"the model reads its {read} outside its forward, which a replacement block "
            "has no copy of: kept as it is")


__all__ = ["LAYERS", "WATCHED", "read_reason", "watch_reads"]

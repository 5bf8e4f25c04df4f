"""The latency guard: under a budget, a block is offered only where it runs faster than the
layer it would replace.

A MACs or params budget prices candidate blocks by count, and fewer MACs do not always take
less time: a memory-bound form (BSConv-U's blueprints at rank > 1, DSC with a channel
multiplier, CP's 1-D stages on small maps) can run slower than the dense conv it replaces,
most of all at a serving batch. With a guard, the allocator times each candidate block
against its layer, at the layer's real input shape and at every batch the model is served
with, and offers it only when it is faster at all of them by a share of what it saves in MACs
(:func:`time_bound`: a block that removes most of a layer's MACs and little of its time
costs accuracy for nothing, and the allocator takes the MACs elsewhere). The timer caches
every figure on disk, so a second run times nothing. The guard counts what it left out and,
once the model is built, times the chosen blocks and the whole model against the original:
the plan's summary holds these time ratios next to the MAC ratios (``records.GuardRecord``).

The timer is anything with ``time(module, input_shape) -> milliseconds``: the ONNX Runtime
CPU timer of the latency budget (``latency.LatencyTimer``) by default; tests pass a fake one.
A timer with ``ratio(module, reference, input_shape)`` (the real ones) times the two in turn
and gives their ratio (:meth:`LatencyGuard.ratio`): a layer timed once and its candidates
minutes later would see the cores' drift between the two, and on a shared machine that is
larger than the margin the guard asks.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from torch import nn

from bscompress.core.errors import BSCompressError, first_line
from bscompress.core.recipe import GUARD_SHARE


class Timer(Protocol):
    """Milliseconds per call of ``block`` on an input of ``input_shape``. A timer may also
    have a ``runtime`` string naming what it measures (the report falls back to its class
    name)."""

    def time(self, block: nn.Module, input_shape: tuple[int, ...]) -> float: ...


class PairTimer(Timer, Protocol):
    """A timer that also times two modules in turn: ``block``'s time ÷ ``reference``'s."""

    def ratio(self, block: nn.Module, reference: nn.Module,
              input_shape: tuple[int, ...]) -> float: ...


def runtime_of(timer: Timer) -> str:
    """What ``timer`` measures, for the report: its ``runtime``, else its class name."""
    return getattr(timer, "runtime", None) or type(timer).__name__


def at_batch(shape: Sequence[int], batch: int) -> tuple[int, ...]:
    """``shape`` with its leading (batch) dimension set to ``batch``."""
    return (batch, *(int(s) for s in shape[1:]))


def time_bound(macs: float, share: float) -> float:
    """The largest time ratio (block ÷ layer) the guard accepts for a block keeping ``macs``
    of its layer's MACs: 1 − share · (1 − macs), so that the block saves at least ``share``
    of the fraction of the MACs it removes as a fraction of the time (share 0: any block
    faster at all)."""
    return 1.0 - share * (1.0 - min(max(macs, 0.0), 1.0))


@dataclass
class LatencyGuard:
    """Keeps a candidate block only where ``timer`` measures it faster than its layer at
    every batch of ``batches`` (batch 1 first: a block slower there is not timed again), by
    at least ``share`` of its MAC saving (:func:`time_bound`).

    Attributes:
        timer: ``time(module, input_shape) -> ms``.
        batches: the batch sizes the model is served at (batch 1 and a serving batch).
        runtime: what the timer measures, for the report.
        share: the share of a block's MAC saving it must save in time (0 to 1).
        checked, rejected: candidates timed, and those left out for being slower.
    """

    timer: Timer
    batches: tuple[int, ...] = (1, 32)
    runtime: str = "ONNX Runtime CPU"
    share: float = GUARD_SHARE
    checked: int = 0
    rejected: int = 0
    #: blocks (or their layers) the timer failed on, kept: the guard leaves out only what it
    #: measured slower; ``why`` is the first failure
    untimed: int = 0
    why: str | None = None
    #: the original model's structure (meta device), kept by :meth:`remember` for the
    #: whole-model ratios of :meth:`whole`
    before: nn.Module | None = field(default=None, repr=False)
    _layer_ms: dict = field(default_factory=dict, repr=False)

    def ratio(self, block: nn.Module, reference: nn.Module, shape: Sequence[int]) -> float:
        """``block``'s time ÷ ``reference``'s on inputs of ``shape``: timed in turn where the
        timer can (``PairTimer``), else each timed alone (``reference`` once per shape);
        :class:`Untimed` where the timer fails."""
        size = tuple(shape)
        if hasattr(self.timer, "ratio"):
            return self._timed(self.timer.ratio, block, reference, size)
        key = (id(reference), size)
        if key not in self._layer_ms:
            self._layer_ms[key] = self.time(reference, size)
        return self.time(block, size) / max(self._layer_ms[key], 1e-9)

    def ratios(self, layer: nn.Module, block: nn.Module, shape: Sequence[int],
               stop_above: float | None = None) -> dict[int, float]:
        """Block time ÷ layer time at each batch (``{batch: ratio}``); with ``stop_above``,
        the batches after the first whose ratio is not below it are left out."""
        out = {}
        for batch in self.batches:
            out[batch] = self.ratio(block, layer, at_batch(shape, batch))
            if stop_above is not None and out[batch] >= stop_above:
                break
        return out

    def keeps(self, layer: nn.Module, block: nn.Module, shape: Sequence[int],
              macs: float = 1.0) -> bool:
        """Whether ``block`` (maybe on the meta device: the timer draws its weights),
        keeping ``macs`` of ``layer``'s MACs, runs faster than ``layer`` on inputs of
        ``shape`` at every batch, by ``share`` of its MAC saving (:func:`time_bound`); a
        pair the timer fails on (a layer no ONNX exporter takes) is kept and counted in
        ``untimed``."""
        self.checked += 1
        bound = time_bound(macs, self.share)
        try:
            faster = all(r < bound for r in self.ratios(layer, block, shape,
                                                        stop_above=bound).values())
        except Untimed as failure:
            self.untimed += 1
            self.why = self.why or str(failure)
            return True
        self.rejected += not faster
        return faster

    def time(self, module: nn.Module, shape: Sequence[int]) -> float:
        """The timer's ms for ``module`` on ``shape``; :class:`Untimed` where it fails."""
        return self._timed(self.timer.time, module, tuple(shape))

    @staticmethod
    def _timed(measure, module: nn.Module, *args) -> float:
        try:
            return measure(module, *args)
        except BSCompressError:
            raise
        except Exception as error:  # exporters and runtimes fail in their own types
            raise Untimed(f"{type(module).__name__}: {first_line(error, 200)}") from error

    def remember(self, model: nn.Module) -> None:
        """Keep ``model``'s structure (the original, before it is rewritten in place) for
        :meth:`whole`."""
        self.before = copy.deepcopy(model).to("meta")

    def whole(self, model: nn.Module, shape: Sequence[int]) -> dict[int, float]:
        """``model``'s time ÷ the remembered original's per batch (``{}`` when nothing is
        remembered or the timer fails on either)."""
        if self.before is None:
            return {}
        try:
            return {b: self.ratio(model, self.before, at_batch(shape, b)) for b in self.batches}
        except Untimed as failure:
            self.why = self.why or str(failure)
            return {}


class Untimed(Exception):
    """The timer failed on a module (the guard's message names it)."""


__all__ = ["LatencyGuard", "PairTimer", "Timer", "Untimed", "at_batch", "runtime_of", "time_bound"]

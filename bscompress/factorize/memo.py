"""Reuse of rank-independent decompositions across the candidates of one layer.

A budget allocator fits every candidate rank of a layer, and every candidate starts from the
same decompositions: the SVD of the same kernel (its per-filter or per-channel SVD for the
separable forms, the eigendecomposition of an unfolding's Gram matrix for Tucker and the CP
initialisation), the whitening L Lᵀ = Σ of the same statistics and the SVD of the same W L
for the data-aware low-rank fit. Only the truncation depends on the rank.

Inside an active :class:`Reuse` table, a function marked :func:`reusable` returns the stored
result of an earlier call with equal arguments (tensors compared by value with
``torch.equal``, after checking that none was changed in place since: ``_version``), as
clones, so that no caller can change what the next one gets. Outside one, it just computes:
nothing is kept, no global state. The table holds at most ``limit`` results (the oldest
goes), and its owner clears it when it moves to the next layer.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


class Reuse:
    """A bounded table of results of :func:`reusable` functions (see the module docstring).

    Attributes:
        hits, misses: calls answered from the table, and calls computed while active.
    """

    def __init__(self, limit: int = 16) -> None:
        self.limit = limit
        self.entries: list[tuple[Callable, tuple, dict, list[int], Any]] = []
        self.hits = self.misses = 0

    @contextlib.contextmanager
    def active(self) -> Iterator[Reuse]:
        """Make this table the one :func:`reusable` functions read and fill, while open."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def clear(self) -> None:
        """Drop every stored result (and the arguments it holds)."""
        self.entries.clear()

    def lookup(self, fn: Callable, args: tuple, kwargs: dict) -> tuple[bool, Any]:
        for key_fn, key_args, key_kwargs, versions, result in self.entries:
            if key_fn is fn and key_kwargs == kwargs and _same(key_args, versions, args):
                self.hits += 1
                return True, result
        return False, None

    def store(self, fn: Callable, args: tuple, kwargs: dict, result: Any) -> None:
        self.misses += 1
        versions = [a._version if isinstance(a, torch.Tensor) else 0 for a in args]
        self.entries.append((fn, args, kwargs, versions, result))
        if len(self.entries) > self.limit:
            self.entries.pop(0)


_ACTIVE: ContextVar[Reuse | None] = ContextVar("bscompress_reuse", default=None)


def reusing() -> bool:
    """Whether a :class:`Reuse` table is active: a caller may then compute a result shared by
    the candidates to come (at a larger size than it needs itself) rather than its own."""
    return _ACTIVE.get() is not None


def _same(stored: tuple, versions: list[int], args: tuple) -> bool:
    if len(stored) != len(args):
        return False
    for old, version, new in zip(stored, versions, args, strict=True):
        if isinstance(old, torch.Tensor) != isinstance(new, torch.Tensor):
            return False
        if isinstance(old, torch.Tensor):
            if old is new and old._version == version:
                continue
            if (old._version != version or old.shape != new.shape or old.dtype != new.dtype
                    or old.device != new.device or not torch.equal(old, new)):
                return False
        elif old != new:
            return False
    return True


def _clone(result: Any) -> Any:
    if isinstance(result, torch.Tensor):
        return result.clone()
    if isinstance(result, tuple):
        return tuple(_clone(r) for r in result)
    return result


def reusable(fn: F) -> F:
    """Mark a pure function of tensors (and hashable-comparable values) whose result an
    active :class:`Reuse` table may answer for equal arguments. Keyword arguments must not
    be tensors."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        table = _ACTIVE.get()
        if table is None:
            return fn(*args, **kwargs)
        found, result = table.lookup(fn, args, kwargs)
        if not found:
            result = fn(*args, **kwargs)
            table.store(fn, args, kwargs, result)
        return _clone(result)

    return wrapper  # type: ignore[return-value]

"""Per-layer sensitivity: what one layer's candidate form costs the whole network's output.

For a layer and a candidate (method, ranks), the block is built (data-aware when the
layer's covariance is known) and swapped in *alone*; the network then runs on the
calibration inputs and is compared with the original network's outputs:

* ``kl``: mean KL(p_original ‖ p_candidate) of the softmax outputs, in nats — the loss a
  distillation would have to recover; small perturbations of different layers add up
  (second order), so the budget allocator sums it;
* ``disagreement``: the share of samples whose top-1 class changes — the accuracy drop
  against the original's own predictions, needing no labels.

Results are cached in a JSON file keyed by a fingerprint of the model's weights and of the
calibration inputs, so a second run with the same model and data measures nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from bscompress.core.errors import BadInput
from bscompress.core.files import write_json_atomic
from bscompress.core.plan import LayerPlan
from bscompress.core.stats import first_tensor


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/bscompress/sensitivity`` (``~/.cache`` when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "bscompress" / "sensitivity"


def fingerprint(model: nn.Module, batches: Sequence[torch.Tensor], tag: str = "") -> str:
    """SHA-256 over the model's state dict (names, shapes, bytes) and the inputs."""
    digest = hashlib.sha256(tag.encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for batch in batches:
        digest.update(batch.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _logits(model: nn.Module, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The model's main output on each batch (``stats.first_tensor``: the logits of a model
    that returns a tuple or a dict with them first), float32."""
    out = []
    with torch.no_grad():
        for batch in batches:
            logits = first_tensor(model(batch))
            if logits is None:
                raise BadInput("--sensitivity compares the model's outputs, and it returns no "
                               "tensor (nor a tuple, list or dict with one first): measure "
                               "candidates without --sensitivity")
            out.append(logits.float())
    return out


class SensitivityProbe:
    """Measures candidates of single layers of ``model`` on ``batches``.

    Args:
        model: the original model; each probe swaps one layer and puts it back, so the model
            is unchanged between calls (run in eval mode).
        batches: calibration inputs ``[B, …]``.
        build: ``build(name, module, entry) -> block``, the block a candidate ``entry`` (a
            :class:`LayerPlan` with method, ranks and options) gives layer ``name``.
        cache_dir: folder of the JSON result files, one per fingerprint (``None``: memory
            only).
        tag: anything else the results depend on (e.g. data-aware or not), for the cache key.
    """

    def __init__(self, model: nn.Module, batches: Sequence[torch.Tensor],
                 build: Callable[[str, nn.Module, LayerPlan], nn.Module],
                 cache_dir: str | Path | None = None, tag: str = "") -> None:
        self.model, self.batches, self.build = model, list(batches), build
        self.measured = 0  # candidates evaluated by this probe (cache misses)
        self._key = fingerprint(model, self.batches, tag)
        self.cache = Path(cache_dir) / f"{self._key[:32]}.json" if cache_dir else None
        self._entries: dict[str, dict] = {}
        if self.cache is not None and self.cache.exists():
            try:
                stored = json.loads(self.cache.read_text())
                if stored.get("fingerprint") == self._key:
                    self._entries = dict(stored["entries"])
            except (ValueError, KeyError, TypeError, AttributeError):
                self._entries = {}  # a damaged cache is rebuilt, never trusted
        self._reference: list[torch.Tensor] | None = None

    def __call__(self, name: str, entry: LayerPlan) -> dict[str, float]:
        """``{"kl", "disagreement"}`` of the network with layer ``name`` in form ``entry``."""
        key = json.dumps([name, entry.method, entry.ranks, entry.options], sort_keys=True)
        if key not in self._entries:
            self._entries[key] = self._measure(name, entry)
            self.measured += 1
            self._save()
        return self._entries[key]

    def _measure(self, name: str, entry: LayerPlan) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        if self._reference is None:
            self._reference = _logits(self.model, self.batches)
        original = self.model.get_submodule(name)
        with torch.no_grad():
            block = self.build(name, original, entry)
        self.model.set_submodule(name, block)
        try:
            outputs = _logits(self.model, self.batches)
        finally:
            self.model.set_submodule(name, original)
            self.model.train(was_training)
        kl = disagree = count = 0.0
        for ref, out in zip(self._reference, outputs, strict=True):
            ref, out = ref.flatten(1), out.flatten(1)
            kl += float(F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref, 1), log_target=True,
                                 reduction="sum"))
            disagree += float((ref.argmax(1) != out.argmax(1)).sum())
            count += len(ref)
        result = {"kl": max(kl / count, 0.0), "disagreement": disagree / count}
        if entry.output_error is not None:  # filled by a data-aware build
            result["output_error"] = float(entry.output_error)
        return result

    def _save(self) -> None:
        if self.cache is not None:
            write_json_atomic(self.cache, {"format": 1, "fingerprint": self._key,
                                           "entries": self._entries})

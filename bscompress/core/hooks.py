"""Hooks the model's own code registered on a layer: replacing the layer by a block would
drop them, and with them part of what the layer computes."""

from __future__ import annotations

from torch import nn

#: forward pre-hooks that compute the weight the layer convolves with (pruning masks, the
#: old-style weight and spectral norms): the weight a factorization reads is theirs, so
#: nothing of the forward pass is lost with them
_WEIGHT_HOOKS = ("torch.nn.utils.prune", "torch.nn.utils.weight_norm",
                 "torch.nn.utils.spectral_norm")


def _name(hook: object) -> str:
    name = getattr(hook, "__qualname__", None) or type(hook).__qualname__
    return name.replace(".<locals>", "")


def _ours(hook: object) -> bool:
    module = getattr(hook, "__module__", None) or type(hook).__module__ or ""
    return module.split(".")[0] == "bscompress"


def hook_reason(module: nn.Module) -> str | None:
    """Why ``module`` must stay as it is because of a forward hook or forward pre-hook on it
    (a hook that changes its input or output would be lost with it), else ``None``. The
    weight-computing pre-hooks of ``torch.nn.utils`` (pruning, ``weight_norm``,
    ``spectral_norm``) and bscompress's own temporary hooks do not count."""
    found = [(kind, hook) for kind, hooks in (("forward pre-hook", module._forward_pre_hooks),
                                              ("forward hook", module._forward_hooks))
             for hook in hooks.values()
             if type(hook).__module__ not in _WEIGHT_HOOKS and not _ours(hook)]
    if not found:
        return None
    kind, hook = found[0]
    more = f" and {len(found) - 1} more" if len(found) > 1 else ""
    return (f"a {kind} registered on it ({_name(hook)}{more}) would be lost with it: "
            "register it on the parent module to let bscompress rewrite the layer")

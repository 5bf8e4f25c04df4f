"""Checkpoint files, read without unpickling unless the caller passes ``trust_pickle=True``
(``torch.load(weights_only=True)`` or safetensors); the state dict found in common
wrappers, its keys normalised, its tensors checked against the model's (floating point,
and finite unless ``allow_nonfinite`` or ``BSCOMPRESS_ALLOW_NONFINITE=1``)."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bscompress.core.errors import BadInput

#: Keys under which training scripts commonly nest the weights, in order of preference.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "ema", "model_ema",
                "state_dict_ema", "module")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sniff(path: Path) -> str:
    """Classify a file by its first bytes: 'zip', 'pickle', 'safetensors' or 'unknown'."""
    with open(path, "rb") as fh:
        head = fh.read(16)
        if head.startswith(b"PK\x03\x04"):
            return "zip"
        # safetensors first: an 8-byte little-endian header length (which may well start with
        # the byte 0x80 of a pickle) followed by a JSON object of that length
        if len(head) >= 9 and head[8:9] == b"{":
            (header_len,) = struct.unpack("<Q", head[:8])
            if 0 < header_len < path.stat().st_size:
                fh.seek(8 + header_len - 1)
                if fh.read(1) in (b"}", b" "):
                    return "safetensors"
    if head[:1] == b"\x80" and len(head) >= 2 and head[1] <= 5:
        return "pickle"
    return "unknown"


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> tuple[Any, dict[str, str]]:
    """Read a checkpoint file without running code from it.

    Returns ``(obj, metadata)``: the loaded object (a dict of tensors, a training-script
    wrapper dict, or with ``trust_pickle`` anything) and safetensors string metadata (empty
    for torch files). Raises :class:`BadInput` with one sentence for every failure.
    """
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if not path.is_file():
        raise BadInput(f"{path} is a directory, not a checkpoint file")
    kind = _sniff(path)
    if kind == "safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = dict(fh.metadata() or {})
                tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
        except Exception as err:
            raise BadInput(f"{path} is not a readable safetensors file ({err})") from None
        return tensors, meta
    if kind == "unknown" and path.suffix.lower() == ".onnx":
        raise BadInput(
            f"{path} is an ONNX model: bscompress rewrites PyTorch modules; pass the PyTorch "
            "checkpoint (a state_dict saved with torch.save, with --arch) it was exported from"
        )
    if kind == "unknown":
        raise BadInput(
            f"{path} is not a checkpoint: expected a file written by torch.save or a "
            ".safetensors file"
        )
    if kind == "zip":
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile:
            raise BadInput(f"{path} is truncated or corrupt (not a complete torch.save zip)") \
                from None
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            raise BadInput(
                f"{path} is a TorchScript archive (torch.jit.save): bscompress rewrites eager "
                "modules; save model.state_dict() with torch.save and pass --arch"
            )
        if any(n.endswith("/archive_format") for n in names):
            raise BadInput(
                f"{path} is a torch.export archive (torch.export.save): bscompress rewrites "
                "eager modules; save the eager model's state_dict() with torch.save and pass "
                "--arch"
            )
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it will refuse
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True), {}
    except pickle.UnpicklingError as err:
        message = str(err)
        if not message.startswith("Weights only load failed") and (
                "Unsupported global" not in message and "Unsupported class" not in message):
            raise BadInput(f"{path} is truncated or corrupt ({message.splitlines()[0]})") \
                from None
        if not trust_pickle:
            raise BadInput(
                f"{path} contains pickled Python objects ({_refusal_detail(message)}), and "
                "loading it would run code from the file: pass --trust-pickle (--trust-code) "
                "only if you trust its source, or save model.state_dict() instead and pass "
                "--arch"
            ) from None
    except (EOFError, RuntimeError, ValueError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BadInput(f"{path} is truncated or corrupt ({first})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle), {}
    except Exception as err:
        raise BadInput(f"{path} could not be unpickled even with --trust-pickle ({err})") \
            from None


def _refusal_detail(message: str) -> str:
    """What torch's weights-only unpickler refused, in a few words (its message is long and
    advises ``weights_only=False``, which bscompress spells ``--trust-pickle``)."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return f"it refers to {found.group(1)}"
    found = re.search(r"Unsupported operand \d+", message)
    return found.group(0) if found else "such as a whole nn.Module"


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def extract_state_dict(
    obj: Any, key: str | None = None, source: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], str | None, nn.Module | None]:
    """Find the weights inside a loaded checkpoint.

    Accepts a plain state_dict, a training-script wrapper (``state_dict``, ``model``,
    ``model_state_dict``, ``net``, ``ema`` ... keys, nested up to three levels) or a whole
    ``nn.Module`` (only reachable with ``trust_pickle``). ``key`` picks a wrapper entry
    explicitly (dotted for nesting). Returns ``(state_dict, key_path, module_or_None)``.
    """
    if key:
        node, path = obj, []
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                keys = sorted(node) if isinstance(node, Mapping) else []
                raise BadInput(
                    f"{source} has no entry {'.'.join([*path, part])!r} (--checkpoint-key); "
                    f"its keys are {keys[:12]}"
                )
            node, path = node[part], [*path, part]
        found = _search_state_dict(node, depth=0)
        if found is None:
            raise BadInput(f"{source}: entry {key!r} holds no tensors")
        state, sub, module = found
        return state, ".".join([key, *sub]), module
    found = _search_state_dict(obj, depth=0)
    if found is None:
        keys = sorted(map(str, obj)) if isinstance(obj, Mapping) else []
        what = f"its top-level keys are {keys[:12]}" if keys else f"it holds a {type(obj).__name__}"
        raise BadInput(
            f"no state_dict found in {source}: {what}; pass --checkpoint-key to name the entry"
        )
    state, sub, module = found
    return state, ".".join(sub) or None, module


def _search_state_dict(
    obj: Any, depth: int
) -> tuple[dict[str, torch.Tensor], list[str], nn.Module | None] | None:
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict()), [], obj
    if _is_state_dict(obj):
        return dict(obj), [], None
    if not isinstance(obj, Mapping) or depth >= 3:
        return None
    for wrapper in WRAPPER_KEYS:
        if wrapper in obj:
            found = _search_state_dict(obj[wrapper], depth + 1)
            if found is not None:
                state, sub, module = found
                return state, [wrapper, *sub], module
    # a state_dict with a few non-tensor extras (e.g. an 'epoch' counter next to the weights)
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if len(tensors) >= max(1, len(obj) // 2):
        return tensors, [], None
    return None


def normalize_keys(
    state: dict[str, torch.Tensor], model_keys: set[str]
) -> dict[str, torch.Tensor]:
    """Undo what wrappers and tools do to the keys: ``_orig_mod.`` (torch.compile) anywhere;
    a leading prefix every key has and the model's keys do not, where the keys then match
    the model's (``module.`` of DataParallel / DistributedDataParallel, ``model.`` of a
    Lightning module, ``net.`` …); and the ``weight_orig`` × ``weight_mask`` pairs of
    ``torch.nn.utils.prune``, folded into the ``weight`` the model holds."""
    out = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    while out and not set(out) & model_keys:
        prefix = next(iter(out)).split(".", 1)[0] + "."
        if not all(k.startswith(prefix) for k in out) or any(
                k.startswith(prefix) for k in model_keys):
            break
        stripped = {k[len(prefix):]: v for k, v in out.items()}
        if prefix != "module." and len(set(stripped) & model_keys) < len(model_keys) / 2:
            break  # not the model's keys under a prefix
        out = stripped
    for key in [k for k in out if k.endswith("_orig")]:
        base, mask = key[:-len("_orig")], key[:-len("_orig")] + "_mask"
        if base in model_keys and base not in out and mask in out and (
                out[mask].shape == out[key].shape):
            out[base] = out.pop(key) * out.pop(mask)
    return out


def allow_nonfinite_default() -> bool:
    """``BSCOMPRESS_ALLOW_NONFINITE=1``: let NaN/Inf weights load (for inspecting them)."""
    return os.environ.get("BSCOMPRESS_ALLOW_NONFINITE", "") not in ("", "0")


def check_tensors(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                  source: str, allow_nonfinite: bool = False) -> list[str]:
    """Refuse weights the model cannot use as they are; return notes on what was converted.

    Integer and bool tensors where the model holds floating point (a quantized or corrupted
    checkpoint) are refused, and so are NaN/±Inf values unless ``allow_nonfinite``. Other
    floating dtypes (half, bfloat16, float64) are converted to the model's on load.

    Raises:
        BadInput: naming the first offending tensor.
    """
    converted: dict[tuple[str, str], list[str]] = {}
    for key, want in expected.items():
        got = state.get(key)
        if got is None:
            continue
        if got.layout != torch.strided:
            layout = str(got.layout).replace("torch.", "")
            raise BadInput(f"{source}: tensor {key!r} is stored {layout}: bscompress needs "
                           "dense weights (save them after .to_dense())")
        if got.device.type == "meta":
            raise BadInput(f"{source}: tensor {key!r} holds no values (a meta tensor): save "
                           "the weights of a model that was loaded or trained")
        if not want.is_floating_point():
            continue
        if not got.is_floating_point():
            raise BadInput(
                f"{source}: tensor {key!r} is {str(got.dtype).replace('torch.', '')} where the "
                f"model holds {str(want.dtype).replace('torch.', '')}: bscompress needs the "
                "floating-point weights of a trained model (dequantize or re-export them)"
            )
        finite = torch.isfinite(got if got.element_size() > 1 else got.float())  # float8
        # as the model will hold it: float64 values past float32's range become infinite
        loaded = torch.isfinite(got.to(want.dtype)) if got.dtype != want.dtype else finite
        if not allow_nonfinite and not bool(loaded.all()):
            bad = int((~loaded).sum())
            overflow = bool(finite.all())
            raise BadInput(
                f"{source}: tensor {key!r} holds {bad} "
                + (f"value{'s' * (bad != 1)} beyond the range of the model's "
                   f"{str(want.dtype).replace('torch.', '')} (infinite once loaded)"
                   if overflow else f"NaN or infinite value{'s' * (bad != 1)}")
                + ": the checkpoint is broken (a diverged run?); pick another checkpoint, or "
                "set BSCOMPRESS_ALLOW_NONFINITE=1 to load it anyway"
            )
        if got.dtype != want.dtype:
            pair = (str(got.dtype).replace("torch.", ""), str(want.dtype).replace("torch.", ""))
            converted.setdefault(pair, []).append(key)
    return [f"{source}: {len(keys)} {a} tensor{'s' * (len(keys) != 1)} converted to {b}"
            for (a, b), keys in converted.items()]


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str, what: str,
                 allow_nonfinite: bool = False) -> list[str]:
    """``model.load_state_dict(state, strict=True)`` with a one-sentence error naming the
    first missing, unexpected and mis-shaped keys, after :func:`check_tensors`; returns its
    notes. A BatchNorm whose running variance is negative is refused too (NaN outputs),
    unless ``allow_nonfinite``."""
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise BadInput(f"{source}: its weights are not a mapping of names to tensors")
    # module versions (``_metadata``) drive some modules' loading (torchvision's MNASNet);
    # copies of the dict drop them: the checkpoint's own, else the model's
    metadata, keys = getattr(state, "_metadata", None), set(state)
    state = normalize_keys(state, set(model.state_dict()))
    expected = model.state_dict()
    if metadata is None or set(state) != keys:  # none, or for the keys before renaming
        metadata = getattr(expected, "_metadata", {})
    state = OrderedDict(state)
    state._metadata = metadata
    for key in [k for k in expected if k not in state and k.endswith(".num_batches_tracked")]:
        state[key] = expected[key]  # a checkpoint from before PyTorch 0.4.1 counts no batches
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} (checkpoint {list(state[k].shape)} vs model {list(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", shapes)):
            if items:
                more = f" and {len(items) - 3} more" if len(items) > 3 else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:3])}{more}")
        raise BadInput(
            f"{source} does not match {what}: {'; '.join(parts)}; check --arch and --arch-kwargs"
        )
    notes = check_tensors(state, expected, source, allow_nonfinite)
    model.load_state_dict(state, strict=True)
    for name, module in model.named_modules():
        var = getattr(module, "running_var", None)
        if (not allow_nonfinite and isinstance(module, nn.modules.batchnorm._NormBase)
                and isinstance(var, torch.Tensor) and var.is_floating_point()
                and bool((var < 0).any())):
            raise BadInput(f"{source}: the running variance of {name} holds negative values, "
                           "which no training gives (the checkpoint is broken): the model's "
                           "outputs would be NaN; pick another checkpoint")
    return notes



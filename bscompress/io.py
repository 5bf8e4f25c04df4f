"""Loading models and checkpoints, and saving/loading bscompress archives.

A MODEL argument is one of:

* a checkpoint file plus an architecture spec (``--arch``);
* a bare architecture spec (random initialisation, seeded; useful for timing);
* a bscompress archive, which carries its spec, Plan and weights and needs nothing else.

Architecture specs are ``torchvision:NAME``, ``timm:NAME`` (random weights, nothing
downloaded), ``package.module:NAME`` or ``path/to/file.py:NAME``, where NAME is an
``nn.Module`` class or a factory returning one, called with ``arch_kwargs``.

Nothing is ever unpickled unless the caller passes ``trust_pickle=True``: checkpoints are read
with ``torch.load(weights_only=True)`` or safetensors. An archive's architecture is built only
when it is built-in or signed by this user, unless ``trust_pickle`` (the one consent flag,
``--trust-code`` / ``--trust-pickle``) says the file may run code (:mod:`bscompress.trust`).
Weights must be floating point and finite where the model's are (``allow_nonfinite`` or
``BSCOMPRESS_ALLOW_NONFINITE=1`` lets NaN/Inf through).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import json
import os
import pickle
import re
import struct
import sys
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from io import StringIO
from pathlib import Path
from typing import Any

import torch
from torch import nn

# registered on import: the blocks, modifiers and fixed/CondConv layers archives may hold
import bscompress.fixed_kernels  # noqa: F401
import bscompress.methods  # noqa: F401
import bscompress.upcycle  # noqa: F401
from bscompress._version import __version__
from bscompress.errors import BadInput
from bscompress.files import (  # noqa: F401  (the output guard, re-exported)
    atomic_output,
    atomic_output_with_companions,
    check_output_path,
    write_json_atomic,
)
from bscompress.plan import Plan
from bscompress.surgery import apply_plan
from bscompress.trust import check_archive_arch, check_json_value, sign_arch

ARCHIVE_FORMAT = "bscompress-archive"
ARCHIVE_VERSION = 1

#: Keys under which training scripts commonly nest the weights, in order of preference.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "ema", "model_ema",
                "state_dict_ema", "module")

#: Input shapes of torchvision models that do not take 224×224 images.
_TORCHVISION_SIZES = {"inception_v3": 299}


# ---------------------------------------------------------------------------------------------
# architecture specs


@dataclass(frozen=True)
class ArchSpec:
    """An architecture: ``spec`` as the user wrote it and the keyword arguments of the call."""

    spec: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "kwargs": dict(self.kwargs)}


def looks_like_arch_spec(text: str) -> bool:
    """True when ``text`` has the form of an architecture spec (``prefix:NAME``)."""
    if ":" not in text:
        return False
    prefix, name = text.rsplit(":", 1)
    if not name.isidentifier():
        return False
    return prefix in ("torchvision", "timm") or prefix.endswith(".py") or all(
        part.isidentifier() for part in prefix.split(".")
    )


def parse_arch_kwargs(text: str | None) -> dict[str, Any]:
    """Parse ``--arch-kwargs`` (a JSON object) into a dict."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadInput(
            f"--arch-kwargs is not valid JSON ({err.msg}); write it like '{{\"num_classes\": 10}}'"
        ) from None
    if not isinstance(value, dict):
        raise BadInput("--arch-kwargs must be a JSON object, like '{\"num_classes\": 10}'")
    return value


def _resolve_callable(spec: str, base_dir: Path | None = None) -> Any:
    prefix, name = spec.rsplit(":", 1)
    if prefix == "torchvision":
        import torchvision

        available = torchvision.models.list_models()
        if name not in available:
            close = difflib.get_close_matches(name, available, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise BadInput(f"--arch {spec}: torchvision has no model {name!r}{hint}")
        return lambda **kw: torchvision.models.get_model(name, weights=None, **kw)
    if prefix == "timm":
        return _timm_factory(spec, name)
    if prefix.endswith(".py"):
        path = Path(prefix)
        if not path.is_absolute() and base_dir is not None and (base_dir / path).is_file():
            path = base_dir / path  # an archive's own folder first, then the working directory
        if not path.is_file():
            raise BadInput(f"--arch {spec}: file {prefix} does not exist")
        module_name = "bscompress_user_" + re.sub(r"\W", "_", str(path.resolve()))
        module = sys.modules.get(module_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise BadInput(f"--arch {spec}: cannot import {prefix} as a Python file")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module
            try:
                with _user_code(f"--arch {spec}: importing {prefix} failed", prefix):
                    loader_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[module_name]
                raise
    else:
        try:
            with _user_code(f"--arch {spec}: importing {prefix} failed", prefix):
                module = importlib.import_module(prefix)
        except BadInput as err:
            if isinstance(err.__cause__, ImportError):
                raise BadInput(f"--arch {spec}: cannot import module {prefix!r} "
                               f"({err.__cause__})") from None
            raise
    if not hasattr(module, name):
        public = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(name, public, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise BadInput(f"--arch {spec}: {prefix} has no attribute {name!r}{hint}")
    return getattr(module, name)


#: timm keyword arguments that download weights or read them from a file
TIMM_WEIGHT_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                      "checkpoint_path", "cache_dir")


def _timm():
    try:
        import timm
    except ImportError:
        raise BadInput("timm is not installed: pip install timm, or name the architecture "
                       "another way (--arch package.module:NAME or file.py:NAME)") from None
    return timm


def _timm_factory(spec: str, name: str) -> Any:
    """``timm:NAME``: ``timm.create_model(NAME, pretrained=False, **kwargs)``, resolved through
    timm's model registry only (so an archive naming it builds without user code)."""
    timm = _timm()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise BadInput(f"--arch {spec}: timm has no model {name!r}{hint}")

    def create(**kwargs: Any) -> nn.Module:
        return timm.create_model(name, pretrained=False, **kwargs)

    create.__module__ = __name__
    return create


@contextlib.contextmanager
def _user_code(what: str, argv0: str) -> Iterator[None]:
    """Run user code (importing an architecture file, calling its factory) with an empty
    ``sys.argv`` (scripts that parse arguments) and turn whatever it raises, ``SystemExit``
    included, into :class:`BadInput` ``"{what} (...)"``; what it printed on stderr is kept
    for the message when it exits, and passed on otherwise."""
    argv = sys.argv
    sys.argv = [argv0]
    printed = StringIO()
    try:
        with contextlib.redirect_stderr(printed):  # argparse's usage lines
            yield
    except BadInput:
        raise
    except SystemExit as err:
        said = [line for line in printed.getvalue().splitlines() if line.strip()]
        raise BadInput(f"{what}: it called sys.exit({err.code!r})"
                       + (f" after printing {said[-1].strip()!r}" if said else "")
                       + "; guard its script part with 'if __name__ == \"__main__\":'"
                       ) from None
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise BadInput(f"{what} ({type(err).__name__}: {first})") from err
    else:
        sys.stderr.write(printed.getvalue())
    finally:
        sys.argv = argv


def build_arch(arch: ArchSpec, seed: int = 0, base_dir: Path | None = None) -> nn.Module:
    """Instantiate ``arch`` with seeded random weights; ``base_dir`` resolves relative .py paths."""
    weights = [k for k in arch.kwargs if k.startswith("weights")]
    if arch.spec.startswith("timm:"):
        weights = [k for k in arch.kwargs if k in TIMM_WEIGHT_KWARGS]
    if weights and arch.spec.startswith(("torchvision:", "timm:")):
        raise BadInput(
            f"--arch-kwargs must not set {weights[0]!r}: bscompress never downloads weights; "
            "pass a checkpoint file instead"
        )
    factory = _resolve_callable(arch.spec, base_dir)
    if not callable(factory):
        raise BadInput(f"--arch {arch.spec}: {arch.spec.rsplit(':', 1)[1]} is not callable")
    with torch.random.fork_rng(devices=[]), _user_code(
            f"--arch {arch.spec} cannot be built with --arch-kwargs {arch.kwargs}", arch.spec):
        torch.manual_seed(seed)
        model = factory(**arch.kwargs)
    if not isinstance(model, nn.Module):
        raise BadInput(
            f"--arch {arch.spec} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model.eval()


def default_input_shape(arch: ArchSpec | None) -> list[int] | None:
    """Input shape (batch 1) of a known architecture, or ``None`` if it cannot be inferred.

    torchvision classification models take 3×224×224 (inception_v3 3×299×299); a module that
    defines ``INPUT_SHAPE`` next to its factory declares its own.
    """
    if arch is None:
        return None
    prefix, name = arch.spec.rsplit(":", 1)
    if prefix == "torchvision":
        size = _TORCHVISION_SIZES.get(name, 224)
        return [1, 3, size, size]
    if prefix == "timm":
        with contextlib.suppress(BadInput, ImportError, KeyError, TypeError, ValueError):
            from timm.models import get_pretrained_cfg_value

            _timm_factory(arch.spec, name)
            # the size it is evaluated at (timm trains some models smaller)
            size = (get_pretrained_cfg_value(name, "test_input_size")
                    or get_pretrained_cfg_value(name, "input_size"))
            if size:
                return [1, *(int(s) for s in size)]
        return None
    with contextlib.suppress(BadInput):
        factory = _resolve_callable(arch.spec)
        module = sys.modules.get(getattr(factory, "__module__", ""), None)
        shape = getattr(module, "INPUT_SHAPE", None)
        if shape is not None:
            return [int(s) for s in shape]
    return None


# ---------------------------------------------------------------------------------------------
# checkpoint files


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
    """Undo the key prefixes that wrappers add: ``_orig_mod.`` (torch.compile) anywhere and a
    leading ``module.`` (DataParallel / DistributedDataParallel) when every key has it."""
    out = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    while out and all(k.startswith("module.") for k in out) and not all(
        k.startswith("module.") for k in model_keys
    ):
        out = {k[len("module."):]: v for k, v in out.items()}
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
        if got is None or not want.is_floating_point():
            continue
        if not got.is_floating_point():
            raise BadInput(
                f"{source}: tensor {key!r} is {str(got.dtype).replace('torch.', '')} where the "
                f"model holds {str(want.dtype).replace('torch.', '')}: bscompress needs the "
                "floating-point weights of a trained model (dequantize or re-export them)"
            )
        if not allow_nonfinite and not bool(torch.isfinite(got).all()):
            bad = int((~torch.isfinite(got)).sum())
            raise BadInput(
                f"{source}: tensor {key!r} holds {bad} NaN or infinite value"
                f"{'s' * (bad != 1)}: the checkpoint is broken (a diverged run?); pick "
                "another checkpoint, or set BSCOMPRESS_ALLOW_NONFINITE=1 to load it anyway"
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
    notes."""
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
    return notes


# ---------------------------------------------------------------------------------------------
# the MODEL argument


@dataclass
class LoadedModel:
    """A model as loaded from a MODEL argument, with where it came from.

    Attributes:
        model: the module in eval mode, on CPU.
        arch: the architecture spec, or ``None`` for a trusted pickled module.
        plan: the Plan that was applied (archives), else ``None``.
        source: the file it was read from, or ``None`` for a bare spec.
        sha256: checksum of ``source``.
        checkpoint_key: the wrapper entry the weights came from (``model``, ``ema`` ...).
        metadata: archive metadata (version, creation time, preprocessing ...).
        notes: what loading changed and the user should know (dtype conversions).
    """

    model: nn.Module
    arch: ArchSpec | None = None
    plan: Plan | None = None
    source: Path | None = None
    sha256: str | None = None
    checkpoint_key: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def is_archive(self) -> bool:
        return self.plan is not None


def load_model(
    model: str | Path,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | str | None = None,
    trust_pickle: bool = False,
    checkpoint_key: str | None = None,
    arch_for_checkpoints_only: bool = False,
    allow_nonfinite: bool | None = None,
) -> LoadedModel:
    """Resolve a MODEL argument (checkpoint + ``arch``, bare spec, or archive) into a module.

    Args:
        model: a checkpoint or archive path, or an architecture spec.
        arch: architecture spec for a plain checkpoint (``torchvision:resnet18``,
            ``pkg.mod:factory``, ``file.py:Class``).
        arch_kwargs: keyword arguments for the architecture (dict or JSON text).
        trust_pickle: trust the file to run code: allow unpickling a whole pickled
            ``nn.Module``, and building the architecture an archive names even when it is
            neither built-in nor signed by this user (``--trust-code``).
        checkpoint_key: dotted entry of a wrapper checkpoint holding the weights.
        arch_for_checkpoints_only: ignore ``arch`` for archives and bare specs instead of
            refusing it (for commands that take several models under one ``--arch``).
        allow_nonfinite: load NaN/Inf weights (default: ``BSCOMPRESS_ALLOW_NONFINITE``).

    Raises:
        BadInput: one sentence naming what is wrong and what to do.
    """
    kwargs = parse_arch_kwargs(arch_kwargs) if isinstance(arch_kwargs, str) else dict(
        arch_kwargs or {}
    )
    text = str(model)
    path = Path(text)
    if not path.exists() and looks_like_arch_spec(text):
        if arch and not arch_for_checkpoints_only:
            raise BadInput(f"{text} is an architecture spec: give either it or --arch, not both")
        spec = ArchSpec(text, kwargs)
        return LoadedModel(build_arch(spec), arch=spec)
    if not path.exists():
        raise BadInput(
            f"{text}: no such file; MODEL is a checkpoint path, a bscompress archive or an "
            "architecture spec such as torchvision:resnet18"
        )
    if allow_nonfinite is None:
        allow_nonfinite = allow_nonfinite_default()
    obj, st_meta = read_checkpoint(path, trust_pickle=trust_pickle)
    digest = file_sha256(path)
    header = _archive_header(obj, st_meta, path)
    if header is not None:
        if arch and not arch_for_checkpoints_only:
            raise BadInput(f"{path} is a bscompress archive: it needs no --arch")
        loaded = _load_archive(path, header, obj, trust_pickle, allow_nonfinite)
        loaded.sha256 = digest
        return loaded
    state, key_path, module = extract_state_dict(obj, checkpoint_key, source=str(path))
    if arch is None:
        if module is not None:
            module = module.cpu().eval()
            floating = {k: v for k, v in module.state_dict().items() if v.is_floating_point()}
            notes = check_tensors(floating, floating, str(path), allow_nonfinite)
            return LoadedModel(module, source=path, sha256=digest, checkpoint_key=key_path,
                               notes=notes)
        raise BadInput(
            f"{path} holds only weights: pass --arch SPEC (e.g. torchvision:resnet18, "
            "my_pkg.models:Net or models.py:Net) to say which architecture they belong to"
        )
    spec = ArchSpec(arch, kwargs)
    net = build_arch(spec)
    notes = load_weights(net, state, str(path), f"--arch {arch}", allow_nonfinite)
    return LoadedModel(net, arch=spec, source=path, sha256=digest, checkpoint_key=key_path,
                       notes=notes)


# ---------------------------------------------------------------------------------------------
# archives


def _archive_header(obj: Any, st_meta: dict[str, str], path: Path | str = "the file"
                    ) -> dict[str, Any] | None:
    if "bscompress" in st_meta:
        try:
            header = json.loads(st_meta["bscompress"])
        except (json.JSONDecodeError, TypeError):
            raise BadInput(f"{path} is a damaged bscompress archive (its safetensors metadata "
                           "'bscompress' is not JSON)") from None
        if not isinstance(header, dict):
            raise BadInput(f"{path} is a damaged bscompress archive (its safetensors metadata "
                           "'bscompress' is not a JSON object)")
        return header
    if isinstance(obj, Mapping) and obj.get("format") == ARCHIVE_FORMAT:
        return {k: v for k, v in obj.items() if k != "state_dict"}
    return None


def _archive_parts(path: Path, header: dict[str, Any]) -> tuple[ArchSpec, Plan, dict]:
    """The architecture, Plan and metadata of an archive header, every field type-checked."""
    def damaged(why: str) -> BadInput:
        return BadInput(f"{path} is a damaged bscompress archive ({why}); write it again "
                        "with bscompress")

    version = header.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise damaged(f"format_version {version!r} is not a version number")
    if version > ARCHIVE_VERSION:
        raise BadInput(
            f"{path} is a version-{version} archive; this bscompress reads version "
            f"{ARCHIVE_VERSION}: upgrade bscompress"
        )
    arch = header.get("arch")
    if not isinstance(arch, Mapping) or not isinstance(arch.get("spec"), str):
        raise damaged("'arch' must be an object with a string 'spec'")
    kwargs = arch.get("kwargs", {})
    if not isinstance(kwargs, Mapping):
        raise damaged("'arch.kwargs' must be an object")
    if not looks_like_arch_spec(arch["spec"]):
        raise damaged(f"arch spec {arch['spec']!r} is not of the form prefix:NAME")
    check_json_value(dict(kwargs), f"{path}: arch.kwargs")
    metadata = header.get("metadata", {})
    if not isinstance(metadata, Mapping):
        raise damaged("'metadata' must be an object")
    if not isinstance(header.get("plan"), Mapping):
        raise damaged("'plan' must be an object")
    try:
        plan = Plan.from_dict(header["plan"])
    except (KeyError, TypeError, ValueError) as err:
        raise damaged(str(err)) from None
    return ArchSpec(arch["spec"], dict(kwargs)), plan, dict(metadata)


def _load_archive(path: Path, header: dict[str, Any], obj: Any, trust_code: bool = False,
                  allow_nonfinite: bool = False) -> LoadedModel:
    spec, plan, metadata = _archive_parts(path, header)
    check_archive_arch(spec.to_dict(), header.get("arch_signature"), trust_code, str(path))
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping):
        raise BadInput(f"{path} is a damaged bscompress archive ('state_dict' is not a "
                       "mapping of names to tensors)")
    model = build_arch(spec, base_dir=path.parent)
    try:
        apply_plan(model, plan)
    except BadInput as err:
        raise BadInput(f"{path} is a damaged bscompress archive: {err}") from None
    notes = load_weights(model, dict(state), str(path),
                         f"the architecture of its plan ({spec.spec})", allow_nonfinite)
    return LoadedModel(model.eval(), arch=spec, plan=plan, source=path, metadata=metadata,
                       notes=notes)


def save_archive(
    path: str | Path,
    model: nn.Module,
    arch: ArchSpec,
    plan: Plan,
    *,
    source_sha256: str | None = None,
    metadata: dict[str, Any] | None = None,
    force: bool = False,
    inputs: tuple[str | Path, ...] = (),
) -> Path:
    """Write a bscompress archive atomically.

    ``.safetensors`` paths get a safetensors file whose string metadata holds the JSON header;
    any other path a ``torch.save`` dict (loadable with ``weights_only=True``) with keys
    ``format``, ``format_version``, ``arch``, ``plan``, ``metadata`` and ``state_dict``.
    """
    path = Path(path)
    meta = {
        "bscompress_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_sha256": source_sha256,
        **(metadata or {}),
    }
    header = {
        "format": ARCHIVE_FORMAT,
        "format_version": ARCHIVE_VERSION,
        "arch": arch.to_dict(),
        "arch_signature": sign_arch(arch.to_dict()),
        "plan": plan.to_dict(),
        "metadata": meta,
    }
    try:
        json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise BadInput(f"archive metadata must be JSON-serialisable ({err})") from None
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_output(path, force=force, inputs=inputs) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(_untie(state), str(tmp), metadata={"bscompress": json.dumps(header)})
        else:
            torch.save({**header, "state_dict": state}, tmp)
    return path


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory; give each key its own storage."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def load(path: str | Path, trust_code: bool = False) -> nn.Module:
    """Load a bscompress archive: rebuild the architecture, apply its Plan, load the weights.

    ``trust_code`` allows an architecture that is neither built-in nor signed by this user
    (it imports and runs the code the archive names)."""
    path = Path(path)
    obj, st_meta = read_checkpoint(path)
    header = _archive_header(obj, st_meta, path)
    if header is None:
        raise BadInput(f"{path} is not a bscompress archive; use load_model() with an arch")
    return _load_archive(path, header, obj, trust_code, allow_nonfinite_default()).model

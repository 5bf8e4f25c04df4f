"""The MODEL argument (``load_model``) and bscompress archives (``save_archive``, ``load``).

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
``--trust-code`` / ``--trust-pickle``) says the file may run code (:mod:`bscompress.io.trust`).
Weights must be floating point and finite where the model's are (``allow_nonfinite`` or
``BSCOMPRESS_ALLOW_NONFINITE=1`` lets NaN/Inf through).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

# registered on import: the blocks, modifiers and fixed/CondConv layers archives may hold
import bscompress.methods  # noqa: F401
import bscompress.transforms.fixed_kernels  # noqa: F401
import bscompress.transforms.upcycle  # noqa: F401
from bscompress._version import __version__
from bscompress.core.errors import BadInput
from bscompress.core.files import atomic_output
from bscompress.core.plan import Plan
from bscompress.core.surgery import apply_plan
from bscompress.io.arch import (
    ArchSpec,
    build_arch,
    default_input_shape,
    looks_like_arch_spec,
    parse_arch_kwargs,
)
from bscompress.io.checkpoint import (
    allow_nonfinite_default,
    check_tensors,
    extract_state_dict,
    file_sha256,
    load_weights,
    read_checkpoint,
)
from bscompress.io.trust import check_archive_arch, check_json_value, sign_arch

ARCHIVE_FORMAT = "bscompress-archive"
ARCHIVE_VERSION = 1


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

    @property
    def rewritten(self) -> bool:
        """An archive whose model bscompress changed (decomposed, fixed kernels, upcycled),
        not one that ``pack`` wrote of a model as it was."""
        plan = self.plan
        return plan is not None and bool(plan.layers or plan.summary.upcycle is not None
                                         or plan.summary.fixed_kernels is not None)

    @property
    def known_input_shape(self) -> list[int] | None:
        """The input shape an archive records, else the one its architecture declares
        (``arch.default_input_shape``), else ``None``."""
        recorded = self.plan.input_shape if self.plan is not None else None
        return list(recorded) if recorded else default_input_shape(self.arch)


def load_model(
    model: str | Path,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | str | None = None,
    trust_pickle: bool = False,
    checkpoint_key: str | None = None,
    arch_for_checkpoints_only: bool = False,
    allow_nonfinite: bool | None = None,
    input_shape: list[int] | None = None,
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
        input_shape: the input shape (batch first) that gives an architecture's lazy modules
            their shapes where it declares none (``--input-shape``); archives use the one
            they record.

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
        return LoadedModel(build_arch(spec, input_shape=input_shape), arch=spec)
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
    net = build_arch(spec, input_shape=input_shape)
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
    model = build_arch(spec, base_dir=path.parent, input_shape=plan.input_shape)
    try:
        apply_plan(model, plan)
    except BadInput as err:
        raise BadInput(f"{path} is a damaged bscompress archive: {err}") from None
    notes = load_weights(model, dict(state), str(path),
                         f"the architecture of its plan ({spec.spec})", allow_nonfinite)
    recorded = header.get("weights_sha256")
    if recorded is not None and recorded != weights_sha256(state):
        raise BadInput(f"{path} is a damaged bscompress archive: its weights are not those it "
                       "was written with (their SHA-256 differs: a corrupted or edited file); "
                       "get a fresh copy")
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
    header["weights_sha256"] = weights_sha256(state)
    with atomic_output(path, force=force, inputs=inputs) as tmp:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            save_file(_untie(state), str(tmp), metadata={"bscompress": json.dumps(header)})
        else:
            torch.save({**header, "state_dict": state}, tmp)
    return path


def weights_sha256(state: Mapping[str, Any]) -> str:
    """SHA-256 of a state dict: each key in order with its dtype, shape and bytes. Written
    into an archive and checked on load, so that a weight changed after writing (a flipped
    bit, an edit) is refused instead of loading as a silently different model."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key]
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            digest.update(f"{key}|{type(tensor).__name__}".encode())
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


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

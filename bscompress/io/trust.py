"""Which architecture an archive may name without the user's consent.

An archive names its architecture by data (``{"spec": ..., "kwargs": ...}``); building it
imports and calls what the spec names. Loading an archive therefore builds, without asking:

* **built-in** architectures: ``torchvision:NAME`` and ``timm:NAME`` for a name in
  torchvision's or timm's model registry, and the public names (``__all__``) of
  :data:`BUILTIN_ARCH_MODULES`;
* architectures **signed by this user**: every archive bscompress writes carries an
  HMAC-SHA256 of its architecture under a key kept in the user's configuration folder
  (``$BSCOMPRESS_KEY_FILE``, else ``$XDG_CONFIG_HOME/bscompress/archive.key``, else
  ``~/.config/bscompress/archive.key``; created on first use, mode 0600). An archive you
  made from your own ``--arch models.py:Net`` loads again on your machine; the same archive
  from someone else, or with its architecture edited, does not.

Anything else needs the consent flag (``--trust-code``, also spelled ``--trust-pickle``).
Keyword arguments must be JSON values in any case. See docs/security.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

from bscompress.core.errors import BadInput

#: Modules whose public architectures (their ``__all__``) archives may name freely.
BUILTIN_ARCH_MODULES = ("bscompress.demo", "bscompress.models")

_JSON_SCALARS = (str, int, float, bool, type(None))


def check_json_value(value: Any, where: str) -> None:
    """Refuse anything but JSON scalars, lists and string-keyed dicts (nested)."""
    if isinstance(value, _JSON_SCALARS):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_json_value(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise BadInput(f"{where} has a key {key!r} that is not a string")
            check_json_value(item, f"{where}.{key}")
        return
    raise BadInput(f"{where} holds a {type(value).__name__}: only JSON values (numbers, "
                   "strings, booleans, null, lists and objects) are allowed")


def is_builtin_arch(spec: str) -> bool:
    """True for ``torchvision:NAME``, ``timm:NAME`` and the public architectures of
    bscompress itself."""
    if ":" not in spec:
        return False
    prefix, name = spec.rsplit(":", 1)
    if prefix in ("torchvision", "timm"):
        return True  # resolved through the library's model registry (io.arch._resolve_callable)
    if prefix not in BUILTIN_ARCH_MODULES:
        return False
    module = importlib.import_module(prefix)
    return name in getattr(module, "__all__", ()) and callable(getattr(module, name, None))


def key_path() -> Path:
    """Where this user's archive-signing key lives."""
    explicit = os.environ.get("BSCOMPRESS_KEY_FILE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "bscompress" / "archive.key"


def _read_key(path: Path) -> bytes | None:
    with contextlib.suppress(OSError, ValueError):
        key = bytes.fromhex(path.read_text().strip())
        if len(key) >= 16:
            return key
    return None


def user_key(create: bool = True) -> bytes | None:
    """This user's signing key (created with mode 0600 when missing and ``create``), or
    ``None`` where the configuration folder cannot hold one."""
    path = key_path()
    key = _read_key(path)
    if key is not None or not create:
        return key
    # written whole to a private temporary file, then linked into place: a process that
    # races this one (two test workers, two commands on a fresh machine) reads either no
    # key or a whole one, never an empty file, and the first link wins
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".archive.key.")  # 0600
    except OSError:
        return None
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
        with contextlib.suppress(FileExistsError):  # another process made it first
            os.link(temporary, path)
    except OSError:
        return None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
    return _read_key(path)


def _message(arch: dict[str, Any]) -> bytes:
    return json.dumps({"spec": arch["spec"], "kwargs": arch.get("kwargs", {})},
                      sort_keys=True).encode()


def sign_arch(arch: dict[str, Any]) -> str | None:
    """HMAC-SHA256 (hex) of an archive's architecture under this user's key."""
    key = user_key()
    if key is None:
        return None
    return hmac.new(key, _message(arch), hashlib.sha256).hexdigest()


def signed_by_user(arch: dict[str, Any], signature: Any) -> bool:
    """True when ``signature`` is this user's signature of ``arch``."""
    if not isinstance(signature, str):
        return False
    key = user_key(create=False)
    if key is None:
        return False
    expected = hmac.new(key, _message(arch), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)


def check_archive_arch(arch: dict[str, Any], signature: Any, trust_code: bool,
                       source: str) -> None:
    """Refuse to build an archive's architecture that would run code the user did not trust.

    Raises:
        BadInput: the spec is neither built-in nor signed by this user, and ``trust_code``
            is not set; or its kwargs are not JSON values.
    """
    check_json_value(arch.get("kwargs", {}), f"{source}: arch.kwargs")
    spec = arch["spec"]
    if trust_code or is_builtin_arch(spec) or signed_by_user(arch, signature):
        return
    prefix = spec.rsplit(":", 1)[0]
    what = f"the file {prefix}" if prefix.endswith(".py") else f"the module {prefix}"
    raise BadInput(
        f"{source} names the architecture {spec!r}: building it would import and run code "
        f"from {what}, and the archive was not written by you (no valid signature): pass "
        "--trust-code if you trust where the archive came from (see docs/security.md)"
    )

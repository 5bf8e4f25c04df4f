"""Architecture specs: ``torchvision:NAME``, ``timm:NAME`` (random weights, nothing
downloaded), ``package.module:NAME`` or ``path/to/file.py:NAME``, where NAME is an
``nn.Module`` class or a factory returning one, called with ``arch_kwargs``."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import inspect
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bscompress.core.errors import BadInput

#: Input shapes of torchvision models that do not take 224×224 images.
_TORCHVISION_SIZES = {"inception_v3": 299}


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
        # no weights, the backbone's either (segmentation and detection models download an
        # ImageNet backbone by default)
        none = {key: None for key in ("weights", "weights_backbone")
                if key in inspect.signature(torchvision.models.get_model_builder(name))
                .parameters}
        return lambda **kw: torchvision.models.get_model(name, **{**kw, **none})
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


def build_arch(arch: ArchSpec, seed: int = 0, base_dir: Path | None = None,
               input_shape: list[int] | None = None) -> nn.Module:
    """Instantiate ``arch`` with seeded random weights; ``base_dir`` resolves relative .py
    paths; ``input_shape`` (batch first) gives lazy modules their shapes where the
    architecture declares none (``--input-shape``, an archive's recorded shape)."""
    weights = [k for k, v in arch.kwargs.items() if k.startswith("weights") and v is not None]
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
    _materialize_lazy(model.eval(), arch, seed, input_shape)
    return model


def _materialize_lazy(model: nn.Module, arch: ArchSpec, seed: int,
                      input_shape: list[int] | None = None) -> None:
    """Give the lazy modules of ``model`` (``nn.LazyConv2d`` …, whose weights take their
    shapes from a first input) those shapes, by one seeded call on zeros of ``input_shape``,
    else of the input shape the architecture declares; nothing else can read, load or
    replace an uninitialised weight.

    Raises:
        BadInput: lazy modules and no shape (given, ``INPUT_SHAPE``, torchvision / timm
            size) to say what their first input is, or the call fails.
    """
    from torch.nn.parameter import is_lazy

    lazy = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
            if is_lazy(t)]
    if not lazy:
        return
    shape = list(input_shape) if input_shape else default_input_shape(arch)
    if shape is None:
        raise BadInput(f"--arch {arch.spec} holds lazy modules ({lazy[0]} …) whose weights take "
                       "their shapes from a first input, and it declares no INPUT_SHAPE: pass "
                       "--input-shape (e.g. 1,3,224,224), add INPUT_SHAPE = (1, C, H, W) to the "
                       "class or its module, or give those modules their input sizes")
    with torch.random.fork_rng(devices=[]), torch.no_grad(), _user_code(
            f"--arch {arch.spec}: its lazy modules cannot be given their shapes by a call on "
            f"an input of shape {shape}", arch.spec):
        torch.manual_seed(seed)
        model(torch.zeros(shape))


def default_input_shape(arch: ArchSpec | None) -> list[int] | None:
    """Input shape (batch 1) of a known architecture, or ``None`` if it cannot be inferred.

    torchvision classification models take 3×224×224 (inception_v3 3×299×299); a class with
    an ``INPUT_SHAPE`` attribute, or a module that defines ``INPUT_SHAPE`` next to its
    factory, declares its own.

    Raises:
        BadInput: a declared ``INPUT_SHAPE`` that is not a shape of whole numbers from 1.
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
    try:
        factory = _resolve_callable(arch.spec)
    except BadInput:
        return None
    module = sys.modules.get(getattr(factory, "__module__", ""), None)
    shape = getattr(factory, "INPUT_SHAPE", None)  # the class's own, else its module's
    shape = getattr(module, "INPUT_SHAPE", None) if shape is None else shape
    if shape is None:
        return None
    try:
        values = [int(s) for s in shape]
    except (TypeError, ValueError):
        values = []
    if len(values) < 2 or min(values) < 1:
        raise BadInput(f"{arch.spec} declares INPUT_SHAPE = {shape!r}, not a shape such as "
                       "(1, 3, 224, 224): fix it, or pass --input-shape")
    return values



"""bscompress: closed-form compression of trained PyTorch CNNs.

The Python API mirrors the CLI: every command is a function here.

>>> import bscompress
>>> loaded = bscompress.load_model("torchvision:resnet18")
>>> report = bscompress.inspect_model(loaded.model, [1, 3, 224, 224])
>>> model, plan = bscompress.decompose(loaded.model, "bsconv-u", [1, 3, 224, 224])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from bscompress._version import __version__

#: the public API: name → the module that defines it, imported on first use (PEP 562), so that
#: ``import bscompress.io.checkpoint`` or ``bscompress.core.errors`` loads only what they need
_API = {
    "InspectReport": "bscompress.analysis.analyze",
    "run_decompose": "bscompress.app.pipeline",
    "inspect_model": "bscompress.analysis.analyze",
    "decompose": "bscompress.compress.decomposition",
    "plan_decomposition": "bscompress.compress.decomposition",
    "BadInput": "bscompress.core.errors",
    "BSCompressError": "bscompress.core.errors",
    "CheckFailed": "bscompress.core.errors",
    "LayerPlan": "bscompress.core.plan",
    "Plan": "bscompress.core.plan",
    "Bench": "bscompress.core.recipe",
    "Calibration": "bscompress.core.recipe",
    "Decompose": "bscompress.core.recipe",
    "Export": "bscompress.core.recipe",
    "ModelStats": "bscompress.core.stats",
    "count_params": "bscompress.core.stats",
    "module_macs": "bscompress.core.stats",
    "Eligibility": "bscompress.core.surgery",
    "apply_plan": "bscompress.core.surgery",
    "eligibility": "bscompress.core.surgery",
    "replace_modules": "bscompress.core.surgery",
    "ArchSpec": "bscompress.io.arch",
    "LoadedModel": "bscompress.io.archive",
    "load": "bscompress.io.archive",
    "load_model": "bscompress.io.archive",
    "save_archive": "bscompress.io.archive",
    "METHODS": "bscompress.methods",
    "RankOptions": "bscompress.methods",
}

if TYPE_CHECKING:
    from bscompress.analysis.analyze import InspectReport, inspect_model
    from bscompress.app.pipeline import run_decompose
    from bscompress.compress.decomposition import decompose, plan_decomposition
    from bscompress.core.errors import BadInput, BSCompressError, CheckFailed
    from bscompress.core.plan import LayerPlan, Plan
    from bscompress.core.recipe import Bench, Calibration, Decompose, Export
    from bscompress.core.stats import ModelStats, count_params, module_macs
    from bscompress.core.surgery import Eligibility, apply_plan, eligibility, replace_modules
    from bscompress.io.arch import ArchSpec
    from bscompress.io.archive import LoadedModel, load, load_model, save_archive
    from bscompress.methods import METHODS, RankOptions


def __getattr__(name: str) -> object:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'bscompress' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


__all__ = [
    "ArchSpec",
    "Bench",
    "BSCompressError",
    "BadInput",
    "Calibration",
    "CheckFailed",
    "Decompose",
    "Eligibility",
    "Export",
    "InspectReport",
    "LayerPlan",
    "LoadedModel",
    "METHODS",
    "ModelStats",
    "Plan",
    "RankOptions",
    "__version__",
    "apply_plan",
    "count_params",
    "decompose",
    "eligibility",
    "inspect_model",
    "load",
    "load_model",
    "module_macs",
    "plan_decomposition",
    "replace_modules",
    "run_decompose",
    "save_archive",
]

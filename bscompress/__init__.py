"""bscompress: closed-form compression of trained PyTorch CNNs.

The Python API mirrors the CLI: every command is a function here.

>>> import bscompress
>>> loaded = bscompress.load_model("torchvision:resnet18")
>>> report = bscompress.inspect_model(loaded.model, [1, 3, 224, 224])
>>> model, plan = bscompress.decompose(loaded.model, "bsconv-u", [1, 3, 224, 224])
"""

from bscompress._version import __version__
from bscompress.analyze import InspectReport, inspect_model
from bscompress.decomposition import decompose, plan_decomposition
from bscompress.errors import BadInput, BSCompressError, CheckFailed
from bscompress.io import ArchSpec, LoadedModel, load, load_model, save_archive
from bscompress.methods import METHODS, RankOptions
from bscompress.plan import LayerPlan, Plan
from bscompress.stats import ModelStats, count_params, module_macs
from bscompress.surgery import Eligibility, apply_plan, eligibility, replace_modules

__all__ = [
    "ArchSpec",
    "BSCompressError",
    "BadInput",
    "CheckFailed",
    "Eligibility",
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
    "save_archive",
]

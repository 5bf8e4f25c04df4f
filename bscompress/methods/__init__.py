"""The factorization methods, one plug-in per file (:mod:`bscompress.methods.base` holds the
interface and the registry).

Importing this package registers the built-in methods, in the order of the imports below:
that order is ``METHODS``'s, the order ``--method auto`` tries its methods in, and the one
error messages list them in. A method from elsewhere registers itself the same way (a
:class:`Method` subclass with ``name=``, or :func:`register`); see docs/design.md, "Adding a
method".
"""

# the registration order is the import order: not sorted
# isort: off
from bscompress.methods.base import (
    LR_GROUPS,
    METHODS,
    ConvMethod,
    Method,
    RankOptions,
    auto_methods,
    block_method,
    get_method,
    lr_group,
    plain_view,
    rank_for_energy,
    register,
    relative_error,
    round_up,
    set_weight,
    unregister,
)
from bscompress.methods.bsconv_u import BSConvUMethod
from bscompress.methods.bsconv_s import BSConvSMethod
from bscompress.methods.dsc import DSCMethod
from bscompress.methods.tucker2 import Tucker2Method
from bscompress.methods.cp import CPMethod
from bscompress.methods.lowrank import SVDMethod
# isort: on

__all__ = [
    "LR_GROUPS", "METHODS", "BSConvSMethod", "BSConvUMethod", "CPMethod", "ConvMethod",
    "DSCMethod", "Method", "RankOptions", "SVDMethod", "Tucker2Method", "auto_methods",
    "block_method", "get_method", "lr_group", "plain_view", "rank_for_energy", "register",
    "relative_error", "round_up", "set_weight", "unregister",
]

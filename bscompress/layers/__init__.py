"""``nn.Module`` blocks built from factors (``from_factors``, ``from_conv``, ``empty_like``),
with ``to_dense()`` giving the equivalent dense weight for tests."""

from bscompress.layers.fixed import FixedKernelConv
from bscompress.layers.lowrank import LowRankConv1x1, LowRankLinear
from bscompress.layers.separable import BSConvS, BSConvU, DSConv
from bscompress.layers.tensor import CPConv, Tucker2Conv

__all__ = ["BSConvS", "BSConvU", "CPConv", "DSConv", "FixedKernelConv", "LowRankConv1x1",
           "LowRankLinear", "Tucker2Conv"]

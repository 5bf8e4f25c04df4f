"""Efficient CNN architectures, buildable from an architecture spec
(``bscompress.models:vgnetg_1_0mp`` with ``arch_kwargs`` ``{"num_classes": 10,
"in_channels": 1, "small_input": true}``). See ``docs/models.md``."""

from bscompress.models.vgnet import (
    INPUT_SHAPE,
    DownsamplingBlock,
    FixedDepthwiseConv2d,
    HalfIdentityBlock,
    SharedDepthwiseConv2d,
    VGNet,
    vgnetc_1_0mp,
    vgnetc_1_5mp,
    vgnete_1_5mp,
    vgnetf_1_5mp,
    vgnetg_1_0mp,
    vgnetg_1_5mp,
    vgnetg_2_0mp,
    vgnetg_2_5mp,
    vgnetg_5_0mp,
)

__all__ = [
    "INPUT_SHAPE",
    "DownsamplingBlock",
    "FixedDepthwiseConv2d",
    "HalfIdentityBlock",
    "SharedDepthwiseConv2d",
    "VGNet",
    "vgnetc_1_0mp",
    "vgnetc_1_5mp",
    "vgnete_1_5mp",
    "vgnetf_1_5mp",
    "vgnetg_1_0mp",
    "vgnetg_1_5mp",
    "vgnetg_2_0mp",
    "vgnetg_2_5mp",
    "vgnetg_5_0mp",
]

"""VGNet (Zhang et al., "Efficient CNN Architecture Design Guided by Visualization", ICME 2022).

Trained depthwise kernels, visualised, look like fixed filters: strided ones like Gaussian
blurs, many others like edge detectors (Sobel, Laplacian), and many middle-layer ones like the
identity with adjacent feature maps alike. VGNet builds on that with two blocks:

* :class:`DownsamplingBlock` — a stride-2 depthwise 3×3 (a **fixed Gaussian** in VGNetG/F,
  learned in VGNetC), then a pointwise block that makes only the *new* channels; the others
  are the blurred input channels passed on unchanged.
* :class:`HalfIdentityBlock` — half of the channels pass through unchanged (the identity
  mapping); the other half goes through a depthwise 3×3, and a pointwise block over both
  halves makes the new half.

Families (the reference code, github.com/ffiirree/cv-models ``cvm/models/vgnet.py``):

* **VGNetC** — every depthwise kernel learned.
* **VGNetG** — fixed Gaussian (σ = 1) depthwise kernels in the downsampling blocks.
* **VGNetF** — every depthwise kernel fixed: Gaussians in the downsampling blocks, edge
  detectors and Gaussians (``vgnetf``) or edge detectors alone (``vgnete``) elsewhere, each
  followed by a BatchNorm (a fixed kernel cannot scale itself).

Fixed kernels are registered buffers (in the ``state_dict``, never in ``parameters()``), built
from :mod:`bscompress.factorize.kernel_bank`.

Shapes: images ``[B, in_channels, H, W]`` → logits ``[B, num_classes]``. The stem and each of
the four stages halve H and W, 32× in all (``small_input=True``, the reference's
``thumbnail``, keeps the stem and the first stage at stride 1, 8× in all, for 28×28 or 32×32
images).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from bscompress.factorize.kernel_bank import gaussian_kernel, kernel_bank

__all__ = [
    "INPUT_SHAPE",
    "ConvBlock",
    "DownsamplingBlock",
    "FixedDepthwiseConv2d",
    "HalfIdentityBlock",
    "SharedDepthwiseConv2d",
    "VGNet",
    "VGNetStage",
    "edge_gaussian_kernels",
    "edge_kernels",
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

#: Input shape ``[B, C, H, W]`` of the ImageNet models (``bscompress inspect`` default).
INPUT_SHAPE = (1, 3, 224, 224)

#: σ of the fixed Gaussian of the downsampling blocks (the reference's ``GaussianBlur``).
DOWNSAMPLING_SIGMA = 1.0

Kernels = Literal["learned", "edge", "edge_gaussian"]
Downsampling = Literal["dwconv", "blur"]

_EDGES = ("sobel x", "sobel y", "laplacian 4", "laplacian 8")
#: Gaussians mixed with the edge detectors in VGNetF (one in every three channels).
_MIX_SIGMAS = (0.8, 1.0)


def _bank(names: tuple[str, ...]) -> torch.Tensor:
    """The named members of the 3×3 kernel bank, ``[len(names), 3, 3]``."""
    all_names, bank = kernel_bank((3, 3), sigmas=_MIX_SIGMAS)
    return torch.stack([bank[all_names.index(n)] for n in names])


def edge_kernels(channels: int) -> torch.Tensor:
    """Fixed edge detectors for ``channels`` depthwise channels, ``[channels, 3, 3]``:
    Sobel x, Sobel y, the 4- and the 8-neighbour Laplacian, cycled over the channels."""
    members = _bank(_EDGES)
    return members[torch.arange(channels) % len(members)]


def edge_gaussian_kernels(channels: int) -> torch.Tensor:
    """Fixed edge detectors and Gaussians for ``channels`` depthwise channels,
    ``[channels, 3, 3]``: Sobel x, Sobel y, Laplacian 4, Laplacian 8, Gaussian σ=0.8,
    Gaussian σ=1, cycled over the channels (two thirds edges, one third Gaussians)."""
    members = _bank(_EDGES + tuple(f"gaussian σ={s:g}" for s in _MIX_SIGMAS))
    return members[torch.arange(channels) % len(members)]


def _gaussian_kernels(channels: int, sigma: float = DOWNSAMPLING_SIGMA) -> torch.Tensor:
    return gaussian_kernel((3, 3), sigma).expand(channels, 3, 3)


class FixedDepthwiseConv2d(nn.Module):
    """A depthwise convolution with fixed kernels: ``[B, C, H, W]`` → ``[B, C, H', W']``
    (H' = ⌈H / stride⌉ with "same" padding). The kernels ``[C, kh, kw]`` are a registered
    buffer ``weight`` ``[C, 1, kh, kw]``: saved in the state_dict, never trained."""

    weight: torch.Tensor

    def __init__(self, kernels: torch.Tensor, stride: int = 1) -> None:
        super().__init__()
        channels, kh, kw = kernels.shape
        self.channels = channels
        self.kernel_size = (kh, kw)
        self.stride = stride
        self.padding = (kh // 2, kw // 2)
        self.register_buffer("weight", kernels.detach().to(torch.float32).reshape(
            channels, 1, kh, kw).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, None, self.stride, self.padding, 1, self.channels)

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                "fixed")


class SharedDepthwiseConv2d(nn.Module):
    """A learned depthwise 3×3 whose C/t kernels are shared by the t groups of C/t channels
    (channel c uses kernel c mod C/t): ``[B, C, H, W]`` → ``[B, C, H, W]``, 9·C/t parameters.
    The reference's last depthwise layer (t = 8)."""

    def __init__(self, channels: int, t: int = 8) -> None:
        super().__init__()
        if channels % t:
            raise ValueError(f"SharedDepthwiseConv2d: {channels} channels do not split into "
                             f"{t} groups")
        self.channels, self.t = channels, t
        self.weight = nn.Parameter(torch.empty(channels // t, 1, 3, 3))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.repeat(self.t, 1, 1, 1), None, 1, 1, 1, self.channels)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size=(3, 3), shared_by={self.t}"


class ConvBlock(nn.Sequential):
    """Convolution → ReLU → BatchNorm (the reference normalises *after* the activation):
    ``[B, in_channels, H, W]`` → ``[B, out_channels, H / stride, W / stride]``. Children
    ``conv``, ``act``, ``bn``; a 1×1 ``kernel_size`` is VGNet's pointwise block."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1,
                 stride: int = 1) -> None:
        super().__init__(OrderedDict([
            ("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                               kernel_size // 2, bias=False)),
            ("act", nn.ReLU(inplace=True)),
            ("bn", nn.BatchNorm2d(out_channels)),
        ]))


def _depthwise(channels: int, kernels: Kernels, stride: int = 1) -> tuple[nn.Module, nn.Module]:
    """A depthwise 3×3 (``dw``) and what follows it (``dw_bn``): a learned conv and no norm,
    or fixed kernels and a BatchNorm."""
    if kernels == "learned":
        return (nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False),
                nn.Identity())
    bank = edge_kernels(channels) if kernels == "edge" else edge_gaussian_kernels(channels)
    return FixedDepthwiseConv2d(bank, stride), nn.BatchNorm2d(channels)


class DownsamplingBlock(nn.Module):
    """``[B, M, H, W]`` → ``[B, N, H / stride, W / stride]``.

    ``dw`` (stride-``stride`` depthwise 3×3: a fixed Gaussian when ``fixed``, else learned)
    blurs the input; the last ``P = min(N // 2, M)`` blurred channels pass on unchanged
    (none when M > N) and ``pw`` (1×1 → ReLU → BN, M → N − P) makes the rest. Output:
    ``[passed P channels, pw's N − P channels]``. At stride 1 the depthwise is learned even
    when ``fixed`` (it does not downsample; as in the reference).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2,
                 fixed: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.passed = 0 if in_channels > out_channels else min(out_channels // 2, in_channels)
        self.dw: nn.Module
        if fixed and stride > 1:
            self.dw = FixedDepthwiseConv2d(_gaussian_kernels(in_channels), stride)
        else:
            self.dw = nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels,
                                bias=False)
        self.pw = ConvBlock(in_channels, out_channels - self.passed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(x)
        if not self.passed:
            return self.pw(x)
        return torch.cat([x[:, self.in_channels - self.passed:], self.pw(x)], 1)


class HalfIdentityBlock(nn.Module):
    """``[B, C, H, W]`` → ``[B, C, H, W]`` with half the channels an identity mapping.

    With the input split into halves ``x = [a, b]`` (C/2 channels each): the output is
    ``[b, pw([a, dw(b)])]`` — ``b`` passes on unchanged as the first half, and ``pw`` (1×1 →
    ReLU → BN, C → C/2) makes the second from ``a`` and the depthwise 3×3 ``dw`` of ``b``
    (learned, or fixed kernels followed by the BatchNorm ``dw_bn``).
    """

    def __init__(self, channels: int, kernels: Kernels = "learned") -> None:
        super().__init__()
        if channels % 2:
            raise ValueError(f"HalfIdentityBlock needs an even channel count, got {channels}")
        self.channels = channels
        half = channels // 2
        self.dw, self.dw_bn = _depthwise(half, kernels)
        self.pw = ConvBlock(channels, half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.channels // 2
        a, b = x[:, :half], x[:, half:]
        return torch.cat([b, self.pw(torch.cat([a, self.dw_bn(self.dw(b))], 1))], 1)


class VGNetStage(nn.Module):
    """One stage: a :class:`DownsamplingBlock` (``downsample``, M → N, stride ``stride``)
    then ``depth − 1`` :class:`HalfIdentityBlock` s (``blocks``, N channels):
    ``[B, M, H, W]`` → ``[B, N, H / stride, W / stride]``."""

    def __init__(self, in_channels: int, out_channels: int, depth: int, stride: int,
                 downsampling: Downsampling, kernels: Kernels) -> None:
        super().__init__()
        self.downsample = DownsamplingBlock(in_channels, out_channels, stride,
                                            fixed=downsampling == "blur")
        self.blocks = nn.Sequential(*[HalfIdentityBlock(out_channels, kernels)
                                      for _ in range(depth - 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class VGNet(nn.Module):
    """VGNet: ``[B, in_channels, H, W]`` → ``[B, num_classes]``.

    ``stem`` (3×3 conv, stride 2 → ReLU → BN, to ``widths[0]``), ``stage1``…``stage4``
    (:class:`VGNetStage`, ``widths[i]`` → ``widths[i+1]``, ``depths[i]`` blocks, stride 2;
    the stem and ``stage1`` at stride 1 with ``small_input``), ``head`` (a depthwise 3×3 —
    :class:`SharedDepthwiseConv2d` with t = 8 when learned, fixed kernels + BN otherwise —
    and a pointwise block), global average ``pool``, ``classifier`` (dropout, linear).

    Args:
        widths: five channel widths (stem, then each stage's output).
        depths: blocks per stage (the downsampling block included).
        downsampling: ``"blur"`` (fixed Gaussian, VGNetG/F) or ``"dwconv"`` (learned, VGNetC).
        kernels: the other depthwise kernels: ``"learned"`` (VGNetC/G), ``"edge"`` or
            ``"edge_gaussian"`` (VGNetF: fixed).
        small_input: the stem and the first stage at stride 1 (the reference's
            ``thumbnail``) for 28–32 px images.
        dropout: dropout rate before the classifier.
    """

    def __init__(self, widths: tuple[int, ...] | list[int], depths: tuple[int, ...] | list[int],
                 downsampling: Downsampling = "blur", kernels: Kernels = "learned",
                 num_classes: int = 1000, in_channels: int = 3, small_input: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if len(widths) != 5 or len(depths) != 4:
            raise ValueError("VGNet takes five widths (stem and four stages) and four depths")
        self.stem = ConvBlock(in_channels, widths[0], 3, stride=1 if small_input else 2)
        strides = (1 if small_input else 2, 2, 2, 2)
        for i in range(4):
            self.add_module(f"stage{i + 1}", VGNetStage(
                widths[i], widths[i + 1], depths[i], strides[i], downsampling, kernels))
        last = widths[-1]
        if kernels == "learned":
            dw, dw_bn = SharedDepthwiseConv2d(last, t=8), nn.Identity()
        else:
            dw, dw_bn = _depthwise(last, kernels)
        self.head = nn.Sequential(OrderedDict([("dw", dw), ("dw_bn", dw_bn),
                                               ("pw", ConvBlock(last, last))]))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(OrderedDict([
            ("dropout", nn.Dropout(dropout)), ("fc", nn.Linear(last, num_classes))]))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_channels, H, W]`` → ``[B, widths[-1], ⌈H/32⌉, ⌈W/32⌉]`` (⌈H/8⌉,
        ⌈W/8⌉ with ``small_input``)."""
        x = self.stem(x)
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _factory(widths: tuple[int, ...], depths: tuple[int, ...], downsampling: Downsampling,
             kernels: Kernels, num_classes: int, in_channels: int, small_input: bool,
             dropout: float) -> VGNet:
    return VGNet(widths, depths, downsampling, kernels, num_classes=num_classes,
                 in_channels=in_channels, small_input=small_input, dropout=dropout)


_W10, _D10 = (28, 56, 112, 224, 368), (4, 7, 13, 2)
_W15, _D15 = (32, 64, 128, 256, 512), (3, 7, 14, 2)


def vgnetc_1_0mp(*, num_classes: int = 1000, in_channels: int = 3, small_input: bool = False,
                 dropout: float = 0.0) -> VGNet:
    """VGNetC-1.0MP: VGNetG-1.0MP's channels with every depthwise kernel learned."""
    return _factory(_W10, _D10, "dwconv", "learned", num_classes, in_channels, small_input,
                    dropout)


def vgnetc_1_5mp(*, num_classes: int = 1000, in_channels: int = 3, small_input: bool = False,
                 dropout: float = 0.0) -> VGNet:
    """VGNetC-1.5MP: VGNetG-1.5MP's channels with every depthwise kernel learned."""
    return _factory(_W15, _D15, "dwconv", "learned", num_classes, in_channels, small_input,
                    dropout)


def vgnetg_1_0mp(*, num_classes: int = 1000, in_channels: int = 3, small_input: bool = False,
                 dropout: float = 0.0) -> VGNet:
    """VGNetG-1.0MP: widths [28, 56, 112, 224, 368], blocks [4, 7, 13, 2], fixed Gaussian
    downsampling (0.99M parameters at 1000 classes)."""
    return _factory(_W10, _D10, "blur", "learned", num_classes, in_channels, small_input,
                    dropout)


def vgnetg_1_5mp(*, num_classes: int = 1000, in_channels: int = 3, small_input: bool = False,
                 dropout: float = 0.0) -> VGNet:
    """VGNetG-1.5MP: widths [32, 64, 128, 256, 512], blocks [3, 7, 14, 2]."""
    return _factory(_W15, _D15, "blur", "learned", num_classes, in_channels, small_input,
                    dropout)


def vgnetg_2_0mp(*, num_classes: int = 1000, in_channels: int = 3, small_input: bool = False,
                 dropout: float = 0.0) -> VGNet:
    """VGNetG-2.0MP: widths [32, 72, 168, 376, 512], blocks [3, 6, 13, 2]."""
    return _factory((32, 72, 168, 376, 512), (3, 6, 13, 2), "blur", "learned", num_classes,
                    in_channels, small_input, dropout)


def vgnetg_2_5mp(*, num_classes: int = 1000, in_channels: int = 3, small_input: bool = False,
                 dropout: float = 0.0) -> VGNet:
    """VGNetG-2.5MP: widths [32, 80, 192, 400, 544], blocks [3, 6, 16, 2]."""
    return _factory((32, 80, 192, 400, 544), (3, 6, 16, 2), "blur", "learned", num_classes,
                    in_channels, small_input, dropout)


def vgnetg_5_0mp(*, num_classes: int = 1000, in_channels: int = 3, small_input: bool = False,
                 dropout: float = 0.0) -> VGNet:
    """VGNetG-5.0MP: widths [32, 88, 216, 456, 856], blocks [4, 7, 15, 5]."""
    return _factory((32, 88, 216, 456, 856), (4, 7, 15, 5), "blur", "learned", num_classes,
                    in_channels, small_input, dropout)


def vgnetf_1_5mp(*, num_classes: int = 1000, in_channels: int = 3, small_input: bool = False,
                 dropout: float = 0.0) -> VGNet:
    """VGNetF-1.5MP: VGNetG-1.5MP's channels with every depthwise kernel fixed — Gaussian
    downsampling, edge detectors and Gaussians elsewhere (:func:`edge_gaussian_kernels`)."""
    return _factory(_W15, _D15, "blur", "edge_gaussian", num_classes, in_channels,
                    small_input, dropout)


def vgnete_1_5mp(*, num_classes: int = 1000, in_channels: int = 3, small_input: bool = False,
                 dropout: float = 0.0) -> VGNet:
    """VGNetF-1.5MP with edge detectors alone (:func:`edge_kernels`) besides the Gaussian
    downsampling: the paper's "fixed edge detectors" row."""
    return _factory(_W15, _D15, "blur", "edge", num_classes, in_channels, small_input,
                    dropout)

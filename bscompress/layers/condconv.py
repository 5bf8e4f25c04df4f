"""CondConv (Yang et al., NeurIPS 2019): a conv whose kernel is a per-example mixture of E
expert kernels, ``y = (Σ_e α_e(x)·W_e) ⋆ x + Σ_e α_e(x)·b_e``.

Routing ``α = f(FC(global-avg-pool(x)))`` with ``f`` one of

* ``sigmoid``: the paper's un-normalised gates (Σα between 0 and E);
* ``softmax``: gates summing to 1;
* ``normalized-sigmoid``: ``σ(z) / Σ_e σ(z_e)``, gates summing to 1 that do not compete as
  sharply as a softmax.

The mixing happens once per example (E·|W| MACs), not per pixel, so E experts cost almost
nothing over one conv. The batched eager forward folds the batch into conv groups: the input
``[B, C, H, W]`` is viewed as ``[1, B·C, H, W]`` and convolved with the ``[B·O, C/g, kh, kw]``
per-example kernels in ``B·g`` groups. ONNX has no conv whose group count depends on the batch,
so while exporting the same numbers are computed as im2col + batched matmul
(``F.unfold``; one ``[O/g, C/g·K] × [C/g·K, L]`` product per example and group).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bscompress.core.padding import PAD_ATTR, Pad, check_pad, pad_input

#: Routing functions, by the name the CLI and the Plan use.
ROUTINGS = ("normalized-sigmoid", "softmax", "sigmoid")


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def routing_weights(logits: torch.Tensor, routing: str) -> torch.Tensor:
    """Gates ``[B, E]`` from router logits ``[B, E]`` (see the module docstring)."""
    if routing == "sigmoid":
        return torch.sigmoid(logits)
    if routing == "softmax":
        return torch.softmax(logits, dim=1)
    if routing == "normalized-sigmoid":
        gates = torch.sigmoid(logits)
        return gates / gates.sum(dim=1, keepdim=True)
    raise ValueError(f"unknown routing {routing!r}; choose one of {', '.join(ROUTINGS)}")


class Router(nn.Module):
    """``α = f(FC(global-avg-pool(x)))``: ``[B, C, *spatial]`` → ``[B, E]``.

    Attributes:
        fc: ``nn.Linear(C, E)``.
        routing: the name of ``f`` (one of :data:`ROUTINGS`).
    """

    def __init__(self, in_channels: int, experts: int, routing: str = "normalized-sigmoid"):
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"unknown routing {routing!r}; choose one of {', '.join(ROUTINGS)}")
        self.routing = routing
        self.fc = nn.Linear(in_channels, experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return routing_weights(self.fc(x.flatten(2).mean(2)), self.routing)

    def extra_repr(self) -> str:
        return f"routing={self.routing}"


class CondConv2d(nn.Module):
    """A 2-D conv with E experts mixed per example.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
        padding_mode: as ``nn.Conv2d`` (``padding`` may be ``'valid'``, or ``'same'`` when
            every ``dilation·(k − 1)`` is even).
        experts: E.
        routing: one of :data:`ROUTINGS`.
        leader: another CondConv2d, called earlier in the same forward pass, whose gates
            this conv reuses instead of routing its own input (one routing vector per block,
            as in the paper, computed from the input of the block's first CondConv);
            ``None``: the conv has its own ``router``.
        pad: a zero padding of the input before the conv, after routing (``F.pad`` amounts
            or TF ``'same'``, of a conv subclass that pads in its forward; see
            :mod:`bscompress.core.padding`).

    Parameters: ``weight`` ``[E, O, C/g, kh, kw]``, ``bias`` ``[E, O]`` (or ``None``),
    ``router.fc`` (own routing only).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 experts: int = 4, routing: str = "normalized-sigmoid",
                 leader: CondConv2d | None = None, pad: Pad | None = None):
        super().__init__()
        if experts < 1:
            raise ValueError(f"experts must be at least 1, got {experts}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"{in_channels}→{out_channels} channels do not split into "
                             f"{groups} groups")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.dilation = _pair(dilation)
        self.padding = _resolve_padding(padding, self.kernel_size, self.dilation, self.stride)
        self.padding_mode, self.experts = padding_mode, experts
        self.bscompress_pad = check_pad(pad, 2)
        self.weight = nn.Parameter(torch.empty(experts, out_channels, in_channels // groups,
                                               *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(experts, out_channels)) if bias else None
        # shared routing: the leader keeps its gates from routing until its last follower
        # has read them (never longer, so a model between forward passes holds no graph)
        self._last_gates: torch.Tensor | None = None
        self._followers = 0
        if leader is None:
            self.router = Router(in_channels, experts, routing)
        else:  # a plain attribute, not a submodule: the leader owns (and saves) the router
            if leader.router is None or leader.experts != experts:
                raise ValueError("a CondConv2d leader needs its own router and as many experts")
            self.router = None
            leader._followers += 1
            self._follower_index = leader._followers
            object.__setattr__(self, "_leader", leader)
        for e in range(experts):
            nn.init.kaiming_uniform_(self.weight[e], a=math.sqrt(5))

    @property
    def routing(self) -> str:
        return (self.router or self._leader.router).routing

    @property
    def lr_compensation(self) -> float:
        """1/Σₑαₑ² at the upcycled start (E with gates summing to 1, 4/E with sigmoid gates
        at 1/2): the factor by which an expert's learning rate must grow for the mixed
        kernel to move as fast as the conv it came from, since each expert receives only its
        gate's share αₑ of the kernel's gradient."""
        return 4.0 / self.experts if self.routing == "sigmoid" else float(self.experts)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, experts: int = 4, routing: str = "normalized-sigmoid",
                  noise: float = 0.0, leader: CondConv2d | None = None,
                  generator: torch.Generator | None = None) -> CondConv2d:
        """Upcycle a trained ``conv``: every expert is its kernel, so the output is unchanged.

        With ``softmax`` and ``normalized-sigmoid`` the gates sum to 1 whatever the router
        says, so the router keeps a random init (different gates per example break the
        experts' symmetry during fine-tuning). With ``sigmoid`` the router starts at zero
        (every gate 1/2) and the experts at ``2/E`` times the kernel; nothing then tells the
        experts apart, so give ``noise``. ``noise`` adds Gaussian noise of that standard
        deviation relative to the kernel's RMS to each expert (the output then changes).
        """
        if not isinstance(conv, nn.Conv2d) or isinstance(conv, nn.modules.conv._ConvTransposeNd):
            raise ValueError(f"{type(conv).__name__}: only nn.Conv2d can be upcycled")
        block = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                    conv.padding_mode, experts, routing, leader,
                    pad=getattr(conv, PAD_ATTR, None))
        device, dtype = conv.weight.device, conv.weight.dtype
        block.to(device=device, dtype=dtype)
        scale = 2.0 / experts if routing == "sigmoid" else 1.0
        with torch.no_grad():
            w = conv.weight.detach()
            block.weight.copy_(scale * w.expand(experts, *w.shape))
            if noise > 0:
                rms = w.pow(2).mean().sqrt()
                block.weight.add_(noise * rms * torch.randn(
                    block.weight.shape, generator=generator, dtype=dtype).to(device))
            if conv.bias is not None:
                block.bias.copy_(scale * conv.bias.detach().expand(experts, -1))
            if routing == "sigmoid" and block.router is not None:
                block.router.fc.weight.zero_()
                block.router.fc.bias.zero_()
        return block

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """``α`` ``[B, E]`` for input ``x``."""
        if self.router is not None:
            gates = self.router(x)
            if self._followers:
                self._last_gates = gates
            return gates
        leader = self._leader
        gates = leader._last_gates
        if gates is None or gates.shape[0] != x.shape[0]:
            raise RuntimeError("CondConv2d with shared routing ran before its leader in this "
                               "forward pass: the leader must be the block's first CondConv")
        if self._follower_index == leader._followers:
            leader._last_gates = None
        return gates

    def kernels(self, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-example kernels ``[B, O, C/g, kh, kw]`` and biases ``[B, O]`` for ``gates``."""
        b = gates.shape[0]
        weight = (gates @ self.weight.flatten(1)).reshape(b, *self.weight.shape[1:])
        bias = gates @ self.bias if self.bias is not None else None
        return weight, bias

    def to_dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The per-example dense weight and bias for input ``x`` (for tests)."""
        return self.kernels(self.gates(x))

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if self.padding_mode == "zeros":
            return x, self.padding
        ph, pw = self.padding
        return F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode), (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.kernels(self.gates(x))
        x = pad_input(x, self.bscompress_pad, self.kernel_size, self.stride, self.dilation)
        x, padding = self._pad(x)
        if torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
            y = self._unfold_forward(x, weight, padding)
        else:
            y = self._grouped_forward(x, weight, padding)
        return y if bias is None else y + bias[:, :, None, None].to(y.dtype)

    def _grouped_forward(self, x: torch.Tensor, weight: torch.Tensor,
                         padding: tuple[int, int]) -> torch.Tensor:
        """The batch folded into conv groups: one conv call for the whole batch."""
        b, c, h, w = x.shape
        y = F.conv2d(x.reshape(1, b * c, h, w), weight.flatten(0, 1), None, self.stride,
                     padding, self.dilation, b * self.groups)
        return y.reshape(b, self.out_channels, *y.shape[2:])

    def _unfold_forward(self, x: torch.Tensor, weight: torch.Tensor,
                        padding: tuple[int, int]) -> torch.Tensor:
        """im2col + batched matmul: the same numbers with no batch-dependent group count."""
        b, _, h, w = x.shape
        g, (kh, kw) = self.groups, self.kernel_size
        out_h = (h + 2 * padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        out_w = (w + 2 * padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        if (kh, kw) == (1, 1) and padding == (0, 0):  # pointwise: im2col is a strided view
            cols = x[:, :, ::self.stride[0], ::self.stride[1]]
        else:  # ONNX Runtime runs F.unfold's gathers far slower than a reshape
            cols = F.unfold(x, self.kernel_size, self.dilation, padding, self.stride)
        cols = cols.reshape(b, g, -1, out_h * out_w)                      # [B, g, C/g·K, L]
        kernel = weight.reshape(b, g, self.out_channels // g, -1)         # [B, g, O/g, C/g·K]
        return (kernel @ cols).reshape(b, self.out_channels, out_h, out_w)

    def extra_repr(self) -> str:
        shared = ", shared routing" if self.router is None else ""
        pad = "" if self.bscompress_pad is None else f", pad={self.bscompress_pad!r}"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}{pad}, groups={self.groups}, "
                f"experts={self.experts}{shared}")


def _resolve_padding(padding, kernel_size: tuple[int, int], dilation: tuple[int, int],
                     stride: tuple[int, int]) -> tuple[int, int]:
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel_size, dilation, strict=True)]
        if any(t % 2 for t in total) or any(s != 1 for s in stride):
            raise ValueError("padding='same' with an even kernel span or a stride is not "
                             "supported by CondConv2d")
        return (total[0] // 2, total[1] // 2)
    return _pair(padding)

"""How a convolution pads its input, for subclasses of ``nn.Conv1d`` / ``nn.Conv2d`` that change
``forward`` (ports of TensorFlow networks pad "same" there: a fixed ``ZeroPad2d`` before the
conv, as ``efficientnet_pytorch``'s ``Conv2dStaticSamePadding``, or amounts computed from the
input size, as timm's ``Conv2dSame``).

bscompress rewrites such a conv only when it can prove how it pads. :func:`input_padding`
probes the module: its output on random inputs of three or more sizes (every residue modulo
the stride on each axis, so that a padding that depends on the input size shows) is compared
with the conv of its own weight and bias after every zero padding that gives the same output
size.
The answer is one of

* ``plain``: the conv's own padding (``forward`` does nothing else that shows) — handled as
  the base class;
* ``static``: the same zero padding ``(left, right[, top, bottom])`` (``F.pad`` order) at
  every size;
* ``same``: TensorFlow's "SAME" padding computed from each input size (:func:`same_pad`:
  ``total = max((⌈n/s⌉ − 1)·s + d·(k − 1) + 1 − n, 0)``, the odd pixel on the right/bottom);
* ``refused``: anything else (another padding rule, a changed weight, an activation …), with
  the reason that ``inspect`` prints and plans record. A conv whose forward convolves with a
  weight it computes (weight standardisation) is refused here and stood in for by
  ``computed_weight``, which proves the computed weight with :func:`probe`.

A rewrite records the padding in its plan entry (``options["pad"]``: the list of amounts or
``"same"``), so archives rebuild it without probing. The blocks carry it on their spatial stage
(:class:`PaddedConv1d` / :class:`PaddedConv2d`, the padded stages of ``layers.base``): a
symmetric static padding is folded into the conv's own padding instead.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bscompress.core.hooks import hook_reason

SAME = "same"

#: ``F.pad`` amounts (last dimension first: left, right[, top, bottom]) or ``"same"``
Pad = tuple[int, ...] | str

#: the attribute of bscompress's padded convs that holds their input padding
PAD_ATTR = "bscompress_pad"


def base_conv_class(module: nn.Module) -> type[nn.Module] | None:
    """``nn.Conv2d`` or ``nn.Conv1d`` when ``module`` is one (or a subclass), else ``None``."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return None
    for cls in (nn.Conv2d, nn.Conv1d):
        if isinstance(module, cls):
            return cls
    return None


def overrides_forward(module: nn.Module) -> bool:
    """Whether ``module``'s class replaces the ``forward`` (or ``_conv_forward``) of its
    ``nn.Conv1d`` / ``nn.Conv2d`` base."""
    base = base_conv_class(module)
    if base is None:
        return False
    cls = type(module)
    return cls.forward is not base.forward or cls._conv_forward is not base._conv_forward


def same_pad(size: Sequence[int], kernel_size: Sequence[int], stride: Sequence[int],
             dilation: Sequence[int]) -> list[int]:
    """TensorFlow's "SAME" padding of an input of spatial ``size``, in ``F.pad`` order (last
    axis first; the odd pixel goes right / bottom), as timm's ``pad_same`` computes it."""
    amounts: list[int] = []
    for n, k, s, d in reversed(list(zip(size, kernel_size, stride, dilation, strict=True))):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        amounts += [total // 2, total - total // 2]
    return amounts


def pad_input(x: torch.Tensor, pad: Pad | None, kernel_size: Sequence[int],
              stride: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """``x`` zero-padded as ``pad`` says (``None``: unchanged)."""
    if pad is None:
        return x
    if pad == SAME:
        dims = len(kernel_size)
        pad = same_pad(x.shape[-dims:], kernel_size, stride, dilation)
    if not any(pad):
        return x
    return F.pad(x, list(pad))


def check_pad(pad: object, dims: int) -> Pad | None:
    """The padding of a plan entry's ``options["pad"]`` as a value :func:`pad_input` takes.

    Raises:
        ValueError: when it is neither ``"same"`` nor ``2·dims`` amounts ≥ 0 (an altered plan).
    """
    if pad is None or pad == SAME:
        return pad
    if (isinstance(pad, list | tuple) and len(pad) == 2 * dims
            and all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p < 2**16
                    for p in pad)):
        return tuple(pad)
    raise ValueError(f"input padding {pad!r} is neither 'same' nor {2 * dims} amounts ≥ 0")


class InputPadMixin:
    """Mixin of a conv that zero-pads its input by ``bscompress_pad`` (static amounts or
    ``"same"``) before its own forward (whose padding is then 0)."""

    bscompress_pad: Pad | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(pad_input(x, self.bscompress_pad, self.kernel_size, self.stride,
                                         self.dilation))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pad={self.bscompress_pad!r}"


class PaddedConv1d(InputPadMixin, nn.Conv1d):
    """``nn.Conv1d`` after a zero padding of its input (static or TF "same")."""


class PaddedConv2d(InputPadMixin, nn.Conv2d):
    """``nn.Conv2d`` after a zero padding of its input (static or TF "same")."""


PADDED_CONVS: dict[int, type[nn.Module]] = {1: PaddedConv1d, 2: PaddedConv2d}


def as_plain_conv(conv: nn.Module, pad: object) -> nn.Module:
    """``conv`` as a conv whose class bscompress knows, padding its input as ``pad`` (a plan
    entry's ``options["pad"]``) says, sharing ``conv``'s weight and bias.

    ``None``: ``conv`` itself. A symmetric static padding becomes the conv's own padding
    (an ``nn.Conv1d`` / ``nn.Conv2d``); any other a :class:`PaddedConv1d` /
    :class:`PaddedConv2d` with padding 0. Builds nothing on the device (structure only).

    Raises:
        ValueError: for a padding :func:`check_pad` refuses or a module that is no conv.
    """
    base = base_conv_class(conv)
    if base is None:
        raise ValueError(f"{type(conv).__name__}: only Conv1d and Conv2d take an input padding")
    dims = len(conv.kernel_size)
    pad = check_pad(pad, dims)
    if pad is None:
        return conv
    stride, dilation = tuple(conv.stride), tuple(conv.dilation)
    if pad == SAME and all(s == 1 for s in stride):  # "same" at stride 1 does not vary
        pad = tuple(same_pad([0] * dims, conv.kernel_size, stride, dilation))
    padding: tuple[int, ...] = (0,) * dims
    cls = PADDED_CONVS[dims]
    if pad != SAME:
        pairs = [pad[2 * i: 2 * i + 2] for i in range(dims)][::-1]  # first axis first
        if all(a == b for a, b in pairs):
            padding, pad, cls = tuple(a for a, _ in pairs), None, base
    view = cls(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), stride=stride,
               padding=padding, dilation=dilation, groups=conv.groups,
               bias=conv.bias is not None, device="meta")
    if pad is not None:
        view.bscompress_pad = pad
    for name in ("weight", "bias"):  # shared, not copied: the view is a description
        delattr(view, name)
        setattr(view, name, getattr(conv, name))
    return view


# ---------------------------------------------------------------------------------------------
# the probe


@dataclass(frozen=True)
class InputPadding:
    """How a conv pads its input (module docstring): ``kind`` is ``plain``, ``static``,
    ``same`` or ``refused``; ``pad`` the amounts of a static padding; ``reason`` why a
    refused one is refused."""

    kind: str
    pad: tuple[int, ...] | None = None
    reason: str | None = None

    @property
    def spec(self) -> Pad | None:
        """What a plan entry records in ``options["pad"]`` (``None``: nothing)."""
        if self.kind == "static":
            return self.pad
        return SAME if self.kind == SAME else None

    def options(self) -> dict:
        """The plan-entry options that rebuild this padding: ``{}`` or ``{"pad": …}``."""
        spec = self.spec
        if spec is None:
            return {}
        return {"pad": spec if spec == SAME else list(spec)}


PLAIN = InputPadding("plain")
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def input_padding(module: nn.Module) -> InputPadding:
    """How the conv ``module`` pads its input (module docstring); ``plain`` without a probe
    when its class keeps the base class's ``forward``. Probes are cached per module."""
    if not overrides_forward(module):
        return PLAIN
    if type(module).__module__.startswith("bscompress."):  # the stages of its own blocks
        spec = getattr(module, PAD_ATTR, None)
        if spec is None:
            return PLAIN
        return InputPadding(SAME) if spec == SAME else InputPadding("static", tuple(spec))
    key = _cache_key(module)
    hit = _CACHE.get(module)
    if hit is not None and hit[0] == key:
        return hit[1]
    result = _probe(module)
    _CACHE[module] = (key, result)
    return result


def refusal(module: nn.Module) -> str | None:
    """Why the conv ``module`` cannot be rewritten because of its ``forward`` (or the
    forward hooks on it: ``hooks.hook_reason``), else ``None``."""
    return hook_reason(module) or input_padding(module).reason


def pad_options(module: nn.Module) -> dict:
    """The plan-entry options recording how ``module`` pads (``{}`` for a plain conv)."""
    return input_padding(module).options()


def _cache_key(module: nn.Module) -> tuple:
    w = module.weight
    return (type(module), tuple(w.shape), w.dtype, str(w.device), tuple(module.stride),
            str(module.padding), tuple(module.dilation), module.groups, module.padding_mode,
            module.training)


def _unreproducible(module: nn.Module, detail: str = "") -> InputPadding:
    name = type(module).__name__
    extra = f": {detail}" if detail else ""
    return InputPadding("refused", reason=(
        f"{name} overrides forward in a way bscompress cannot reproduce (not a plain or "
        f"'same'-padded convolution{extra})"))


def _probe_sizes(kernel: Sequence[int], stride: Sequence[int],
                 dilation: Sequence[int]) -> list[list[int]]:
    """Input sizes that show how a padding depends on the input size: at least three, and
    on each axis every residue modulo its stride (the axes' residues differ in each probe),
    each larger than the kernel's span."""
    count = max(3, *stride)
    sizes = []
    for probe in range(count):
        size = []
        for axis, (k, s, d) in enumerate(zip(kernel, stride, dilation, strict=True)):
            q = -(-((k - 1) * d + 2) // s) + 1
            size.append(s * (q + probe + axis) + (probe + axis) % s)
        sizes.append(size)
    return sizes


#: the scales of the probe inputs in turn: a forward that clips or saturates its input
#: (activation clipping at 6, PACT) shows only on inputs beyond unit variance
PROBE_SCALES = (1.0, 100.0, 0.01)


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 1e-2)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    if a.shape != b.shape:
        return False
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(((a - b).abs() <= tol * max(scale, 1e-12)).all())


#: per axis: (left, lowest right, highest right) zero padding consistent with one probe
_Axis = tuple[int, int, int]


def _probe(module: nn.Module) -> InputPadding:
    return probe(module, module.weight, module.bias)


def probe(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> InputPadding:
    """How ``module``'s output is the conv of ``weight`` and ``bias`` (its own, or the ones its
    forward computes: ``computed_weight``) with its stride, dilation and groups: after its own
    padding (``plain``), after a static or TF "same" zero padding, or not at all (``refused``)."""
    if not isinstance(weight, torch.Tensor) or weight.is_meta:
        return _unreproducible(module, "its weight holds no values to probe it with")
    if not weight.is_floating_point():
        return _unreproducible(module, f"its weight is {weight.dtype}")
    base = base_conv_class(module)
    dims = len(module.kernel_size)
    kernel, stride = tuple(module.kernel_size), tuple(module.stride)
    dilation = tuple(module.dilation)
    tol = _tolerance(weight.dtype)
    generator = torch.Generator().manual_seed(0)
    plain, found = True, []
    with torch.no_grad():
        for i, size in enumerate(_probe_sizes(kernel, stride, dilation)):
            scale = PROBE_SCALES[i % len(PROBE_SCALES)]
            x = (scale * torch.randn(2, module.in_channels, *size, generator=generator,
                                     dtype=torch.float64)).to(weight)
            try:
                y = module.forward(x)
            except Exception as err:  # a forward that needs other inputs
                first = str(err).splitlines()[0] if str(err) else type(err).__name__
                return _unreproducible(module, f"its forward fails on a probe input ({first})")
            if not isinstance(y, torch.Tensor) or y.dim() != dims + 2 or \
                    tuple(y.shape[:2]) != (2, module.out_channels):
                return _unreproducible(module, "its forward does not return one conv output")
            try:
                reference = base._conv_forward(module, x, weight, bias)
                plain = plain and _close(y, reference, tol)
            except Exception:
                plain = False
            axes = _find_pad(module, x, y, tol, weight, bias)
            if axes is None and not plain:
                return _unreproducible(module)
            found.append((size, axes))
    if plain:
        return PLAIN
    if any(axes is None for _, axes in found):
        return _unreproducible(module)
    static = []
    for axis in range(dims):
        lefts = {axes[axis][0] for _, axes in found}
        low = max(axes[axis][1] for _, axes in found)
        high = min(axes[axis][2] for _, axes in found)
        if len(lefts) != 1 or low > high:
            break
        static.append((lefts.pop(), low))
    else:
        return InputPadding("static", tuple(p for pair in reversed(static) for p in pair))
    for size, axes in found:
        same = same_pad(size, kernel, stride, dilation)
        for axis, (left, low, high) in enumerate(axes):
            tf_left, tf_right = same[2 * (dims - 1 - axis): 2 * (dims - axis)]
            if left != tf_left or not low <= tf_right <= high:
                return _unreproducible(module, "its padding depends on the input size, but "
                                               "not as TensorFlow's 'same' does")
    return InputPadding(SAME)


def _find_pad(module: nn.Module, x: torch.Tensor, y: torch.Tensor, tol: float,
              weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[_Axis, ...] | None:
    """Per axis, the zero padding after which ``weight`` and ``bias`` give ``y`` on
    ``x``, if one does: ``(left, lowest right, highest right)`` (a stride leaves the last few
    pixels of the right padding unread). One stride-1 conv of the input padded on every side
    by the most any candidate pads; each candidate is a strided slice of it."""
    dims = len(module.kernel_size)
    kernel, stride = tuple(module.kernel_size), tuple(module.stride)
    dilation = tuple(module.dilation)
    spans = [(k - 1) * d for k, d in zip(kernel, dilation, strict=True)]
    sizes, outs = list(x.shape[2:]), list(y.shape[2:])
    # the most padding per axis that still gives the output size
    most = [(o - 1) * s + span + s - n
            for n, o, s, span in zip(sizes, outs, stride, spans, strict=True)]
    wides = [max(span, top, 0) for span, top in zip(spans, most, strict=True)]
    conv = F.conv2d if dims == 2 else F.conv1d
    wide = F.pad(x, [p for w in reversed(wides) for p in (w, w)])
    full = conv(wide, weight, None, 1, 0, dilation, module.groups)
    if bias is not None:
        full = full + bias.reshape(1, -1, *([1] * dims))
    # per axis, every left padding giving the output size, TF "same" first
    options = []
    for axis in range(dims):
        n, o, s, span = sizes[axis], outs[axis], stride[axis], spans[axis]
        total = max((-(-n // s) - 1) * s + span + 1 - n, 0)
        order = [total // 2] + [left for left in range(most[axis] + 1) if left != total // 2]
        axis_options = []
        for left in order:
            right = (o - 1) * s + span + 1 - n - left  # the least right padding
            if left > most[axis] or right + s - 1 < 0:  # would crop
                continue
            axis_options.append((left, max(right, 0), right + s - 1))
        options.append(axis_options)
    for choice in _product(options):
        index = [slice(None), slice(None)]
        for axis, (left, _, _) in enumerate(choice):
            start = wides[axis] - left
            index.append(slice(start, start + (outs[axis] - 1) * stride[axis] + 1,
                               stride[axis]))
        if _close(y, full[tuple(index)], tol):
            return choice
    return None


def _product(options: list[list[_Axis]]) -> list[tuple[_Axis, ...]]:
    out: list[tuple[_Axis, ...]] = [()]
    for axis_options in options:
        out = [prefix + (option,) for prefix in out for option in axis_options]
    return out


__all__ = ["PADDED_CONVS", "PAD_ATTR", "SAME", "InputPadMixin", "InputPadding", "PaddedConv1d",
           "PaddedConv2d", "as_plain_conv", "base_conv_class", "check_pad",
           "input_padding", "overrides_forward", "pad_input", "pad_options", "probe", "refusal",
           "same_pad"]

"""Calibration: input-patch statistics of layers via forward hooks, BatchNorm re-estimation.

``collect_patch_covariances`` runs the model once over calibration batches and accumulates, for
each requested layer, Σ = E[p pᵀ] of its input patches and their mean μ = E[p]: the im2col
columns a conv multiplies with its weight (padding, stride, dilation and padding mode applied
as the conv does), or the input rows of a Linear. Σ is the second moment because the output
error of a bias-preserving approximation is E‖(W − Ŵ) p‖² = tr((W − Ŵ) Σ (W − Ŵ)ᵀ); where a
bias or the next BatchNorm takes up the mean error (W − Ŵ) μ, only the covariance Σ − μμᵀ is
left (:func:`centred`). Sums are streamed per batch (float32 products of the patches less the
first batch's mean patch, float64 accumulators, so that a covariance under a large mean keeps
its digits); per group of a grouped conv, Σ is ``[M/g·K, M/g·K]`` with index ``m·K + k`` like
``weight.reshape(N, -1)``. A stride-1 conv with a kernel larger than 1×1 gets its full Σ from
its input map without im2col (:mod:`patch_moments`: one product per kernel offset instead of
one per pair of taps, all of its patches); strided convs take im2col columns, at most
``max_patches_per_batch`` of them per batch (a stride subsample), and 1×1 convs their input.

Speed: ``decompose`` hands the batches to every pass in channels-last layout where the model
runs on it to the same output (:func:`in_fast_layout`: PyTorch's CPU convs run NHWC faster),
and the im2col Grams compute the half of a symmetric product they need (``self_gram``).

Memory: a layer whose full Σ (``g · (M/g·K)² · 8`` bytes) exceeds ``max_bytes`` keeps only
the per-channel K×K diagonal blocks ``[g, M/g, K, K]``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bscompress.compress.patch_moments import Geometry, patch_gram, patch_sum, position_major
from bscompress.core.covariance import PatchCovariance, outer
from bscompress.core.errors import BadInput, BSCompressError
from bscompress.core.padding import Pad, input_padding, pad_input
from bscompress.core.stats import evaluating, first_tensor, module_device
from bscompress.factorize.linalg import self_gram

#: default bound on one layer's full covariance
DEFAULT_MAX_BYTES = 1 << 30


def full_bytes(module: nn.Module) -> int:
    """Bytes a full Σ of ``module`` (conv or Linear) takes in float64."""
    groups, channels, kernel = _dims(module)
    return groups * (channels * kernel) ** 2 * 8


def _dims(module: nn.Module) -> tuple[int, int, int]:
    if isinstance(module, nn.Linear):
        return 1, module.in_features, 1
    return module.groups, module.in_channels // module.groups, math.prod(module.kernel_size)


def padded_input(module: nn.Module, x: torch.Tensor, pad: Pad | None = None
                 ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int], tuple[int, int]]:
    """``module``'s input ``x`` padded as the conv pads it (``pad``: the padding a conv
    subclass applies in its own ``forward``, ``padding.input_padding(module).spec``, then the
    conv's own, in its padding mode), as ``[B, C, H_p, W_p]`` (a Conv1d's as height 1), with
    the conv's kernel size, dilation and stride as pairs."""
    x = pad_input(x, pad, module.kernel_size, module.stride, module.dilation)
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
    else:
        x = F.pad(x, module._reversed_padding_repeated_twice)
    if x.dim() == 3:  # Conv1d as a 1×k Conv2d
        return (x.unsqueeze(2), (1, *module.kernel_size), (1, *module.dilation),
                (1, *module.stride))
    return x, tuple(module.kernel_size), tuple(module.dilation), tuple(module.stride)


#: the largest kernel (taps) whose second moments come from the input map: the map's
#: products fall from K² to (2k − 1)² per image, but each of the K² tap pairs costs a few
#: Python-level tensor operations, which larger kernels no longer pay back (on 2 cores,
#: batches of 4–32: 3×3 to 5×5 kernels 1.3–6.7× faster from the map, 7×7 0.8–1.1×, 9×9
#: 0.9×, 11×11 0.7×, 15×15 0.4–0.5×, against im2col and ``linalg.self_gram``)
MAX_MAP_TAPS = 49


def from_map(module: nn.Module) -> bool:
    """Whether the second moments of ``module``'s patches come from its input map
    (:mod:`patch_moments`: a conv with a kernel larger than 1×1 and at most
    :data:`MAX_MAP_TAPS` taps, at stride 1) instead of im2col columns (:func:`patches`)."""
    return (not isinstance(module, nn.Linear)
            and 1 < math.prod(module.kernel_size) <= MAX_MAP_TAPS
            and all(step == 1 for step in module.stride))


def map_of(module: nn.Module, x: torch.Tensor, pad: Pad | None
           ) -> tuple[torch.Tensor, Geometry]:
    """``module``'s padded input and its patch geometry (a :func:`from_map` layer)."""
    x, size, dilation, _ = padded_input(module, x, pad)
    return x, Geometry(size, dilation, (x.shape[-2], x.shape[-1]))


def patches(module: nn.Module, x: torch.Tensor, pad: Pad | None = None) -> torch.Tensor:
    """The input patches of ``module`` for input ``x``: ``[g, P, M/g·K]`` (P patches).

    ``pad``: the padding a conv subclass applies in its own ``forward`` before the conv
    (``padding.input_padding(module).spec``: static amounts or TF's dynamic "same"), found
    by the caller before any hook runs (the probe runs the module)."""
    if isinstance(module, nn.Linear):
        return x.reshape(1, -1, module.in_features)
    groups, channels, kernel = _dims(module)
    x, size, dilation, stride = padded_input(module, x, pad)
    if kernel == 1:  # a 1×1 conv's patches are its strided input: no im2col copy
        cols = x[:, :, ::stride[0], ::stride[1]].flatten(2)
    else:
        cols = F.unfold(x, size, dilation=dilation, stride=stride)  # [B, M·K, L]
    b, _, length = cols.shape
    cols = cols.reshape(b, groups, channels * kernel, length)
    return cols.permute(1, 0, 3, 2).reshape(groups, b * length, channels * kernel)


def _diagonal_blocks(full: torch.Tensor, channels: int, kernel: int) -> torch.Tensor:
    """The per-channel K×K diagonal blocks ``[g, M/g, K, K]`` of a full ``[g, M/g·K, M/g·K]``."""
    view = full.reshape(full.shape[0], channels, kernel, channels, kernel)
    return torch.diagonal(view, dim1=1, dim2=3).permute(0, 3, 1, 2).contiguous()


def _thin(count: int, limit: int) -> int:
    """Stride keeping at most ``limit`` of ``count`` patches (1 when they fit)."""
    return math.ceil(count / limit) if count > limit else 1


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_calibration_fits(model: nn.Module, batches: Iterable[torch.Tensor],
                           what: str = "the calibration data (--calib)"
                           ) -> Iterable[torch.Tensor]:
    """Run ``model`` (eval mode, no grad, no hooks of ours yet) on the first sample of the
    first batch, so that data that do not fit the model (channels, image size) fail with a
    sentence instead of deep inside a hook. Returns ``batches`` (re-chained when it was an
    iterator, so that nothing is consumed).

    Raises:
        BadInput: naming ``what`` and the batch shape, when the model does not run on it;
            or when its output on that sample is not finite (overflowing activations).
    """
    iterator = iter(batches)
    if iterator is batches:  # a one-shot iterator: peek, then put the first batch back
        first = next(iterator, None)
        if first is None:
            return batches
        batches = itertools.chain([first], iterator)
    else:
        first = next(iterator, None)
        if first is None:
            return batches
    if not isinstance(first, torch.Tensor) or first.dim() == 0 or len(first) == 0:
        raise BadInput(f"{what} yield {type(first).__name__} batches, not input tensors "
                       "[B, C, H, W]")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = first_tensor(model(first[:1].to(module_device(model))))
    except BSCompressError:
        raise
    except Exception as err:  # noqa: BLE001 - the model's own error on data that do not fit
        raise BadInput(
            f"the model does not run on {what}, batches of shape {list(first.shape)} "
            f"({_first_line(err)}): use data with the channels and image size the model was "
            "trained on (--resize/--crop for image folders)"
        ) from None
    finally:
        model.train(was_training)
    if (output is not None and output.is_floating_point()
            and not bool(torch.isfinite(output).all())):
        raise BadInput(
            f"the model's output on the first sample of {what} holds NaN or infinite values: "
            "its activations overflow (weights far from a trained scale, or inputs not "
            "normalised as in training: --mean/--std), and statistics of them would mean "
            "nothing; check the checkpoint and the preprocessing")
    return batches


def in_fast_layout(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """``batches`` in channels-last (NHWC) memory layout where ``model`` runs on it to the
    same output, else ``batches`` themselves. Every pass over the calibration data then runs
    in that layout (a conv given an NHWC input returns one, and so do the layers after it):
    PyTorch's CPU convs run a ResNet-50 at batch 32 on 2 cores in 2.9 s instead of 4.0 s, a
    compressed one 1.3–1.5× faster too. The layers' hooks read the same values.

    Unchanged: batches that are not all 4-D, batches already in that layout, and a model
    that fails on a channels-last input or gives another output (a ``view`` of a tensor it
    assumes contiguous), tried on two samples of the first batch before anything else runs
    (the caller checks first that the model runs on the batches as given)."""
    last = torch.channels_last
    if (not batches or any(x.dim() != 4 for x in batches)
            or all(x.is_contiguous(memory_format=last) for x in batches)):
        return batches
    sample = batches[0][:2].to(module_device(model))
    try:
        with torch.no_grad(), evaluating(model):
            given = first_tensor(model(sample))
            nhwc = first_tensor(model(sample.contiguous(memory_format=last)))
    except BSCompressError:
        raise
    except Exception:  # noqa: BLE001 - the model's own error: it keeps the layout it had
        return batches
    if (given is None or nhwc is None or given.shape != nhwc.shape
            or not bool(torch.isfinite(given).all())
            or not torch.allclose(given.float(), nhwc.float(), rtol=1e-3,
                                  atol=1e-4 * (1 + float(given.float().abs().max())))):
        return batches
    return [x.contiguous(memory_format=last) for x in batches]


class StopForward(Exception):
    """Raised by a hook of :func:`run_hooked` once it has what it needs from a batch: the
    rest of that model's forward pass is skipped (a layer's input statistics need the
    network up to the layer only)."""


def run_hooked(models: Sequence[nn.Module], batches: Iterable[torch.Tensor],
         handles: Sequence[torch.utils.hooks.RemovableHandle]) -> Iterator[torch.Tensor]:
    """Run every model on each batch (eval mode, no grad, on the first model's device) and
    yield the batch after it ran; afterwards the hooks in ``handles`` are removed and the models'
    modes restored. A hook may raise :class:`StopForward` to end its model's pass early."""
    modes = [model.training for model in models]
    device = module_device(models[0])
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            for x in batches:
                x = x.to(device)
                for model in models:
                    with contextlib.suppress(StopForward):
                        model(x)
                yield x
    finally:
        for handle in handles:
            handle.remove()
        for model, mode in zip(models, modes, strict=True):
            model.train(mode)


class _Shifted:
    """Sums of patches taken about a fixed shift s (the first batch's mean patch, or its
    channel means for patches taken from the map), so that the covariance does not come
    from the difference of two large numbers when the mean dominates (post-ReLU inputs):
    E[p qᵀ] = E[(p − s)(q − t)ᵀ] − m mᵀ + μ νᵀ with m, the means about the shifts, small."""

    def __init__(self, groups: int, d: int) -> None:
        self.shift: torch.Tensor | None = None
        self.sum = torch.zeros(groups, d, dtype=torch.float64)

    def add(self, p: torch.Tensor) -> torch.Tensor:
        """``p`` ``[g, P, D]`` float32 → ``p − s`` (s set on the first call)."""
        if self.shift is None:
            self.shift = p.mean(1, keepdim=True)
        p = p - self.shift
        self.sum += p.sum(1).double().cpu()  # float32 pairwise sums: no float64 copy of p
        return p

    def add_map(self, x: torch.Tensor, geometry: Geometry, groups: int) -> torch.Tensor:
        """The padded map ``x [B, C, H_p, W_p]`` → its :func:`patch_moments.position_major`
        buffer less the shift (set on the first call from the channel means, the same for
        every tap); adds the shifted patches' sum."""
        channels, kernel = x.shape[1], math.prod(geometry.kernel)
        if self.shift is None:
            means = x.float().mean((0, 2, 3))
            self.shift = means.repeat_interleave(kernel).view(groups, 1, -1)
        buffer = position_major(x.detach().float(), geometry, self.shift[:, 0, ::kernel]
                                .reshape(channels))
        self.sum += patch_sum(buffer, geometry, len(x), groups).double().cpu()
        return buffer

    def means(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m, μ)``: the mean about the shift and the mean, ``[g, D]`` float64."""
        m = self.sum / n
        shift = self.shift[:, 0].double().cpu() if self.shift is not None else 0 * m
        return m, m + shift


class _Accumulator:
    def __init__(self, module: nn.Module, max_bytes: int) -> None:
        self.groups, self.channels, self.kernel = _dims(module)
        d = self.channels * self.kernel
        self.keep_full = full_bytes(module) <= max_bytes
        self.full = torch.zeros(self.groups, d, d, dtype=torch.float64) if self.keep_full \
            else None
        self.blocks = torch.zeros(self.groups, self.channels, self.kernel, self.kernel,
                                  dtype=torch.float64)
        self.first = _Shifted(self.groups, d)
        self.count = 0
        self.pad = None if isinstance(module, nn.Linear) else input_padding(module).spec

    def add(self, p: torch.Tensor) -> None:
        p = self.first.add(p.detach().float())
        self.count += p.shape[1]
        if self.full is not None:
            self.full += self_gram(p).cpu()  # promoted in place: no float64 copy
        else:
            q = p.reshape(self.groups, -1, self.channels, self.kernel).transpose(1, 2)
            self.blocks += (q.transpose(2, 3) @ q).cpu()

    def add_map(self, x: torch.Tensor, geometry: Geometry) -> None:
        """The full Σ's sums from the padded input map (a :func:`from_map` layer)."""
        buffer = self.first.add_map(x, geometry, self.groups)
        self.count += len(x) * geometry.patches_per_image
        self.full += patch_gram(buffer, buffer, geometry, len(x), self.groups).cpu()

    def result(self) -> PatchCovariance:
        n = max(self.count, 1)
        m, mean = self.first.means(n)
        moved = outer(mean, mean) - outer(m, m)  # from moments about the shift to raw ones
        full = None
        if self.full is not None:
            full = self.full / n + moved
            blocks = _diagonal_blocks(full, self.channels, self.kernel)
        else:
            blocks = self.blocks / n + _diagonal_blocks(moved, self.channels, self.kernel)
        return PatchCovariance(self.groups, self.channels, self.kernel, full, blocks, self.count,
                               mean=mean)


def collect_patch_covariances(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    layers: Sequence[str],
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_patches_per_batch: int = 1 << 16,
    progress: Callable[[int], None] | None = None,
    observe: Callable[[], list[torch.utils.hooks.RemovableHandle]] | None = None,
) -> dict[str, PatchCovariance]:
    """Σ of the input patches of each named layer, over ``batches`` (one forward pass each).

    Args:
        model: the original model (run in eval mode, no grad, on the device of its weights).
        batches: input tensors ``[B, C, H, W]`` (labels already stripped).
        layers: qualified names of convs / Linear layers.
        max_bytes: full Σ only for layers at or under this many bytes; blocks otherwise.
        max_patches_per_batch: patches per batch and layer kept (a seeded stride subsample of
            the positions, bounding time on large feature maps).
        progress: called with the number of samples seen after each batch.
        observe: registers further hooks on ``model`` for the same pass (what else a
            caller records of the original network on these batches: BatchNorm inputs,
            outputs) and returns their handles, removed at the end; called after the check
            that the model runs on the batches, so that they see each batch once.
    """
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise KeyError(f"no layer named {missing[0]!r} in the model")
    batches = check_calibration_fits(model, batches)
    accumulators = {name: _Accumulator(modules[name], max_bytes) for name in layers}

    def hook(name: str):
        def record(module, args):
            accumulator = accumulators[name]
            if accumulator.full is not None and from_map(module):  # no im2col, no thinning
                accumulator.add_map(*map_of(module, args[0], accumulator.pad))
                return
            p = patches(module, args[0], accumulator.pad)
            accumulator.add(p[:, ::_thin(p.shape[1], max_patches_per_batch)])
        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in layers]
    handles += observe() if observe is not None else []
    seen = 0
    for x in run_hooked([model], batches, handles):
        seen += len(x)
        if progress is not None:
            progress(seen)
    return {name: acc.result() for name, acc in accumulators.items()}


BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


#: the fewest samples BatchNorm statistics are re-estimated from: fewer give running
#: variances of a handful of images (one image: the demo model drops to chance)
MIN_BATCHNORM_SAMPLES = 16


def check_batchnorm_samples(count: int, minimum: int = MIN_BATCHNORM_SAMPLES,
                            repeated: int = 0) -> None:
    """Refuse to re-estimate BatchNorm statistics from fewer than ``minimum`` samples (call
    it before the expensive steps when the count is known; ``reestimate_batchnorm`` calls it
    too).

    Raises:
        BadInput: naming ``--calib-samples`` and the minimum.
    """
    if count < minimum:
        copies = f" distinct ({repeated} more repeat others)" if repeated else ""
        raise BadInput(
            f"re-estimating BatchNorm statistics needs at least {minimum} samples but the "
            f"calibration data hold only {count}{copies}: give data of {minimum} samples or more "
            f"(--calib-samples {minimum} or more, from a set that holds them), or turn "
            "re-estimation off with --no-bn-reestimate (bn_reestimate: false in a recipe)"
        )


def distinct_samples(batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """``(batches, repeated)``: the batches without the samples that repeat an earlier one
    byte for byte, and how many those were. Copies add nothing to the statistics but their
    count: 16 copies of one photo passed the held-out check (held-out batches equal to the
    fitted ones) and the BatchNorm minimum, and their low-rank statistics made a model that
    agreed with the original on 0% of other photos."""
    seen: set[bytes] = set()
    out, repeated = [], 0
    for x in batches:
        flat = x.detach().reshape(len(x), -1).cpu()
        keep = []
        for i in range(len(x)):
            key = hashlib.blake2b(flat[i].contiguous().view(torch.uint8).numpy().tobytes(),
                                  digest_size=16).digest()
            if key not in seen:
                seen.add(key)
                keep.append(i)
        repeated += len(x) - len(keep)
        if len(keep) == len(x):
            out.append(x)
        elif keep:
            out.append(x[keep])
    return out, repeated


def _buffer_samples(batches: Iterable[torch.Tensor], minimum: int
                    ) -> tuple[list[torch.Tensor], Iterator[torch.Tensor], int]:
    """The first batches of ``batches`` up to ``minimum`` samples (or all of them, with their
    count, when they are fewer), and an iterator over the rest."""
    iterator = iter(batches)
    head: list[torch.Tensor] = []
    count = 0
    while count < minimum:
        x = next(iterator, None)
        if x is None:
            break
        head.append(x)
        count += len(x)
    return head, iterator, count


def reestimate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor],
                         min_samples: int = MIN_BATCHNORM_SAMPLES) -> int:
    """Recompute every BatchNorm's running mean and variance on ``batches``.

    The statistics are reset and averaged over all batches with equal weight (cumulative
    moving average, ``momentum=None``) in train mode for the BatchNorms only; every other
    module stays in eval mode (no dropout), no gradient is taken, and the model returns to
    its mode. Returns the number of BatchNorm layers updated.

    Raises:
        BadInput: when ``batches`` hold fewer than ``min_samples`` samples (checked before
            any statistic changes; a model without BatchNorm is not checked).
    """
    norms = [m for m in model.modules() if isinstance(m, BATCHNORMS) and m.track_running_stats]
    if not norms:
        return 0
    head, rest, count = _buffer_samples(batches, min_samples)
    check_batchnorm_samples(count, min_samples)
    was_training = model.training
    saved = [(m, m.momentum) for m in norms]
    device = module_device(model)
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            for x in itertools.chain(head, rest):
                model(x.to(device))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return len(norms)


def measure_output_errors(
    original: nn.Module,
    compressed: nn.Module,
    layers: Sequence[str],
    batches: Iterable[torch.Tensor],
    chunk: int = 16,
) -> dict[str, float]:
    """Relative output error of each layer inside the compressed network.

    Both networks run on the same batches; for every named layer, ``Σ‖y_c − y_o‖² /
    Σ‖y_o − b‖²`` where y_o is the original layer's output in the original network, y_c the
    replacement's output in the compressed one (so upstream errors count) and b the
    original bias (the scale is that of the weights' contribution, like the predicted error).

    The batches run ``chunk`` samples at a time, and each compressed layer's output is
    compared as soon as it is computed: what is held at once is one chunk's layer outputs of
    the original network (all of them for a batch of 64 at 224² would be gigabytes).
    """
    reference: dict[str, list[torch.Tensor]] = {}  # a layer run twice: its calls in order
    biases = {name: getattr(original.get_submodule(name), "bias", None) for name in layers}
    # a Linear's bias runs along the last axis (its input may be [B, tokens, C]), a conv's
    # along the channels (axis 1)
    linear = {name: isinstance(original.get_submodule(name), nn.Linear) for name in layers}
    num = dict.fromkeys(layers, 0.0)
    den = dict.fromkeys(layers, 0.0)

    def keep(name: str):
        def hook(_module, _args, out):
            reference.setdefault(name, []).append(out.detach())
        return hook

    def compare(name: str):
        def hook(_module, _args, out):
            if not reference.get(name):
                return
            ref, bias = reference[name].pop(0).double(), biases[name]
            if bias is None:
                scale = ref
            elif linear[name]:
                scale = ref - bias.double()
            else:
                scale = ref - bias.double().reshape(1, -1, *([1] * (ref.dim() - 2)))
            num[name] += float((out.detach().double() - ref).square().sum())
            den[name] += float(scale.square().sum())
        return hook

    handles = []
    for name in layers:
        handles.append(original.get_submodule(name).register_forward_hook(keep(name)))
        handles.append(compressed.get_submodule(name).register_forward_hook(compare(name)))
    pieces = (piece for x in batches for piece in x.split(chunk))
    for _ in run_hooked([original, compressed], pieces, handles):
        reference.clear()  # calls the compressed network did not make
    return {name: num[name] / den[name] if den[name] > 0 else 0.0 for name in layers}

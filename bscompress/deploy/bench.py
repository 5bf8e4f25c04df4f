"""Accuracy, fidelity and latency of models side by side, and the gates CI runs on them.

For each model: params, MACs, ONNX file size, ONNX Runtime (CPU) latency at batch 1 and at a
larger batch, PyTorch eager latency at both, ``torch.compile`` latency at batch 1 when asked,
CUDA figures too when there is a GPU (eager PyTorch, and ONNX Runtime's CUDA provider when
it is installed), and — on labelled
data — top-1/top-5; against the first model always top-1 agreement and mean KL divergence of
the softmax outputs, so unlabelled (or synthetic) inputs still say how faithful a compressed
model is.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bscompress.core.errors import BadInput, first_line
from bscompress.core.files import PNG_SUFFIXES, check_output_path, same_file
from bscompress.core.stats import (
    activation_bytes,
    check_input_shape,
    check_threads,
    first_tensor,
    memory_bytes,
    module_macs,
)
from bscompress.deploy.export import export_onnx, output_tensors
from bscompress.deploy.profile import LayerTime, profile_onnx


@dataclass
class Latency:
    """Milliseconds per call over ``runs`` timed calls after ``warmup`` untimed ones."""

    p50: float
    p90: float
    p99: float
    mean: float
    runs: int

    @classmethod
    def measure(cls, fn: Callable[[], object], warmup: int, runs: int) -> Latency:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        p50, p90, p99 = np.percentile(times, [50, 90, 99])
        return cls(float(p50), float(p90), float(p99), float(np.mean(times)), runs)


@dataclass
class BenchResult:
    """Everything measured for one model (accuracies as fractions, latencies in ms)."""

    name: str
    params: int
    macs: int
    onnx_bytes: int
    latency: dict[str, Latency] = field(default_factory=dict)
    top1: float | None = None
    top5: float | None = None
    agreement: float | None = None
    kl: float | None = None
    samples: int = 0
    profile: list[LayerTime] = field(default_factory=list)
    #: what could not be measured, and why (e.g. a model torch.compile fails on)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _logits(model: nn.Module, images: torch.Tensor, batch: int = 256,
            name: str = "the model") -> torch.Tensor:
    """The model's logits on ``images`` (the first tensor of a tuple/list/dict output)."""
    outs = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            try:
                out = first_tensor(model(images[start:start + batch]))
            except Exception as err:
                first = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise BadInput(f"{name} does not run on the evaluation images of shape "
                               f"{list(images.shape[1:])} ({first}): give --data of the "
                               "models' input shape (--resize/--crop)") from None
            if out is None or out.dim() < 2:
                what = "no tensor" if out is None else f"a tensor of shape {list(out.shape)}"
                raise BadInput(f"{name} returns {what}, not logits [batch, classes]: bench "
                               "compares classifiers")
            outs.append(out.float())
    return torch.cat(outs)


def check_gates(models: int, data: str | None, max_accuracy_drop: float | None = None,
                min_speedup: float | None = None, max_agreement_drop: float | None = None
                ) -> None:
    """Refuse, before any work, gates that cannot be evaluated: a gate with a single model
    (nothing to compare with), and ``--max-accuracy-drop`` without ``--data`` (top-1 needs
    labels; agreement and speed do not). The bounds' own values are the schema's
    (``recipe.Bench``).

    Raises:
        BadInput: naming the option.
    """
    gates = {"--max-accuracy-drop": max_accuracy_drop, "--min-speedup": min_speedup,
             "--max-agreement-drop": max_agreement_drop}
    for option, value in gates.items():
        if value is not None and models < 2:
            raise BadInput(f"{option} compares every model with the first: give two models "
                           "or more")
    if max_accuracy_drop is not None and not data:
        raise BadInput("--max-accuracy-drop compares top-1 accuracy, which needs labelled "
                       "--data (e.g. --data imagefolder:DIR); --max-agreement-drop and "
                       "--min-speedup work without it")


def check_bench_outputs(outputs: Mapping[str, str | Path | None], force: bool,
                        inputs: Sequence[str | Path | None] = ()) -> None:
    """The output guard of ``bench``, before any work: every report path (``{"--json":
    path, …}``) is a new or ``force``-replaceable regular file, none of ``inputs``, and no two
    options name the same file.

    Raises:
        BadInput: naming the option(s) and the path.
    """
    given = [(option, Path(path)) for option, path in outputs.items() if path is not None]
    for i, (option, path) in enumerate(given):
        for other, earlier in given[:i]:
            if same_file(path, earlier) or path.resolve() == earlier.resolve():
                raise BadInput(f"{other} and {option} both name {path}: give each output its "
                               "own file")
        check_output_path(path, force, inputs, what=f"{option} output",
                          suffixes=PNG_SUFFIXES if option == "--plot" else ())


def check_bench_models(models: Sequence[tuple[str, nn.Module]], input_shape: Sequence[int],
                       batch: int) -> list[bool]:
    """Check, before any timing, that every model runs at ``input_shape`` (batch 1) and at
    batch 2; return for each whether it takes any batch size. A model that runs at batch 1
    only is benchmarked at batch 1 (static ONNX batch) when ``batch`` is 1, else refused.

    Raises:
        BadInput: naming the model, the shape and what to do.
    """
    shape = [1, *[int(s) for s in input_shape[1:]]]
    any_batch = []
    for name, model in models:
        try:
            check_input_shape(model, shape, batches=(1,))
        except BadInput as err:
            raise BadInput(f"{name}: {err}") from None
        try:
            check_input_shape(model, shape, batches=(2,))
            any_batch.append(True)
        except BadInput as err:
            if batch != 1:
                raise BadInput(
                    f"{name} runs at batch 1 but not at batch 2: bench exports it with a "
                    f"dynamic batch axis and times --batch {batch} too, so it needs a model "
                    "that takes any batch size; pass --batch 1 to time it at batch 1 only"
                ) from err
            any_batch.append(False)
        with torch.inference_mode():  # ONNX needs tensors out
            output_tensors(model.eval()(_zeros(model, shape)), name)
        check_batch_memory(name, model, shape, batch)
    return any_batch


def check_batch_memory(name: str, model: nn.Module, input_shape: Sequence[int],
                       batch: int) -> None:
    """Refuse a ``batch`` whose activations (``stats.activation_bytes``, one forward pass at
    batch 1) exceed half of the memory, before timing it (ONNX Runtime's allocation failure
    otherwise).

    Raises:
        BadInput: naming the model, the batch and the GiB it would hold.
    """
    if batch <= 1:
        return
    needed = batch * activation_bytes(model, [1, *input_shape[1:]])
    if needed > memory_bytes() // 2:
        raise BadInput(f"{name} at --batch {batch} holds about {needed / 2**30:.1f} GiB "
                       "of activations, more than half of this machine's memory: time a "
                       "smaller --batch")


def _zeros(model: nn.Module, shape: Sequence[int]) -> torch.Tensor:
    """Zeros of ``shape`` on the model's device, in its floating dtype."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.zeros(list(shape), device=device, dtype=dtype)


def bench_models(
    models: Sequence[tuple[str, nn.Module]],
    input_shape: Sequence[int],
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    batch: int = 32,
    runs: int = 50,
    warmup: int = 10,
    threads: int | None = None,
    profile_top: int = 5,
    progress: Callable[[str], None] | None = None,
    torch_compile: bool = False,
    channels_last: bool = False,
) -> list[BenchResult]:
    """Measure ``models`` (the first is the reference for agreement and KL).

    Args:
        models: ``(name, module)`` pairs, all taking ``input_shape`` inputs.
        input_shape: ``[1, C, H, W]`` (the batch entry is ignored).
        images, labels: evaluation inputs ``[N, C, H, W]`` (float, preprocessed) and labels
            ``[N]``; without images, 256 seeded random inputs give agreement and KL only.
        batch: the larger batch size timed besides batch 1.
        runs, warmup: timed and untimed calls per latency figure.
        threads: intra-op threads of ONNX Runtime and PyTorch (default: PyTorch's).
        profile_top: keep the this many slowest modules of an ONNX Runtime profile at batch 1
            (``runs`` profiled runs); 0 skips profiling.
        torch_compile: also time ``torch.compile(model)`` (inductor, CPU) at batch 1 as
            ``compile_b1``; its first call compiles and is not timed. A model that does not
            compile gets no figure and a line in ``BenchResult.notes``.
        channels_last: also time eager PyTorch with a copy of the model and its inputs
            channels-last (NHWC), at batch 1 and ``batch``, as ``eager_cl_b1`` and
            ``eager_cl_bN`` (4-D inputs only; PyTorch's CPU convs run 1×1 and depthwise convs
            several times faster in it at larger batches).

    Keys of ``BenchResult.latency``: ``ort_b1``, ``ort_bN``, ``eager_b1``, ``eager_bN``,
    ``eager_cl_b1``, ``eager_cl_bN`` (with ``channels_last``), ``compile_b1`` (with
    ``torch_compile``); with a GPU ``cuda_eager_b1`` and, where ONNX Runtime
    has its CUDA provider, ``ort_cuda_b1``.
    """
    import onnxruntime as ort

    check_threads(threads)
    shape = [1, *[int(s) for s in input_shape[1:]]]
    any_batch = check_bench_models(models, shape, batch)  # before the threads are set
    threads = threads or torch.get_num_threads()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    if images is None:
        generator = torch.Generator().manual_seed(0)
        images = torch.randn([256, *shape[1:]], generator=generator)
    for name, model in models:  # the data fits every model, before any timing
        probe = _logits(model.cpu().float().eval(), images[:1], 1, name)
        if labels is not None and probe.dim() != 2:
            raise BadInput(f"{name} returns logits of shape {list(probe.shape[1:])} per "
                           "image, not one score per class: top-1 needs a classifier")
    reference_logits = None
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for index, (name, model) in enumerate(models):
                if progress is not None:
                    progress(name)
                model = model.cpu().float().eval()
                stats = module_macs(model, shape)
                onnx_path = Path(tmp) / f"{index}.onnx"
                export_onnx(model, shape, onnx_path, dynamic_batch=any_batch[index])
                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                session = ort.InferenceSession(str(onnx_path), options,
                                               providers=["CPUExecutionProvider"])
                input_name = session.get_inputs()[0].name
                result = BenchResult(name, stats.params, stats.macs, onnx_path.stat().st_size)
                nhwc = _channels_last_copy(model) if channels_last and len(shape) == 4 else None
                for size in (1, batch):
                    x = torch.randn([size, *shape[1:]])
                    feed = {input_name: x.numpy()}
                    result.latency[f"ort_b{size}"] = Latency.measure(
                        lambda s=session, feed=feed: s.run(None, feed), warmup, runs)
                    with torch.inference_mode():
                        result.latency[f"eager_b{size}"] = Latency.measure(
                            lambda m=model, x=x: m(x), warmup, runs)
                        if nhwc is not None:
                            x = x.contiguous(memory_format=torch.channels_last)
                            result.latency[f"eager_cl_b{size}"] = Latency.measure(
                                lambda m=nhwc, x=x: m(x), warmup, runs)
                if channels_last and nhwc is None:
                    result.notes.append("--channels-last: the input is not 4-D (N, C, H, W), "
                                        "so eager PyTorch was timed in its own layout only")
                if profile_top > 0:
                    result.profile = profile_onnx(onnx_path, shape, runs=runs, warmup=warmup,
                                                  threads=threads)[:profile_top]
                if torch_compile:
                    try:
                        result.latency["compile_b1"] = compiled_latency(model, shape, warmup,
                                                                        runs)
                    except Exception as error:  # inductor's failures have no common type
                        result.notes.append(f"torch.compile failed: {first_line(error)}")
                if torch.cuda.is_available():
                    result.latency["cuda_eager_b1"] = _cuda_latency(model, shape, warmup, runs)
                    if "CUDAExecutionProvider" in ort.get_available_providers():
                        result.latency["ort_cuda_b1"] = _ort_cuda_latency(
                            onnx_path, shape, warmup, runs)
                logits = _logits(model, images, 256 if any_batch[index] else 1, name)
                result.samples = len(images)
                if labels is not None:
                    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                    hits = top == labels[:, None]
                    result.top1 = float(hits[:, 0].float().mean())
                    result.top5 = float(hits.any(dim=1).float().mean())
                if reference_logits is None:
                    reference_logits = logits
                if logits.shape == reference_logits.shape:
                    result.agreement = float(
                        (logits.argmax(1) == reference_logits.argmax(1)).float().mean())
                    log_p = reference_logits.log_softmax(1)
                    log_q = logits.log_softmax(1)
                    # KL ≥ 0: a rounding residue of an identical model is not a negative KL
                    result.kl = max(float((log_p.exp() * (log_p - log_q)).sum(1).mean()), 0.0)
                results.append(result)
    finally:
        torch.set_num_threads(previous_threads)
    return results


def _channels_last_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its 4-D weights channels-last (its convs then run NHWC)."""
    import copy

    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def compiled_latency(model: nn.Module, shape: Sequence[int], warmup: int, runs: int
                     ) -> Latency:
    """Latency of ``torch.compile(model)`` (default inductor backend, static shapes) on a
    random input of ``shape``; the compiling first call is outside the figure. The model is
    copied: compiling leaves it as it was.

    Dynamo's caches are cleared first: every model of a ``bench`` run shares the code of its
    ``forward`` methods with the others (a torchvision ResNet's and its compressed copy's),
    and after ``recompile_limit`` (8) guard failures on one of them dynamo runs it eagerly,
    which would time eager PyTorch under the name of ``torch.compile``."""
    import copy

    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model).eval(), dynamic=False)
    x = torch.randn(list(shape))
    with torch.inference_mode():
        compiled(x)
        return Latency.measure(lambda: compiled(x), warmup, runs)


def _ort_cuda_latency(onnx_path: Path, shape: list[int], warmup: int, runs: int) -> Latency:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CUDAExecutionProvider"])
    feed = {session.get_inputs()[0].name: torch.randn(shape).numpy()}
    return Latency.measure(lambda: session.run(None, feed), warmup, runs)


def _cuda_latency(model: nn.Module, shape: list[int], warmup: int, runs: int) -> Latency:
    import copy

    gpu = copy.deepcopy(model).cuda()
    x = torch.randn(shape, device="cuda")

    def call():
        gpu(x)
        torch.cuda.synchronize()

    with torch.inference_mode():
        return Latency.measure(call, warmup, runs)


def gate_failures(
    results: Sequence[BenchResult],
    max_accuracy_drop: float | None = None,
    min_speedup: float | None = None,
    max_agreement_drop: float | None = None,
) -> list[str]:
    """The bounds each model after the first violates, as sentences (empty when all pass).

    ``max_accuracy_drop`` and ``max_agreement_drop`` are in percentage points of top-1;
    ``min_speedup`` compares ONNX Runtime p50 latency at batch 1 with the first model's.
    """
    if len(results) < 2:
        return []
    ref, failures = results[0], []
    for res in results[1:]:
        if max_accuracy_drop is not None:
            if ref.top1 is None or res.top1 is None:
                failures.append("--max-accuracy-drop needs labelled --data")
            elif 100 * (ref.top1 - res.top1) > max_accuracy_drop:
                failures.append(f"{res.name}: top-1 drops {100 * (ref.top1 - res.top1):.2f} "
                                f"points (> {max_accuracy_drop})")
        if min_speedup is not None:
            speedup = ref.latency["ort_b1"].p50 / res.latency["ort_b1"].p50
            if speedup < min_speedup:
                failures.append(f"{res.name}: ONNX Runtime speedup at batch 1 is "
                                f"{speedup:.2f}× (< {min_speedup}×)")
        if max_agreement_drop is not None and res.agreement is not None:
            drop = 100 * (1 - res.agreement)
            if drop > max_agreement_drop:
                failures.append(f"{res.name}: top-1 agreement with {ref.name} is "
                                f"{100 * res.agreement:.2f}% (drop {drop:.2f} > "
                                f"{max_agreement_drop} points)")
    return sorted(set(failures), key=failures.index)


def markdown_table(results: Sequence[BenchResult], batch: int) -> str:
    """The results as a Markdown table (latencies p50 in ms; channels-last eager and
    ``torch.compile`` columns when one model has the figures)."""
    compiled = any("compile_b1" in r.latency for r in results)
    nhwc = any("eager_cl_b1" in r.latency for r in results)
    head = ("| model | params | MACs | ONNX MB | ORT b1 p50/p90/p99 ms | ORT b"
            f"{batch} p50 ms | eager b1 p50 ms | eager b{batch} p50 ms |"
            f"{f' eager CL b1 p50 ms | eager CL b{batch} p50 ms |' if nhwc else ''}"
            f"{' compile b1 p50 ms |' if compiled else ''} top-1 | top-5 | agreement | KL |")
    lines = [head, "|" + "---|" * (12 + compiled + 2 * nhwc)]
    for r in results:
        b1 = r.latency["ort_b1"]
        acc = (f"{100 * r.top1:.2f}%", f"{100 * r.top5:.2f}%") if r.top1 is not None else (
            "—", "—")
        cl = f"{_p50(r, 'eager_cl_b1')} | {_p50(r, f'eager_cl_b{batch}')} | " if nhwc else ""
        lines.append(
            f"| {r.name} | {r.params:,} | {r.macs:,} | {r.onnx_bytes / 2**20:.2f} | "
            f"{b1.p50:.3f}/{b1.p90:.3f}/{b1.p99:.3f} | {r.latency[f'ort_b{batch}'].p50:.3f} | "
            f"{r.latency['eager_b1'].p50:.3f} | {_p50(r, f'eager_b{batch}')} | "
            f"{cl}{_p50(r, 'compile_b1') + ' | ' if compiled else ''}{acc[0]} | {acc[1]} | "
            f"{100 * (r.agreement or 0):.2f}% | {r.kl or 0:.4f} |")
    noted = [r for r in results if r.notes]
    if noted:
        lines += [""] + [f"- {r.name}: {'; '.join(r.notes)}" for r in noted]
    profiled = [r for r in results if r.profile]
    if profiled:
        lines += ["", "Slowest modules in ONNX Runtime at batch 1 (kernel time per run):", ""]
        lines += [f"- {r.name}: {slowest_modules(r)}" for r in profiled]
    return "\n".join(lines) + "\n"


def _p50(result: BenchResult, key: str) -> str:
    return f"{result.latency[key].p50:.3f}" if key in result.latency else "—"


def slowest_modules(result: BenchResult) -> str:
    """``layer3.0.conv2.dw 0.26 ms (9%), …`` from the profile of ``result``."""
    return ", ".join(f"{t.module} {t.ms:.3f} ms ({t.share:.0%})" for t in result.profile)

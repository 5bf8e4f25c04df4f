"""Latency of single blocks in ONNX Runtime (or eager PyTorch), measured once per (block,
input shape) and cached on disk — the cost model of ``--budget latency=F`` and the timer of
the latency guard.

A block is timed alone, at the real input shape of the layer it would replace, with random
weights (latency does not depend on their values) in an ONNX Runtime CPU session with
``threads`` intra-op threads. The export uses the TorchScript exporter (about 0.1 s per
block against several seconds for the dynamo exporter that ``bscompress export`` uses; both
give the same ONNX operators for these blocks), so timing a few hundred candidates takes
minutes the first time and nothing on the next run: the cache key is the block's structure
(its ``repr`` and parameter shapes), the input shape, the thread count, the ONNX Runtime
version and the CPU model. The guard asks for ratios instead (:meth:`LatencyTimer.ratio`):
a block and the layer it would replace timed in turn, so that the cores' drift between two
measurements does not decide which blocks are faster.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from bscompress.core.errors import BadInput
from bscompress.core.files import write_json_atomic
from bscompress.core.stats import check_threads
from bscompress.deploy.bench import Latency


def _check_cache_path(path: Path) -> None:
    """Refuse, before any timing, a cache path that can never hold the JSON file: a folder,
    a device, or a path below a regular file."""
    if path.exists() and path.is_dir():
        raise BadInput(f"the latency cache {path} is a directory: give --latency-cache the "
                       f"path of a JSON file (e.g. {path / 'latency.json'})")
    if path.exists() and not path.is_file():
        raise BadInput(f"the latency cache {path} is not a regular file: give --latency-cache "
                       "the path of a JSON file")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise BadInput(f"the latency cache {path} lies below {parent}, a file: give "
                               "--latency-cache a path in a folder")
            break


def _read_cache(path: Path, quiet: bool = False) -> dict[str, float]:
    """The cache's entries, never trusted: only finite, non-negative timings under string
    keys are kept, and damaged entries are reported (unless ``quiet``) and measured again.

    Raises:
        BadInput: (unless ``quiet``, which reads it as empty) when the file is not a JSON
            object with ``entries``: it is some other file (the model, its source, a typo
            in the path), which the timings must not replace.
    """
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        entries = data["entries"]
        if not isinstance(entries, dict):
            raise TypeError("entries is not an object")
    except (OSError, ValueError, KeyError, TypeError) as err:
        if quiet:
            return {}
        reason = err.strerror if isinstance(err, OSError) and err.strerror else (
            type(err).__name__ if not str(err) else str(err).splitlines()[0][:80])
        raise BadInput(f"the latency cache {path} is not a file of bscompress's timings "
                       f"({reason}), and it is left as it is: give --latency-cache another "
                       "path, or delete the file to start a new cache") from None
    kept = {key: float(value) for key, value in entries.items()
            if isinstance(key, str) and isinstance(value, (int, float))
            and not isinstance(value, bool) and math.isfinite(value) and value >= 0}
    if len(kept) < len(entries) and not quiet:
        print(f"warning: the latency cache {path} holds {len(entries) - len(kept)} damaged "
              "entries; they are measured again", file=sys.stderr)
    return kept


def default_cache_path() -> Path:
    """``$XDG_CACHE_HOME/bscompress/latency.json`` (``~/.cache`` when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "bscompress" / "latency.json"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor or machine elsewhere),
    which latency cache keys and benchmark tables name."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def materialize(block: nn.Module) -> nn.Module:
    """A CPU copy of ``block`` (which may live on the meta device) with random weights and
    unit buffers, in eval mode; ``block`` itself is left untouched."""
    block = copy.deepcopy(block).to("meta").to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in block.parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
        for tensor in block.buffers():
            if tensor.is_floating_point():
                tensor.fill_(1.0)
    return block.eval()


def explicit_same_padding(module: nn.Module) -> nn.Module:
    """``module``, or a copy of it whose zero-padded convs with ``padding="same"`` carry the
    amounts instead, where they are the same on both sides (d·(k − 1) even on every axis).

    The TorchScript exporter writes ``padding="same"`` as ``auto_pad=SAME_UPPER``, which ONNX
    Runtime refuses on a dilated conv ("Dilation not supported for AutoPadType::SAME_UPPER");
    explicit pads are the same conv, and what the dynamo exporter writes."""
    def convertible(conv: nn.Module) -> bool:
        return (isinstance(conv, nn.modules.conv._ConvNd) and conv.padding == "same"
                and conv.padding_mode == "zeros"
                and all(d * (k - 1) % 2 == 0 for k, d in zip(conv.kernel_size, conv.dilation,
                                                              strict=True)))

    if not any(convertible(m) for m in module.modules()):
        return module
    module = copy.deepcopy(module)
    for conv in module.modules():
        if convertible(conv):
            conv.padding = tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size,
                                                                   conv.dilation, strict=True))
    return module


def onnx_bytes(block: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """``block`` as an ONNX model (TorchScript exporter, opset 18) for an input of that shape
    (``padding="same"`` as explicit pads where it can be: :func:`explicit_same_padding`)."""
    block = explicit_same_padding(block)
    buffer = io.BytesIO()
    example = torch.randn(input_shape)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(block, (example,), buffer, dynamo=False, opset_version=18,
                              input_names=["x"], output_names=["y"])
        except Exception:  # noqa: BLE001 — a block the TorchScript exporter cannot trace
            buffer = io.BytesIO()
            with contextlib.redirect_stdout(io.StringIO()):
                torch.onnx.export(block, (example,), buffer, dynamo=True, opset_version=18,
                                  input_names=["x"], output_names=["y"])
    return buffer.getvalue()


#: the timed calls of one block stop near this many milliseconds in all (a whole 224² model
#: at batch 32 takes about a second a call: 50 calls would take a minute)
TIME_BUDGET_MS = 2000.0
#: but never fewer calls than this
MIN_RUNS = 5


def runs_within(one_ms: float, runs: int, budget_ms: float = TIME_BUDGET_MS,
                least: int = MIN_RUNS) -> int:
    """How many of ``runs`` timed calls of ``one_ms`` each fit in ``budget_ms`` (never more
    than ``runs``, never fewer than ``least`` unless ``runs`` is)."""
    return min(runs, max(least, int(budget_ms // max(one_ms, 1e-6))))


def ort_call(block: nn.Module, input_shape: tuple[int, ...], threads: int = 1
             ) -> Callable[[], object]:
    """One call of ``block`` (exported by :func:`onnx_bytes`) in an ONNX Runtime CPU session
    with ``threads`` intra-op threads, on a random input of ``input_shape``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # a failed call raises; its log line would only repeat it
    session = ort.InferenceSession(onnx_bytes(block, input_shape), options,
                                   providers=["CPUExecutionProvider"])
    feed = {"x": torch.randn(input_shape).numpy()}
    return lambda: session.run(None, feed)


def eager_call(block: nn.Module, input_shape: tuple[int, ...],
               device: torch.device | str = "cpu",
               memory_format: torch.memory_format = torch.contiguous_format
               ) -> Callable[[], object]:
    """One eager PyTorch call of ``block`` (moved to ``device`` in ``memory_format``) on a
    random input of ``input_shape``, synchronised on CUDA; the caller sets the threads and
    inference mode around the calls."""
    device = torch.device(device)
    if len(input_shape) != 4:  # channels-last is a layout of 4-D maps; a Conv1d's stays
        memory_format = torch.contiguous_format
    block = block.to(device, memory_format=memory_format)
    x = torch.randn(input_shape, device=device).contiguous(memory_format=memory_format)
    cuda = device.type == "cuda"

    def call() -> None:
        block(x)
        if cuda:
            torch.cuda.synchronize(device)

    return call


#: rounds of a paired timing (:meth:`LatencyTimer.ratio`): the two modules are timed in turn,
#: and the median of the per-round ratios is kept
PAIR_ROUNDS = 8


def interleaved(calls: Sequence[Callable[[], object]], rounds: int, runs: int
                ) -> list[list[float]]:
    """Per-round median ms of each of ``calls``, timed in turn: ``rounds`` rounds of ``runs``
    calls of each (``[call][round]``). Times taken in turn see the same state of the cores
    (clock, cache, other work), so their per-round ratios do not drift as times taken one
    after the other do."""
    out: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for times, call in zip(out, calls, strict=True):
            times.append(Latency.measure(call, 0, runs).p50)
    return out


def paired_ratio(empty: Sequence[float], reference: Sequence[float], block: Sequence[float]
                 ) -> float:
    """The median over rounds of (block − empty) ÷ (reference − empty), from per-round ms of
    the three timed in turn (:func:`interleaved`; ``empty``: a call that does nothing, the
    overhead both pay); at least 1e-6."""
    return max(statistics.median([max(b - e, 1e-9) / max(r - e, 1e-9)
                                  for e, r, b in zip(empty, reference, block, strict=True)]),
               1e-6)


def _warmups(warmup: int, runs: int) -> int:
    """Untimed calls before ``runs`` timed ones: fewer than ``warmup`` where the runs are few
    (slow calls), the probing first call counted."""
    return max(min(warmup, runs // 5) - 1, 0)


def _first_ms(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1e3


def median_ms(call, warmup: int, runs: int) -> float:
    """Median ms of ``call`` over ``runs`` calls after ``warmup`` untimed ones, with fewer of
    both where one call is slow (:func:`runs_within`; the first call, untimed, says how
    slow)."""
    runs = runs_within(_first_ms(call), runs)
    return Latency.measure(call, _warmups(warmup, runs), runs).p50


class _Copy(nn.Module):
    """The cheapest graph with an input and an output: ``x + 0`` (one Add)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.0


class _Identity(nn.Module):
    """A module call that does nothing: the whole cost of calling an eager block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class LatencyTimer:
    """Median ONNX Runtime CPU latency (ms) of blocks, cached in a JSON file.

    Args:
        cache: the JSON file holding measured latencies (created on first use; ``None``
            keeps them in memory only).
        threads: ONNX Runtime intra-op threads (1 by default: the figure of one core,
            least disturbed by other work on the machine).
        runs: timed calls per block (the median is kept).
        warmup: untimed calls before them.
    """

    runtime = "ONNX Runtime CPU"

    def __init__(self, cache: str | Path | None = None, threads: int = 1, runs: int = 50,
                 warmup: int = 5) -> None:
        import onnxruntime as ort

        self.cache = Path(cache) if cache is not None else None
        check_threads(threads, "--latency-threads")
        self.threads, self.runs, self.warmup = threads, runs, warmup
        self.measured = 0  # blocks timed by this timer (cache misses)
        self._context = f"ort={ort.__version__}|threads={threads}|cpu={cpu_model()}"
        self._entries: dict[str, float] = {}
        if self.cache is not None:
            _check_cache_path(self.cache)
            if self.cache.exists():
                self._entries = _read_cache(self.cache)

    def key(self, block: nn.Module, input_shape: tuple[int, ...]) -> str:
        shapes = [(name, tuple(t.shape)) for name, t in block.state_dict().items()]
        text = f"{self._context}|{tuple(input_shape)}|{block!r}|{shapes}"
        return hashlib.sha256(text.encode()).hexdigest()

    def time(self, block: nn.Module, input_shape: tuple[int, ...]) -> float:
        """Median ms of one call of ``block`` on an input of ``input_shape``, less the cost of
        a call that does nothing (session overhead and the input copy, ``overhead``), so
        that the times of the blocks of a model add up (cached; at least 1 ns)."""
        return max(self._time(block, input_shape) - self.overhead(input_shape), 1e-6)

    def overhead(self, input_shape: tuple[int, ...]) -> float:
        """Median ms of a session that only copies an input of ``input_shape``."""
        return self._time(self._empty(), input_shape)

    @staticmethod
    def _empty() -> nn.Module:
        """The cheapest block this runtime can time (ONNX Runtime: a graph of one Add)."""
        return _Copy()

    def ratio(self, block: nn.Module, reference: nn.Module, input_shape: tuple[int, ...]
              ) -> float:
        """``block``'s time ÷ ``reference``'s on an input of ``input_shape``, each less the
        cost of a call that does nothing, the three timed in turn (:func:`interleaved`,
        :data:`PAIR_ROUNDS` rounds): the median of the per-round ratios (cached under the
        pair; at least 1e-6). The latency guard's measure: two times taken minutes apart
        (a layer timed once, its candidates later) differ by the cores' drift, which on a
        shared machine is larger than the margin the guard asks of a block."""
        shape = tuple(input_shape)
        pair = f"ratio|{self.key(block, shape)}|{self.key(reference, shape)}"
        key = hashlib.sha256(pair.encode()).hexdigest()
        if key not in self._entries:
            self._entries[key] = self._measure_ratio(materialize(block), materialize(reference),
                                                     shape)
            self.measured += 1
            self._save()
        return self._entries[key]

    def _measure_ratio(self, block: nn.Module, reference: nn.Module,
                       input_shape: tuple[int, ...]) -> float:
        with self._running():
            calls = [self._call(m, input_shape) for m in (self._empty(), reference, block)]
            one = sum(_first_ms(call) for call in calls)  # also the first, untimed calls
            total = runs_within(one, self.runs)
            rounds = min(PAIR_ROUNDS, total)
            for call in calls:  # warm up
                for _ in range(_warmups(self.warmup, total)):
                    call()
            return paired_ratio(*interleaved(calls, rounds, max(total // rounds, 1)))

    def _time(self, block: nn.Module, input_shape: tuple[int, ...]) -> float:
        key = self.key(block, input_shape)
        if key not in self._entries:
            self._entries[key] = self._measure(materialize(block), tuple(input_shape))
            self.measured += 1
            self._save()
        return self._entries[key]

    def _measure(self, block: nn.Module, input_shape: tuple[int, ...]) -> float:
        with self._running():
            return median_ms(self._call(block, input_shape), self.warmup, self.runs)

    def _call(self, block: nn.Module, input_shape: tuple[int, ...]) -> Callable[[], object]:
        """One call of ``block`` (materialized) on a random input of ``input_shape``."""
        return ort_call(block, input_shape, self.threads)

    def _running(self) -> contextlib.AbstractContextManager:
        """What the calls of :meth:`_call` run under (the runtime's thread setting)."""
        return contextlib.nullcontext()

    def _save(self) -> None:
        """Write the entries, merged into what the file holds now: other timers (another
        runtime, another process) sharing the file keep theirs."""
        if self.cache is not None:
            if self.cache.is_file():
                self._entries = {**_read_cache(self.cache, quiet=True), **self._entries}
            write_json_atomic(self.cache, {"format": 1, "entries": self._entries})


class EagerTimer(LatencyTimer):
    """Median eager PyTorch latency (ms) of blocks on ``device`` (``cpu``, or ``cuda``
    synchronised around each call), with ``threads`` intra-op threads on the CPU; cached in
    the same file as the ONNX Runtime timings under keys of their own."""

    runtime = "PyTorch eager CPU"
    #: the layout of the block's weights and its input (a subclass may time channels-last)
    memory_format = torch.contiguous_format

    def __init__(self, cache: str | Path | None = None, threads: int = 1, runs: int = 50,
                 warmup: int = 5, device: str = "cpu") -> None:
        super().__init__(cache, threads, runs, warmup)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.runtime = f"PyTorch eager {torch.cuda.get_device_name(self.device)}"
        self._context = (f"torch={torch.__version__}|device={self.device}|threads={threads}"
                         f"|cpu={cpu_model()}")

    @staticmethod
    def _empty() -> nn.Module:
        """A module call returning its input: eager PyTorch needs no graph, and ``x + 0``
        would charge every block a pass over its input (at batch 32 on a 56² map, as long
        as a 1×1 conv)."""
        return _Identity()

    def _call(self, block: nn.Module, input_shape: tuple[int, ...]) -> Callable[[], object]:
        return eager_call(block, input_shape, self.device, self.memory_format)

    @contextlib.contextmanager
    def _running(self):
        """``threads`` intra-op threads and inference mode, restored after."""
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                yield
        finally:
            torch.set_num_threads(threads)


class ChannelsLastEagerTimer(EagerTimer):
    """:class:`EagerTimer` with the blocks' weights and inputs channels-last (NHWC), the
    layout PyTorch's CPU convs run fastest in: in NCHW at batch 32 its 1×1 convs on 56² maps
    run 1.8–7.8× slower and its depthwise convs about 2× (docs/benchmarks.md, "Eager
    PyTorch: the layout"), so a block's time in eager PyTorch depends on the layout it is
    served in."""

    runtime = "PyTorch eager CPU, channels-last"
    memory_format = torch.channels_last

    def __init__(self, cache: str | Path | None = None, threads: int = 1, runs: int = 50,
                 warmup: int = 5) -> None:
        super().__init__(cache, threads, runs, warmup)
        self._context += "|channels_last"


#: the runtimes a latency budget and the guard can time in (``--latency-runtime``)
RUNTIMES = ("onnxruntime", "eager", "eager-channels-last", "eager-cuda")


def channel_block(runtime: str) -> int:
    """The channel multiple at which ``runtime`` keeps its fast layout on this machine, that
    bottleneck widths are rounded up to when time matters (``recipe.Decompose.round_to``).

    On an x86 CPU, ONNX Runtime runs convolutions in its blocked NCHWc layout (MLAS: blocks of
    8 channels with AVX2, 16 with AVX-512) and oneDNN's eager kernels in nChw8c / nChw16c; a
    conv whose channels are not a multiple of the block falls out of it. One such layer costs
    a reorder on each side and the Conv+Add+ReLU fusion of its residual block: ResNet-50 at
    25% of the MACs with free widths spent 5.3 of its 32.1 ms of ONNX Runtime kernels (1
    thread) in reorders and unfused Add and ReLU, none with widths in multiples of 8
    (docs/benchmarks.md, "Channel layout"). Inside the layout, ONNX Runtime's AVX2 kernels
    step by 16 channels, in and out: a 1×1, depthwise or 3×3 conv with 24, 40 or 56 channels
    takes the time of one with 32, 48 or 64 (docs/benchmarks.md, "Channel block"), so its
    block is 16 on AVX2 too; oneDNN's eager kernels show no such step (8). On CUDA, 8
    (tensor-core tiles); 1 (no rounding) on a CPU with neither AVX2 nor AVX-512.
    """
    if runtime == "eager-cuda":
        return 8
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return 16
    if capability.startswith("AVX2"):
        return 16 if runtime == "onnxruntime" else 8
    return 1


def make_timer(runtime: str, cache: str | Path | None = None, threads: int = 1
               ) -> LatencyTimer:
    """The timer of ``runtime`` (one of :data:`RUNTIMES`: ONNX Runtime CPU, eager PyTorch on
    the CPU in NCHW or channels-last, or on the current CUDA device)."""
    if runtime == "onnxruntime":
        return LatencyTimer(cache, threads=threads)
    if runtime == "eager":
        return EagerTimer(cache, threads=threads)
    if runtime == "eager-channels-last":
        return ChannelsLastEagerTimer(cache, threads=threads)
    if runtime == "eager-cuda":
        if not torch.cuda.is_available():
            raise BadInput("latency runtime eager-cuda needs a CUDA device, and PyTorch sees "
                           "none: time on the CPU (onnxruntime or eager)")
        return EagerTimer(cache, threads=threads, device="cuda")
    raise BadInput(f"latency runtime {runtime!r} is unknown; choose one of {', '.join(RUNTIMES)}")

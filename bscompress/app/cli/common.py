"""What every ``bscompress`` command shares: the typer app, the consoles, the option types,
error handling (exit codes), model loading and the plan table.

The commands live in the other modules of :mod:`bscompress.app.cli`, one per command (``train``:
finetune and run); each imports this module and none imports another, so that the command
modules form no import cycle. Exit codes: 0 ok, 1 a check failed, 2 bad input, 3 internal error (a
bug: please report it with the output of ``--debug``).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bscompress._version import __version__
from bscompress.core.errors import BSCompressError
from bscompress.core.records import CalibrationRecord, FixedKernelsRecord, GuardRecord

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="bscompress",
    help="Compress trained PyTorch CNNs into depthwise- and blueprint-separable form.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
# no emoji codes: user text (a path "x:smile:.pt", "cuda:-1") is printed as it was typed
err_console = Console(stderr=True, emoji=False)
# tables keep their columns when piped into a file or a CI log
out_console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160,
                      emoji=False)
_state = {"debug": bool(os.environ.get("BSCOMPRESS_DEBUG"))}

INTERNAL_ERROR = 3

# ---------------------------------------------------------------------------------------------
# options shared by the commands

ModelArg = Annotated[
    str,
    typer.Argument(
        metavar="MODEL",
        help="A checkpoint file (with --arch), a bscompress archive, or an architecture spec "
        "such as torchvision:resnet18 (random weights).",
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        metavar="SPEC",
        help="Architecture of a plain checkpoint: torchvision:NAME, timm:NAME, "
        "package.module:NAME or path/to/file.py:NAME (a class or a factory).",
    ),
]
ArchKwargsOpt = Annotated[
    str | None,
    typer.Option("--arch-kwargs", metavar="JSON",
                 help='Arguments for --arch, e.g. \'{"num_classes": 10}\'.'),
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle", "--trust-code",
        help="Trust the file to run code: load a pickled whole nn.Module, or build the "
        "architecture an archive names when it is neither built-in nor written by you "
        "(docs/security.md).",
    ),
]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--checkpoint-key",
        metavar="KEY",
        help="Entry of a wrapper checkpoint holding the weights (e.g. ema, or model.state_dict).",
    ),
]
ShapeOpt = Annotated[
    str | None,
    typer.Option(
        "--input-shape",
        metavar="SHAPE",
        help="Input shape with batch, e.g. 1,3,224,224 (inferred for torchvision models, "
        "archives and models that declare INPUT_SHAPE).",
    ),
]
IncludeOpt = Annotated[
    list[str] | None,
    typer.Option("--include", metavar="GLOB", help="Only layers matching (repeatable)."),
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option("--exclude", metavar="GLOB", help="Never layers matching (repeatable)."),
]
MinInOpt = Annotated[
    int,
    typer.Option("--min-in-channels", min=1,
                 help="Skip convs with fewer input channels per group."),
]
ResizeOpt = Annotated[
    int | None, typer.Option("--resize", min=1, help="imagefolder: resize the short side first.")
]
CropOpt = Annotated[int | None, typer.Option("--crop", min=1, help="imagefolder: centre crop.")]
MeanOpt = Annotated[
    str | None,
    typer.Option("--mean", help="Per-channel input mean, e.g. 0.485,0.456,0.406 (default: the "
                 "one recorded in an archive, else the dataset's own)."),
]
StdOpt = Annotated[
    str | None,
    typer.Option("--std", help="Per-channel input std, e.g. 0.229,0.224,0.225 (default as "
                 "--mean)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or info lines.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"bscompress {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version_callback, is_eager=True,
                     help="Print the version and exit."),
    ] = None,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks on errors.")
    ] = False,
) -> None:
    """Compress trained PyTorch CNNs: closed-form DSC, BSConv, Tucker-2 and CP rewrites."""
    _state["debug"] = _state["debug"] or debug


def handle_errors(func: F) -> F:
    """Turn :class:`BSCompressError` into one red sentence and its exit code; other
    exceptions into an 'internal error' line (exit 3). ``--debug`` shows tracebacks."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except BSCompressError as err:
            if _state["debug"]:
                raise
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[red]interrupted[/]")
            raise typer.Exit(130) from None
        except Exception as err:
            if _state["debug"]:
                raise
            err_console.print(
                f"[bold red]internal error:[/] {type(err).__name__}: {escape(str(err))} "
                "(run with --debug for the traceback and please report it)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(INTERNAL_ERROR) from None

    return wrapper  # type: ignore[return-value]


def _print_json(data: Any) -> None:
    from bscompress.core.files import dumps

    typer.echo(dumps(data, indent=2, default=str))  # valid JSON: NaN and ±Inf as null


class StageBar:
    """A rich progress bar for ``decompose``'s ``progress.Step`` reports: one line per stage
    (its description, a bar and M/N with the time left when the stage's size is known, a
    spinner and the elapsed time when not)."""

    def __init__(self, disabled: bool) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                 BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=err_console, transient=True,
                                 disable=disabled)
        self.task = None
        self.stage: str | None = None

    def __enter__(self) -> StageBar:
        self.progress.__enter__()
        self.task = self.progress.add_task("planning", total=None)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, step: Any) -> None:
        """``step``: a ``progress.Step`` (or a plain description)."""
        stage, total = getattr(step, "stage", str(step)), getattr(step, "total", None)
        if stage != self.stage:  # a new stage starts its own clock (and may have no size)
            self.stage = stage
            self.progress.remove_task(self.task)
            self.task = self.progress.add_task(escape(str(step)), total=total)
        self.progress.update(self.task, description=escape(str(step)),
                             completed=getattr(step, "done", 0), total=total)


def flag_names(flags: dict[str, str]) -> Callable[[str], str]:
    """How a command names the fields of its schema section in messages: the flag in
    ``flags``, else ``--`` and the field with dashes (``round_to`` → ``--round-to``)."""
    return lambda field: flags.get(field, "--" + field.replace("_", "-"))


def _info(quiet: bool, message: str) -> None:
    if not quiet:
        err_console.print(message, highlight=False)


def _load(model: str, arch: str | None, arch_kwargs: str | dict | None, trust: bool,
          key: str | None, arch_for_checkpoints_only: bool = False,
          input_shape: str | None = None):
    """Load MODEL; ``input_shape`` (``--input-shape``) gives lazy modules their shapes."""
    from bscompress.core.stats import parse_shape
    from bscompress.io.archive import load_model

    loaded = load_model(model, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust,
                        checkpoint_key=key, arch_for_checkpoints_only=arch_for_checkpoints_only,
                        input_shape=parse_shape(input_shape) if input_shape else None)
    for note in loaded.notes:
        err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    return loaded


def _input_shape(loaded: Any, text: str | None, probe: tuple[int, ...] = (1, 2)
                 ) -> list[int]:
    """The input shape (``--input-shape``, the archive's, the architecture's), checked by a
    forward pass at each batch size of ``probe`` before any expensive step."""
    from bscompress.core.errors import BadInput
    from bscompress.core.stats import check_input_shape, check_input_size, parse_shape
    from bscompress.io.arch import default_input_shape

    what = "--input-shape"
    if text:
        shape = parse_shape(text)
    elif loaded.plan is not None and loaded.plan.input_shape:
        shape = list(loaded.plan.input_shape)
        what = f"the input shape recorded in {loaded.source} (--input-shape overrides it)"
    else:
        shape = default_input_shape(loaded.arch)
    if shape is None:
        raise BadInput(
            "cannot infer the model's input shape: pass --input-shape, e.g. 1,3,224,224"
        )
    if probe:
        check_input_shape(loaded.model, shape, probe, what=what)
    else:
        check_input_size(shape, what)
    return shape


def _input_paths(*items: str | Path | None) -> tuple[Path, ...]:
    """The files and folders among a command's inputs, for the output guard: model and
    recipe paths, the file of a ``file.py:NAME`` spec, the folder of a ``kind:DIR`` data
    spec, caches."""
    found: list[Path] = []
    for item in items:
        if item is None:
            continue
        text = str(item)
        candidates = [text]
        if ":" in text:
            candidates += [text.split(":", 1)[1], text.rsplit(":", 1)[0]]
        found += [Path(c) for c in candidates if c and Path(c).exists()]
    return tuple(dict.fromkeys(found))


def _open_data(data: str, loaded: list[Any], quiet: bool, shape: list[int] | None = None,
               **options: Any) -> Any:
    """Open ``--data`` with the preprocessing given on the command line or, when none is
    given, the one recorded in the archives among ``loaded`` (they must agree), for a model
    of the input channels of ``shape`` (else the first model's recorded or declared input
    shape: an image folder is read as grayscale for a model of one channel)."""
    from bscompress.core.errors import BadInput
    from bscompress.data import open_data_spec, recorded_preprocessing
    if shape is None and loaded:
        shape = loaded[0].known_input_shape
    if shape is not None and len(shape) > 1:
        options["channels"] = shape[1]

    given = any(options.get(k) is not None for k in ("mean", "std", "resize", "crop"))
    records = {json.dumps(r, sort_keys=True): r
               for lm in loaded if (r := lm.metadata.get("preprocessing"))}
    if not given and len(records) > 1:
        raise BadInput("the models record different preprocessing "
                       f"({'; '.join(records)}): pass --mean/--std (and --resize/--crop) "
                       "explicitly")
    if not given and records:
        record = next(iter(records.values()))
        options.update(recorded_preprocessing(data, record))
        _info(quiet, "using the preprocessing recorded in the archive: "
                     + ", ".join(f"{k} {v}" for k, v in record.items()))
    return open_data_spec(data, **options)


def _preprocessing_meta(mean: str | None, std: str | None, resize: int | None,
                        crop: int | None, shape: list[int] | None = None) -> dict[str, Any]:
    """Archive metadata recording the preprocessing a model expects (only what was given),
    checked against the channels of the input ``shape`` when it is known."""
    from bscompress.core.errors import BadInput
    from bscompress.data import parse_floats

    record = {"mean": parse_floats(mean, "--mean"), "std": parse_floats(std, "--std"),
              "resize": resize, "crop": crop}
    channels = shape[1] if shape is not None and len(shape) > 1 else None
    for option in ("mean", "std"):
        values = record[option]
        if values is not None and channels is not None and len(values) not in (1, channels):
            raise BadInput(f"--{option} gives {len(values)} values for a model with "
                           f"{channels} input channels: give one value or {channels}")
    record = {k: v for k, v in record.items() if v is not None}
    return {"preprocessing": record} if record else {}


def _fmt_count(value: float) -> str:
    from bscompress.core.stats import format_count

    return format_count(value)


def _fmt_frac(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _fmt_error(value: float | None) -> str:
    return "?" if value is None else f"{value:.3g}"


# ---------------------------------------------------------------------------------------------
# commands



def _print_fixed(fixed: FixedKernelsRecord) -> None:
    out_console.print(
        f"fixed kernels ({escape(fixed.mode)}, |ρ| ≥ {fixed.match:g}): {fixed.gaussian} "
        f"Gaussian, {fixed.edge} edge, {fixed.identity} identity of {fixed.kernels} "
        f"kernels examined, in {fixed.layers} layers ({fixed.negative} with a negative "
        f"scale); {fixed.dropped_blocks} blocks reduced to their 1×1 conv"
        + (f"; {fixed.unsupported_blocks} blocks left alone (blueprints at rank > 1 or "
           "4-mode CP kernels)" if fixed.unsupported_blocks else "")
        + (f"; {fixed.refused} depthwise convs refused (their forward is not a plain or "
           "'same'-padded conv: reasons in the plan)" if fixed.refused else ""),
        highlight=False)
    metric = ("ρ of their output on the calibration data" if fixed.metric == "inputs"
              else "ρ of their weights")
    if fixed.weight_metric:
        metric += (f", except {len(fixed.weight_metric)} convs matched on their weights "
                   "(reasons in the plan's summary)")
    change = ("" if fixed.output_change is None else
              f"; the model's output changed by {fixed.output_change:.2%} of its energy"
              + ("" if fixed.agreement is None else
                 f" (top-1 agreement with the model before: {fixed.agreement:.1%})")
              + f" on {escape(fixed.measured_on or '?')}")
    out_console.print(f"kernels matched by {metric}{change}", highlight=False)
    from bscompress.transforms.fixed_kernels import AGREEMENT_WARNING, CHANGE_WARNING

    if fixed.agreement is not None:
        if fixed.agreement >= AGREEMENT_WARNING:
            return
        what = f"top-1 agreed with the model before on only {fixed.agreement:.1%} of"
    elif fixed.output_change is not None and fixed.output_change > CHANGE_WARNING:
        what = f"output changed by {fixed.output_change:.1%} of its energy on"
    else:
        return
    err_console.print(
        f"[yellow]warning: with the fixed kernels the model's {what} "
        f"{escape(fixed.measured_on or '?')}: fine-tune it (bscompress finetune) before use, "
        "or fix fewer kernels with a higher --match"
        + (", or add --calib to match them on their output on the data"
           if fixed.metric == "weights" else "") + "[/yellow]")


def _print_guard(guard: GuardRecord, totals: Any) -> None:
    """The latency guard's line: what it left out, and the time ratios against the MACs."""
    batches = ", ".join(str(b) for b in guard.batches)
    why = ("slower than their layer" if not guard.share else
           f"saving less than {guard.share:g} of their MAC saving in time")
    text = (f"latency guard ({escape(guard.runtime)}; batch {batches}): {guard.rejected} of "
            f"{guard.checked} candidate blocks left out as {why}")
    if guard.whole:
        times = " and ".join(f"{r:.2f}× (batch {b})" for b, r in guard.whole.items())
        macs = (f", with {totals.macs_after / max(totals.macs_before, 1):.1%} of its MACs"
                if totals.macs_after is not None and totals.macs_before else "")
        text += f"; the whole model runs in {times} of the original's time{macs}"
    if guard.layers:
        first = str(guard.batches[0])
        ratios = [r[first] for r in guard.layers.values() if first in r]
        if ratios:
            text += (f"; the replaced layers {min(ratios):.2f}–{max(ratios):.2f}× theirs at "
                     f"batch {first}")
    if guard.untimed_why:
        text += (f"; {guard.untimed} blocks kept untimed, as the timer failed "
                 f"({escape(guard.untimed_why)})")
    out_console.print(text, highlight=False)
    advice = ("try a smaller budget fraction, another --method, or --latency-runtime for the "
              "runtime you serve with, and check with bscompress bench")
    slower = {b: r for b, r in guard.whole.items() if r >= 1.0}
    if slower:  # every block was faster than its layer, the whole model is not
        where = " and ".join(f"batch {b} ({r:.2f}×)" for b, r in slower.items())
        err_console.print(
            f"[yellow]warning: the compressed model is not faster than the original at "
            f"{where} in {escape(guard.runtime)}: its blocks, each timed faster than its "
            f"layer alone, do not add up to a faster network here; {advice}[/yellow]")
        return
    if not guard.share or totals.macs_after is None or not totals.macs_before:
        return
    from bscompress.compress.guard import time_bound

    # the guard's own bound, for the network: the layers it cannot touch (depthwise convs,
    # normalisation, activations) may hold most of the time
    kept = totals.macs_after / totals.macs_before
    bound = time_bound(kept, guard.share)
    short = {b: r for b, r in guard.whole.items() if r > bound}
    if short:
        where = " and ".join(f"batch {b} ({1 / r:.2f}× faster)" for b, r in short.items())
        err_console.print(
            f"[yellow]warning: with {kept:.1%} of its MACs the compressed model saves less "
            f"than {guard.share:g} of that saving in time at {where} in "
            f"{escape(guard.runtime)} (the bound each block met: {bound:.2f}× the time): the "
            f"layers no block replaces may hold most of its time there; {advice}[/yellow]")


def _batchnorm_note(calibration: CalibrationRecord) -> str:
    """What happened to the BatchNorm statistics, for the summary under the plan table."""
    return _batchnorm_note_of(calibration.batchnorm, calibration.batchnorm_reestimated)


def _error_pair(error: dict) -> str:
    """``{"before": e0, "after": e1, "in_sample"?}`` as "held-out output error e0 → e1"."""
    on = "calibration" if error.get("in_sample") else "held-out"
    return f"{on} output error {error['before']:.4f} → {error['after']:.4f}"


def _batchnorm_note_of(batchnorm: dict, corrected: int) -> str:
    """A BatchNorm correction's record (``batchnorm.correct_batchnorm_checked``) in words."""
    held = batchnorm.get("held_out_error")
    on = "calibration" if batchnorm.get("in_sample") else "held-out"
    if held and not batchnorm.get("kept", True):
        return (f"BatchNorm correction dropped ({on} output error {held['before']:.4f} "
                f"→ {held['after']:.4f})")
    text = f"BatchNorm corrected in {corrected} layers"
    if held:
        text += f" ({on} output error {held['before']:.4f} → {held['after']:.4f})"
    return text


def _print_plan(plan: Any, title: str) -> None:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    calibrated = any(entry.output_error is not None for entry in plan.layers)
    columns = ["layer", "method", "ranks", "params", "MACs", "weight error"]
    held_out = any(entry.held_out_error is not None for entry in plan.layers)
    if calibrated:
        columns += ["output error"] + (["held-out"] if held_out else []) + ["in network", "fit"]
    sensitive = any(entry.sensitivity is not None for entry in plan.layers)
    if sensitive:
        columns.append("KL alone")
    for column in columns:
        table.add_column(column, justify="left" if column in ("layer", "method", "ranks", "fit")
                         else "right", no_wrap=column == "layer")
    for entry in plan.layers:
        if entry.replaced:
            ranks = ", ".join([f"{k}={v}" for k, v in entry.ranks.items()] + [
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in entry.options.items()
                if k != "n_iter_max" and not isinstance(v, list)])  # fixed-kernel indices
            extra = ([_fmt_frac(entry.output_error)]
                     + ([_fmt_frac(entry.held_out_error)] if held_out else [])
                     + [_fmt_frac(entry.measured_error), entry.fit or ""] if calibrated else [])
            if sensitive:
                extra.append(_fmt_frac(entry.sensitivity))
            table.add_row(
                entry.name, entry.label(), ranks,
                f"{_fmt_count(entry.params_before)} → {_fmt_count(entry.params_after or 0)}",
                f"{_fmt_count(entry.macs_before)} → {_fmt_count(entry.macs_after or 0)}",
                _fmt_frac(entry.predicted_error), *extra,
            )
        else:
            table.add_row(entry.name, f"[dim]{escape(entry.skip_reason)}[/]",
                          *[""] * (len(columns) - 2))
    out_console.print(table)
    totals = plan.summary
    if totals.fixed_kernels is not None:
        _print_fixed(totals.fixed_kernels)
    if None not in (totals.params_before, totals.params_after, totals.macs_before,
                    totals.macs_after):
        out_console.print(
            f"{len(plan.replaced())}/{len(plan.layers)} layers rewritten; params "
            f"{_fmt_count(totals.params_before)} → {_fmt_count(totals.params_after)} "
            f"({totals.params_after / max(totals.params_before, 1):.1%}), MACs "
            f"{_fmt_count(totals.macs_before)} → {_fmt_count(totals.macs_after)} "
            f"({totals.macs_after / max(totals.macs_before, 1):.1%})",
            highlight=False,
        )
    b = totals.budget
    if b is not None:
        if b.kind == "latency" and None not in (b.measured, b.goal, totals.latency_before_ms):
            before = totals.latency_before_ms
            out_console.print(
                f"budget latency={b.fraction}: {escape(b.runtime or 'ONNX Runtime')}, whole "
                f"model {before:.3f} → "
                f"{b.measured:.3f} ms ({b.measured / max(before, 1e-12):.1%}; goal ≤ "
                f"{b.goal:.3f} ms)", highlight=False)
        else:
            out_console.print(f"budget {escape(b.kind)}={b.fraction}: target "
                              f"{_fmt_count(b.target)}, allocated {_fmt_count(b.achieved)}",
                              highlight=False)
        if b.under_block:
            block = (totals.ranks or {}).get("round_to")
            out_console.print(f"widths rounded up to multiples of {block} could not reach "
                              "the budget: narrower forms were offered too "
                              f"({b.under_block} candidates)", highlight=False)
        probe = totals.sensitivity
        out_console.print(f"allocated by {escape(b.error)}"
                          + (f" ({probe.measured} candidates measured, "
                             f"cache {escape(str(probe.cache))})" if probe else ""),
                          highlight=False)
    if totals.guard is not None:
        _print_guard(totals.guard, totals)
    calibration = totals.calibration
    if calibration is not None:
        out_console.print(
            f"calibrated on {calibration.samples if calibration.samples is not None else '?'}"
            f" samples of {escape(str(calibration.data or '?'))}: full input covariance for "
            f"{calibration.full_covariance_layers}/{calibration.layers} layers "
            f"({calibration.covariance_mb} MB), {_batchnorm_note(calibration)}"
            + (f"; {calibration.repeated} samples left out as copies of others"
               if calibration.repeated else ""),
            highlight=False,
        )
        if calibration.held_out_samples == 0 and calibration.holdout != 0:  # too few
            from bscompress.compress.planning import FEW_SAMPLES_ERROR

            err_console.print(
                "[yellow]warning: the calibration data are too few to hold any out (8 "
                "distinct samples are needed), so nothing checked the data-aware fits against "
                "the data-free ones: layers with fewer patches than dimensions were fitted "
                "data-free, the others on the calibration samples alone"
                + ("; the budget was allocated by the layers' weight errors, as their "
                   "in-sample output errors rank nothing" if b is not None
                   and b.error == FEW_SAMPLES_ERROR else "")
                + "; calibrate on more samples[/yellow]")
    degenerate = [e for e in plan.layers if e.statistics]
    if degenerate:
        floored = [e.name for e in degenerate if e.statistics.get("floored")]
        out_console.print(
            f"degenerate calibration statistics in {len(degenerate)} "
            f"layer{'s' if len(degenerate) != 1 else ''} (fewer patches "
            "than dimensions, or dimensions always zero)"
            + (f"; eigenvalues floored in {escape(', '.join(floored))}" if floored else "")
            + ": see 'statistics' in the plan (--json)", highlight=False)
    rebuilt = totals.reconstruction
    if rebuilt is not None:
        blocks = [b for b in rebuilt.blocks if b.skipped is None]
        worse = sum(b.restored for b in blocks)
        errors = ", ".join(
            f"{b.name} {_fmt_error(b.error_before)} → {_fmt_error(b.error_after)}"
            for b in blocks)
        skipped = [f"{b.name} ({b.skipped})" for b in rebuilt.blocks if b.skipped]
        out_console.print(
            f"reconstructed {len(blocks)} blocks ({rebuilt.steps} Adam steps each, lr "
            f"{rebuilt.lr:g}; relative block error {escape(errors)})"
            + (f"; {worse} restored (no gain)" if worse else "")
            + (f"; not reconstructed: {escape(', '.join(skipped))}" if skipped else "")
            + (f"; then {_batchnorm_note_of(again, again.get('corrected', 0))}"
               if (again := rebuilt.batchnorm) else "")
            + ("" if rebuilt.kept else
               f"; dropped: the network's {_error_pair(rebuilt.network_error)} rose, the "
               "model is the one before reconstruction"),
            highlight=False)

"""``bscompress finetune`` and ``bscompress run``: the recipe commands (they share the run
directory, the history table and the progress display)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from bscompress.app.cli.common import (
    ArchKwargsOpt,
    ArchOpt,
    ForceOpt,
    JsonOpt,
    KeyOpt,
    QuietOpt,
    TrustOpt,
    _info,
    _input_paths,
    _load,
    _print_json,
    app,
    err_console,
    handle_errors,
    out_console,
)

RecipeOpt = Annotated[Path, typer.Option("--recipe", "-r", help="Recipe YAML (see recipes/).")]
DeviceOpt = Annotated[
    str | None,
    typer.Option("--device", help="cuda, cuda:1 or cpu (default: CUDA when available)."),
]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue the run from its checkpoint.pt: model, "
                       "optimizer, epoch, step and RNG states (refused when the model or "
                       "the recipe's training fields changed; a folder without checkpoint.pt "
                       "has nothing to resume: start without --resume).")
]
OutputDirOpt = Annotated[
    Path | None,
    typer.Option("--output-dir", help="Run folder (default: the recipe's output, else "
                 "runs/RECIPE-NAME)."),
]


def _run_dir(recipe: Any, recipe_path: Path, given: Path | None) -> Path:
    if given is not None:
        return given
    if recipe.output:
        return Path(recipe.output)
    return Path("runs") / (recipe.name or recipe_path.stem)


class _StepBar:
    """A rich progress bar fed by the trainer's per-step callback (rank 0)."""

    def __init__(self, disabled: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                 console=err_console, transient=True, disable=disabled)
        self.task = None
        self.epoch = None

    def __enter__(self) -> _StepBar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, info: dict) -> None:
        if self.task is None or info["epoch"] != self.epoch:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.epoch = info["epoch"]
            self.task = self.progress.add_task(f"epoch {info['epoch']}", total=info["steps"],
                                               info="")
        self.progress.update(self.task, completed=info["step"],
                             info=f"loss {info['loss']:.4f}  lr {info['lr']:.2e}  "
                             f"{info['samples_per_s']:.0f} samples/s")


def _print_history(history: list[dict]) -> None:
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="fine-tuning", title_justify="left")
    for column in ("epoch", "train loss", "train top-1", "val top-1", "seconds", "samples/s"):
        table.add_column(column, justify="right")
    for row in history:
        table.add_row(str(row["epoch"]),
                      "—" if "train_loss" not in row else f"{row['train_loss']:.4f}",
                      _pct(row.get("train_top1")), _pct(row.get("val_top1")),
                      "—" if "seconds" not in row else f"{row['seconds']:.1f}",
                      "—" if "samples_per_s" not in row else f"{row['samples_per_s']:.0f}")
    out_console.print(table)


def _with_progress(quiet: bool, job: Callable[[Callable[[str], None], _StepBar], Any]) -> Any:
    """``job(log, bar)`` under a step progress bar; a signal becomes exit code 130 naming
    the checkpoint that resumes the run (once taken, further signals are ignored until the
    process exits: the checkpoint is saved and the exit code stays 130)."""
    from bscompress.core.errors import Stopped
    from bscompress.train.finetune import Interrupted, exit_after_stop

    with _StepBar(quiet) as bar, exit_after_stop():
        try:
            return job(lambda message: _info(quiet, message), bar)
        except Interrupted as err:
            raise Stopped(f"stopped by signal {err.signum}; the run is saved in "
                          f"{err.checkpoint}: rerun the same command with --resume to "
                          "continue it") from None


@app.command(
    epilog="Examples:\n\n"
    "  bscompress finetune demo.auto.pt --recipe recipes/fmnist-bsconvu-kd.yaml -o demo.ft.pt"
    "\n\n  torchrun --nproc_per_node 4 -m bscompress finetune r50.pt -r recipes/"
    "imagenet-resnet50-bsconvu.yaml\n\n"
    "  bscompress finetune demo.auto.pt -r recipe.yaml --resume",
)
@handle_errors
def finetune(
    model: Annotated[str, typer.Argument(help="Archive (or checkpoint with --arch) to train.")],
    recipe_path: RecipeOpt,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Archive of the best model (default "
                                  "RUN-DIR/model.pt).")
    ] = None,
    output_dir: OutputDirOpt = None,
    resume: ResumeOpt = False,
    device: DeviceOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    checkpoint_key: KeyOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune a (decomposed) model by a recipe, distilling from the original model.

    Evaluates before the first step and after every eval_interval epochs and keeps the
    best model, so the result is never worse on the validation data than the start. Writes
    RUN-DIR/checkpoint.pt after every epoch (and on SIGINT/SIGTERM, then exits 130),
    RUN-DIR/best.pt and RUN-DIR/metrics.jsonl. Under torchrun it trains with
    DistributedDataParallel; rank 0 logs, evaluates and writes. Exits 1 when the training
    diverges (a loss that is not finite), keeping the best model and checkpoint so far.
    No output may replace an input (model, teacher, recipe, data).
    """
    from bscompress.app import pipeline
    from bscompress.core.recipe import load_recipe
    from bscompress.train import finetune as engine

    recipe = pipeline.consented(load_recipe(recipe_path), trust_pickle)
    with engine.joined_world(device) as world:
        # the recipe's arch is the original model's: an archive brings its own
        # (and its arch_kwargs, unless --arch-kwargs gives others)
        loaded = _load(model, arch or recipe.arch,
                       arch_kwargs if arch_kwargs is not None else recipe.arch_kwargs,
                       trust_pickle, checkpoint_key,
                       arch_for_checkpoints_only=arch is None)
        run_dir = _run_dir(recipe, recipe_path, output_dir)
        out = output or run_dir / "model.pt"
        quiet = quiet or as_json or not world.main
        inputs = _input_paths(recipe_path, model, arch)
        _, result = _with_progress(quiet, lambda log, bar: pipeline.finetune(
            loaded, recipe, run_dir, out, world, resume=resume, force=force, log=log,
            on_step=bar, inputs=inputs))
    if not world.main:
        return
    if as_json:
        _print_json({"output": str(out), "initial_top1": result.initial_top1,
                     "best_top1": result.best_top1, "best_epoch": result.best_epoch,
                     "history": result.history})
        return
    _print_history(result.history)
    out_console.print(
        f"best val top-1 {_pct(result.best_top1)} (epoch {result.best_epoch}; start "
        f"{_pct(result.initial_top1)}); wrote {escape(str(out))}", highlight=False)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


@app.command(
    epilog="Examples:\n\n  bscompress run recipes/fmnist-bsconvu-kd.yaml\n\n"
    "  bscompress run recipes/cifar10-resnet18-bsconvs.yaml --output-dir runs/r18 --force",
)
@handle_errors
def run(
    recipe_path: Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/).")],
    output_dir: OutputDirOpt = None,
    resume: ResumeOpt = False,
    device: DeviceOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a non-empty run folder.")]
    = False,
    trust_pickle: TrustOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run a recipe's whole pipeline into one folder, from checkpoint to benchmarked ONNX.

    load → decompose (calibrated) → fine-tune with distillation → export to ONNX with
    parity checks → bench against the original (report.json, report.md, report.png), with
    metrics.jsonl and run.json. Exits 1 when a bench gate of the recipe fails.
    """
    from bscompress.app import pipeline
    from bscompress.core.errors import CheckFailed
    from bscompress.core.recipe import load_recipe
    from bscompress.train import finetune as engine

    recipe = pipeline.consented(load_recipe(recipe_path), trust_pickle)
    with engine.joined_world(device) as world:
        run_dir = _run_dir(recipe, recipe_path, output_dir)
        quiet = quiet or as_json or not world.main
        summary = _with_progress(quiet, lambda log, bar: pipeline.run(
            recipe, run_dir, world, force=force, resume=resume, log=log, on_step=bar,
            inputs=(recipe_path,)))
    if not world.main:
        return
    if as_json:
        _print_json(summary)
    else:
        for name, step in summary["steps"].items():
            figures = ", ".join(f"{k} {json.dumps(v)}" for k, v in step.items())
            out_console.print(f"{name}: {escape(figures)}", highlight=False)
        out_console.print(f"results in {escape(str(run_dir))}", highlight=False)
    if summary.get("gate_failures"):
        raise CheckFailed("gate failed: " + "; ".join(summary["gate_failures"]))

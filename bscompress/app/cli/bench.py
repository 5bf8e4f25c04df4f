"""``bscompress bench``: accuracy and latency of models side by side, and the CI gate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from bscompress.app.cli.common import (
    ArchKwargsOpt,
    ArchOpt,
    CropOpt,
    ForceOpt,
    KeyOpt,
    MeanOpt,
    QuietOpt,
    ResizeOpt,
    ShapeOpt,
    StdOpt,
    TrustOpt,
    _fmt_count,
    _input_paths,
    _input_shape,
    _load,
    _open_data,
    app,
    err_console,
    flag_names,
    handle_errors,
    out_console,
)


@app.command(
    epilog="Examples:\n\n"
    "  bscompress bench original.bsc.pt compressed.bsc.pt --data demo\n\n"
    "  bscompress bench original.bsc.pt compressed.bsc.pt --data demo --max-accuracy-drop 1.0 "
    "--min-speedup 1.5 --json bench.json",
)
@handle_errors
def bench(
    models: Annotated[
        list[str],
        typer.Argument(metavar="MODEL...", help="Models to compare; the first is the reference."),
    ],
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    checkpoint_key: KeyOpt = None,
    input_shape: ShapeOpt = None,
    data: Annotated[
        str | None, typer.Option("--data", metavar="SPEC", help="Labelled data for accuracy "
                                 "(see evaluate --help); without it, agreement and KL on "
                                 "random inputs.")
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Samples of --data.")] = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    batch: Annotated[int, typer.Option("--batch", help="Batch timed besides 1.")] = 32,
    runs: Annotated[int, typer.Option("--runs", help="Timed runs per figure.")] = 50,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs first.")] = 10,
    threads: Annotated[
        int | None, typer.Option("--threads", help="Intra-op threads.")
    ] = None,
    torch_compile: Annotated[
        bool, typer.Option("--compile", help="Also time torch.compile (inductor) at batch 1; "
                           "compiling takes seconds to minutes per model and is not timed.")
    ] = False,
    channels_last: Annotated[
        bool, typer.Option("--channels-last", help="Also time eager PyTorch with the model "
                           "and its inputs channels-last (NHWC), at batch 1 and --batch.")
    ] = False,
    profile_top: Annotated[
        int, typer.Option("--profile-top", help="Name the K slowest modules of each "
                          "model from an ONNX Runtime profile at batch 1 (0: no profile).")
    ] = 5,
    max_accuracy_drop: Annotated[
        float | None, typer.Option("--max-accuracy-drop", help="Gate: top-1 points.")
    ] = None,
    min_speedup: Annotated[
        float | None, typer.Option("--min-speedup", help="Gate: ORT batch-1 p50 speedup.")
    ] = None,
    max_agreement_drop: Annotated[
        float | None, typer.Option("--max-agreement-drop", help="Gate: top-1 agreement points.")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the results as JSON to this file.")
    ] = None,
    markdown_out: Annotated[
        Path | None, typer.Option("--markdown", help="Write a Markdown table to this file.")
    ] = None,
    plot_out: Annotated[
        Path | None, typer.Option("--plot", help="Write a PNG: accuracy vs MACs, latency, and "
                                  "per-layer ranks and errors of archives.")
    ] = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Params, MACs, ONNX size, latency, accuracy and fidelity of models side by side.

    Latency: ONNX Runtime (CPU) at batch 1 and --batch, PyTorch eager at both (and in
    channels-last with --channels-last), torch.compile at batch 1 with --compile (and CUDA
    eager, ONNX Runtime CUDA when a GPU is there), p50/p90/p99 over --runs after --warmup.
    Against the first model: top-1 agreement and mean KL. Gates exit 1 naming every bound that
    failed.
    """
    from rich.progress import Progress

    from bscompress.core.errors import CheckFailed
    from bscompress.core.files import atomic_output, dumps
    from bscompress.core.recipe import Bench, validate_section
    from bscompress.deploy.bench import (
        bench_models,
        check_bench_models,
        check_bench_outputs,
        check_gates,
        gate_failures,
        markdown_table,
        slowest_modules,
    )

    # every check that can fail runs before the first expensive step
    step = validate_section(Bench, {
        "runs": runs, "warmup": warmup, "threads": threads, "batch": batch,
        "compile": torch_compile, "channels_last": channels_last, "profile_top": profile_top,
        "max_accuracy_drop": max_accuracy_drop, "min_speedup": min_speedup,
        "max_agreement_drop": max_agreement_drop}, flag_names({}))
    check_gates(len(models), data, **step.gates())
    outputs = {"--json": json_out, "--markdown": markdown_out, "--plot": plot_out}
    inputs = _input_paths(*models, arch, data)
    check_bench_outputs(outputs, force, inputs)
    loaded = [_load(m, arch, arch_kwargs, trust_pickle, checkpoint_key, True,
                    input_shape=input_shape) for m in models]
    inputs = _input_paths(*inputs, *(lm.source for lm in loaded))
    check_bench_outputs(outputs, force, inputs)
    shape = _input_shape(loaded[0], input_shape, probe=())
    check_bench_models([(m, lm.model) for m, lm in zip(models, loaded, strict=True)], shape,
                       batch)
    source = _open_data(data, loaded, quiet, shape, mean=mean, std=std, limit=limit, resize=resize,
                        crop=crop) if data else None
    with Progress(console=err_console, transient=True, disable=quiet) as bar:
        task = bar.add_task("benchmarking", total=len(models))
        results = bench_models(
            [(m, lm.model) for m, lm in zip(models, loaded, strict=True)], shape,
            images=source.images if source else None,
            labels=source.labels if source else None, **step.timing(),
            progress=lambda name: bar.update(task, description=f"benchmarking {name}",
                                             advance=1),
        )
    table = Table(title=f"input {shape}, {results[0].samples} samples"
                  f"{' of ' + data if data else ' (random)'}", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    timed = [("ORT b1 p50 ms", "ort_b1"), (f"ORT b{batch} p50", f"ort_b{batch}"),
             ("eager b1 p50", "eager_b1"), (f"eager b{batch} p50", f"eager_b{batch}")]
    timed += [(title, key) for title, key in (("eager CL b1 p50", "eager_cl_b1"),
                                               (f"eager CL b{batch} p50", f"eager_cl_b{batch}"),
                                               ("compile b1 p50", "compile_b1"),
                                               ("CUDA eager b1", "cuda_eager_b1"),
                                               ("ORT CUDA b1", "ort_cuda_b1"))
              if any(key in r.latency for r in results)]
    for column in ("model", "params", "MACs", "ONNX MB", *(title for title, _ in timed),
                   "top-1", "agreement", "KL"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in results:
        table.add_row(
            r.name, _fmt_count(r.params), _fmt_count(r.macs), f"{r.onnx_bytes / 2**20:.2f}",
            *(f"{r.latency[key].p50:.3f}" if key in r.latency else "—" for _, key in timed),
            "—" if r.top1 is None else f"{100 * r.top1:.2f}%",
            f"{100 * (r.agreement or 0):.2f}%", f"{r.kl or 0:.4f}",
        )
    out_console.print(table)
    for r in results:
        for note in r.notes:
            err_console.print(f"[yellow]{escape(r.name)}: {escape(note)}[/yellow]")
        if r.profile:
            out_console.print(f"slowest in ONNX Runtime, {escape(r.name)}: "
                              f"{escape(slowest_modules(r))}", highlight=False)
    if json_out is not None:
        with atomic_output(json_out, force=force, inputs=inputs) as tmp:
            tmp.write_text(dumps([r.to_dict() for r in results], indent=2))
    if markdown_out is not None:
        with atomic_output(markdown_out, force=force, inputs=inputs) as tmp:
            tmp.write_text(markdown_table(results, batch))
    if plot_out is not None:
        from bscompress.deploy.report import plot_bench

        with atomic_output(plot_out, force=force, inputs=inputs) as tmp:
            plot_bench(results, [lm.plan for lm in loaded], tmp)
    failures = gate_failures(results, **step.gates())
    if failures:
        raise CheckFailed("gate failed: " + "; ".join(failures))

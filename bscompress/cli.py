"""The ``bscompress`` command line: parses options, calls the Python API, renders with rich.

The commands inspect, pack, evaluate, decompose, export and bench are here; finetune and run
in :mod:`bscompress.cli_train`, upcycle in :mod:`bscompress.cli_upcycle`; what they share
(the app, options, error handling) in :mod:`bscompress.cli_common`. Exit codes: 0 ok, 1 a
check failed, 2 bad input, 3 internal error (a bug: please report it with the output of
``--debug``).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from bscompress.cli_common import (
    ArchKwargsOpt,
    ArchOpt,
    CropOpt,
    ExcludeOpt,
    ForceOpt,
    IncludeOpt,
    JsonOpt,
    KeyOpt,
    MeanOpt,
    MinInOpt,
    ModelArg,
    QuietOpt,
    ResizeOpt,
    ShapeOpt,
    StageBar,
    StdOpt,
    TrustOpt,
    _fmt_count,
    _fmt_frac,
    _info,
    _input_paths,
    _input_shape,
    _load,
    _open_data,
    _preprocessing_meta,
    _print_json,
    _print_plan,
    app,
    err_console,
    handle_errors,
    out_console,
)

__all__ = ["StageBar", "app", "main"]


@app.command(
    epilog="Examples:\n\n"
    "  bscompress inspect model.pt --arch torchvision:resnet18 "
    "--arch-kwargs '{\"num_classes\": 10}'\n\n"
    "  bscompress inspect torchvision:mobilenet_v2 --json > layers.json\n\n"
    "  bscompress inspect torchvision:mobilenet_v2 --kernels --plot kernels.png",
)
@handle_errors
def inspect(
    model: ModelArg,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    checkpoint_key: KeyOpt = None,
    input_shape: ShapeOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    min_in_channels: MinInOpt = 8,
    no_analysis: Annotated[
        bool, typer.Option("--no-analysis", help="Skip the SVD separability analysis.")
    ] = False,
    kernels: Annotated[
        bool,
        typer.Option("--kernels", help="Instead of the conv table: match every depthwise "
                     "kernel and blueprint against fixed Gaussian / Sobel / Laplacian / "
                     "identity kernels (VGNet) and count them per stage."),
    ] = False,
    match: Annotated[
        float | None,
        typer.Option("--match", metavar="RHO", help="With --kernels: |correlation| a kernel "
                     "needs to count as Gaussian, edge or identity, in (0, 1] (default 0.9)."),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", metavar="PNG", help="With --kernels: write a gallery of "
                     "kernels of a few layers, each titled with its best match."),
    ] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """List every convolution with its cost, eligibility and separability.

    Per conv: shape, stride, params, MACs and their share of the model, whether it can be
    rewritten (or why not), and the fraction of the kernel energy kept by a rank-1 blueprint
    (BSConv-U), rank-1 depthwise decomposition (DSC) and Tucker-2 at ranks C/4. A value near
    1 means the layer separates with little loss in that form.

    With --kernels: every depthwise kernel and blueprint matched against a bank of fixed
    kernels (VGNet); per stage, the share of kernels that are Gaussian-, edge- or
    identity-like (|ρ| ≥ --match), of negative matches, and strided against stride-1 layers.
    """
    from rich.progress import Progress

    from bscompress.analyze import inspect_model
    from bscompress.errors import BadInput
    from bscompress.surgery import Eligibility

    if not kernels and (match is not None or plot is not None):
        raise BadInput("--match and --plot go with --kernels: add --kernels")
    if kernels:
        from bscompress.io import atomic_output, check_output_path
        from bscompress.kernels import inspect_kernels, plot_kernels

        if plot is not None:
            check_output_path(plot, force, _input_paths(model, arch))
        loaded = _load(model, arch, arch_kwargs, trust_pickle, checkpoint_key)
        kreport = inspect_kernels(loaded.model, 0.9 if match is None else match,
                                  include=tuple(include or ()), exclude=tuple(exclude or ()),
                                  source=model)
        if plot is not None:
            with atomic_output(plot, force=force, inputs=_input_paths(model, arch)) as tmp:
                plot_kernels(kreport, tmp)
            _info(quiet, f"wrote {plot}")
        if as_json:
            _print_json({"model": model, **kreport.to_dict()})
            return
        _print_kernels(kreport, model, quiet)
        return
    loaded = _load(model, arch, arch_kwargs, trust_pickle, checkpoint_key)
    shape = _input_shape(loaded, input_shape, probe=(1,))
    options = Eligibility(tuple(include or ()), tuple(exclude or ()), min_in_channels)
    with Progress(console=err_console, transient=True, disable=quiet or as_json) as bar:
        task = bar.add_task("analysing", total=None)
        report = inspect_model(
            loaded.model, shape, options, analyse=not no_analysis,
            progress=lambda name: bar.update(task, description=f"analysing {name}"),
            plan=loaded.plan,
        )
    if as_json:
        _print_json({"model": model, **report.to_dict()})
        return
    table = Table(title=f"{model}  ·  input {report.input_shape}", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("layer", "conv", "params", "MACs", "%MACs", "eligible", "BP r1", "DW r1",
                   "T2 C/4"):
        justify = "left" if column in ("layer", "conv", "eligible") else "right"
        table.add_column(column, justify=justify, no_wrap=column in ("layer", "conv"))
    for row in report.layers:
        stride = "" if set(row.stride) == {1} else f" /{row.stride[0]}" if len(
            set(row.stride)) == 1 else f" /{','.join(map(str, row.stride))}"
        groups = "" if row.groups == 1 else f" g{row.groups}"
        pad = "" if row.padding is None else " pad " + (
            row.padding if isinstance(row.padding, str) else ",".join(map(str, row.padding)))
        table.add_row(
            row.name,
            f"{row.in_channels}→{row.out_channels} {'×'.join(map(str, row.kernel_size))}"
            f"{stride}{groups}{pad}",
            _fmt_count(row.params),
            _fmt_count(row.macs),
            f"{100 * row.mac_share:.1f}",
            "[green]yes[/]" if row.eligible else f"[dim]{escape(row.skip_reason)}[/]",
            _fmt_frac(row.blueprint_rank1),
            _fmt_frac(row.depthwise_rank1),
            _fmt_frac(row.tucker2_quarter),
        )
    out_console.print(table)
    eligible = [r for r in report.layers if r.eligible]
    out_console.print(
        f"total: {_fmt_count(report.params)} params, {_fmt_count(report.macs)} MACs; "
        f"{len(eligible)}/{len(report.layers)} convs eligible, holding "
        f"{100 * report.eligible_macs / max(report.macs, 1):.1f}% of the MACs",
        highlight=False,
    )
    _info(quiet, "BP r1 / DW r1 / T2 C/4: energy kept by a rank-1 blueprint, rank-1 depthwise "
                 "decomposition, Tucker-2 at ranks C/4 (1.0 = lossless).")


@app.command(
    epilog="Example:\n\n"
    "  bscompress pack model.pt --arch torchvision:resnet18 -o resnet18.bsc.pt",
)
@handle_errors
def pack(
    model: ModelArg,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Archive to write (.pt or .safetensors).")
    ],
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    checkpoint_key: KeyOpt = None,
    input_shape: ShapeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Bundle a checkpoint and its architecture into a self-contained bscompress archive.

    The archive needs no --arch afterwards, records the source's SHA-256 and loads with
    torch.load(weights_only=True) (or as safetensors): no pickle. --mean/--std/--resize/--crop
    record how the model's inputs were preprocessed in training; evaluate, bench and export
    --data then use them unless told otherwise.
    """
    from bscompress.errors import BadInput
    from bscompress.io import check_output_path, save_archive
    from bscompress.plan import Plan

    inputs = _input_paths(model, arch)
    check_output_path(output, force, inputs)
    loaded = _load(model, arch, arch_kwargs, trust_pickle, checkpoint_key)
    if loaded.arch is None:
        raise BadInput(
            f"{model} is a pickled module without an architecture spec: pass --arch so that "
            "the archive can rebuild it"
        )
    shape = _input_shape(loaded, input_shape) if input_shape or loaded.arch else None
    plan = loaded.plan or Plan(input_shape=shape)
    metadata = {**loaded.metadata, **_preprocessing_meta(mean, std, resize, crop, shape)}
    save_archive(output, loaded.model, loaded.arch, plan, source_sha256=loaded.sha256,
                 metadata=metadata, force=force, inputs=inputs)
    _info(quiet, f"wrote {output}")


@app.command(
    epilog="Example:\n\n"
    "  bscompress evaluate bscompress/demo/fmnist_resnet.pt --arch bscompress.demo:fmnist_resnet "
    "--data demo",
)
@handle_errors
def evaluate(
    model: ModelArg,
    data: Annotated[
        str,
        typer.Option("--data", metavar="SPEC",
                     help="demo (the bundled Fashion-MNIST subset), fashion-mnist:DIR, "
                     "cifar10:DIR (python batches), imagefolder:DIR or synthetic:CxHxW:CLASSES."),
    ],
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    checkpoint_key: KeyOpt = None,
    split: Annotated[str, typer.Option("--split", help="train or test.")] = "test",
    mean: MeanOpt = None,
    std: StdOpt = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Use the first N samples.")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 256,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Top-1 / top-5 accuracy of a model on a labelled dataset."""
    from bscompress.data import evaluate as run_eval

    loaded = _load(model, arch, arch_kwargs, trust_pickle, checkpoint_key)
    spec = _open_data(data, [loaded], quiet, split=split, mean=mean, std=std, limit=limit,
                      resize=resize, crop=crop)
    result = run_eval(loaded.model, spec.loader(batch_size))
    result = {"model": model, "data": data, "split": split, **result}
    if as_json:
        _print_json(result)
        return
    out_console.print(
        f"{model} on {data} ({result['n']} samples): top-1 {100 * result['top1']:.2f}%, "
        f"top-5 {100 * result['top5']:.2f}%",
        highlight=False,
    )


MethodOpt = Annotated[
    str,
    typer.Option("--method", "-m",
                 help="bsconv-u, bsconv-s, dsc, tucker2, cp (3-mode), cp4 (4-mode), svd (1×1 "
                 "convs and Linear layers), auto (per layer among bsconv-u, dsc, "
                 "tucker2, cp and cp4 for k×k convs, svd for 1×1 convs and Linear layers; "
                 "needs --budget), or none (no factorization: "
                 "--fixed-kernels alone)."),
]


@app.command(
    epilog="Examples:\n\n"
    "  bscompress decompose model.pt --arch torchvision:resnet18 --method bsconv-u -o r18.bsc.pt"
    "\n\n  bscompress decompose model.pt --arch my_models.py:Net --method dsc --energy 0.9 "
    "--input-shape 1,3,32,32 -o net.dsc.pt",
)
@handle_errors
def decompose(
    model: ModelArg,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Archive to write (.pt or .safetensors).")
    ],
    method: MethodOpt = "bsconv-u",
    rank: Annotated[
        int | None,
        typer.Option("--rank", min=1, help="Rank per layer (BSConv: blueprints per filter; "
                     "DSC: channel multiplier; svd: rank). Default 1 (svd: a quarter)."),
    ] = None,
    energy: Annotated[
        float | None,
        typer.Option("--energy", help="Instead of --rank: per layer, the smallest rank keeping "
                     "this fraction of the squared singular values, e.g. 0.9."),
    ] = None,
    p: Annotated[float, typer.Option("--p", help="BSConv-S bottleneck ratio M'/M.")] = 0.25,
    tucker_ranks: Annotated[
        float, typer.Option("--tucker-ranks", help="Tucker-2 ranks: fraction of the channels "
                            "(≤ 1) or a channel count.")
    ] = 0.25,
    cp_rank: Annotated[
        float, typer.Option("--cp-rank", help="CP rank: fraction of the output channels (≤ 1) "
                            "or a count.")
    ] = 0.25,
    tucker_iters: Annotated[
        int, typer.Option("--tucker-iters", min=0, help="HOOI iterations after the HOSVD.")
    ] = 5,
    cp_iters: Annotated[
        int, typer.Option("--cp-iters", min=1, help="CP ALS iterations (seeded, SVD init).")
    ] = 50,
    round_to: Annotated[
        int, typer.Option("--round-to", min=1, help="Round bottleneck widths up to a multiple.")
    ] = 1,
    budget: Annotated[
        str | None,
        typer.Option("--budget", metavar="KIND=F", help="Whole-model target instead of one "
                     "rank for all: macs=0.25, params=0.2 or latency=0.5 of the model's. "
                     "Ranks are allocated across layers to minimise the summed relative "
                     "errors (output errors on the data with --calib); layers may stay dense "
                     "(all methods but bsconv-s). latency times every candidate block once in "
                     "ONNX Runtime at its layer's input shape and never picks one slower than "
                     "the layer."),
    ] = None,
    latency_threads: Annotated[
        int, typer.Option("--latency-threads", min=1, help="ONNX Runtime threads of the "
                          "latency budget's timings.")
    ] = 1,
    latency_cache: Annotated[
        Path | None, typer.Option("--latency-cache", help="JSON file of measured block "
                                  "latencies, reused across runs (default "
                                  "~/.cache/bscompress/latency.json).")
    ] = None,
    sensitivity: Annotated[
        bool, typer.Option("--sensitivity", help="With --calib and --budget: measure, for "
                           "every layer and candidate rank, the network's KL divergence "
                           "and top-1 disagreement with that layer alone replaced, and "
                           "allocate by the KL. Slow the first time (one pass over the "
                           "calibration data per candidate); cached for the next run.")
    ] = False,
    sensitivity_cache: Annotated[
        Path | None, typer.Option("--sensitivity-cache", help="Folder of the sensitivity "
                                  "results (default ~/.cache/bscompress/sensitivity).")
    ] = None,
    allow_growth: Annotated[
        bool, typer.Option("--allow-growth", help="Rewrite layers even if MACs grow.")
    ] = False,
    fixed_kernels: Annotated[
        str | None,
        typer.Option("--fixed-kernels", metavar="MODE", help="VGNet: after factorizing, "
                     "replace the depthwise kernels (of any model) and blueprints (of the "
                     "blocks) that match a fixed Gaussian/Sobel/Laplacian/identity kernel by "
                     "it, with their own sign and least-squares scale, as untrained buffers: "
                     "strided-gaussian (strided kernels, Gaussians only), bank (every kernel, "
                     "the whole bank) or identity (blocks whose kernels are all identity "
                     "become their 1×1 conv)."),
    ] = None,
    match: Annotated[
        float, typer.Option("--match", help="With --fixed-kernels: the sign-invariant "
                            "normalised correlation a kernel must reach with its bank member.")
    ] = 0.9,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    checkpoint_key: KeyOpt = None,
    input_shape: ShapeOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    min_in_channels: MinInOpt = 8,
    include_classifier: Annotated[
        bool, typer.Option("--include-classifier", help="Rewrite the model's output layer "
                           "(its classifier) too; it is kept dense by default.")
    ] = False,
    calib: Annotated[
        str | None,
        typer.Option("--calib", metavar="SPEC", help="Data-aware factors: calibration data "
                     "(see evaluate --help for specs; the training split by default). Fits "
                     "each block to its layer's input statistics and re-estimates BatchNorm."),
    ] = None,
    calib_samples: Annotated[
        int, typer.Option("--calib-samples", min=1, help="Calibration samples.")
    ] = 512,
    calib_split: Annotated[
        str, typer.Option("--calib-split", help="Split of --calib: train or test.")
    ] = "train",
    calib_batch: Annotated[
        int, typer.Option("--calib-batch", min=1, help="Calibration batch size.")
    ] = 64,
    calib_max_mb: Annotated[
        int, typer.Option("--calib-max-mb", min=1, help="Memory bound per layer: a layer "
                          "whose full input-patch covariance g·(M/g·K)²·8 bytes exceeds it "
                          "keeps only the per-channel K×K blocks (about 1 GB for all layers "
                          "of a ResNet-50).")
    ] = 1024,
    holdout: Annotated[
        float, typer.Option("--holdout", min=0.0, max=0.9, help="With --calib: share of the "
                            "calibration batches held out to choose, per layer, between the "
                            "data-free fit and data-aware fits with Σ shrunk toward the "
                            "identity; the chosen fit is refitted on all the data and its "
                            "held-out error shown. 0 always takes the data-aware fit.")
    ] = 0.25,
    als_iters: Annotated[
        int, typer.Option("--als-iters", min=1, help="Alternating least-squares rounds of "
                          "the data-aware BSConv-U fit.")
    ] = 1,
    sequential: Annotated[
        bool, typer.Option("--sequential", help="With --calib: fit each layer on the inputs "
                           "of the already-compressed network against the original "
                           "network's outputs (multi-layer error compensation; two passes "
                           "over the calibration data per layer).")
    ] = False,
    bn_reestimate: Annotated[
        bool, typer.Option("--bn-reestimate/--no-bn-reestimate", help="Recompute BatchNorm "
                           "running statistics on the --calib data after decomposing.")
    ] = True,
    reconstruct: Annotated[
        bool, typer.Option("--reconstruct", help="With --calib: then train each block that "
                           "holds replaced layers (a residual block, or the layer itself) "
                           "by Adam to reproduce the original network's block output on the "
                           "calibration data, block after block (BRECQ-style block-wise "
                           "reconstruction; a block that gets worse is restored).")
    ] = False,
    reconstruct_steps: Annotated[
        int, typer.Option("--reconstruct-steps", min=1, help="Adam steps per block.")
    ] = 500,
    reconstruct_lr: Annotated[
        float, typer.Option("--reconstruct-lr", min=0.0, help="Adam's initial learning "
                            "rate (cosine-decayed).")
    ] = 1e-3,
    device: Annotated[
        str | None, typer.Option("--device", help="Where --reconstruct trains: cuda, cuda:1 "
                                 "or cpu (default: CUDA when available).")
    ] = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Rewrite the eligible layers into factorized blocks computed in closed form.

    Each layer's weights come from its trained kernel: per-filter SVD for BSConv,
    per-input-channel SVD for DSC, Tucker-2 HOOI and CP ALS through tensorly, truncated SVD
    for svd. Prints the Plan (per layer the ranks, params and MACs before → after and the
    relative truncation error ‖W − Ŵ‖²/‖W‖²) and writes an archive that reloads with no --arch.
    --mean/--std/--resize/--crop record the preprocessing the model was trained with.

    With --calib, the factors are data-aware: each block minimises its layer's output error
    tr((W − Ŵ) Σ (W − Ŵ)ᵀ) on the calibration inputs (whitened SVD, least-squares refits),
    BatchNorm statistics are re-estimated, and the Plan shows each layer's relative output
    error on that data.
    """

    from bscompress.decomposition import Budget
    from bscompress.decomposition import decompose as run_decompose
    from bscompress.errors import BadInput
    from bscompress.finetune import resolve_device
    from bscompress.fixed_kernels import FixedKernelOptions, fix_kernels
    from bscompress.io import check_output_path, save_archive
    from bscompress.latency import LatencyTimer, default_cache_path
    from bscompress.methods import RankOptions, get_method
    from bscompress.reconstruct import ReconstructionOptions
    from bscompress.sensitivity import default_cache_dir
    from bscompress.surgery import Eligibility

    fixing = FixedKernelOptions(fixed_kernels, match) if fixed_kernels else None
    if method == "none" and fixing is None:
        raise BadInput("-m none factorizes nothing: add --fixed-kernels MODE, or choose a "
                       "method")
    if method not in ("auto", "none"):
        get_method(method)
    target = Budget.parse(budget) if budget else None
    if method == "none" and (target is not None or calib):
        raise BadInput("-m none factorizes nothing: --budget and --calib need a method")
    if target is not None and (rank is not None or energy is not None):
        raise BadInput("--budget allocates the ranks itself: drop --rank/--energy")
    if sensitivity and (target is None or not calib):
        raise BadInput("--sensitivity measures candidates on calibration data to allocate a "
                       "budget: add --calib and --budget")
    if reconstruct and not calib:
        raise BadInput("--reconstruct trains blocks on calibration data: add --calib")
    rebuild = ReconstructionOptions(steps=reconstruct_steps, lr=reconstruct_lr,
                                    max_bytes=calib_max_mb * 2**20,
                                    device=str(resolve_device(device))) if reconstruct else None
    timer = (LatencyTimer(latency_cache or default_cache_path(), threads=latency_threads)
             if target is not None and target.kind == "latency" else None)
    options = RankOptions(rank=rank, energy=energy, p=p, tucker_ranks=tucker_ranks,
                          cp_rank=cp_rank, round_to=round_to, allow_growth=allow_growth,
                          tucker_iters=tucker_iters, cp_iters=cp_iters)
    inputs = _input_paths(model, arch, calib, latency_cache, sensitivity_cache)
    check_output_path(output, force, inputs)
    loaded = _load(model, arch, arch_kwargs, trust_pickle, checkpoint_key)
    if loaded.arch is None:
        raise BadInput(f"{model} is a pickled module: pass --arch so that the archive can be "
                       "rebuilt")
    if loaded.is_archive:
        raise BadInput(f"{model} is already a bscompress archive: decompose the original "
                       "checkpoint instead")
    shape = _input_shape(loaded, input_shape)
    eligibility = Eligibility(tuple(include or ()), tuple(exclude or ()), min_in_channels,
                              include_classifier)
    metadata = _preprocessing_meta(mean, std, resize, crop, shape)
    batches = None
    if calib:
        source = _open_data(calib, [loaded], quiet or as_json, split=calib_split, mean=mean,
                            std=std, limit=calib_samples, resize=resize, crop=crop)
        batches = [x for x, _ in source.loader(calib_batch)]
        metadata = {"preprocessing": source.preprocessing,
                    "calibration": {"data": calib, "split": calib_split,
                                    "samples": sum(len(x) for x in batches)}}
    with StageBar(quiet or as_json) as step:
        if method == "none":
            compressed, plan = loaded.model, None
        else:
            compressed, plan = run_decompose(
                loaded.model, method, shape, options, eligibility, progress=step,
                budget=target, calibration=batches, calib_max_bytes=calib_max_mb * 2**20,
                als_iters=als_iters, reestimate_bn=bn_reestimate, sequential=sequential,
                holdout=holdout,
                latency=timer, sensitivity=sensitivity,
                sensitivity_cache=sensitivity_cache or default_cache_dir(),
                reconstruction=rebuild)
        if fixing is not None:
            compressed, plan = fix_kernels(compressed, plan, shape, fixing)
    if calib:
        plan.meta["calibration"].update(metadata["calibration"])
    save_archive(output, compressed, loaded.arch, plan, source_sha256=loaded.sha256,
                 metadata=metadata, force=force, inputs=inputs)
    if as_json:
        _print_json({"model": model, "output": str(output), "plan": plan.to_dict()})
        return
    _print_plan(plan, title=f"{model}  ·  {method}  ·  input {plan.input_shape}")
    _info(quiet, f"wrote {output}")


@app.command(
    epilog="Examples:\n\n"
    "  bscompress export demo.bsconv-u.pt -o demo.onnx\n\n"
    "  bscompress export model.pt --arch torchvision:resnet18 -o r18.onnx --static --data "
    "synthetic:3x224x224:1000",
)
@handle_errors
def export(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="ONNX file to write.")],
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    checkpoint_key: KeyOpt = None,
    input_shape: ShapeOpt = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (18 or newer).")] = 18,
    static: Annotated[
        bool, typer.Option("--static", help="Fix the batch size instead of a dynamic axis.")
    ] = False,
    rtol: Annotated[float, typer.Option("--rtol", help="Parity tolerance, relative to the "
                                        "output's scale.")] = 1e-4,
    atol: Annotated[float, typer.Option("--atol", help="Parity tolerance, absolute.")] = 1e-5,
    data: Annotated[
        str | None, typer.Option("--data", metavar="SPEC", help="Also check parity on real "
                                 "samples (see evaluate --help for specs).")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Samples of --data.")] = 256,
    mean: MeanOpt = None,
    std: StdOpt = None,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    keep_failed: Annotated[
        bool, typer.Option("--keep-failed", help="Keep the file when parity fails.")
    ] = False,
    external_data: Annotated[
        bool, typer.Option("--external-data", help="Weights in FILE.data beside the graph "
                           "(automatic above protobuf's 2 GB limit).")
    ] = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Export to ONNX and prove it: onnx.checker, then ONNX Runtime against PyTorch.

    Parity runs on random inputs (batch 1 and 3 with the dynamic batch axis) and, with --data,
    on real samples. A failed check exits 1, names the worst output and its error, and leaves
    no file unless --keep-failed.
    """
    from bscompress.export import (
        check_export_model,
        check_export_options,
        check_export_outputs,
        export_onnx,
    )

    # every check that can fail runs before the first expensive step
    check_export_options(opset, rtol, atol)
    inputs = _input_paths(model, arch, data)
    check_export_outputs(output, force, inputs, external_data or None)
    loaded = _load(model, arch, arch_kwargs, trust_pickle, checkpoint_key)
    inputs = _input_paths(*inputs, loaded.source)
    shape = _input_shape(loaded, input_shape, probe=())
    check_export_model(loaded.model, shape, dynamic_batch=not static)
    samples = _open_data(data, [loaded], quiet or as_json, limit=limit, mean=mean, std=std,
                         resize=resize, crop=crop).images if data else None
    report = export_onnx(loaded.model, shape, output, opset=opset, dynamic_batch=not static,
                         rtol=rtol, atol=atol, samples=samples, keep_failed=keep_failed,
                         force=force, inputs=inputs, external_data=external_data or None)
    if as_json:
        _print_json(report.to_dict())
        return
    worst = report.worst()
    out_console.print(
        f"wrote {output}{' + ' + report.external_data if report.external_data else ''} "
        f"({report.file_bytes / 2**20:.2f} MiB, opset {report.opset}, "
        f"{'dynamic' if report.dynamic_batch else 'static'} batch): onnx.checker ok, parity ok "
        f"on {len({c.inputs for c in report.checks})} input batches (worst: {worst.output} on "
        f"{worst.inputs}, max abs error {worst.max_abs_error:.2e} ≤ {worst.bound:.2e})",
        highlight=False,
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
    batch: Annotated[int, typer.Option("--batch", min=1, help="Batch timed besides 1.")] = 32,
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed runs per figure.")] = 50,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed runs first.")] = 10,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="Intra-op threads.")
    ] = None,
    profile_top: Annotated[
        int, typer.Option("--profile-top", min=0, help="Name the K slowest modules of each "
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

    Latency: ONNX Runtime (CPU) at batch 1 and --batch, PyTorch eager (and CUDA eager when a
    GPU is there), p50/p90/p99 over --runs after --warmup. Against the first model: top-1
    agreement and mean KL. Gates exit 1 naming every bound that failed.
    """
    from rich.progress import Progress

    from bscompress.bench import (
        bench_models,
        check_bench_models,
        check_bench_outputs,
        check_gates,
        gate_failures,
        markdown_table,
        slowest_modules,
    )
    from bscompress.errors import CheckFailed
    from bscompress.files import atomic_output, dumps

    # every check that can fail runs before the first expensive step
    check_gates(len(models), data, max_accuracy_drop, min_speedup, max_agreement_drop)
    outputs = {"--json": json_out, "--markdown": markdown_out, "--plot": plot_out}
    inputs = _input_paths(*models, arch, data)
    check_bench_outputs(outputs, force, inputs)
    loaded = [_load(m, arch, arch_kwargs, trust_pickle, checkpoint_key, True) for m in models]
    inputs = _input_paths(*inputs, *(lm.source for lm in loaded))
    check_bench_outputs(outputs, force, inputs)
    shape = _input_shape(loaded[0], input_shape, probe=())
    check_bench_models([(m, lm.model) for m, lm in zip(models, loaded, strict=True)], shape,
                       batch)
    source = _open_data(data, loaded, quiet, mean=mean, std=std, limit=limit, resize=resize,
                        crop=crop) if data else None
    with Progress(console=err_console, transient=True, disable=quiet) as bar:
        task = bar.add_task("benchmarking", total=len(models))
        results = bench_models(
            [(m, lm.model) for m, lm in zip(models, loaded, strict=True)], shape,
            images=source.images if source else None,
            labels=source.labels if source else None, batch=batch, runs=runs, warmup=warmup,
            threads=threads, profile_top=profile_top,
            progress=lambda name: bar.update(task, description=f"benchmarking {name}",
                                             advance=1),
        )
    table = Table(title=f"input {shape}, {results[0].samples} samples"
                  f"{' of ' + data if data else ' (random)'}", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("model", "params", "MACs", "ONNX MB", "ORT b1 p50 ms", f"ORT b{batch} p50",
                   "eager b1 p50", "top-1", "agreement", "KL"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in results:
        table.add_row(
            r.name, _fmt_count(r.params), _fmt_count(r.macs), f"{r.onnx_bytes / 2**20:.2f}",
            f"{r.latency['ort_b1'].p50:.3f}", f"{r.latency[f'ort_b{batch}'].p50:.3f}",
            f"{r.latency['eager_b1'].p50:.3f}",
            "—" if r.top1 is None else f"{100 * r.top1:.2f}%",
            f"{100 * (r.agreement or 0):.2f}%", f"{r.kl or 0:.4f}",
        )
    out_console.print(table)
    for r in results:
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
        from bscompress.report import plot_bench

        with atomic_output(plot_out, force=force, inputs=inputs) as tmp:
            plot_bench(results, [lm.plan for lm in loaded], tmp)
    failures = gate_failures(results, max_accuracy_drop, min_speedup, max_agreement_drop)
    if failures:
        raise CheckFailed("gate failed: " + "; ".join(failures))


def _print_kernels(kreport: Any, model: str, quiet: bool) -> None:
    """The table of ``inspect --kernels``: one row per stage (its layers below it), then
    strided against stride-1 layers and the whole model."""
    table = Table(title=f"{model}  ·  kernels matched at |ρ| ≥ {kreport.match:g}",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("stage / layer", "kind", "kernel", "kernels", "matched", "gauss",
                   "edge", "ident", "neg", "mean |ρ|", "top match"):
        justify = "left" if column in ("stage / layer", "kind", "kernel",
                                       "top match") else "right"
        table.add_column(column, justify=justify, no_wrap=column == "stage / layer")

    def pct(part: int, whole: int) -> str:
        return f"{100 * part / whole:.1f}%" if whole else "—"

    def add(label: str, kind: str, kernel: str, s: Any, style: str | None = None) -> None:
        table.add_row(escape(label), kind, kernel, str(s.kernels), pct(s.matched, s.kernels),
                      pct(s.gaussian, s.kernels), pct(s.edge, s.kernels),
                      pct(s.identity, s.kernels), pct(s.negative, s.matched),
                      f"{s.mean_abs_rho:.2f}", escape(s.top_member or "—"), style=style)

    def geometry(layer: Any) -> str:
        stride = f" /{'×'.join(map(str, layer.stride))}" if layer.strided else ""
        return "×".join(map(str, layer.kernel_size)) + stride

    for stage in kreport.stages:
        members = kreport.stage_layers(stage.name)
        kinds = ",".join(dict.fromkeys(la.kind for la in members))
        sizes = ",".join(dict.fromkeys(geometry(la) for la in members))
        if len(members) == 1:
            add(f"{stage.name}: {members[0].name}", kinds, sizes, stage)
        else:
            add(stage.name, kinds, sizes, stage, style="bold")
            for layer in members:
                add(f"  {layer.name}", layer.kind, geometry(layer),
                    layer.summary(kreport.match), style="dim")
    table.add_section()
    for key, summary in kreport.by_stride.items():
        add(f"{key} ({summary.layers} layer{'s' * (summary.layers != 1)})", "", "",
            summary)
    total = kreport.total
    add(f"all ({total.layers} layer{'s' * (total.layers != 1)})", "", "", total,
        style="bold")
    out_console.print(table)
    _info(quiet, "matched: |ρ| ≥ --match with the best of the bank (Gaussians σ 0.5–2, "
                 "Sobel x/y, Laplacian 4/8, identity); gauss/edge/ident: shares of all "
                 "kernels; neg: share of the matches with ρ < 0 (a negated kernel).")


# the commands defined in their own modules: finetune and run, upcycle
from bscompress import cli_train, cli_upcycle  # noqa: E402,F401


def _terminate(signum: int, _frame: Any) -> None:
    """SIGTERM unwinds like an error (temporary outputs are removed on the way out)."""
    raise SystemExit(128 + signum)


def main() -> None:
    """Console-script entry point."""
    import signal

    with contextlib.suppress(ValueError):  # not in the main thread
        signal.signal(signal.SIGTERM, _terminate)
    app(prog_name="bscompress")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

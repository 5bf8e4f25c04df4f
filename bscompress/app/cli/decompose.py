"""``bscompress decompose``: the layers rewritten into factorized blocks (closed form, calibrated,
under a budget) and saved as an archive."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bscompress.app.cli.common import (
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
    _info,
    _input_paths,
    _input_shape,
    _load,
    _open_data,
    _preprocessing_meta,
    _print_json,
    _print_plan,
    app,
    flag_names,
    handle_errors,
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


#: the options of the calibration section (``--calib``): (flag, parameter, key of
#: ``recipe.Calibration``)
CALIBRATION_OPTIONS = (
    ("--calib-split", "calib_split", "split"), ("--calib-samples", "calib_samples", "samples"),
    ("--calib-batch", "calib_batch", "batch"), ("--calib-max-mb", "calib_max_mb", "max_mb"),
    ("--als-iters", "als_iters", "als_iters"), ("--holdout", "holdout", "holdout"),
    ("--bn-reestimate/--no-bn-reestimate", "bn_reestimate", "bn_reestimate"),
    ("--sequential", "sequential", "sequential"),
    ("--sensitivity", "sensitivity", "sensitivity"))

#: the flag of each field of the decompose section (recipe.Decompose) this command fills
FLAGS = {
    "method": "--method", "fixed_kernels": "--fixed-kernels", "calibration": "--calib",
    "calibration.data": "--calib",
    **{f"calibration.{key}": option.split("/")[0] for option, _, key in CALIBRATION_OPTIONS},
    "calibration.reconstruct": "--reconstruct",
    "calibration.reconstruct.steps": "--reconstruct-steps",
    "calibration.reconstruct.lr": "--reconstruct-lr",
}

#: the flag of a field path of the decompose section (``round_to`` → ``--round-to``)
flag = flag_names(FLAGS)


@app.command(
    epilog="Examples:\n\n"
    "  bscompress decompose model.pt --arch torchvision:resnet18 --method bsconv-u -o r18.bsc.pt"
    "\n\n  bscompress decompose model.pt --arch my_models.py:Net --method dsc --energy 0.9 "
    "--input-shape 1,3,32,32 -o net.dsc.pt",
)
@handle_errors
def decompose(
    ctx: typer.Context,
    model: ModelArg,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Archive to write (.pt or .safetensors).")
    ],
    method: MethodOpt = "bsconv-u",
    rank: Annotated[
        int | None,
        typer.Option("--rank", help="Rank per layer (BSConv: blueprints per filter; "
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
        int, typer.Option("--tucker-iters", help="HOOI iterations after the HOSVD.")
    ] = 5,
    cp_iters: Annotated[
        int, typer.Option("--cp-iters", help="CP ALS iterations (seeded, SVD init).")
    ] = 50,
    round_to: Annotated[
        int | None, typer.Option("--round-to", help="Round bottleneck widths up to a multiple "
                                 "[default: under a budget with the latency guard or a latency "
                                 "budget, the runtime's channel block on this machine (16 "
                                 "for ONNX Runtime on AVX2 or AVX-512, 8 for eager PyTorch "
                                 "with AVX2); else 1].", show_default=False)
    ] = None,
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
        int, typer.Option("--latency-threads", help="ONNX Runtime threads of the "
                          "latency budget's timings.")
    ] = 1,
    latency_cache: Annotated[
        Path | None, typer.Option("--latency-cache", help="JSON file of measured block "
                                  "latencies, reused across runs (default "
                                  "~/.cache/bscompress/latency.json).")
    ] = None,
    latency_runtime: Annotated[
        str, typer.Option("--latency-runtime", help="Where the latency budget and the guard "
                          "time blocks: onnxruntime (CPU), eager (PyTorch on the CPU), "
                          "eager-channels-last (the same, model and inputs channels-last) or "
                          "eager-cuda.")
    ] = "onnxruntime",
    latency_guard: Annotated[
        bool | None, typer.Option("--latency-guard/--no-latency-guard", help="Use a block "
                                  "only where --latency-runtime (ONNX Runtime by default, "
                                  "--latency-threads) runs it faster than its layer at batch "
                                  "1 and at --serving-batch; the plan shows each replaced "
                                  "layer's and the whole model's time ratio. On by default "
                                  "under a macs or params budget (timings cached in "
                                  "--latency-cache); --no-latency-guard for size alone.",
                                  show_default=False)
    ] = None,
    serving_batch: Annotated[
        int, typer.Option("--serving-batch", help="With the latency guard: the batch "
                          "the model is served at, besides batch 1.")
    ] = 32,
    guard_share: Annotated[
        float | None, typer.Option("--guard-share", min=0.0, max=1.0, help="With the latency "
                                   "guard: the share of the fraction of its layer's MACs a "
                                   "block removes that it must remove of the layer's time "
                                   "(0: any block faster at all) [default: 0.5: a block "
                                   "keeping 30% of the MACs must run in under 65% of the "
                                   "time].", show_default=False)
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
                     "become their 1×1 conv). With --calib, kernels are matched on their "
                     "inputs' statistics (their output on the data), else on their weights."),
    ] = None,
    match: Annotated[
        float, typer.Option("--match", help="With --fixed-kernels: the sign-invariant "
                            "normalised correlation ρ a kernel must reach with its bank member "
                            "(with --calib, in output on the data: 1 − ρ² bounds each fixed "
                            "kernel's relative output error).")
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
        int, typer.Option("--calib-samples", help="Calibration samples.")
    ] = 512,
    calib_split: Annotated[
        str, typer.Option("--calib-split", help="Split of --calib: train or test.")
    ] = "train",
    calib_batch: Annotated[
        int, typer.Option("--calib-batch", help="Calibration batch size.")
    ] = 64,
    calib_max_mb: Annotated[
        int, typer.Option("--calib-max-mb", help="Memory bound per layer: a layer "
                          "whose full input-patch covariance g·(M/g·K)²·8 bytes exceeds it "
                          "keeps only the per-channel K×K blocks (about 1 GB for all layers "
                          "of a ResNet-50).")
    ] = 1024,
    holdout: Annotated[
        float, typer.Option("--holdout", help="With --calib: share of the "
                            "calibration batches held out to choose, per layer, between the "
                            "data-free fit and data-aware fits with Σ shrunk toward the "
                            "identity; the chosen fit is refitted on all the data and its "
                            "held-out error shown. 0 always takes the data-aware fit.")
    ] = 0.25,
    als_iters: Annotated[
        int, typer.Option("--als-iters", help="Alternating least-squares rounds of "
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
        int, typer.Option("--reconstruct-steps", help="Adam steps per block.")
    ] = 500,
    reconstruct_lr: Annotated[
        float, typer.Option("--reconstruct-lr", help="Adam's initial learning "
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

    from bscompress.app.pipeline import run_decompose
    from bscompress.compress.decomposition import Budget
    from bscompress.core.errors import BadInput
    from bscompress.core.files import ARCHIVE_SUFFIXES, check_output_path
    from bscompress.core.recipe import USED_WITH, Decompose, validate_section
    from bscompress.io.archive import save_archive
    from bscompress.methods import get_method
    from bscompress.train.finetune import resolve_device

    if method not in ("auto", "none"):
        get_method(method)
    if budget:
        Budget.parse(budget)
    given = {name for name in ctx.params  # (typer's click or click itself: by the name)
             if getattr(ctx.get_parameter_source(name), "name", None)
             in ("COMMANDLINE", "ENVIRONMENT")}
    # the flags that only mean something with calibration data (a recipe nests them in it)
    if not calib:
        for option, on in (("--sensitivity", sensitivity), ("--reconstruct", reconstruct),
                           ("--sequential", sequential)):
            if on:
                raise BadInput(f"{option} needs calibration data: add --calib")
        for option, name, _ in CALIBRATION_OPTIONS:
            if name in given:
                raise BadInput(f"{option} sets the calibration, so it would be ignored "
                               "without it: add --calib, or drop it")
    if not reconstruct:
        for option, name in (("--reconstruct-steps", "reconstruct_steps"),
                             ("--reconstruct-lr", "reconstruct_lr")):
            if name in given:
                raise BadInput(f"{option} is used only with --reconstruct, so it would be "
                               "ignored: add --reconstruct, or drop it")
    # the calibration's options as the section's keys, only those given (the defaults are
    # the section's: ``test_the_command_defaults_are_the_schema_defaults``), so that the
    # section knows which were set
    calibration = None if not calib else {
        "data": calib,
        **{key: ctx.params[name] for _, name, key in CALIBRATION_OPTIONS if name in given},
        "reconstruct": {"steps": reconstruct_steps, "lr": reconstruct_lr} if reconstruct
        else None}
    values = {
        "method": method, "budget": budget, "rank": rank, "energy": energy, "p": p,
        "tucker_ranks": tucker_ranks, "cp_rank": cp_rank, "tucker_iters": tucker_iters,
        "cp_iters": cp_iters, "round_to": round_to, "allow_growth": allow_growth,
        "include": list(include or ()), "exclude": list(exclude or ()),
        "min_in_channels": min_in_channels, "include_classifier": include_classifier,
        "latency_threads": latency_threads,
        "latency_cache": None if latency_cache is None else str(latency_cache),
        "latency_runtime": latency_runtime, "latency_guard": latency_guard,
        "serving_batch": serving_batch,
        **({} if guard_share is None else {"guard_share": guard_share}),
        "sensitivity_cache": None if sensitivity_cache is None else str(sensitivity_cache),
        "calibration": calibration, "fixed_kernels": fixed_kernels, "match": match,
    }
    # an option used only with another counts as set where it was given (``USED_WITH``)
    step = validate_section(Decompose, {key: value for key, value in values.items()
                                        if key not in USED_WITH or key in given}, flag)
    reconstruct_on = str(resolve_device(device)) if reconstruct else None
    inputs = _input_paths(model, arch, calib, latency_cache, sensitivity_cache)
    check_output_path(output, force, inputs, suffixes=ARCHIVE_SUFFIXES)
    loaded = _load(model, arch, arch_kwargs, trust_pickle, checkpoint_key,
                   input_shape=input_shape)
    if loaded.arch is None:
        raise BadInput(f"{model} is a pickled module: pass --arch so that the archive can be "
                       "rebuilt")
    if loaded.rewritten:
        raise BadInput(f"{model} is already a compressed bscompress archive: decompose the "
                       "original checkpoint (or its packed archive) instead")
    shape = _input_shape(loaded, input_shape)
    # a packed archive's recorded preprocessing carries over, each value unless given again
    given_pre = _preprocessing_meta(mean, std, resize, crop, shape).get("preprocessing", {})
    recorded = loaded.metadata.get("preprocessing") or {}
    metadata = ({"preprocessing": {**recorded, **given_pre}} if recorded or given_pre
                else {})
    batches = None
    if calib:
        source = _open_data(calib, [loaded], quiet or as_json, shape, split=calib_split, mean=mean,
                            std=std, limit=calib_samples, resize=resize, crop=crop)
        batches = [x for x, _ in source.loader(calib_batch)]
        metadata = {"preprocessing": source.preprocessing,
                    "calibration": {"data": calib, "split": calib_split,
                                    "samples": sum(len(x) for x in batches)}}
    with StageBar(quiet or as_json) as progress:
        compressed, plan = run_decompose(loaded.model, step, shape, batches,
                                         metadata.get("calibration"), progress=progress,
                                         device=reconstruct_on)
    save_archive(output, compressed, loaded.arch, plan, source_sha256=loaded.sha256,
                 metadata=metadata, force=force, inputs=inputs)
    if as_json:
        _print_json({"model": model, "output": str(output), "plan": plan.to_dict()})
        return
    _print_plan(plan, title=f"{model}  ·  {method}  ·  input {plan.input_shape}")
    _info(quiet, f"wrote {output}")

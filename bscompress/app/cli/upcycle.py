"""``bscompress upcycle``: CondConv experts on the convs of a trained or factorized model
(registered on the app of ``bscompress.app.cli``)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated

import typer

from bscompress.app.cli.common import (
    ArchKwargsOpt,
    ArchOpt,
    ExcludeOpt,
    ForceOpt,
    JsonOpt,
    KeyOpt,
    QuietOpt,
    ShapeOpt,
    TrustOpt,
    _info,
    _input_paths,
    _input_shape,
    _load,
    _print_json,
    _print_plan,
    app,
    handle_errors,
    out_console,
)


@app.command(
    epilog="Examples:\n\n"
    "  bscompress upcycle demo.auto.pt --experts 4 -o demo.condconv.pt\n\n"
    "  bscompress upcycle model.pt --arch torchvision:mobilenet_v2 --include 'features.*.conv.2'"
    " -o mnv2.condconv.pt\n\n"
    "  bscompress finetune demo.condconv.pt -r recipes/demo-kd.yaml -o demo.condconv.ft.pt",
)
@handle_errors
def upcycle(
    model: Annotated[str, typer.Argument(help="Checkpoint, bscompress archive or arch spec.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Archive to write.")],
    experts: Annotated[int, typer.Option("--experts", "-e", min=2,
                                         help="Expert kernels per conv (E).")] = 4,
    include: Annotated[
        list[str] | None,
        typer.Option("--include", metavar="GLOB", help="Upcycle the convs matching (any "
                     "kernel size; repeatable). Default: the pointwise convs of the factorized "
                     "blocks, or every 1×1 conv of a model that has none."),
    ] = None,
    exclude: ExcludeOpt = None,
    routing: Annotated[str, typer.Option(
        "--routing", help="normalized-sigmoid (gates sum to 1), softmax, or sigmoid (the "
        "paper's; starts with experts at 2/E of the kernel and needs --noise to diverge).",
    )] = "normalized-sigmoid",
    noise: Annotated[float, typer.Option(
        "--noise", min=0.0, help="Gaussian noise on each expert, relative to the kernel's RMS "
        "(breaks the experts' symmetry; the output then changes).")] = 0.0,
    share_routing: Annotated[bool, typer.Option(
        "--share-routing", help="One routing vector per factorized block (the paper's), "
        "computed by its first upcycled conv.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seeds routers and noise.")] = 0,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    checkpoint_key: KeyOpt = None,
    input_shape: ShapeOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Turn convs into CondConv (per-example mixtures of E expert kernels) with the output
    unchanged.

    Every expert starts as the trained kernel and the routing gates sum to 1, so the model
    computes exactly what it did (the command checks it on a random batch) until fine-tuning
    (bscompress finetune) lets the experts diverge. A factorized archive gains capacity at the
    cost of one routing FC and one kernel mix per example. The Plan records the upcycling, so
    the archive reloads, exports and benches like any other.
    """
    import torch

    from bscompress.core.errors import BadInput
    from bscompress.core.files import ARCHIVE_SUFFIXES, check_output_path
    from bscompress.core.stats import first_tensor
    from bscompress.io.archive import save_archive
    from bscompress.transforms.upcycle import UpcycleOptions
    from bscompress.transforms.upcycle import upcycle as run_upcycle

    # every check that can fail runs before the first expensive step
    options = UpcycleOptions(experts, routing, tuple(include or ()), tuple(exclude or ()),
                             noise, share_routing, seed)
    inputs = _input_paths(model, arch)
    check_output_path(output, force, inputs, suffixes=ARCHIVE_SUFFIXES)
    loaded = _load(model, arch, arch_kwargs, trust_pickle, checkpoint_key,
                   input_shape=input_shape)
    if loaded.arch is None:
        raise BadInput(f"{model} is a pickled module: pass --arch so that the archive can be "
                       "rebuilt")
    if loaded.plan is not None and loaded.plan.summary.upcycle is not None:
        raise BadInput(f"{model} is already upcycled: upcycle the archive it was made from")
    inputs = _input_paths(*inputs, loaded.source)
    check_output_path(output, force, inputs, suffixes=ARCHIVE_SUFFIXES)
    shape = _input_shape(loaded, input_shape)
    reference = copy.deepcopy(loaded.model)
    upcycled, plan = run_upcycle(loaded.model, shape, options, loaded.plan)
    x = torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        before, after = first_tensor(reference(x)), first_tensor(upcycled(x))
    change = float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))
    plan.summary.upcycle.max_relative_change = change
    save_archive(output, upcycled, loaded.arch, plan, source_sha256=loaded.sha256,
                 metadata=loaded.metadata, force=force, inputs=inputs)
    if as_json:
        _print_json({"model": model, "output": str(output), "plan": plan.to_dict()})
        return
    _print_plan(plan, title=f"{model}  ·  upcycle ×{experts} ({routing})  ·  input "
                            f"{plan.input_shape}")
    up = plan.summary.upcycle
    out_console.print(f"{up.convs} convs upcycled to {experts} experts; output change on a "
                      f"random batch: {change:.1e} of its largest value", highlight=False)
    if up.refused:
        out_console.print(f"{len(up.refused)} convs refused (their forward is not a plain or "
                          "'same'-padded conv: reasons in the plan)", highlight=False)
    _info(quiet, f"wrote {output}")

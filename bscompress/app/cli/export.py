"""``bscompress export``: an archive or a checkpoint to a verified ONNX file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bscompress.app.cli.common import (
    ArchKwargsOpt,
    ArchOpt,
    CropOpt,
    ForceOpt,
    JsonOpt,
    KeyOpt,
    MeanOpt,
    ModelArg,
    QuietOpt,
    ResizeOpt,
    ShapeOpt,
    StdOpt,
    TrustOpt,
    _input_paths,
    _input_shape,
    _load,
    _open_data,
    _print_json,
    app,
    err_console,
    flag_names,
    handle_errors,
    out_console,
)

#: the flag of each field of the export section (recipe.Export) this command fills
FLAGS = {"dynamic_batch": "--static", "external_data": "--external-data"}

#: the flag of a field of the export section (``keep_failed`` → ``--keep-failed``)
flag = flag_names(FLAGS)


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
    from bscompress.core.recipe import Export, validate_section
    from bscompress.deploy.export import check_export_model, check_export_outputs, export_onnx

    # every check that can fail runs before the first expensive step
    step = validate_section(Export, {
        "opset": opset, "dynamic_batch": not static, "rtol": rtol, "atol": atol,
        "external_data": external_data or None, "keep_failed": keep_failed}, flag)
    inputs = _input_paths(model, arch, data)
    check_export_outputs(output, force, inputs, external_data or None)
    loaded = _load(model, arch, arch_kwargs, trust_pickle, checkpoint_key,
                   input_shape=input_shape)
    inputs = _input_paths(*inputs, loaded.source)
    shape = _input_shape(loaded, input_shape, probe=())
    check_export_model(loaded.model, shape, dynamic_batch=not static)
    samples = _open_data(data, [loaded], quiet or as_json, shape, limit=limit, mean=mean, std=std,
                         resize=resize, crop=crop).images if data else None
    report = export_onnx(loaded.model, shape, output, **step.arguments(), samples=samples,
                         force=force, inputs=inputs)
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
    small = report.below_atol()
    if small:
        largest, many = max(small.values()), len(small) > 1
        err_console.print(
            f"[yellow]warning: output{'s' * many} {', '.join(small)} {'are' if many else 'is'} "
            f"at most {largest:.2g} in magnitude, no more than --atol {report.atol:g}: the "
            f"parity check cannot tell {'them' if many else 'it'} from zeros; pass --atol "
            f"below {largest:.1g}, or --data with inputs that give larger outputs[/yellow]",
            highlight=False)

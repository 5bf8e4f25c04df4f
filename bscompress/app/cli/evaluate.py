"""``bscompress evaluate``: top-1/top-5 accuracy of a model or an archive on a dataset spec."""

from __future__ import annotations

from typing import Annotated

import typer

from bscompress.app.cli.common import (
    ArchKwargsOpt,
    ArchOpt,
    CropOpt,
    JsonOpt,
    KeyOpt,
    MeanOpt,
    ModelArg,
    QuietOpt,
    ResizeOpt,
    StdOpt,
    TrustOpt,
    _load,
    _open_data,
    _print_json,
    app,
    handle_errors,
    out_console,
)


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

"""``bscompress pack``: a pickled model or a state_dict saved as a bscompress archive (an identity
plan)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bscompress.app.cli.common import (
    ArchKwargsOpt,
    ArchOpt,
    CropOpt,
    ForceOpt,
    KeyOpt,
    MeanOpt,
    ModelArg,
    QuietOpt,
    ResizeOpt,
    ShapeOpt,
    StdOpt,
    TrustOpt,
    _info,
    _input_paths,
    _input_shape,
    _load,
    _preprocessing_meta,
    app,
    handle_errors,
)


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
    from bscompress.core.errors import BadInput
    from bscompress.core.files import ARCHIVE_SUFFIXES, check_output_path
    from bscompress.core.plan import Plan
    from bscompress.io.archive import save_archive

    inputs = _input_paths(model, arch)
    check_output_path(output, force, inputs, suffixes=ARCHIVE_SUFFIXES)
    loaded = _load(model, arch, arch_kwargs, trust_pickle, checkpoint_key,
                   input_shape=input_shape)
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

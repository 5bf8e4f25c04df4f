"""``bscompress inspect``: the layers, their eligibility and spectra, and the kernels matched to
Gaussian/edge banks (``--kernels``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from bscompress.app.cli.common import (
    ArchKwargsOpt,
    ArchOpt,
    ExcludeOpt,
    ForceOpt,
    IncludeOpt,
    JsonOpt,
    KeyOpt,
    MinInOpt,
    ModelArg,
    QuietOpt,
    ShapeOpt,
    TrustOpt,
    _fmt_count,
    _fmt_frac,
    _info,
    _input_paths,
    _input_shape,
    _load,
    _print_json,
    app,
    err_console,
    handle_errors,
    out_console,
)


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

    from bscompress.analysis.analyze import inspect_model
    from bscompress.core.errors import BadInput
    from bscompress.core.surgery import Eligibility

    if not kernels and (match is not None or plot is not None):
        raise BadInput("--match and --plot go with --kernels: add --kernels")
    if kernels:
        from bscompress.analysis.kernels import inspect_kernels, plot_kernels
        from bscompress.core.files import PNG_SUFFIXES, atomic_output, check_output_path

        if plot is not None:
            check_output_path(plot, force, _input_paths(model, arch), "--plot output",
                              suffixes=PNG_SUFFIXES)
        loaded = _load(model, arch, arch_kwargs, trust_pickle, checkpoint_key,
                       input_shape=input_shape)
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
    loaded = _load(model, arch, arch_kwargs, trust_pickle, checkpoint_key, input_shape=input_shape)
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

"""Write docs/benchmarks.md and its plots from the JSON results of ``make bench``.

    python benchmarks/report.py [--results bench-out] [--out docs/benchmarks.md]
        [--img docs/img] [--discussion benchmarks/discussion.md] [--splice-model MODEL]

Reads ``quality-*.json`` (``benchmarks/quality.py``), ``latency.json``
(``benchmarks/latency.py``), ``scale.json`` (``benchmarks/scale.py``), ``guard.json``
(``benchmarks/guard_latency.py``), ``guard-accuracy.json`` (``benchmarks/guard_accuracy.py``),
``eager-layout.json`` (``benchmarks/eager_layout.py``), ``forms.json``
(``benchmarks/block_forms.py``), ``large-kernels.json`` (``benchmarks/large_kernels.py``) and
``speed.json``
(``benchmarks/decompose_speed.py``), whichever exist, and writes the tables, the machine and
versions, the commands, and two plots per run: accuracy against MACs per model and ONNX
Runtime speedup against MAC reduction.
``--discussion`` is a hand-written Markdown file included as it is (what the figures mean).
``--splice-model MODEL`` rewrites only that model's accuracy section of an existing ``--out``
(between its ``<!-- quality MODEL -->`` markers), e.g. after running ``quality.py`` alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections import defaultdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import block_forms
import eager_layout
import guard_accuracy
import guard_latency
import large_kernels
import scale
from latency import merged_results
from markers import cpu, replace_marked
from studies import BEGIN, END

#: the sections written from one benchmark script's JSON each, in the report's order: the
#: results file and the script (its ``TITLE``, ``BEGIN`` and ``END`` markers)
SECTIONS = (("scale.json", scale), ("guard.json", guard_latency),
            ("guard-accuracy.json", guard_accuracy), ("eager-layout.json", eager_layout),
            ("forms.json", block_forms), ("large-kernels.json", large_kernels))

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["torch", "torchvision", "onnx", "onnxruntime", "tensorly", "tensorly-torch",
            "torch-pruning", "bsconv"]
ORDER = ["dsc", "bsconv-u", "bsconv-s", "tucker2", "cp", "cp4", "auto",
         "tltorch-tucker", "tltorch-cp", "torch-pruning", "bsconv-scratch"]


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def machine() -> str:
    versions = []
    for package in PACKAGES:
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} (not installed)")
    return (f"{cpu()}, {os.cpu_count()} logical cores, {platform.system()} "
            f"{platform.release()}; Python {platform.python_version()}; " + ", ".join(versions))


#: bscompress's calibrations in table order, with their line style in the plots
CALIBRATIONS = {"data-free": "--", "data-aware": "-", "data-aware, sequential": "-.",
                "data-aware, sequential, reconstructed": (0, (1, 1))}


def _rank(row: dict) -> tuple:
    method = row["method"]
    order = list(CALIBRATIONS)
    return (ORDER.index(method) if method in ORDER else len(ORDER),
            order.index(row["calibration"]) if row["calibration"] in order else len(order))


def quality_table(result: dict) -> str:
    original = result["original"]
    lines = [
        f"Original: **{pct(original['top1'])}** top-1, {original['macs'] / 1e6:.2f} M MACs, "
        f"{original['params'] / 1e3:.1f} k params. Fine-tune: one epoch over "
        f"{result['ft_samples']} training images ({result['ft_steps']} steps of 128); "
        f"calibration: {result['calibration_samples']} images of `{result['calibration']}`; "
        f"test: `{result['test']}`.",
        "",
        "| budget | method | calibration | MACs kept | params | zero-shot | + BN re-estimation "
        "| + fine-tune | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_budget = defaultdict(list)
    for row in result["rows"]:
        by_budget[row["budget"]].append(row)
    for budget in sorted(by_budget, reverse=True):
        rows = sorted(by_budget[budget], key=_rank)
        best = max((r.get("kd") or 0.0 for r in rows), default=0.0)
        for row in rows:
            name = row["method"] if row["family"] == "bscompress" else f"*{row['method']}*"
            kd = pct(row.get("kd"))
            if row.get("kd") is not None and row["kd"] == best:
                kd = f"**{kd}**"
            note = row.get("error") or row.get("note") or ""
            if row.get("onnx", "") and str(row.get("onnx")).startswith("failed"):
                note = (note + "; " if note else "") + f"ONNX export {row['onnx']}"
            macs = f"{100 * row['macs_kept']:.1f}%" if "macs_kept" in row else "—"
            params = f"{row['params'] / 1e3:.1f}k" if "params" in row else "—"
            bn = ("(included)" if row["calibration"].startswith("data-aware")
                  else pct(row.get("bn")))
            lines.append(f"| {100 * budget:.0f}% | {name} | {row['calibration']} | {macs} | "
                         f"{params} | {pct(row.get('zero_shot'))} | {bn} | "
                         f"{kd} | {note} |")
    return "\n".join(lines)


STAGES = (("zero_shot", "zero-shot"), ("bn", "+ BN"), ("kd", "+ fine-tune"))


def _best_stage(row: dict) -> tuple[float, str]:
    """The row's best accuracy over its stages, and which stage gave it."""
    return max(((row[key], label) for key, label in STAGES if row.get(key) is not None),
               default=(0.0, "—"))


def verdicts(result: dict) -> str:
    """Per budget: the best bscompress row against the best peer, over every stage (what
    each tool can ship in this protocol) and after the fine-tune alone."""
    lines = ["| budget | best bscompress, any stage | best peer, any stage | difference | "
             "after the fine-tune: bscompress | peer | difference |",
             "|---|---|---|---|---|---|---|"]
    by_budget = defaultdict(list)
    for row in result["rows"]:
        if "macs_kept" in row:
            by_budget[row["budget"]].append(row)
    for budget in sorted(by_budget, reverse=True):
        ours = [r for r in by_budget[budget] if r["family"] == "bscompress"]
        peers = [r for r in by_budget[budget] if r["family"] == "peer"]
        if not ours or not peers:
            continue
        a = max(ours, key=lambda r: _best_stage(r)[0])
        b = max(peers, key=lambda r: _best_stage(r)[0])
        (acc_a, stage_a), (acc_b, stage_b) = _best_stage(a), _best_stage(b)
        cells = [f"{a['method']} ({a['calibration']}, {stage_a}): {pct(acc_a)}",
                 f"{b['method']} ({stage_b}): {pct(acc_b)}",
                 f"{100 * (acc_a - acc_b):+.2f} points"]
        tuned_a = [r for r in ours if r.get("kd") is not None]
        tuned_b = [r for r in peers if r.get("kd") is not None]
        if tuned_a and tuned_b:
            ka = max(tuned_a, key=lambda r: r["kd"])
            kb = max(tuned_b, key=lambda r: r["kd"])
            cells += [f"{ka['method']} ({ka['calibration']}): {pct(ka['kd'])}",
                      f"{kb['method']}: {pct(kb['kd'])}",
                      f"{100 * (ka['kd'] - kb['kd']):+.2f} points"]
        else:
            cells += ["—", "—", "—"]
        lines.append(f"| {100 * budget:.0f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_quality(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5.6), sharey=True)
    series = defaultdict(list)
    for row in result["rows"]:
        if "macs_kept" in row:
            series[(row["method"], row["calibration"], row["family"])].append(row)
    for ax, (key, title) in zip(axes, [("zero", "before fine-tuning (best of zero-shot, "
                                                "+ BN)"),
                                       ("kd", "after the fine-tune")], strict=True):
        for (method, calibration, family), rows in sorted(series.items(),
                                                         key=lambda kv: _rank(kv[1][0])):
            rows = sorted(rows, key=lambda r: r["macs_kept"])
            if key == "zero":
                ys = [max(r.get("zero_shot") or 0, r.get("bn") or 0) for r in rows]
            else:
                ys = [r.get("kd") for r in rows]
            points = [(100 * r["macs_kept"], 100 * y) for r, y in zip(rows, ys, strict=True)
                      if y is not None]
            if not points:
                continue
            color = plt.get_cmap("tab20")(ORDER.index(method) % 20 if method in ORDER else 19)
            style = {"peer": dict(linestyle=":", marker="x"),
                     "bscompress": dict(linestyle=CALIBRATIONS.get(calibration, (0, (1, 1))),
                                        marker="o")}[family]
            label = method if family == "peer" else f"{method} ({calibration})"
            ax.plot(*zip(*points, strict=True), label=label, color=color, **style)
        ax.axhline(100 * result["original"]["top1"], color="black", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("MACs kept (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    axes[0].set_ylim(100 * result["original"]["top1"] - 20, 100 * result["original"]["top1"] + 1)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(f"{result['model']}: accuracy against MACs (original: horizontal line; "
                 "points more than 20 below it are off the plot)")
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_rows(quality: list[dict], latency: dict) -> tuple[str, list[tuple]]:
    lines = ["| model | config | MACs kept | ORT b1 p50 / p90, 1 thread (ms) | speedup | "
             "2 threads (ms) | speedup | MAC reduction |", "|---|---|---|---|---|---|---|---|"]
    points = []
    for result in quality:
        times = latency["models"].get(result["model"], {})
        base = times.get("original")
        if not base:
            continue
        kept = {r["key"]: r["macs_kept"] for r in result["rows"] if "macs_kept" in r}
        for key, t in sorted(times.items(), key=lambda kv: (kv[0] != "original", kv[0])):
            macs = 1.0 if key == "original" else kept.get(key)
            if macs is None:
                continue
            cells, speedups = [], []
            for threads in ("1", "2"):
                if threads in t:
                    speedup = base[threads]["p50"] / t[threads]["p50"]
                    speedups.append(speedup)
                    cells += [f"{t[threads]['p50']:.3f} / {t[threads]['p90']:.3f}",
                              f"{speedup:.2f}×"]
                else:
                    cells += ["—", "—"]
            lines.append(f"| {result['model']} | {key} | {100 * macs:.1f}% | "
                         + " | ".join(cells) + f" | {1 / macs:.2f}× |")
            if key != "original" and speedups:
                points.append((result["model"], key, 1 / macs, speedups[0]))
    return "\n".join(lines), points


def plot_speedup(points: list[tuple], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for model in sorted({p[0] for p in points}):
        xs = [p[2] for p in points if p[0] == model]
        ys = [p[3] for p in points if p[0] == model]
        ax.scatter(xs, ys, label=model)
        for p in points:
            if p[0] == model:
                ax.annotate(p[1], (p[2], p[3]), fontsize=5, alpha=0.7)
    top = max([p[2] for p in points] + [2.0])
    ax.plot([1, top], [1, top], color="gray", linestyle="--", label="speedup = MAC reduction")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("MAC reduction (original MACs / model MACs)")
    ax.set_ylabel("ONNX Runtime speedup, batch 1, 1 thread (p50)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def speed_table(speed: dict) -> str:
    lines = [f"{speed['model']}, input {speed['input_shape']}, {speed['device']}, "
             f"{speed['threads']} threads, torch {speed['torch']}:", "",
             "| method | ranks | decompose (s) | bare batched float64 SVD (s) | ratio | "
             "peak memory growth (MB) | MACs kept |", "|---|---|---|---|---|---|---|"]
    for r in speed["rows"]:
        lines.append(f"| {r['method']} | {r['ranks']} | {r['seconds']:.2f} | "
                     f"{r['bare_svd']:.2f} | {r['seconds'] / r['bare_svd']:.1f}× | "
                     f"{r['peak_mb']:.0f} | {r['macs_kept']:.3f} |")
    return "\n".join(lines)


def quality_markers(model: str) -> tuple[str, str]:
    return (f"<!-- quality {model}: generated by benchmarks/report.py -->",
            f"<!-- quality {model} end -->")


def quality_section(result: dict, img: Path, rel: str) -> list[str]:
    """A model's accuracy section (its plot written to ``img``), between its markers."""
    image = img / f"quality-{result['model']}.png"
    plot_quality(result, image)
    commands = " and ".join(f"`python {c}`" for c in result["commands"])
    begin, end = quality_markers(result["model"])
    return [begin, f"### {result['model']}", "",
            f"{commands} ({result.get('seconds', 0) / 60:.0f} min of one core)", "",
            quality_table(result), "", "Best per budget, bscompress against the peers:", "",
            verdicts(result), "",
            f"![accuracy against MACs, {result['model']}]({rel}/{image.name})", end]


def splice_quality(out: Path, result: dict, img: Path, rel: str) -> None:
    """Replace ``result``'s model section of ``out`` (between its markers), or add it before
    the latency section (at the end when there is none)."""
    text = out.read_text()
    begin, end = quality_markers(result["model"])
    block = "\n".join(quality_section(result, img, rel))
    replaced = replace_marked(text, begin, end, block)
    if replaced is not None:
        text = replaced
    elif "\n## Latency" in text:
        head, _, rest = text.partition("\n## Latency")
        text = head.rstrip() + "\n\n" + block + "\n\n## Latency" + rest
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    out.write_text(text.replace(f"{ROOT}/", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="bench-out")
    parser.add_argument("--out", default="docs/benchmarks.md")
    parser.add_argument("--img", default="docs/img")
    parser.add_argument("--discussion", default=None,
                        help="a Markdown file included as it is (none by default)")
    parser.add_argument("--command", default="make bench")
    parser.add_argument("--splice-model", default=None, metavar="MODEL",
                        help="only MODEL's accuracy section, from the quality-*.json of "
                        "--results, spliced into the existing --out")
    args = parser.parse_args()
    results = Path(args.results)
    img = Path(args.img)
    img.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    rel = os.path.relpath(img, out.parent)
    quality = merged_results(results)
    if args.splice_model:
        chosen = [r for r in quality if r["model"] == args.splice_model]
        if not chosen:
            raise SystemExit(f"no quality-*.json of {args.splice_model} in {results}")
        splice_quality(out, chosen[0], img, rel)
        print(f"spliced the {args.splice_model} section into {out}")
        return
    seconds = {}
    timing = results / "seconds.json"
    if timing.is_file():
        seconds = json.loads(timing.read_text())
    stages = ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
    if seconds:
        stages += f"; {sum(seconds.values()) / 60:.0f} min in all"
    doc = [
        "# Benchmarks",
        "",
        f"Generated by `{args.command}` ({stages or 'timing not recorded'}) "
        f"on {datetime.now(UTC):%Y-%m-%d}. Do not edit by hand: edit "
        "`benchmarks/discussion.md` or the scripts, and rerun.",
        "",
        f"Machine and versions: {machine()}.",
        "",
        "One-off studies from earlier issues (calibration, fine-tuning variants, CondConv, "
        "fixed kernels, GPU runs) are in [experiments.md](experiments.md).",
    ]
    if args.discussion:
        doc += ["", Path(args.discussion).read_text().strip()]
    studies = results / "studies.md"
    if studies.is_file():  # between the markers that ``make bench-studies`` replaces
        doc += ["", BEGIN, studies.read_text().strip(), END]
    if quality:
        doc += ["", "## Accuracy against MACs, bscompress and the peers", ""]
    for result in quality:
        doc += quality_section(result, img, rel) + [""]
    latency_file = results / "latency.json"
    if latency_file.is_file() and quality:
        latency = json.loads(latency_file.read_text())
        table, points = latency_rows(quality, latency)
        doc += ["## Latency: ONNX Runtime, batch 1", "",
                f"`python {latency['command']}` (ONNX Runtime {latency['onnxruntime']}, CPU "
                f"provider, {latency['runs']} timed calls per model and thread setting). "
                "Speedup is the original's p50 over the model's; MAC reduction is the "
                "original's MACs over the model's.", "", table, ""]
        if points:
            plot_speedup(points, img / "speedup-vs-macs.png")
            doc += [f"![speedup against MAC reduction]({rel}/speedup-vs-macs.png)", ""]
    for name, script in SECTIONS:  # each script's own section, its markers around it
        path = results / name
        if path.is_file():
            doc += [f"## {script.TITLE}", "", script.BEGIN,
                    json.loads(path.read_text())["markdown"], script.END, ""]
    speed_file = results / "speed.json"
    if speed_file.is_file():
        speed = json.loads(speed_file.read_text())
        doc += ["## Decomposition speed", "", f"`python {speed['command']}`", "",
                speed_table(speed), ""]
    text = "\n".join(doc).rstrip() + "\n"
    out.write_text(text.replace(f"{ROOT}/", ""))  # commands as run from the repository
    print(f"wrote {out} and {len(quality)} + {int(latency_file.is_file())} plots in {img}")


if __name__ == "__main__":
    main()

"""Plots of a bench run (matplotlib, headless): accuracy against MACs, latency, and for
archives the per-layer rank and truncation error recorded in their Plan."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bscompress.core.plan import Plan
from bscompress.deploy.bench import BenchResult


def plot_bench(results: Sequence[BenchResult], plans: Sequence[Plan | None],
               path: str | Path) -> Path:
    """Write a PNG with one panel each for accuracy (top-1, else agreement) against MACs,
    ONNX Runtime batch-1 latency (p50 bar, p90 whisker), and — when any model is an archive —
    the relative truncation error of every rewritten layer, annotated with its ranks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compressed = [(r.name, p) for r, p in zip(results, plans, strict=True)
                  if p is not None and p.replaced()]
    panels = 3 if compressed else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
    try:
        _draw(results, compressed, axes)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120, format="png")
    finally:
        plt.close(fig)  # a failed plot leaves no figure behind in a long-lived process
    return path


def _draw(results: Sequence[BenchResult], compressed: list, axes) -> None:
    labels = [Path(r.name).name for r in results]

    ax = axes[0]
    use_top1 = all(r.top1 is not None for r in results)
    for label, r in zip(labels, results, strict=True):
        y = 100 * (r.top1 if use_top1 else (r.agreement or 0))
        ax.scatter(r.macs / 1e6, y, s=40)
        ax.annotate(label, (r.macs / 1e6, y), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("MACs (M)")
    ax.set_ylabel("top-1 (%)" if use_top1 else "top-1 agreement with the first model (%)")
    ax.set_title("accuracy vs MACs")
    ax.grid(alpha=0.3)

    ax = axes[1]
    p50 = [r.latency["ort_b1"].p50 for r in results]
    p90 = [r.latency["ort_b1"].p90 for r in results]
    ax.bar(range(len(results)), p50, yerr=[[0] * len(p50), [b - a for a, b in zip(
        p50, p90, strict=True)]], capsize=3, color="tab:blue")
    ax.set_xticks(range(len(results)), labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("ms (p50, whisker p90)")
    ax.set_title("ONNX Runtime latency, batch 1")
    ax.grid(axis="y", alpha=0.3)

    if compressed:
        ax = axes[2]
        output = any(e.output_error is not None for _, plan in compressed
                     for e in plan.replaced())
        for name, plan in compressed:
            entries = plan.replaced()
            # calibrated archives: the output error on the calibration data
            errors = [(e.output_error if output and e.output_error is not None
                       else e.predicted_error) or 0.0 for e in entries]
            ax.plot(range(len(entries)), errors, marker="o", label=Path(name).name)
            for i, e in enumerate(entries):
                ranks = ",".join(str(v) for v in e.ranks.values())
                ax.annotate(ranks, (i, errors[i]), fontsize=6, xytext=(0, 4),
                            textcoords="offset points", ha="center")
        ax.set_xlabel("rewritten layer (model order)")
        ax.set_ylabel("relative output error on calibration data" if output
                      else "relative truncation error ‖W−Ŵ‖²/‖W‖²")
        ax.set_title("per-layer error (labels: ranks)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)


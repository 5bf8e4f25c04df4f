"""Decomposition wall time on torchvision resnet50 against a bare batched SVD of the same tensors.

    python benchmarks/decompose_speed.py [--device cpu|cuda] [--threads 2] [--methods ...]
        [--out bench-out/speed.json]

For every method: the wall time of ``bscompress.decompose`` on all eligible convs (random init:
the cost of an SVD does not depend on the values; ranks 1, Tucker-2 and CP at a quarter of
the channels, ``auto`` under ``--auto-budget``), its peak RSS growth (CPU) or peak CUDA
memory, and the time of a bare batched ``torch.linalg.svd`` in float64, measured in the same
run, over the matrices the method's closed form starts from: per-filter ``[M, k²]`` for
BSConv-U/-S, per-input-channel ``[N, k²]`` for DSC; Tucker-2, CP and ``auto`` are compared
with the per-filter SVD too (the cheapest factorization of the same kernels). Prints a
Markdown table; ``--out`` writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torchvision
from markers import cpu

from bscompress.compress.decomposition import Budget, decompose
from bscompress.core.surgery import eligibility
from bscompress.methods import RankOptions


def bare_svd_seconds(model: torch.nn.Module, method: str, device: str) -> float:
    """Batched float64 SVD of exactly the matrices the method factorizes."""
    reasons = eligibility(model)
    mats = []
    for name, module in model.named_modules():
        if reasons.get(name, "x") is not None:
            continue
        w = module.weight.detach().to(device, torch.float64)
        n, m_g = w.shape[:2]
        g = module.groups
        if method != "dsc":
            mats.append(w.reshape(n, m_g, -1))
        else:
            mats.append(w.reshape(g, n // g, m_g, -1).permute(0, 2, 1, 3).reshape(g * m_g,
                                                                                  n // g, -1))
    _sync(device)
    start = time.perf_counter()
    for mat in mats:
        torch.linalg.svd(mat, full_matrices=False)
    _sync(device)
    return time.perf_counter() - start


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--methods", nargs="*", default=["bsconv-u", "bsconv-s", "dsc",
                                                         "tucker2", "cp", "cp4", "auto"])
    parser.add_argument("--auto-budget", default="macs=0.7")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = torchvision.models.resnet50().eval().to(args.device)
    shape = (1, 3, 224, 224)
    print(f"resnet50, {args.device}, {args.threads} threads, torch {torch.__version__}, "
          f"{cpu()}")
    rows, bare_seconds = [], {}
    print("| method | ranks | decompose (s) | bare batched SVD (s) | ratio | peak memory (MB) | "
          "MACs after / before |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods:
        model = copy.deepcopy(base)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        _sync(args.device)
        start = time.perf_counter()
        budget = Budget.parse(args.auto_budget) if method == "auto" else None
        _, plan = decompose(model, method, shape, RankOptions(rank=1, tucker_ranks=0.25),
                            budget=budget)
        _sync(args.device)
        seconds = time.perf_counter() - start
        if args.device.startswith("cuda"):
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        kind = "dsc" if method == "dsc" else "blueprint"  # the matrices it is compared with
        if kind not in bare_seconds:  # timed once per kind of matrix
            bare_seconds[kind] = bare_svd_seconds(base, method, args.device)
        bare = bare_seconds[kind]
        ranks = {"tucker2": "C/4", "cp": "C/4", "cp4": "C/4",
                 "auto": args.auto_budget}.get(method, "1")
        macs = plan.summary.macs_after / plan.summary.macs_before
        rows.append({"method": method, "ranks": ranks, "seconds": seconds, "bare_svd": bare,
                     "peak_mb": peak, "macs_kept": macs})
        print(f"| {method} | {ranks} | {seconds:.2f} | {bare:.2f} | {seconds / bare:.1f}× | "
              f"{peak:.0f} | {macs:.3f} |", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "model": "torchvision resnet50", "input_shape": list(shape), "device": args.device,
            "threads": args.threads, "torch": torch.__version__, "command": " ".join(sys.argv),
            "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

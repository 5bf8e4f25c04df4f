"""Decomposition wall time on torchvision resnet50 against a bare batched SVD of the same tensors.

    python benchmarks/decompose_speed.py [--device cpu|cuda] [--threads 2] [--methods ...]

For every method: the wall time of ``bscompress.decompose`` on all eligible convs (random init:
the cost of an SVD does not depend on the values), its peak RSS growth (CPU) or peak CUDA memory,
and, for BSConv-U / DSC, the time of the bare ``torch.linalg.svd`` over the same per-filter /
per-channel matrices in float64 — the floor any implementation has to pay. Prints a Markdown
table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import platform
import resource
import time

import torch
import torchvision

from bscompress.decomposition import decompose
from bscompress.methods import RankOptions
from bscompress.surgery import eligibility


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
        if method == "bsconv-u":
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
    parser.add_argument("--methods", nargs="*",
                        default=["bsconv-u", "dsc", "bsconv-s", "tucker2"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = torchvision.models.resnet50().eval().to(args.device)
    shape = (1, 3, 224, 224)
    print(f"resnet50, {args.device}, {args.threads} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}")
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
        _, plan = decompose(model, method, shape, RankOptions(rank=1, tucker_ranks=0.25))
        _sync(args.device)
        seconds = time.perf_counter() - start
        if args.device.startswith("cuda"):
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        bare = (bare_svd_seconds(base, method, args.device)
                if method in ("bsconv-u", "dsc") else float("nan"))
        ranks = "C/4" if method == "tucker2" else "1"
        ratio = seconds / bare if bare == bare else float("nan")
        macs = plan.meta["macs_after"] / plan.meta["macs_before"]
        print(f"| {method} | {ranks} | {seconds:.2f} | {bare:.2f} | {ratio:.1f}× | {peak:.0f} | "
              f"{macs:.3f} |")


if __name__ == "__main__":
    main()

"""Time and memory of calibration on a ResNet-50-sized model at 224×224 (CPU).

    python benchmarks/calibration_cost.py [--samples 512] [--method bsconv-u] [--threads 2]

Random weights and seeded Gaussian inputs (the cost does not depend on the values). Reports
the wall time of collecting the input-patch covariances of every rewritten layer, of the
data-aware decomposition, of BatchNorm re-estimation plus the measured-error pass, the size
of the covariances and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torchvision

from bscompress.compress.calibrate import collect_patch_covariances
from bscompress.compress.decomposition import decompose, plan_decomposition
from bscompress.methods import RankOptions


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--method", default="bsconv-u")
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    shape = [1, 3, 224, 224]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch, 3, 224, 224, generator=gen)
               for _ in range(args.samples // args.batch)]
    options = RankOptions(rank=args.rank)
    layers = [e.name for e in plan_decomposition(model, args.method, shape, options).replaced()]
    print(f"{args.model}: {len(layers)} layers rewritten by {args.method}, "
          f"{args.samples} samples at 224×224, {args.threads} threads; inputs held: "
          f"{sum(b.numel() for b in batches) * 4 / 2**30:.2f} GB; peak RSS so far "
          f"{peak_rss_gb():.2f} GB", flush=True)
    start = time.perf_counter()
    covs = collect_patch_covariances(model, batches, layers)
    collect = time.perf_counter() - start
    size = sum(c.nbytes for c in covs.values()) / 2**30
    full = sum(c.full is not None for c in covs.values())
    print(f"covariances: {collect:.0f} s, {size:.2f} GB ({full}/{len(covs)} full); peak RSS "
          f"{peak_rss_gb():.2f} GB", flush=True)
    start = time.perf_counter()
    _, plan = decompose(model, args.method, shape, options, covariances=covs,
                        calibration=batches)
    rest = time.perf_counter() - start
    print(f"data-aware decomposition + BatchNorm re-estimation + measured errors: {rest:.0f} s; "
          f"peak RSS {peak_rss_gb():.2f} GB", flush=True)
    fits = sorted({e.fit for e in plan.replaced()})
    print(f"fits: {fits}")


if __name__ == "__main__":
    main()

"""The CUDA path of decompose, checked on a GPU (or on --device cpu, the same code).

    python benchmarks/gpu_check.py --device cuda

1. resnet18 (float64, random init) on the device: every exact method at full rank reproduces
   the model's outputs; every method at rank 1 runs there and shrinks the MACs.
2. An archive written from the device model reloads on the CPU to the same outputs.
3. Wall time of decompose on resnet50 (float32) on the device.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from bscompress.compress.decomposition import decompose
from bscompress.io.arch import ArchSpec
from bscompress.io.archive import load, save_archive
from bscompress.methods import METHODS, RankOptions

FULL = RankOptions(rank=10_000, p=1.0, tucker_ranks=1.0, allow_growth=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = args.device
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.startswith("cuda") else ""))
    shape = (1, 3, 64, 64)
    torch.manual_seed(0)
    base = torchvision.models.resnet18().eval().to(device)
    x = torch.randn(2, 3, 64, 64, device=device)
    with torch.no_grad():
        ref = base.double()(x.double())
        for method in METHODS:
            start = time.perf_counter()
            if method not in ("cp", "cp4"):
                model, _ = decompose(copy.deepcopy(base), method, shape, FULL)
                err = float((model(x.double()) - ref).norm() / ref.norm())
                assert err < 1e-8, (method, err)
            else:
                err = float("nan")
            small, plan = decompose(copy.deepcopy(base).float(), method, shape,
                                    RankOptions(rank=1, cp_iters=10))
            assert next(small.parameters()).device.type == device.split(":")[0]
            _sync(device)
            ratio = plan.summary.macs_after / plan.summary.macs_before
            print(f"resnet18 {method:9s} full-rank rel. error {err:.1e}, rank-1 MACs "
                  f"{ratio:.3f}, {time.perf_counter() - start:.1f} s")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "a.pt"
            save_archive(path, small, ArchSpec("torchvision:resnet18"), plan)
            again = load(path)
            diff = float((again(x.float().cpu()) - small(x.float()).cpu()).abs().max())
            print(f"archive written on {device}, reloaded on cpu: max abs diff {diff:.2e}")
            assert diff < 1e-4
    big = torchvision.models.resnet50().eval().to(device)
    for method, options in (("bsconv-u", RankOptions(rank=1)), ("dsc", RankOptions(rank=1)),
                            ("tucker2", RankOptions(tucker_ranks=0.25))):
        model = copy.deepcopy(big)
        _sync(device)
        start = time.perf_counter()
        decompose(model, method, (1, 3, 224, 224), options)
        _sync(device)
        print(f"resnet50 {method:9s} decompose {time.perf_counter() - start:.2f} s on {device}")


if __name__ == "__main__":
    main()

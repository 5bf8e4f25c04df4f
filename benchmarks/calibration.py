"""Zero-shot accuracy of decomposed models: data-free, data-free + BatchNorm re-estimation,
data-aware (``--calib``: GSVD factors + BatchNorm re-estimation) and data-aware sequential
(``--calib --sequential``), per method and rank or budget; with ``--reconstruct STEPS``
also the sequential model after block-wise reconstruction (``--reconstruct``).

    python benchmarks/calibration.py [--model bscompress/demo/fmnist_resnet.pt]
        [--arch bscompress.demo:fmnist_resnet] [--test fashion-mnist:DIR]
        [--calib demo] [--samples 512] [--configs "bsconv-u:rank=2" "dsc@macs=0.25" ...]
        [--reconstruct 300]

A config is ``METHOD:OPTION=V,...`` (RankOptions fields) or ``METHOD@KIND=F`` (``--budget``);
``METHOD@KIND=F+sens`` allocates the budget by measured sensitivity (``--sensitivity``,
calibrated columns only; the first of its two runs measures, the second reuses the cache).
``tltorch-cp@macs=F`` / ``tltorch-tucker@macs=F`` are the peers: tensorly-torch's
``FactorizedConv.from_conv`` (``pip install tensorly-torch``) on the same layers, at the
largest rank fraction within F of the model's MACs (bisection), then BatchNorm
re-estimation on the same calibration data (their data-aware columns stay empty).

Calibration uses training images only (``--calib`` with ``split=train``); accuracy is on the
``--test`` spec's test split (the full 10k Fashion-MNIST test set by default, the bundled
2000-image subset when the Debian package is missing). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import macs, tensorly_torch  # noqa: E402

from bscompress.compress.calibrate import reestimate_batchnorm  # noqa: E402
from bscompress.compress.decomposition import Budget, decompose  # noqa: E402
from bscompress.compress.reconstruct import ReconstructionOptions, reconstruct
from bscompress.data import evaluate, open_data_spec  # noqa: E402
from bscompress.io.archive import load_model  # noqa: E402
from bscompress.methods import RankOptions  # noqa: E402

SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_CONFIGS = [  # the table of docs/experiments.md
    "auto@macs=0.25", "bsconv-u@macs=0.25", "dsc@macs=0.25", "cp4@macs=0.25",
    "tltorch-cp@macs=0.25", "tltorch-tucker@macs=0.25", "auto@macs=0.5", "auto@macs=0.12",
]


def parse_config(text: str) -> tuple[str, RankOptions, Budget | None]:
    text = text.removesuffix("+sens")
    if "@" in text:
        method, _, budget = text.partition("@")
        return method, RankOptions(), Budget.parse(budget)  # the CLI defaults
    method, _, args = text.partition(":")
    kwargs = {}
    for item in filter(None, args.split(",")):
        key, _, value = item.partition("=")
        kwargs[key] = int(value) if key == "rank" else float(value)
    return method, RankOptions(cp_iters=25, **kwargs), None


def main() -> None:
    default_test = (f"fashion-mnist:{SYSTEM_FMNIST}" if SYSTEM_FMNIST.is_dir() else "demo")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bscompress/demo/fmnist_resnet.pt")
    parser.add_argument("--arch", default="bscompress.demo:fmnist_resnet")
    parser.add_argument("--input-shape", default="1,1,28,28")
    parser.add_argument("--test", default=default_test)
    parser.add_argument("--calib", default="demo")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--als-iters", type=int, default=1)
    parser.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reconstruct", type=int, default=0, metavar="STEPS",
                        help="add a column: the sequential model reconstructed block-wise "
                             "with STEPS Adam steps per block (0: no column)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = [int(s) for s in args.input_shape.split(",")]

    base = load_model(args.model, arch=args.arch).model.eval()
    test = open_data_spec(args.test, split="test").loader(500)
    calib = [x for x, _ in open_data_spec(args.calib, split="train",
                                          limit=args.samples).loader(64)]
    cache = tempfile.mkdtemp(prefix="bscompress-sensitivity-")  # shared by a config's runs
    original = evaluate(base, test)["top1"]
    print(f"original: {100 * original:.2f}% on {args.test} (test split); calibration: "
          f"{sum(len(x) for x in calib)} training samples of {args.calib}\n")
    column, rule, timed = ((" + reconstruct |", "---|", " / reconstruct") if args.reconstruct
                           else ("", "", ""))
    print("| config | MACs kept | data-free | + BN re-estimation | data-aware (GSVD + BN) | "
          f"+ sequential |{column} seconds (aware / sequential{timed}) |\n"
          f"|---|---|---|---|---|---|{rule}---|")
    for text in args.configs:
        if text.startswith("tltorch-"):
            method, _, budget = text.partition("@")
            free, _ = tensorly_torch(base, Budget.parse(budget).fraction, shape,
                                     method.removeprefix("tltorch-"))
            kept = macs(free, shape) / macs(base, shape)
            bn = copy.deepcopy(free)
            reestimate_batchnorm(bn, calib)
            accs = [evaluate(m, test)["top1"] for m in (free, bn)]
            print(f"| `{text}` | {kept:.1%} | " + " | ".join(f"{100 * a:.2f}%" for a in accs)
                  + " | — | — |" + " — |" * bool(args.reconstruct) + " — |", flush=True)
            continue
        method, options, budget = parse_config(text)
        common = dict(ranks=options, budget=budget)
        models, seconds, cells = [], [], []
        if text.endswith("+sens"):  # allocation by measured sensitivity: calibrated only
            common.update(sensitivity=True, sensitivity_cache=cache)
            cells = ["—", "—"]
        else:
            free, plan = decompose(copy.deepcopy(base), method, shape, **common)
            bn, _ = decompose(copy.deepcopy(base), method, shape, **common, calibration=calib,
                              covariances={})
            models = [free, bn]
        for sequential in (False, True):
            start = time.perf_counter()
            model, plan = decompose(copy.deepcopy(base), method, shape, **common,
                                    calibration=calib, als_iters=args.als_iters,
                                    sequential=sequential)
            seconds.append(time.perf_counter() - start)
            models.append(model)
        if args.reconstruct:
            rebuilt = copy.deepcopy(models[-1])
            start = time.perf_counter()
            reconstruct(rebuilt, base, calib, [e.name for e in plan.replaced()],
                        ReconstructionOptions(steps=args.reconstruct))
            seconds.append(time.perf_counter() - start)
            models.append(rebuilt)
        kept = plan.summary.macs_after / plan.summary.macs_before
        cells += [f"{100 * evaluate(m, test)['top1']:.2f}%" for m in models]
        print(f"| `{text}` | {kept:.1%} | " + " | ".join(cells)
              + " | " + " / ".join(f"{s:.1f}" for s in seconds) + " |", flush=True)


if __name__ == "__main__":
    main()

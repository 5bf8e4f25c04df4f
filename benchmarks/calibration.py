"""Zero-shot accuracy of decomposed models: data-free, data-free + BatchNorm re-estimation,
and data-aware (``--calib``: GSVD factors + BatchNorm re-estimation), per method and rank.

    python benchmarks/calibration.py [--model bscompress/demo/fmnist_resnet.pt]
        [--arch bscompress.demo:fmnist_resnet] [--test fashion-mnist:DIR]
        [--calib demo] [--samples 512] [--configs "bsconv-u:rank=2" ...]

Calibration uses training images only (``--calib`` with ``split=train``); accuracy is on the
``--test`` spec's test split (the full 10k Fashion-MNIST test set by default, the bundled
2000-image subset when the Debian package is missing). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from bscompress.data import evaluate, open_data_spec
from bscompress.decomposition import decompose
from bscompress.io import load_model
from bscompress.methods import RankOptions

SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_CONFIGS = [
    "bsconv-u:rank=1", "bsconv-u:rank=2", "bsconv-s:rank=2", "dsc:rank=1", "dsc:rank=2",
    "tucker2:tucker_ranks=0.25", "tucker2:tucker_ranks=0.5", "cp:cp_rank=0.5", "cp4:cp_rank=0.5",
    "cp4:cp_rank=1.0",
]


def parse_config(text: str) -> tuple[str, RankOptions]:
    method, _, args = text.partition(":")
    kwargs = {}
    for item in filter(None, args.split(",")):
        key, _, value = item.partition("=")
        kwargs[key] = int(value) if key == "rank" else float(value)
    return method, RankOptions(cp_iters=25, **kwargs)


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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = [int(s) for s in args.input_shape.split(",")]

    base = load_model(args.model, arch=args.arch).model.eval()
    test = open_data_spec(args.test, split="test").loader(500)
    calib = [x for x, _ in open_data_spec(args.calib, split="train",
                                          limit=args.samples).loader(64)]
    original = evaluate(base, test)["top1"]
    print(f"original: {100 * original:.2f}% on {args.test} (test split); calibration: "
          f"{sum(len(x) for x in calib)} training samples of {args.calib}\n")
    print("| method | MACs kept | data-free | + BN re-estimation | data-aware (GSVD + BN) | "
          "calib s |\n|---|---|---|---|---|---|")
    for text in args.configs:
        method, options = parse_config(text)
        free, plan = decompose(copy.deepcopy(base), method, shape, options)
        bn, _ = decompose(copy.deepcopy(base), method, shape, options, calibration=calib,
                          covariances={})
        start = time.perf_counter()
        aware, _ = decompose(copy.deepcopy(base), method, shape, options, calibration=calib,
                             als_iters=args.als_iters)
        seconds = time.perf_counter() - start
        kept = plan.meta["macs_after"] / plan.meta["macs_before"]
        accs = [evaluate(m, test)["top1"] for m in (free, bn, aware)]
        print(f"| `{text}` | {kept:.1%} | " + " | ".join(f"{100 * a:.2f}%" for a in accs)
              + f" | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()

"""Accuracy after calibration and after fine-tuning with distillation, at several budgets.

    python benchmarks/finetune.py [--recipe recipes/fmnist-bsconvu-kd.yaml]
        [--budgets macs=0.25 macs=0.12] [--threads 2]

Runs the recipe's pipeline (decompose → fine-tune; no export or bench) once per budget,
with the recipe's budget replaced, and prints a Markdown table: the original's accuracy, the
accuracy after decomposition and calibration (epoch 0), after the last epoch, and the one
kept (the best evaluation, never below the start), with the seconds per epoch. The recipe's
validation data is the full Fashion-MNIST test set, so the kept model is chosen on the data
it is reported on (between the start and each epoch's end: two candidates for one epoch).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import yaml

from bscompress.app.pipeline import open_data, run
from bscompress.core.recipe import parse_recipe
from bscompress.data import evaluate
from bscompress.io.archive import load_model
from bscompress.train.finetune import World


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/fmnist-bsconvu-kd.yaml")
    parser.add_argument("--budgets", nargs="*", default=["macs=0.25", "macs=0.12"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    raw = yaml.safe_load(Path(args.recipe).read_text())
    base = parse_recipe(raw, args.recipe)
    loaded = load_model(base.model, arch=base.arch)
    original = loaded.model.eval()
    _, val = open_data(base, loaded)
    top1 = evaluate(original, val.loader(500))["top1"]
    print(f"recipe {args.recipe}; original {100 * top1:.2f}% on {base.data.val or base.data.train}"
          f" ({len(val.dataset)} images); torch threads {args.threads}\n")
    print("| budget | MACs kept | calibrated (start) | after the epochs | kept | "
          "decompose s | s / epoch |\n|---|---|---|---|---|---|---|")
    for budget in args.budgets:
        recipe = parse_recipe({**raw, "decompose": {**raw["decompose"], "budget": budget},
                               "export": {"enabled": False}, "bench": {"enabled": False}})
        with tempfile.TemporaryDirectory() as tmp:
            summary = run(recipe, Path(tmp) / "run", World())
            steps = summary["steps"]
            macs = steps["decompose"]["macs"]
            history = [json.loads(line)
                       for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        ft = steps["finetune"]
        last = history[-1]["val_top1"]
        per_epoch = sum(ft["seconds_per_epoch"]) / max(len(ft["seconds_per_epoch"]), 1)
        print(f"| `{budget}` | {macs[1] / macs[0]:.1%} | {100 * ft['initial_top1']:.2f}% | "
              f"{100 * last:.2f}% | {100 * ft['best_top1']:.2f}% | "
              f"{steps['decompose']['seconds']:.0f} | {per_epoch:.0f} |", flush=True)


if __name__ == "__main__":
    main()

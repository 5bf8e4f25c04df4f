"""CondConv upcycling of a factorized model: fine-tuned accuracy with and without E experts on
the pointwise convs, at the same fine-tune budget.

    python benchmarks/condconv.py [--recipe recipes/fmnist-bsconvu-kd.yaml] [--experts 4]
        [--budget macs=0.12] [--share-routing] [--threads 2]

Decomposes the recipe's model as its ``decompose`` section says (once), then fine-tunes two
students by the same recipe (epochs, optimizer, distillation from the original): the
factorized model as it is, and the same model upcycled (``bscompress upcycle``, every
pointwise conv of the blocks gets E experts, output unchanged at the start). Prints a Markdown
table: MACs and params of each, accuracy at the start and kept after fine-tuning, s/epoch.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
import yaml

from bscompress.app.pipeline import decompose_step, finetune, open_data
from bscompress.core.recipe import parse_recipe
from bscompress.core.stats import module_macs
from bscompress.io.archive import LoadedModel, load_model
from bscompress.train.finetune import World
from bscompress.transforms.upcycle import UpcycleOptions, upcycle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/fmnist-bsconvu-kd.yaml")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--routing", default="normalized-sigmoid")
    parser.add_argument("--share-routing", action="store_true")
    parser.add_argument("--budget", help="replaces the recipe's decompose.budget")
    parser.add_argument("--skip-factorized", action="store_true",
                        help="fine-tune the upcycled student only")
    parser.add_argument("--expert-lr", type=float,
                        help="optimizer.expert_lr (default: the recipe's, else E with SGD)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    raw = yaml.safe_load(Path(args.recipe).read_text())
    if args.budget:
        raw["decompose"] = {**raw["decompose"], "budget": args.budget}
    if args.expert_lr:
        raw["optimizer"] = {**raw.get("optimizer", {}), "expert_lr": args.expert_lr}
    recipe = parse_recipe(raw, args.recipe)
    loaded = load_model(recipe.model, arch=recipe.arch)
    original = copy.deepcopy(loaded.model).eval()
    shape = list(recipe.input_shape)
    data = open_data(recipe, loaded)
    model, plan, metadata = decompose_step(loaded, recipe, shape)
    base = module_macs(original, shape)
    print(f"recipe {args.recipe}: {recipe.decompose.method} {recipe.decompose.budget}, "
          f"{recipe.epochs} epoch(s); torch threads {args.threads}\n", flush=True)
    print("| student | MACs | params | start | kept after fine-tuning | s / epoch |\n"
          "|---|---|---|---|---|---|")
    print(f"| original | {base.macs / 1e6:.2f}M | {base.params / 1e3:.1f}k | — | — | — |")
    variants = [("factorized", None),
                (f"factorized + CondConv ×{args.experts} on the pointwise convs",
                 UpcycleOptions(experts=args.experts, routing=args.routing,
                                share_routing=args.share_routing))]
    for label, options in variants[1:] if args.skip_factorized else variants:
        student_model, student_plan = copy.deepcopy(model), copy.deepcopy(plan)
        if options is not None:
            student_model, student_plan = upcycle(student_model, shape, options, student_plan)
        stats = module_macs(student_model, shape)
        student = LoadedModel(student_model, loaded.arch, student_plan, None, loaded.sha256,
                              None, {**metadata, "source_sha256": loaded.sha256})
        with tempfile.TemporaryDirectory() as tmp:
            _, result = finetune(student, recipe, Path(tmp) / "run", Path(tmp) / "out.pt",
                                 World(), teacher=original, data=data)
        per_epoch = sum(result.seconds_per_epoch) / max(len(result.seconds_per_epoch), 1)
        print(f"| {label} | {stats.macs / 1e6:.2f}M ({stats.macs / base.macs:.1%}) | "
              f"{stats.params / 1e3:.1f}k | {100 * result.initial_top1:.2f}% | "
              f"{100 * result.best_top1:.2f}% | {per_epoch:.0f} |", flush=True)


if __name__ == "__main__":
    main()

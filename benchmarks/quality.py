"""Accuracy of every bscompress method and of the peers at whole-model MAC budgets: zero-shot,
after BatchNorm re-estimation, after a fixed distillation budget.

    python benchmarks/quality.py --name resnet [--model bscompress/demo/fmnist_resnet.pt
        --arch bscompress.demo:fmnist_resnet] [--budgets 0.5 0.25 0.12]
        [--methods dsc bsconv-u ...] [--peers tltorch-tucker ...] [--ft-samples 6000]
        [--out bench-out/quality-resnet.json] [--onnx-dir bench-out/onnx/resnet]

For each method and budget (``--budget macs=F``; a method whose smallest ranks keep more
than F is run at those smallest ranks, and the row says so):

* **data-free**: the closed-form factors (zero-shot); then BatchNorm re-estimated on the
  calibration images; then, with ``--finetune-data-free``, the fine-tune below.
* **data-aware**: ``--calib`` (GSVD factors fitted to each layer's input statistics,
  allocation by output error, BatchNorm re-estimated: what ``decompose --calib`` returns);
  then the fine-tune.
* for ``auto`` also **data-aware, sequential** (``--calib --sequential``), then the
  fine-tune; and **data-aware, sequential, reconstructed**: that same model before its
  fine-tune, each block then trained to reproduce the original's block output on the
  calibration images (``--reconstruct``, ``--reconstruct-steps`` Adam steps a block), then
  the fine-tune.

Peers (``benchmarks/peers.py``): as built (zero-shot), after BatchNorm re-estimation on the
same calibration images (not for the randomly initialised BSConv baseline), then the same
fine-tune.

The fine-tune is the same for every row: ``recipes/fmnist-bsconvu-kd.yaml``'s optimisation
(SGD, lr 0.01, Nesterov, 10% warm-up then cosine, distillation from the original at T = 4,
α = 0.9, flip + 2-px crop, gradient clip 5, the CP/factor rates of that recipe), for one
epoch over the first ``--ft-samples`` training images. Accuracy is on the full test split,
computed by ONNX Runtime. The fine-tuned data-aware models and peers are exported to ONNX
with parity checks for ``benchmarks/latency.py``. Results go to ``--out`` as JSON, one row
at a time.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from markers import cpu  # noqa: E402
from peers import PEERS  # noqa: E402

from bscompress.compress.calibrate import collect_patch_covariances, reestimate_batchnorm  # noqa: E402
from bscompress.compress.decomposition import Budget, decompose  # noqa: E402
from bscompress.compress.reconstruct import ReconstructionOptions, reconstruct  # noqa: E402
from bscompress.core.errors import BadInput  # noqa: E402
from bscompress.core.recipe import parse_recipe  # noqa: E402
from bscompress.core.stats import module_macs  # noqa: E402
from bscompress.data import evaluate, open_data_spec  # noqa: E402
from bscompress.deploy.export import export_onnx  # noqa: E402
from bscompress.io.archive import load_model  # noqa: E402
from bscompress.methods import RankOptions, get_method  # noqa: E402
from bscompress.train.finetune import Trainer, World  # noqa: E402

SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")
METHODS = ["dsc", "bsconv-u", "bsconv-s", "tucker2", "cp", "cp4", "auto"]
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "fmnist-bsconvu-kd.yaml"


def finetune_recipe(train_spec: str, samples: int, seed: int):
    """The shipped recipe's optimisation on ``samples`` training images, one epoch."""
    import yaml

    raw = yaml.safe_load(RECIPE.read_text())
    keep = ("optimizer", "schedule", "distillation", "transforms", "grad_clip", "batch_size")
    recipe = {k: raw[k] for k in keep if k in raw}
    recipe.update(data={"train": train_spec, "limit_train": samples}, epochs=1, seed=seed,
                  bn_reestimate=False)
    return parse_recipe(recipe, str(RECIPE))


class Bench:
    """Shared state of one model's run: data, teacher, fine-tune recipe, output."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.start = args, time.perf_counter()
        self.shape = [int(s) for s in args.input_shape.split(",")]
        self.base = load_model(args.model, arch=args.arch).model.eval()
        test = open_data_spec(args.test, split="test")
        self.test = list(test.loader(500))
        self.calib = [x for x, _ in open_data_spec(args.calib, split="train",
                                                   limit=args.samples).loader(64)]
        self.recipe = finetune_recipe(args.train, args.ft_samples, args.seed)
        self.train = open_data_spec(args.train, split="train", limit=args.ft_samples)
        self.onnx_dir = Path(args.onnx_dir)
        self.onnx_dir.mkdir(parents=True, exist_ok=True)
        base = module_macs(self.base, self.shape)
        self.result = {
            "model": args.name, "spec": {"model": args.model, "arch": args.arch},
            "input_shape": self.shape, "test": args.test, "calibration": args.calib,
            "calibration_samples": args.samples, "ft_samples": len(self.train.dataset),
            "ft_steps": len(self.train.dataset) // self.recipe.batch_size,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": cpu(), "command": " ".join(sys.argv),
            "original": {"macs": base.macs, "params": base.params,
                         "top1": self.accuracy(self.base),
                         "onnx": self.export(self.base, "original")},
            "rows": [],
        }
        self.covariances = None

    def accuracy(self, model: nn.Module) -> float:
        """Top-1 on the test split, run by ONNX Runtime (2–3× faster than eager PyTorch on
        the depthwise stages here; TorchScript export, a fraction of a second), or by
        PyTorch where that export fails."""
        import onnxruntime as ort

        model = model.eval()
        buffer = io.BytesIO()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (torch.randn(self.shape),), buffer, dynamo=False,
                                  input_names=["input"], output_names=["logits"],
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                                  opset_version=18)
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            options.log_severity_level = 3  # errors only
            session = ort.InferenceSession(buffer.getvalue(), options,
                                           providers=["CPUExecutionProvider"])
        except Exception:
            model = copy.deepcopy(model).to(memory_format=torch.channels_last)
            return evaluate(model, self.test)["top1"]
        correct = sum(int((session.run(None, {"input": x.numpy()})[0].argmax(1)
                           == y.numpy()).sum()) for x, y in self.test)
        return correct / sum(len(y) for _, y in self.test)

    def finetune(self, model: nn.Module, plan) -> tuple[nn.Module, float]:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(model, plan, self.recipe, self.train.dataset, None, Path(tmp),
                              lambda *_: None, teacher=copy.deepcopy(self.base),
                              world=World(), collate=self.train._collate)
            result = trainer.fit()
        return trainer.model.eval(), sum(result.seconds_per_epoch)

    def export(self, model: nn.Module, name: str) -> str | None:
        path = self.onnx_dir / f"{name}.onnx"
        try:
            export_onnx(model, self.shape, path, force=True)
        except Exception as err:  # a peer's layers may not export: record how
            return f"failed: {str(err).splitlines()[0][:200]}"
        return str(path)

    def save(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1))
        tmp.replace(out)

    def row(self, **row) -> None:
        self.result["rows"].append(row)
        self.save()
        cells = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in row.items() if k not in ("onnx",))
        print(f"[{time.perf_counter() - self.start:.0f} s] {cells}", flush=True)

    def stats(self, model: nn.Module) -> dict:
        s = module_macs(model.eval(), self.shape)
        total = self.result["original"]["macs"]
        return {"macs": s.macs, "params": s.params, "macs_kept": s.macs / total}

    # -- bscompress ----------------------------------------------------------------------
    def decompose(self, method: str, fraction: float, aware: bool, sequential: bool):
        """``(model, plan, note)``: at the budget, or at the smallest ranks when the method
        cannot reach it."""
        common: dict = {}
        if aware:
            if self.covariances is None:  # the original's statistics, shared by every run
                handled = get_method("bsconv-u").handles
                self.covariances = collect_patch_covariances(
                    self.base, self.calib,
                    [n for n, m in self.base.named_modules() if handled(m)])
            common = dict(calibration=self.calib, covariances=self.covariances,
                          sequential=sequential)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model, plan = decompose(copy.deepcopy(self.base), method, self.shape,
                                        budget=Budget("macs", fraction), **common)
                return model, plan, ""
            except BadInput as err:
                if "smallest ranks" not in str(err) or method == "auto":
                    raise
            model, plan = decompose(copy.deepcopy(self.base), method, self.shape,
                                    RankOptions(rank=1, p=1 / 16), **common)
            return model, plan, "budget out of reach: smallest ranks"

    def ours(self, method: str, fraction: float) -> None:
        runs = [("data-free", False, False), ("data-aware", True, False)]
        if method == "auto":
            runs.append(("data-aware, sequential", True, True))
        for label, aware, sequential in runs:
            start = time.perf_counter()
            try:
                model, plan, note = self.decompose(method, fraction, aware, sequential)
            except Exception as err:
                self.row(family="bscompress", method=method, budget=fraction,
                         calibration=label, error=str(err).splitlines()[0])
                continue
            seconds = time.perf_counter() - start
            key = f"{method}{'+seq' if sequential else ''}@{fraction}"
            rebuild = sequential and self.args.reconstruct_steps > 0
            closed_form = copy.deepcopy(model) if rebuild else None  # the fine-tune trains model
            self.evaluate_ours(model, plan, method, fraction, label, key, aware, seconds,
                               note)
            if rebuild:
                start = time.perf_counter()
                reconstruct(closed_form, self.base, self.calib,
                            [entry.name for entry in plan.replaced()],
                            ReconstructionOptions(steps=self.args.reconstruct_steps))
                self.evaluate_ours(closed_form, plan, method, fraction,
                                   f"{label}, reconstructed", key.replace("@", "+rec@"),
                                   aware, seconds + time.perf_counter() - start, note)

    def evaluate_ours(self, model: nn.Module, plan, method: str, fraction: float, label: str,
                      key: str, aware: bool, seconds: float, note: str) -> None:
        """The row of one bscompress model: zero-shot, BatchNorm (data-free), fine-tuned."""
        zero = self.accuracy(model)
        bn = kd = onnx = None
        ft_seconds = 0.0
        if not aware:
            reestimate_batchnorm(model, self.calib)
            bn = self.accuracy(model)
        if aware or self.args.finetune_data_free:
            model, ft_seconds = self.finetune(model, plan)
            kd = self.accuracy(model)
        if aware:
            onnx = self.export(model, key.replace("@", "-"))
        self.row(family="bscompress", method=method, budget=fraction, calibration=label,
                 key=key, **self.stats(model), zero_shot=zero, bn=bn, kd=kd,
                 decompose_s=seconds, finetune_s=ft_seconds, note=note, onnx=onnx)

    # -- peers ---------------------------------------------------------------------------
    def peer(self, name: str, fraction: float) -> None:
        start = time.perf_counter()
        try:
            model, note = PEERS[name](self.base, fraction, self.shape)
        except Exception as err:
            self.row(family="peer", method=name, budget=fraction, calibration="data-free",
                     error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
            return
        seconds = time.perf_counter() - start
        zero = self.accuracy(model)
        bn = None
        if name != "bsconv-scratch":
            reestimate_batchnorm(model, self.calib)
            bn = self.accuracy(model)
        try:
            tuned, ft_seconds = self.finetune(model, None)
            kd = self.accuracy(tuned)
        except Exception as err:
            self.row(family="peer", method=name, budget=fraction, calibration="data-free",
                     **self.stats(model), zero_shot=zero, bn=bn, note=note,
                     error=f"fine-tuning: {type(err).__name__}: {str(err)[:200]}")
            return
        key = f"{name}@{fraction}"
        onnx = self.export(tuned, key.replace("@", "-"))
        self.row(family="peer", method=name, budget=fraction, calibration="data-free",
                 key=key, **self.stats(tuned), zero_shot=zero, bn=bn, kd=kd,
                 decompose_s=seconds, finetune_s=ft_seconds, note=note, onnx=onnx)


def main() -> None:
    default_data = (f"fashion-mnist:{SYSTEM_FMNIST}" if SYSTEM_FMNIST.is_dir() else "demo")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="the model's name in the tables")
    parser.add_argument("--model", default="bscompress/demo/fmnist_resnet.pt")
    parser.add_argument("--arch", default="bscompress.demo:fmnist_resnet")
    parser.add_argument("--input-shape", default="1,1,28,28")
    parser.add_argument("--test", default=default_data)
    parser.add_argument("--train", default=default_data)
    parser.add_argument("--calib", default="demo")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--budgets", nargs="*", type=float, default=[0.5, 0.25, 0.12])
    parser.add_argument("--methods", nargs="*", default=METHODS)
    parser.add_argument("--peers", nargs="*", default=list(PEERS))
    parser.add_argument("--ft-samples", type=int, default=2048)
    parser.add_argument("--reconstruct-steps", type=int, default=500,
                        help="Adam steps a block of the reconstructed auto row (0: no row)")
    parser.add_argument("--finetune-data-free", action="store_true",
                        help="fine-tune the data-free rows too")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--onnx-dir", default=None)
    args = parser.parse_args()
    args.out = args.out or f"bench-out/quality-{args.name}.json"
    args.onnx_dir = args.onnx_dir or f"bench-out/onnx/{args.name}"
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    bench = Bench(args)
    print(f"{args.name}: original {100 * bench.result['original']['top1']:.2f}% "
          f"({time.perf_counter() - start:.0f} s to load, evaluate and export)", flush=True)
    for fraction in args.budgets:
        for method in args.methods:
            bench.ours(method, fraction)
        for peer in args.peers:
            bench.peer(peer, fraction)
    bench.result["seconds"] = time.perf_counter() - start
    bench.save()


if __name__ == "__main__":
    main()

"""Run the benchmarks end to end and write the report: ``make bench`` / ``make bench-quick``.

    python benchmarks/run.py [--quick] [--out bench-out] [--docs docs/benchmarks.md]
        [--ft-samples N]

From the repository root. ``OUT/full`` (or ``OUT/quick``) is emptied first.

Stages, each timed into ``OUT/seconds.json``:

0. ``train`` (full run, when missing): the models too large to ship (``TRAINED``: the
   torchvision ResNet-18 on Fashion-MNIST) into ``bench-out/models/``.
1. ``quality``: ``benchmarks/quality.py`` for the demo ResNet, the VGG-style net and the
   torchvision ResNet-18, split by budget over two workers of one thread each (the two cores
   of the reference machine).
2. ``latency``: ``benchmarks/latency.py`` on every exported model, alone on the machine.
3. ``speed``: ``benchmarks/decompose_speed.py`` on torchvision's resnet50; then (full run
   only) ``scale``: ``benchmarks/scale.py``, a calibrated ``auto`` on resnet50 at 224² (512
   photo crops, one-shot and sequential), time per stage and peak memory; and ``guard``:
   ``benchmarks/guard_latency.py``, ResNet-18 at 224² under ``auto`` at 50% and 25% of the
   MACs with and without the latency guard, timed in ONNX Runtime, eager and torch.compile;
   and ``guard-accuracy``: ``benchmarks/guard_accuracy.py``, what the guard costs in top-1 on
   the trained Fashion-MNIST networks (calibrated ``auto``, with and without it); and
   ``eager-layout``: ``benchmarks/eager_layout.py``, eager PyTorch in NCHW and channels-last
   with the guard timing each layout (ResNet-18 and MobileNetV2 at 224²); and
   ``large-kernels``: ``benchmarks/large_kernels.py``, the calibration cost of kernels from
   3×3 to 15×15.
4. ``studies`` (full run only): ``benchmarks/studies.py``, the data-aware studies (a
   1×1-heavy network, narrow calibration sets).
5. ``report``: ``benchmarks/report.py`` writes the Markdown and the plots.

``--quick`` (a few minutes) runs the ResNet alone at 25% of the MACs with three methods, every
peer, a 1024-image fine-tune, fewer latency runs and three decomposition methods, and writes
``OUT/quick/benchmarks.md`` with its plots beside it instead of ``docs/``. The full run reads
the real Fashion-MNIST from Debian's ``dataset-fashion-mnist``; without it every script falls
back to the bundled 2000-image test and 1024-image training subsets and says so in the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = {
    "resnet": ["--model", "bscompress/demo/fmnist_resnet.pt",
               "--arch", "bscompress.demo:fmnist_resnet"],
    "vgg": ["--model", "benchmarks/models/vgg_fmnist.pt",
            "--arch", "benchmarks/models/__init__.py:vgg_fmnist"],
    "resnet18": ["--model", "bench-out/models/resnet18_fmnist.pt",
                 "--arch", "benchmarks/models/__init__.py:resnet18_fmnist"],
    # 1×1-heavy (93% of its MACs): only the low-rank pair applies to those convs, and its
    # stem and depthwise convs are not eligible, so the other methods would replace nothing
    "mobilenet": ["--model", "benchmarks/models/mobilenet_fmnist.pt",
                  "--arch", "benchmarks/models/__init__.py:mobilenet_fmnist",
                  "--methods", "svd", "auto"],
}
#: models too large to ship (45 MB): trained by the full run when missing, by the command in
#: their docstring (``benchmarks/models/__init__.py``; about 21 minutes on one core)
TRAINED = {
    "resnet18": ["--arch", "benchmarks.models:resnet18_fmnist", "--epochs", "8", "--seed", "0",
                 "--threads", "1", "--no-fill-uninitialized", "--eval-every", "2",
                 "--out", "bench-out/models/resnet18_fmnist.pt"],
}


def script(name: str, *args: str) -> list[str]:
    return [sys.executable, os.path.relpath(HERE / name), *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--docs", default=None, help="the Markdown report (default: "
                        "docs/benchmarks.md, or OUT/quick/benchmarks.md with --quick)")
    parser.add_argument("--ft-samples", type=int, default=None)
    args = parser.parse_args()
    out = Path(args.out) / ("quick" if args.quick else "full")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    docs = Path(args.docs or (out / "benchmarks.md" if args.quick else "docs/benchmarks.md"))
    img = docs.parent / "img"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if args.quick:
        workers_of = [[("resnet", ["0.25"])]]
        quality = ["--methods", "bsconv-u", "cp4", "auto",
                   "--ft-samples", str(args.ft_samples or 1024)]
        latency = ["--runs", "50"]
        speed = ["--methods", "bsconv-u", "dsc", "tucker2"]
    else:
        workers_of = [[("resnet", ["0.5", "0.25"]), ("vgg", ["0.12"]), ("resnet18", ["0.5"]),
                       ("mobilenet", ["0.75"])],
                      [("vgg", ["0.5", "0.25"]), ("resnet", ["0.12"]), ("resnet18", ["0.25"]),
                       ("mobilenet", ["0.5"])]]
        quality = ["--ft-samples", str(args.ft_samples or 2048)]
        latency = ["--runs", "200"]
        speed = ["--methods", "bsconv-u", "bsconv-s", "dsc", "tucker2", "cp", "cp4", "auto"]
    seconds: dict[str, float] = {}

    def stage(name: str, workers: list[list[tuple[list[str], Path]]]) -> None:
        """Run each worker's commands one after the other, the workers side by side."""
        start = time.perf_counter()
        failed: list[str] = []

        def work(jobs: list[tuple[list[str], Path]]) -> None:
            for command, log in jobs:
                with log.open("w") as handle:
                    if subprocess.run(command, env=env, stdout=handle,
                                      stderr=subprocess.STDOUT).returncode:
                        failed.append(str(log))
                        return

        threads = [threading.Thread(target=work, args=(jobs,)) for jobs in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds[name] = time.perf_counter() - start
        (out / "seconds.json").write_text(json.dumps(seconds, indent=1))
        print(f"{name}: {seconds[name] / 60:.1f} min", flush=True)
        if failed:
            sys.exit(f"benchmark stage {name} failed: see {', '.join(failed)}")

    def quality_job(name: str, budgets: list[str]) -> tuple[list[str], Path]:
        tag = f"{name}-{'-'.join(budgets)}"
        return (script("quality.py", "--name", name, *MODELS[name], "--budgets", *budgets,
                       *quality, "--threads", "1", "--out", str(out / f"quality-{tag}.json"),
                       "--onnx-dir", str(out / "onnx" / name)), out / f"quality-{tag}.log")

    untrained = [name for name in TRAINED if not args.quick
                 and not Path(MODELS[name][1]).is_file()]
    if untrained:
        Path(MODELS[untrained[0]][1]).parent.mkdir(parents=True, exist_ok=True)
        stage("train", [[(script("train_fmnist.py", *TRAINED[name]), out / f"train-{name}.log")
                         for name in untrained]])
    # two workers of about equal work (the VGG net costs about 1.3× the ResNet per row)
    stage("quality", [[quality_job(*job) for job in jobs] for jobs in workers_of])
    stage("latency", [[(script("latency.py", "--results", str(out), *latency),
                        out / "latency.log")]])
    stage("speed", [[(script("decompose_speed.py", "--threads", "2", *speed,
                              "--out", str(out / "speed.json")), out / "speed.log")]])
    if not args.quick:
        stage("scale", [[(script("scale.py", "--samples", "512", "--threads", "2", "--configs",
                                 "one-shot", "sequential", "--out", str(out / "scale.json")),
                          out / "scale.log")]])
        # every method and auto with the command's defaults (issue 22's figures); the
        # unguarded comparison is guard_latency.py's default --variants
        stage("guard", [[(script("guard_latency.py", "--models", "resnet18", "--budgets", "0.5",
                                 "0.25", "--methods", "auto", "tucker2", "cp", "cp4", "bsconv-u",
                                 "bsconv-s", "dsc", "--variants", "guard", "--threads", "1",
                                 "--out", str(out / "guard.json")), out / "guard.log")]])
        stage("guard-accuracy", [[(script("guard_accuracy.py",
                                          "--out", str(out / "guard-accuracy.json")),
                                   out / "guard-accuracy.log")]])
        stage("eager-layout", [[(script("eager_layout.py", "--threads", "1",
                                        "--out", str(out / "eager-layout.json")),
                                 out / "eager-layout.log")]])
        stage("forms", [[(script("block_forms.py", "--threads", "1",
                                 "--cache", str(out / "forms-latency.json"),
                                 "--out", str(out / "forms.json")), out / "forms.log")]])
        stage("large-kernels", [[(script("large_kernels.py",
                                         "--out", str(out / "large-kernels.json")),
                                  out / "large-kernels.log")]])
        stage("studies", [[(script("studies.py", "--out", str(out / "studies.md")),
                            out / "studies.log")]])
    command = "make bench-quick" if args.quick else "make bench"
    # the discussion reads the full run's figures: not for the quick one
    discussion = [] if args.quick else ["--discussion", str(HERE / "discussion.md")]
    subprocess.run(script("report.py", "--results", str(out), "--out", str(docs), "--img",
                          str(img), "--command", command, *discussion), check=True, env=env)


if __name__ == "__main__":
    main()

"""Wall time per stage and peak memory of a calibrated ``auto`` run on torchvision ResNet-50
at 224² (issue 20's scale figures).

    python benchmarks/scale.py [--samples 512] [--threads 2] [--device cpu|cuda]
        [--configs sequential reconstruct] [--out bench-out/scale.json]

What ``bscompress decompose resnet50.pt --arch torchvision.models:resnet50 -m auto --budget
macs=0.5 --calib imagefolder:DIR --calib-samples N --sequential`` (and with
``--reconstruct``) does, run through the same calls in a fresh process per configuration:
the calibration images are 224² crops of the photos bundled with scikit-image and
scikit-learn (``imagenet_agreement.crops``), written as an image folder and read back by
``bscompress.data`` like the CLI reads ``imagefolder:DIR``. The weights are torchvision's
random initialisation (seed 0; no hub download here): time and memory depend on the shapes,
not the values. Peak memory is the child process's maximum resident set size (CPU) or
``torch.cuda.max_memory_allocated`` (CUDA). Prints a Markdown table; ``--out`` writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

#: configuration → decompose keyword arguments beyond the budget and the calibration
CONFIGS = {
    "one-shot": {},
    "sequential": {"sequential": True},
    "reconstruct": {"sequential": True, "reconstruct": True},
}


def write_folder(root: Path, samples: int, seed: int = 0) -> None:
    """``samples`` 224² PNG crops of the bundled photos, one class folder per photo, the
    photos taken in turn."""
    from imagenet_agreement import CALIBRATION, SCORED, crops
    from PIL import Image

    names = CALIBRATION + SCORED
    per = -(-samples // len(names))
    images = crops(names, per, seed)  # [len(names)·per, 3, 224, 224] in [-1, 1]
    for i in range(samples):
        photo, k = i % len(names), i // len(names)
        image = images[photo * per + k]
        folder = root / names[photo]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = ((image * 0.5 + 0.5).clamp(0, 1) * 255).round().byte().permute(1, 2, 0)
        Image.fromarray(pixels.numpy()).save(folder / f"{i:04d}.png")


def child(args: argparse.Namespace) -> dict:
    """One configuration, timed stage by stage (run in its own process)."""
    import torchvision

    from bscompress.data import open_data_spec
    from bscompress.decomposition import Budget, decompose
    from bscompress.methods import RankOptions
    from bscompress.reconstruct import ReconstructionOptions

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval().to(args.device)
    start = time.perf_counter()
    # as the CLI: ImageNet normalisation, batches of 64
    source = open_data_spec(f"imagefolder:{args.folder}", split="train",
                            mean="0.485,0.456,0.406", std="0.229,0.224,0.225",
                            limit=args.samples)
    batches = [x.to(args.device) for x, _ in source.loader(64)]
    stages = {"loading the calibration images": time.perf_counter() - start}
    current = [None, time.perf_counter()]

    def progress(step) -> None:
        now = time.perf_counter()
        if current[0] is not None:
            stages[current[0]] = stages.get(current[0], 0.0) + now - current[1]
        current[0], current[1] = step.stage, now

    options = dict(CONFIGS[args.config])
    rebuild = ReconstructionOptions() if options.pop("reconstruct", False) else None
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _, plan = decompose(model, "auto", (1, 3, 224, 224), RankOptions(),
                        budget=Budget("macs", 0.5), calibration=batches, progress=progress,
                        reconstruction=rebuild, **options)
    now = time.perf_counter()
    if current[0] is not None:
        stages[current[0]] = stages.get(current[0], 0.0) + now - current[1]
    peak = (torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"config": args.config, "seconds": now - start, "stages": stages,
            "peak_mb": peak, "replaced": len(plan.replaced()),
            "macs_kept": plan.meta["macs_after"] / plan.meta["macs_before"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", nargs="*", default=["sequential", "reconstruct"],
                        choices=list(CONFIGS))
    parser.add_argument("--out", default=None)
    parser.add_argument("--config", help=argparse.SUPPRESS)  # the child's configuration
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.config:
        print(json.dumps(child(args)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(Path(tmp), args.samples)
        for config in args.configs:
            command = [sys.executable, __file__, "--config", config, "--folder", tmp,
                       "--samples", str(args.samples), "--threads", str(args.threads),
                       "--device", args.device]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode:
                sys.exit(f"{config} failed:\n{result.stderr[-3000:]}")
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    device = (torch.cuda.get_device_name() if args.device == "cuda"
              else f"{platform.processor() or platform.machine()}, {args.threads} threads")
    argv = " ".join(sys.argv[1:])
    lines = [f"`python benchmarks/scale.py {argv}`".replace(" `", "`"), "",
             f"torchvision resnet50 at 224², `-m auto --budget macs=0.5 --calib "
             f"imagefolder:… --calib-samples {args.samples}`, on {device}:", "",
             "| configuration | total (s) | per stage (s) | peak memory (MB) | MACs kept |",
             "|---|---|---|---|---|"]
    for row in rows:
        stages = "; ".join(f"{k} {v:.0f}" for k, v in row["stages"].items())
        lines.append(f"| {row['config']} | {row['seconds']:.0f} | {stages} | "
                     f"{row['peak_mb']:.0f} | {row['macs_kept']:.3f} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"command": f"benchmarks/scale.py {argv}",
                                              "device": device, "rows": rows,
                                              "markdown": "\n".join(lines)}, indent=1))


if __name__ == "__main__":
    main()

"""Train the bundled Fashion-MNIST demo model on CPU, deterministically.

Example (the command that produced ``bscompress/demo/fmnist_resnet.pt``)::

    python benchmarks/train_fmnist.py --arch bscompress.demo:fmnist_resnet --epochs 15 \\
        --seed 0 --out bscompress/demo/fmnist_resnet.pt \\
        --subset-out bscompress/demo/data --subset-size 2000

The 1×1-heavy MobileNetV2-style benchmark model ``benchmarks/models/mobilenet_fmnist.pt``
(6 epochs of about 210 s each on one core shared with other work, 1300 s in all; 91.98 %
top-1 on the 10k test set)::

    OMP_NUM_THREADS=1 python benchmarks/train_fmnist.py \\
        --arch benchmarks.models:mobilenet_fmnist --epochs 6 --seed 0 --threads 1 \\
        --no-fill-uninitialized --eval-every 3 --out benchmarks/models/mobilenet_fmnist.pt

Trains on the 60k official training images only; the official 10k test split is used for the
per-epoch accuracy report and is never trained on. ``--subset-out`` writes the first
``--subset-size`` test images/labels as IDX ``.gz`` files readable by
``bscompress.data.load_fashion_mnist(DIR, "test")``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads
# slow training down several-fold. Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from bscompress.data import (  # noqa: E402
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    evaluate,
    load_fashion_mnist,
    make_loader,
    normalize_uint8,
    write_idx,
)


def resolve_arch(spec: str) -> Callable[..., nn.Module]:
    """Return the callable named by ``"package.module:callable"``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"--arch must look like 'package.module:callable', got {spec!r}")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop with ``pad``-pixel zero padding plus random horizontal flip, batched.

    Args:
        images: ``uint8`` ``[B, H, W]`` batch.
        generator: seeded CPU generator that draws the crop offsets and flips.
        pad: padding in pixels on each side.

    Returns:
        ``uint8`` ``[B, H, W]`` augmented batch.
    """
    b, h, w = images.shape
    padded = nn.functional.pad(images, (pad, pad, pad, pad))  # [B, H + 2p, W + 2p], zeros
    oy = torch.randint(0, 2 * pad + 1, (b, 1, 1), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b, 1, 1), generator=generator)
    flip = torch.rand(b, 1, 1, generator=generator) < 0.5
    rows = oy + torch.arange(h).view(1, h, 1)  # [B, H, 1]
    cols = torch.arange(w).view(1, 1, w)
    cols = torch.where(flip, w - 1 - cols, cols) + ox  # [B, 1, W]
    return padded[torch.arange(b).view(b, 1, 1), rows, cols]


def write_subset(out_dir: Path, images: torch.Tensor, labels: torch.Tensor, n: int,
                 prefix: str = "t10k") -> None:
    """Write the first ``n`` images ``[n, 28, 28]`` and labels ``[n]`` of a split as IDX
    ``.gz`` (``prefix`` t10k: test, train: training split)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_idx(out_dir / f"{prefix}-images-idx3-ubyte.gz", images[:n].contiguous())
    write_idx(out_dir / f"{prefix}-labels-idx1-ubyte.gz", labels[:n].to(torch.uint8).contiguous())
    print(f"wrote the first {n} official {prefix} images/labels to {out_dir}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="bscompress.demo:fmnist_resnet", help="module:callable")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="where to save the state_dict")
    p.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--arch-kwargs", default="{}", help="JSON keyword arguments for --arch")
    p.add_argument(
        "--device",
        default="cpu",
        help="training device; the bundled checkpoint was trained on cpu (cuda needs "
        "CUBLAS_WORKSPACE_CONFIG=:4096:8 for determinism)",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak OneCycle learning rate")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--subset-out", type=Path, default=None, help="dir for the test subset")
    p.add_argument("--subset-size", type=int, default=2000)
    p.add_argument("--train-subset-size", type=int, default=1024,
                   help="training images also written to --subset-out (for calibration)")
    p.add_argument(
        "--fill-uninitialized",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="deterministic mode's NaN-filling of fresh tensors (torch's default); "
        "--no-fill-uninitialized trains the same weights 10-20%% faster",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=1,
        help="report test accuracy every N epochs (the last epoch always); the weights do "
        "not depend on it",
    )
    p.add_argument(
        "--max-batches",
        type=int,
        default=0,
        help="stop each epoch after this many batches (throughput checks only; 0 = all)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = args.fill_uninitialized

    train_x, train_y = load_fashion_mnist(args.data, "train")  # [60000, 28, 28] uint8, [60000]
    test_x, test_y = load_fashion_mnist(args.data, "test")  # [10000, 28, 28] uint8, [10000]
    if args.subset_out is not None:
        write_subset(args.subset_out, test_x, test_y, args.subset_size)
        write_subset(args.subset_out, train_x, train_y, args.train_subset_size, "train")
    test_loader = make_loader(test_x, test_y, 500, FASHION_MNIST_MEAN, FASHION_MNIST_STD)

    device = torch.device(args.device)
    model = resolve_arch(args.arch)(**json.loads(args.arch_kwargs))
    model = model.to(device, memory_format=torch.channels_last)  # measurably faster on CPU
    n_params = sum(p.numel() for p in model.parameters())
    print(f"arch {args.arch}: {n_params} parameters", flush=True)

    n = train_x.shape[0]
    batches = math.ceil(n / args.batch_size)
    if args.max_batches:
        batches = min(batches, args.max_batches)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=args.lr,
        momentum=0.9,
        nesterov=True,
        weight_decay=args.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=batches, pct_start=0.2
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    gen = torch.Generator().manual_seed(args.seed)  # shuffling and augmentation

    total_start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=gen)
        loss_sum = 0.0
        seen = 0
        for i in range(batches):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            xb = augment(train_x[idx], gen)
            x = normalize_uint8(xb, FASHION_MNIST_MEAN, FASHION_MNIST_STD)  # [B, 1, 28, 28]
            x = x.to(device).contiguous(memory_format=torch.channels_last)
            y = train_y[idx].to(device)
            loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * y.shape[0]
            seen += y.shape[0]
        train_s = time.perf_counter() - start
        evaluated = epoch == args.epochs or epoch % max(args.eval_every, 1) == 0
        if evaluated:
            metrics = evaluate(model, test_loader, device)
        top1 = f"{metrics['top1']:.4f}" if evaluated else "-"
        print(
            f"epoch {epoch:2d}/{args.epochs}  train_loss {loss_sum / seen:.4f}  "
            f"test_top1 {top1}  train_s {train_s:.1f}  "
            f"epoch_s {time.perf_counter() - start:.1f}",
            flush=True,
        )

    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    print(
        f"final test_top1 {metrics['top1']:.4f} top5 {metrics['top5']:.4f} (n={metrics['n']}); "
        f"total {time.perf_counter() - total_start:.0f}s; saved {args.out}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

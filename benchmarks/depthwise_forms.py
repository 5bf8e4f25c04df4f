"""Latency of the grouped-conv stages of BSConv-U (blueprint, N·r → N, groups N) and DSC
(channel multiplier, M → M·r, groups M) as plain grouped convs and in the depthwise forms the
blocks use (``bscompress.layers.base``), in ONNX Runtime (CPU) at batch 1.

    python benchmarks/depthwise_forms.py [--threads 1] [--runs 50]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from bscompress.deploy.bench import Latency
from bscompress.layers.base import BlueprintConv2d, MultiplierConv2d

CASES = [(16, 4, 28), (64, 3, 7), (32, 2, 14), (256, 3, 14)]


def ort_latency(module: nn.Module, x: torch.Tensor, threads: int, runs: int) -> float:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "m.onnx"
        torch.onnx.export(module.eval(), (x,), dynamo=True, verbose=False).save(str(path))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}
        return Latency.measure(lambda: session.run(None, feed), 10, runs).p50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    print("| stage | grouped conv | depthwise form |\n|---|---|---|")
    for n, r, size in CASES:
        fast = BlueprintConv2d(n * r, n, 3, padding=1, groups=n)
        slow = nn.Conv2d(n * r, n, 3, padding=1, groups=n)
        slow.load_state_dict(fast.state_dict())
        x = torch.randn(1, n * r, size, size)
        assert torch.allclose(fast(x), slow(x), atol=1e-5)
        print(f"| blueprint N={n}, r={r}, {size}×{size} | "
              f"{ort_latency(slow, x, args.threads, args.runs):.3f} ms | "
              f"{ort_latency(fast, x, args.threads, args.runs):.3f} ms |")
    for m, r, size in CASES:
        fast = MultiplierConv2d(m, m * r, 3, padding=1, groups=m, bias=False)
        slow = nn.Conv2d(m, m * r, 3, padding=1, groups=m, bias=False)
        slow.load_state_dict(fast.state_dict())
        x = torch.randn(1, m, size, size)
        assert torch.allclose(fast(x), slow(x), atol=1e-5)
        print(f"| multiplier M={m}, r={r}, {size}×{size} | "
              f"{ort_latency(slow, x, args.threads, args.runs):.3f} ms | "
              f"{ort_latency(fast, x, args.threads, args.runs):.3f} ms |")


if __name__ == "__main__":
    main()

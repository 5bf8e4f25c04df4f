"""ONNX Runtime latency, batch 1, of every model ``benchmarks/quality.py`` exported.

    python benchmarks/latency.py [--results bench-out] [--threads 1 2] [--runs 200]
        [--out bench-out/latency.json]

Reads ``quality-*.json`` in ``--results``; times the original and each exported compressed
model (the data-aware fine-tuned ones and the peers) in ONNX Runtime's CPU provider at
batch 1 with each ``--threads`` setting: p50 and p90 of ``--runs`` calls after 20 untimed
ones, the models interleaved round by round so that a slow spell of the machine hits them
all alike. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def merged_results(folder: Path) -> list[dict]:
    """The ``quality-*.json`` of ``folder``, one per model (runs of one model over several
    budgets, as ``benchmarks/run.py`` splits them, have their rows joined)."""
    models: dict[str, dict] = {}
    for file in sorted(folder.glob("quality-*.json")):
        result = json.loads(file.read_text())
        result["commands"] = [result["command"]]
        if result["model"] in models:
            models[result["model"]]["rows"] += result["rows"]
            models[result["model"]]["commands"].append(result["command"])
            models[result["model"]]["seconds"] = (models[result["model"]].get("seconds", 0)
                                                  + result.get("seconds", 0))
        else:
            models[result["model"]] = result
    return list(models.values())


def session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def time_models(paths: dict[str, str], shape: list[int], threads: int, runs: int,
                rounds: int = 5) -> dict[str, dict[str, float]]:
    """``{key: {"p50": ms, "p90": ms}}`` of every ONNX file, ``runs`` calls each, taken in
    ``rounds`` interleaved slices."""
    feed_x = np.random.default_rng(0).standard_normal([1, *shape[1:]]).astype(np.float32)
    sessions = {key: session(path, threads) for key, path in paths.items()}
    feeds = {key: {s.get_inputs()[0].name: feed_x} for key, s in sessions.items()}
    times: dict[str, list[float]] = {key: [] for key in sessions}
    for key, s in sessions.items():
        for _ in range(20):
            s.run(None, feeds[key])
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for key, s in sessions.items():
            for _ in range(per_round):
                start = time.perf_counter()
                s.run(None, feeds[key])
                times[key].append((time.perf_counter() - start) * 1e3)
    return {key: {"p50": float(np.percentile(t, 50)), "p90": float(np.percentile(t, 90))}
            for key, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="bench-out")
    parser.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import onnxruntime as ort

    out = {"onnxruntime": ort.__version__, "runs": args.runs, "threads": args.threads,
           "command": " ".join(sys.argv), "models": {}}
    for result in merged_results(Path(args.results)):
        paths = {}
        if result["original"].get("onnx", "").endswith(".onnx"):
            paths["original"] = result["original"]["onnx"]
        for row in result["rows"]:
            onnx = row.get("onnx") or ""
            if onnx.endswith(".onnx") and Path(onnx).is_file():
                paths[row["key"]] = onnx
        timings = {key: {} for key in paths}
        for threads in args.threads:
            for key, value in time_models(paths, result["input_shape"], threads,
                                          args.runs).items():
                timings[key][str(threads)] = value
        out["models"][result["model"]] = timings
        print(f"{result['model']}: {len(paths)} models timed", flush=True)
    path = Path(args.out or Path(args.results) / "latency.json")
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""The zoo matrix: torchvision and timm classification models through the bscompress CLI.

    python benchmarks/zoo.py [--models PATTERN ...] [--all] [--methods M,M] [--jobs N]
        [--size S] [--step-timeout S] [--model-timeout S] [--out docs/zoo.md] [--work DIR]

``make zoo`` runs it with the defaults and writes docs/zoo.md. For each model, with random
weights (seeded by bscompress) at the smallest square input of ``--size``, 96, 128, 160, 224,
256 and 299 pixels that the model takes, every step is a real ``bscompress`` command with its
real exit code:

1. ``inspect MODEL --input-shape 1,3,S,S``;
2. ``decompose MODEL -m METHOD`` with the default ranks, for every method of ``--methods``;
3. ``decompose MODEL -m auto --budget macs=0.5 --calib imagefolder:DIR`` on 16 crops of the
   photographs matplotlib ships (``auto`` column); where the latency guard refuses the budget
   (its blocks save too little time at the zoo's small inputs), again with
   ``--no-latency-guard``, and the cell shows both;
4. ``reload``: ``evaluate ARCHIVE --data imagefolder:DIR`` on every archive step 2 and 3 wrote;
5. ``export``: ``export ARCHIVE`` (onnx.checker, ONNX Runtime parity on random inputs) on every
   archive.

MODEL is ``torchvision:NAME`` or ``timm:NAME`` (built-in specs: random weights, nothing
downloaded), or any arch spec given to ``--models``. The commands run in-process (typer's
CliRunner, which returns the exit code the console script would) in one worker process per
model, so a model that crashes or hangs stops only itself; a step over ``--step-timeout``
is interrupted and marked TIMEOUT, a worker over ``--model-timeout`` is killed.

A cell is ``pass``, ``exit 2:`` and the first sentence of the refusal (bad input: the tool
declines the model or the layer, with a reason), ``FAIL`` (exit 1: a failed check, e.g. ONNX
parity), ``INTERNAL`` (exit 3, or an exception that escaped the CLI: a bug; the traceback of
a rerun with ``--debug`` goes to WORK/tracebacks/ and the Failures section), or ``TIMEOUT``;
each with its seconds. ``—``: not run because the step it needs did not pass.

``--models`` takes shell-style patterns over ``torchvision:NAME`` and ``timm:NAME`` (a
pattern without a prefix matches either family, e.g. ``'resnet*'``), over every torchvision
classification model and the timm list below whatever the default set; any other arch spec
(``path/to/file.py:NAME``, or ``timm:NAME`` of any model timm builds) runs as given. Without
``--models``: the default set (11 small torchvision models of distinct families and the timm
list, 30–45 minutes on 2 cores with ``--jobs 2``); ``--families``: the smallest model of
every torchvision family instead; ``--all``: every torchvision classification model (many
hours). ``--render WORK/zoo.json`` writes the table again from a finished run; ``--update
WORK/zoo.json`` reruns its models that did not pass every step (or the ``--models`` named)
and writes the table with their new rows.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import fnmatch
import json
import os
import platform
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from markers import cpu  # noqa: E402

METHODS = ["bsconv-u", "bsconv-s", "dsc", "tucker2", "cp", "cp4", "svd"]
AUTO = "auto"
SIZES = (96, 128, 160, 224, 256, 299)  # tried after --size, in this order
BUDGET = "macs=0.5"
#: the step that reruns ``auto`` with ``--no-latency-guard`` where the guard refused the
#: budget (its refusal names the guard)
UNGUARDED = "auto-unguarded"
GUARD_REFUSAL = "the latency guard left out"
CALIB_IMAGES = 16
#: iterations cut from the defaults (50 ALS, 5 HOOI) to keep the matrix within the hour: the
#: zoo tests support and numerics, not the quality of the fit
METHOD_OPTIONS = {"tucker2": ["--tucker-iters", "1"], "cp": ["--cp-iters", "10"],
                  "cp4": ["--cp-iters", "10"]}

#: the default set of torchvision models (``make zoo``, under an hour on 2 cores with the timm
#: list): small models of the families with distinct blocks (residual, inverted residual with
#: and without squeeze-excitation, channel shuffle, fire modules, grouped convs, compound
#: scaling, inception branches, dense concatenation)
TORCHVISION_DEFAULT = [
    "resnet18", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5", "shufflenet_v2_x0_5",
    "squeezenet1_1", "regnet_x_400mf", "regnet_y_400mf", "efficientnet_b0", "googlenet",
    "densenet121",
]

#: the smallest of each torchvision family (``--families``: several hours on 2 cores)
TORCHVISION_FAMILIES = [
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s",
    "googlenet", "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2",
    "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf", "resnet18", "resnet50",
    "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1", "swin_t", "vgg11_bn", "vit_b_32",
    "wide_resnet50_2",
]

#: timm families, small variants: a ResNet with a deep stem, EfficientNet and MobileNetV3 with
#: and without TensorFlow "same" padding (Conv2dSame), RegNet X/Y, ConvNeXt (7×7 depthwise,
#: LayerNorm, Linear MLP), GhostNet, LCNet, MixNet (MixedConv2d), MobileViT, and the
#: weight-standardised convs (``core.computed_weight``): NF-RegNet (``ScaledStdConv2d``, grouped)
#: and BiT's ResNetV2 (``StdConv2d``, pre-activation)
TIMM_MODELS = [
    "resnet10t", "efficientnet_b0", "tf_efficientnet_b0", "mobilenetv3_small_050",
    "tf_mobilenetv3_small_minimal_100", "regnetx_002", "regnety_002", "convnext_atto",
    "ghostnet_100", "lcnet_050", "mixnet_s", "mobilevit_xxs", "nf_regnet_b0",
    "resnetv2_50x1_bit",
]


#: what the CLI appends to an internal error's line
DEBUG_HINT = "(run with --debug for the traceback and please report it)"


class StepTimeout(BaseException):  # noqa: N818 - not an Exception: the CLI must not catch it
    """Raised by SIGALRM inside a step that ran past --step-timeout."""


# ---------------------------------------------------------------------------------------------
# which models


def torchvision_models() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def entry(name: str) -> dict[str, Any]:
    """A model of the matrix: its display name, arch spec and kwargs."""
    family, _, short = name.partition(":")
    if family == "torchvision":
        return {"name": name, "spec": name, "kwargs": {}}
    return {"name": name, "spec": name, "kwargs": {}}


def update_selection(previous: dict, patterns: list[str] | None, methods: list[str]
                     ) -> tuple[list[dict], list[str]]:
    """The models of a finished run to rerun: those matching ``patterns``, or every one that
    did not pass every step."""
    results = previous["results"]
    if patterns:
        chosen = [r for r in results
                  if any(fnmatch.fnmatchcase(r["name"], p) for p in patterns)]
    else:
        chosen = [r for r in results if summarise(r, methods)["verdict"] != "pass"]
    if not chosen:
        raise SystemExit("--update: no model of that run to rerun")
    return [{k: r[k] for k in ("name", "spec", "kwargs")} for r in chosen], []


def _timm_name(pattern: str) -> bool:
    """Whether ``pattern`` is ``timm:NAME`` of a model the installed timm builds."""
    if not pattern.startswith("timm:") or not timm_available():
        return False
    import timm

    return timm.is_model(pattern.split(":", 1)[1])


def select_models(patterns: list[str] | None, every: bool, families: bool = False
                  ) -> tuple[list[dict], list[str]]:
    """The models to run and notes on what was left out."""
    notes = []
    if patterns and all(".py:" in p for p in patterns):  # arch specs only: no registry needed
        return [entry(p) for p in dict.fromkeys(patterns)], notes
    tv_all = [f"torchvision:{n}" for n in torchvision_models()]
    timm_all = [f"timm:{n}" for n in TIMM_MODELS]
    if not timm_available():
        notes.append("timm is not installed (pip install -e '.[zoo]'): no timm models")
        timm_all = []
    universe = tv_all + timm_all
    if not patterns:
        chosen = TORCHVISION_FAMILIES if families else TORCHVISION_DEFAULT
        names = tv_all if every else [f"torchvision:{n}" for n in chosen]
        names = [n for n in names if n in tv_all] + timm_all
        if not every:
            left = [n.split(":", 1)[1] for n in tv_all if n not in names]
            what = ("the smallest torchvision model of each family" if families else
                    f"the default set: {len(names) - len(timm_all)} small torchvision models "
                    "of distinct families and the timm list (to stay near an hour on 2 cores; "
                    "`--families` adds the smallest model of every torchvision family, "
                    "`--all` every torchvision classification model)")
            notes.append(f"models: {what}; not run: {', '.join(left)}")
        return [entry(n) for n in names], notes
    names: list[str] = []
    for pattern in patterns:
        found = [n for n in universe
                 if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n.split(":", 1)[1],
                                                                            pattern)]
        if not found and (".py:" in pattern or _timm_name(pattern)):
            found = [pattern]  # an arch spec of its own, or a timm model off the list
        if not found:
            raise SystemExit(f"--models {pattern!r} matches no model")
        names += [n for n in found if n not in names]
    return [entry(n) for n in names], notes


# ---------------------------------------------------------------------------------------------
# calibration images


def write_calibration_images(folder: Path, count: int = CALIB_IMAGES) -> Path:
    """``count`` seeded crops (256 px) of the photographs matplotlib ships, two classes."""
    import matplotlib
    from PIL import Image

    sample = Path(matplotlib.get_data_path()) / "sample_data"
    sources = {"hopper": "grace_hopper.jpg", "present": "Minduka_Present_Blue_Pack.png"}
    rng = random.Random(0)
    for label, file in sources.items():
        (folder / label).mkdir(parents=True, exist_ok=True)
        image = Image.open(sample / file).convert("RGB")
        w, h = image.size
        for i in range(count // len(sources)):
            side = rng.randint(min(w, h) // 2, min(w, h))
            x, y = rng.randint(0, w - side), rng.randint(0, h - side)
            crop = image.crop((x, y, x + side, y + side)).resize((256, 256), Image.BICUBIC)
            if i % 2:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            crop.save(folder / label / f"{i}.png")
    return folder


# ---------------------------------------------------------------------------------------------
# the worker: one model, every step in-process


def first_sentence(text: str, limit: int = 160) -> str:
    """The message of the CLI's ``error:`` / ``internal error:`` line, up to its first
    sentence end, shortened to ``limit`` characters (terminal colour codes removed)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    message = next((ln for ln in lines if ln.startswith(("error:", "internal error:"))),
                   lines[-1] if lines else "")
    for prefix in ("internal error:", "error:"):
        if message.startswith(prefix):
            message = message[len(prefix):].strip()
    message = message.removesuffix(DEBUG_HINT).strip()
    cut = message.find(". ")
    if cut > 0:
        message = message[:cut + 1]
    return message if len(message) <= limit else message[:limit - 1] + "…"


def probe_size(spec: str, kwargs: dict, sizes: list[int]) -> tuple[int | None, str]:
    """The first size of ``sizes`` at which the model runs a batch of 2, and why the others
    failed."""
    import torch

    from bscompress.io.arch import ArchSpec, build_arch

    model = build_arch(ArchSpec(spec, kwargs))
    why = ""
    for size in sizes:
        try:
            with torch.no_grad():
                model(torch.randn(2, 3, size, size))
            return size, why
        except Exception as err:  # noqa: BLE001 - any failure means: try a larger input
            why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None, why


def run_worker(task_path: Path) -> None:
    """Run one model's steps; append one JSON line per step to ``task['results']``."""
    task = json.loads(task_path.read_text())
    os.chdir(ROOT)
    import torch

    torch.set_num_threads(task.get("threads", torch.get_num_threads()))
    from typer.testing import CliRunner

    from bscompress.app.cli import app
    from bscompress.app.cli import common as cli

    work = Path(task["work"])
    work.mkdir(parents=True, exist_ok=True)
    results = Path(task["results"])
    runner = CliRunner()
    spec, kwargs = task["spec"], task["kwargs"]
    model_args = [spec] + (["--arch-kwargs", json.dumps(kwargs)] if kwargs else [])
    timeout = int(task["step_timeout"])

    def record(row: dict[str, Any]) -> None:
        with results.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def alarm(_signum: int, _frame: Any) -> None:
        raise StepTimeout

    signal.signal(signal.SIGALRM, alarm)

    def step(name: str, args: list[str], archive: str | None = None) -> dict[str, Any]:
        command = "bscompress " + shlex.join(args)
        start = time.perf_counter()
        row: dict[str, Any] = {"step": name, "archive": archive, "command": command}
        cli._state["debug"] = False  # a --debug rerun (below) leaves it set in this process
        signal.alarm(timeout)
        try:
            result = runner.invoke(app, args)
            signal.alarm(0)
            code = result.exit_code
            escaped = result.exception is not None and not isinstance(result.exception,
                                                                       SystemExit)
            text = (result.stderr or "") + (result.stdout or "")
            if code == 0:
                row["status"] = "pass"
            elif code == 2:
                row["status"] = "exit 2"
            elif code == 1 and not escaped:
                row["status"] = "FAIL"
            else:
                row["status"] = "INTERNAL"
            row["exit_code"] = code
            if code != 0:
                row["message"] = first_sentence(text) if not escaped else (
                    f"{type(result.exception).__name__}: {result.exception}")
                row["output_tail"] = text[-4000:]
            if escaped:
                row["traceback"] = "".join(traceback.format_exception(*result.exc_info))
        except StepTimeout:
            row.update(status="TIMEOUT", message=f"over {timeout} s")
        finally:
            signal.alarm(0)
        row["seconds"] = round(time.perf_counter() - start, 1)
        if row["status"] == "INTERNAL" and "traceback" not in row:
            row["traceback"] = debug_traceback(runner, app, args, timeout)
        record(row)
        return row

    sizes = [task["size"]] + [s for s in SIZES if s > task["size"]]
    start = time.perf_counter()
    try:
        size, why = probe_size(spec, kwargs, sizes)
    except BaseException as err:  # noqa: BLE001 - the model cannot even be built
        record({"step": "build", "status": "INTERNAL", "seconds": 0,
                "message": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc()})
        return
    record({"step": "probe", "size": size, "why": why,
            "seconds": round(time.perf_counter() - start, 1)})
    if size is None:
        return
    shape = ["--input-shape", f"1,3,{size},{size}"]
    calib = f"imagefolder:{task['calib']}"
    pre = ["--resize", str(size), "--crop", str(size)]
    step("inspect", ["inspect", *model_args, *shape, "-q"])
    archives = []
    for method in task["methods"]:
        out = work / f"{method}.pt"
        args = ["decompose", *model_args, "-m", method, *shape, "-o", str(out), "--force", "-q"]
        if method == AUTO:
            args += ["--budget", BUDGET, "--calib", calib, "--calib-samples",
                     str(CALIB_IMAGES), "--calib-batch", "8", *pre]
        args += METHOD_OPTIONS.get(method, [])
        row = step(method, args)
        refused = " ".join(row.get("output_tail", "").split())  # as rich wrapped it
        if method == AUTO and row["status"] == "exit 2" and GUARD_REFUSAL in refused:
            # the budget was refused for the time its blocks save at this size and on
            # these shared cores: whether the rest of the pipeline runs is still asked
            row = step(UNGUARDED, [*args, "--no-latency-guard"])
        if row["status"] == "pass":
            archives.append((method, out))
    exported = []
    for method, out in archives:
        step("reload", ["evaluate", str(out), "--data", calib, *pre, "--limit", "8", "--json",
                        "-q"], archive=method)
        exported.append(step("export", ["export", str(out), "-o", str(out.with_suffix(".onnx")),
                                        "--force", "-q"], archive=method)["status"])
        for path in (out, out.with_suffix(".onnx")):  # keep the disk small
            with contextlib.suppress(OSError):
                path.unlink()
    if any(s != "pass" for s in exported):  # is it the blocks, or the model itself?
        original = work / "original.onnx"
        step("export-original", ["export", *model_args, *shape, "-o", str(original), "--force",
                                 "-q"])
        with contextlib.suppress(OSError):
            original.unlink()


def debug_traceback(runner: Any, app: Any, args: list[str], timeout: int) -> str:
    """The traceback of ``bscompress --debug ARGS`` (an internal error's rerun)."""
    from bscompress.app.cli import common as cli

    signal.alarm(timeout)
    try:
        result = runner.invoke(app, ["--debug", *args])
    except StepTimeout:
        return f"(the rerun with --debug ran past {timeout} s)"
    finally:
        signal.alarm(0)
        cli._state["debug"] = False
    if result.exc_info is not None and not isinstance(result.exception, SystemExit):
        return "".join(traceback.format_exception(*result.exc_info))
    return f"(the rerun with --debug exited {result.exit_code} without a traceback)\n" + (
        result.stderr or "")[-2000:]


# ---------------------------------------------------------------------------------------------
# the parent: workers, the table


def run_model(model: dict, args: argparse.Namespace, work: Path, calib: Path,
              log: Any) -> dict[str, Any]:
    """One worker for ``model``; its rows, plus the outcome of the worker itself."""
    safe = model["name"].replace(":", "_").replace("/", "_")
    folder = work / safe
    folder.mkdir(parents=True, exist_ok=True)
    results = folder / "results.jsonl"
    results.unlink(missing_ok=True)
    task = {**model, "work": str(folder), "results": str(results), "calib": str(calib),
            "methods": args.methods, "size": args.size, "step_timeout": args.step_timeout,
            "threads": max(1, (os.cpu_count() or 1) // max(1, args.jobs))}
    task_path = folder / "task.json"
    task_path.write_text(json.dumps(task))
    start = time.perf_counter()
    with (folder / "worker.log").open("w") as out:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker",
                                 str(task_path)], cwd=ROOT, stdout=out, stderr=out,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=args.model_timeout)
            killed = False
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
            killed = True
    rows = [json.loads(line) for line in results.read_text().splitlines()] if (
        results.exists()) else []
    seconds = round(time.perf_counter() - start, 1)
    worker = None
    if killed:
        worker = f"TIMEOUT: the worker ran past --model-timeout {args.model_timeout} s"
    elif code != 0:
        tail = (folder / "worker.log").read_text()[-3000:]
        worker = f"INTERNAL: the worker exited {code}"
        rows.append({"step": "worker", "status": "INTERNAL", "message": worker,
                     "traceback": tail, "seconds": 0})
    result = {**model, "rows": rows, "seconds": seconds, "worker": worker}
    log(f"{model['name']}: {summarise(result, args.methods)['verdict']} ({seconds:.0f} s)")
    return result


def cell(rows: list[dict]) -> tuple[str, float, str]:
    """(status, seconds, text) of one column from its rows (several for reload/export: the
    archives with the same outcome are named together)."""
    if not rows:
        return "none", 0.0, "—"
    seconds = sum(r.get("seconds", 0) for r in rows)
    bad = [r for r in rows if r["status"] != "pass"]
    if not bad:
        n = f" ×{len(rows)}" if len(rows) > 1 else ""
        return "pass", seconds, f"pass{n} {seconds:.0f} s"
    order = ["INTERNAL", "FAIL", "TIMEOUT", "exit 2"]
    worst = min(bad, key=lambda r: order.index(r["status"]))["status"]
    groups: dict[tuple[str, str], list[str]] = {}
    for r in bad:
        message = r.get("message", "").removesuffix(DEBUG_HINT).strip()
        groups.setdefault((r["status"], message), []).append(r.get("archive") or "")
    parts = []
    for (status, message), archives in groups.items():
        named = [a for a in archives if a]
        where = ("all: " if len(named) == len(rows) > 1 else
                 f"{', '.join(named)}: " if named else "")
        parts.append(f"{where}{status}: {message}")
    text = "; ".join(parts)
    if len(rows) > 1:
        text = f"{len(rows) - len(bad)}/{len(rows)} pass; {text}"
    return worst, seconds, f"{text} ({seconds:.0f} s)"


def summarise(result: dict, methods: list[str]) -> dict[str, Any]:
    """Columns of one model's row, and its verdict."""
    rows = result["rows"]
    probe = next((r for r in rows if r["step"] == "probe"), None)
    columns = {}
    for name in ["inspect", *methods, "reload", "export"]:
        columns[name] = cell([r for r in rows if r["step"] == name])
    rerun = [r for r in rows if r["step"] == UNGUARDED]
    if AUTO in columns and rerun:  # the guard refused the budget: the rerun's outcome counts
        status, seconds, text = cell(rerun)
        refused = columns[AUTO][2]
        columns[AUTO] = (status, columns[AUTO][1] + seconds,
                         f"{text} with --no-latency-guard; with the guard: {refused}")
    original = next((r for r in rows if r["step"] == "export-original"), None)
    if original is not None:  # said in the export cell: the model itself, or the blocks
        status, seconds, text = columns["export"]
        said = ("the original model exports" if original["status"] == "pass" else
                f"the original model too: {original['status']}"
                + (": same error" if original.get("message") in text else
                   f": {original.get('message', '')}"))
        columns["export"] = (status, seconds, f"{text}; {said}")
    build = [r for r in rows if r["step"] in ("build", "worker")]
    statuses = [c[0] for c in columns.values()]
    if build or result.get("worker"):
        verdict = "INTERNAL" if build else "TIMEOUT"
    elif probe is None or probe.get("size") is None:
        verdict = "exit 2"
    elif all(s == "pass" for s in statuses):
        verdict = "pass"
    else:
        verdict = next(s for s in ("INTERNAL", "FAIL", "TIMEOUT", "exit 2", "none")
                       if s in statuses)
    return {"columns": columns, "verdict": verdict,
            "size": probe.get("size") if probe else None,
            "probe_why": probe.get("why") if probe else None, "build": build}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def versions() -> dict[str, str]:
    import importlib.metadata as meta

    found = {}
    for package in ("bscompress", "torch", "torchvision", "timm", "onnx", "onnxruntime",
                    "tensorly"):
        try:
            found[package] = meta.version(package)
        except meta.PackageNotFoundError:
            found[package] = "not installed"
    return found


def write_markdown(path: Path, results: list[dict], args: argparse.Namespace,
                   notes: list[str], command: str, started: float,
                   finished: float | None = None) -> str:
    """docs/zoo.md from the models' results; returns the summary line."""
    finished = time.time() if finished is None else finished
    methods = args.methods
    total = len(results)
    summaries = [summarise(r, methods) for r in results]
    passed = [r for r, s in zip(results, summaries, strict=True) if s["verdict"] == "pass"]
    gaps = []
    lines = [
        "# Zoo matrix",
        "",
        "Generated by `make zoo` (benchmarks/zoo.py); do not edit by hand.",
        "",
        f"- command: `{command}`",
        f"- date: {_dt.datetime.fromtimestamp(finished).strftime('%Y-%m-%d %H:%M')}; took "
        f"{_duration(finished - started)} on {os.cpu_count()} CPU cores "
        f"({cpu()}, {platform.python_implementation()} "
        f"{platform.python_version()})",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        f"- every model with random weights, at the smallest square input of {args.size}, "
        f"{', '.join(str(s) for s in SIZES if s > args.size)} pixels it takes (`--input-shape "
        "1,3,S,S`, column S); calibration: 16 crops of the photographs matplotlib ships, as "
        f"`imagefolder:DIR --resize S --crop S`",
        "- steps: `inspect`; `decompose -m METHOD` with the default ranks ("
        + ", ".join(f"{m} `{' '.join(o)}`" for m, o in METHOD_OPTIONS.items())
        + ": fewer iterations, to save time); "
        f"`decompose -m auto --budget {BUDGET} --calib imagefolder:DIR "
        f"--calib-samples {CALIB_IMAGES}` (the command's defaults otherwise: the latency "
        "guard times each candidate block against its layer in ONNX Runtime, and refuses a "
        "budget that only blocks saving too little time could meet; where it does, the cell "
        "says so and the step is run again with `--no-latency-guard`, whose archive the next "
        "steps take); `reload`: `evaluate "
        "ARCHIVE --data imagefolder:DIR "
        "--limit 8` on every archive written; `export`: `export ARCHIVE` (checker and ONNX "
        "Runtime parity) on every archive",
        f"- cells: pass, `exit 2:` the tool's refusal (first sentence), FAIL (exit 1, a failed "
        "check), INTERNAL (exit 3 or a crash: a bug), TIMEOUT (a step over "
        f"{args.step_timeout} s, a model over {args.model_timeout} s), — not run; with the "
        "seconds (the reload and export cells add up every archive's)",
    ]
    lines += [f"- {note}" for note in notes]
    lines += [""]
    header = ["model", "S", "inspect", *methods, "reload", "export", "total"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for result, summary in zip(results, summaries, strict=True):
        size = summary["size"]
        if summary["build"]:
            message = summary["build"][0].get("message", "")
            lines.append(f"| {result['name']} | — | INTERNAL: {md(message)} |"
                         + " |" * (len(header) - 3))
            gaps.append(f"{result['name']}: INTERNAL: {message}")
            continue
        if size is None and result.get("worker") is None:
            why = summary["probe_why"] or ""
            lines.append(f"| {result['name']} | — | runs at no size up to {SIZES[-1]}: "
                         f"{md(why)} |" + " |" * (len(header) - 3))
            gaps.append(f"{result['name']}: runs at no input size up to {SIZES[-1]}")
            continue
        texts = [c[2] for c in summary["columns"].values()]
        timeout = result.get("worker")
        if timeout:
            texts = [t if t != "—" else "" for t in texts]
            texts[-1] = (texts[-1] + " " if texts[-1] else "") + timeout
        lines.append(f"| {result['name']} | {size or '—'} | "
                     + " | ".join(md(t) for t in texts) + f" | {result['seconds']:.0f} s |")
        if summary["verdict"] != "pass":
            bad = []
            for name, c in summary["columns"].items():
                if c[0] in ("pass", "none"):
                    continue
                first = next(r for r in result["rows"]
                             if r["step"] == name and r["status"] == c[0])
                why = (first.get("message", "").removesuffix(DEBUG_HINT).strip()
                       if c[0] != "TIMEOUT" else "")
                bad.append(f"{name} {c[0]}" + (f": {why}" if why else ""))
            if timeout:
                bad.append(timeout.split(":")[0])
            gaps.append(f"{result['name']}: {'; '.join(bad) or summary['verdict']}")
    internal = sum(1 for s in summaries for c in s["columns"].values() if c[0] == "INTERNAL")
    internal += sum(1 for s in summaries if s["build"])
    summary_line = (f"**{len(passed)} of {total} models pass every step**; "
                    f"{internal} INTERNAL cells."
                    + ("" if not gaps else " Gaps:\n\n" + "\n".join(f"- {md(g)}"
                                                                  for g in gaps)))
    lines[4:4] = [summary_line, ""]
    failures: dict[tuple, list[dict]] = {}  # the same failure of several archives: once
    for result in results:
        for row in result["rows"]:
            if row.get("status") in ("INTERNAL", "FAIL", "TIMEOUT"):
                key = (result["name"], row["step"], row["status"],
                       row.get("message", "").removesuffix(DEBUG_HINT).strip())
                failures.setdefault(key, []).append(row)
    if failures:
        lines += ["", "## Failures", "",
                  "Every FAIL, INTERNAL and TIMEOUT cell, with its command (run from the "
                  "repository root; WORK is the zoo's work folder) and, for an internal "
                  "error, the traceback of its rerun with `--debug`.", ""]
        work = str(Path(args.work).resolve())
        for (name, step_name, status, message), rows in failures.items():
            archives = [r["archive"] for r in rows if r.get("archive")]
            where = f" ({', '.join(archives)})" if archives else ""
            lines.append(f"### {name}: {step_name}{where}, {status}")
            lines.append("")
            row = rows[0]
            if row.get("command"):
                lines.append(f"`{row['command'].replace(work, 'WORK')}`"
                             + (" (and the other archives)" if len(rows) > 1 else ""))
                lines.append("")
            lines.append(md(message))
            if row.get("traceback"):
                tb = row["traceback"].replace(f"{ROOT}/", "").strip().splitlines()
                lines += ["", "```text", *tb[-25:], "```"]
            lines.append("")
    text = "\n".join(lines).rstrip() + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return summary_line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", metavar="PATTERN", help="torchvision:NAME, "
                        "timm:NAME or NAME patterns ('resnet*'), or arch specs")
    parser.add_argument("--families", action="store_true", help="the smallest torchvision "
                        "model of every family instead of the default few")
    parser.add_argument("--all", action="store_true", help="every torchvision classification "
                        "model")
    parser.add_argument("--methods", default=",".join([*METHODS, AUTO]),
                        help="comma-separated decompose methods (auto: under the budget, "
                        "calibrated)")
    parser.add_argument("--jobs", type=int, default=1, help="models run at once (each with "
                        "CPU cores / jobs threads)")
    parser.add_argument("--size", type=int, default=64, help="smallest input side tried")
    parser.add_argument("--step-timeout", type=int, default=600, help="seconds per step "
                        "(calibrated auto on ResNet-18 at 64² takes about 9 minutes on one core)")
    parser.add_argument("--model-timeout", type=int, default=1800, help="seconds per model")
    parser.add_argument("--out", default="docs/zoo.md", help="the Markdown table")
    parser.add_argument("--work", default="zoo-out", help="archives, logs and zoo.json")
    parser.add_argument("--render", metavar="ZOO_JSON", help="only write --out again from "
                        "the zoo.json of a finished run (its command, date and options)")
    parser.add_argument("--update", metavar="ZOO_JSON", help="rerun, with the methods and "
                        "sizes of a finished run, its models that did not pass every step "
                        "(or the --models named), put their new rows in its zoo.json and "
                        "write --out again")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(Path(args.worker))
        return
    if args.render:
        run = json.loads(Path(args.render).read_text())
        for key, value in run["options"].items():
            setattr(args, key, value)
        summary = write_markdown(Path(args.out), run["results"], args, run["notes"],
                                 run["command"], run["started"], run["finished"])
        print(f"wrote {args.out}: {summary}")
        return
    command = "python benchmarks/zoo.py " + shlex.join(sys.argv[1:])
    previous = None
    if args.update:
        previous = json.loads(Path(args.update).read_text())
        for key in ("methods", "size", "work"):  # what the rows mean; timeouts are this run's
            setattr(args, key, previous["options"][key])
        args.methods = ",".join(args.methods)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in (*METHODS, AUTO)]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}")
    started = began = time.time()
    if previous is not None:
        models, notes = update_selection(previous, args.models, args.methods)
    else:
        models, notes = select_models(args.models, args.all, args.families)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    calib = write_calibration_images(work / "calib")
    lock = threading.Lock()

    def log(message: str) -> None:
        with lock:
            print(f"[{time.time() - began:6.0f} s] {message}", flush=True)

    log(f"{len(models)} models, steps: inspect, {', '.join(args.methods)}, reload, export; "
        f"work folder {work}")
    results: dict[str, dict] = {}

    def one(model: dict) -> None:
        result = run_model(model, args, work, calib, log)
        with lock:
            results[model["name"]] = result
            # progress, apart from the finished run's zoo.json (which --update reads)
            (work / "zoo.partial.json").write_text(json.dumps(list(results.values()),
                                                              indent=1))

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(one, models))
    ordered = [results[m["name"]] for m in models]
    finished = time.time()
    if previous is not None:  # the new rows in place of the old, the first run's header
        stamp = _dt.datetime.fromtimestamp(finished).strftime("%Y-%m-%d %H:%M")
        notes = [*previous["notes"], f"updated {stamp}: {', '.join(results)} rerun by "
                 f"`{command}` (timeouts {args.step_timeout} s per step, "
                 f"{args.model_timeout} s per model), in {_duration(finished - started)}"]
        ordered = [results.get(r["name"], r) for r in previous["results"]]
        command, started, finished = (previous["command"], previous["started"],
                                      previous["finished"])
        args.jobs = previous["options"]["jobs"]
    options = {key: getattr(args, key) for key in ("methods", "size", "step_timeout",
                                                   "model_timeout", "work", "jobs")}
    (work / "zoo.json").write_text(json.dumps(
        {"command": command, "started": started, "finished": finished, "notes": notes,
         "options": options, "results": ordered}, indent=1))
    summary = write_markdown(Path(args.out), ordered, args, notes, command, started, finished)
    log(f"wrote {args.out}: {summary}")


if __name__ == "__main__":
    main()

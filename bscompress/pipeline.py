"""The recipe pipeline: load → decompose (calibrated) → fine-tune → export → bench.

``finetune`` and ``run`` on the command line are thin wrappers around these functions;
each step writes its output atomically into the run folder.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from bscompress.data import DataSource, open_data_spec, recorded_preprocessing
from bscompress.errors import BadInput
from bscompress.finetune import Result, Trainer, World
from bscompress.io import LoadedModel, file_sha256, load_model, save_archive
from bscompress.plan import Plan
from bscompress.recipe import Recipe

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def preprocessing(recipe: Recipe, loaded: LoadedModel, spec: str) -> dict[str, Any]:
    """``open_data_spec`` options: the recipe's transforms, else the ones the archive
    records, else the dataset's own statistics."""
    t = recipe.transforms
    given = {"mean": t.mean, "std": t.std, "resize": t.resize, "crop": t.crop}
    given = {k: v for k, v in given.items() if v is not None}
    if given:
        return given
    record = loaded.metadata.get("preprocessing")
    return recorded_preprocessing(spec, record) if record else {}


def open_data(recipe: Recipe, loaded: LoadedModel) -> tuple[DataSource, DataSource | None]:
    """The training and validation sources of ``recipe.data``."""
    data = recipe.data

    def source(key: str, spec: str, split: str, limit: int | None) -> DataSource:
        try:
            return open_data_spec(spec, split=split, limit=limit, seed=recipe.seed,
                                  **preprocessing(recipe, loaded, spec))
        except BadInput as err:
            raise BadInput(f"recipe data.{key}: {err}") from None

    train = source("train", data.train, data.train_split, data.limit_train)
    val = source("val" if data.val else "train", data.val or data.train, data.val_split,
                 data.limit_val)
    return train, val


def load_teacher(recipe: Recipe, loaded: LoadedModel,
                 original: nn.Module | None = None) -> nn.Module | None:
    """The distillation teacher: ``distillation.teacher`` when set, else ``original`` when
    given (``run``: the model before decomposition), else the recipe's ``model`` — which must
    be the checkpoint the archive was decomposed from (checked by SHA-256)."""
    distill = recipe.distillation
    if distill is None or distill.alpha == 0:
        return None
    if original is not None and distill.teacher is None:
        return original
    check_scratch_teacher(recipe, loaded)
    path = distill.teacher or recipe.model
    if path is None:
        raise BadInput("distillation needs a teacher: set distillation.teacher (or model) in "
                       "the recipe to the original checkpoint, or write 'distillation: null'")
    if distill.teacher is None and Path(path).is_file():
        source = loaded.metadata.get("source_sha256")
        if source and file_sha256(path) != source:
            raise BadInput(f"the recipe's model {path} is not the checkpoint this archive was "
                           "decomposed from (SHA-256 differs): set distillation.teacher")
    arch = distill.teacher_arch or recipe.arch or (loaded.arch.spec if loaded.arch else None)
    kwargs = recipe.arch_kwargs or (loaded.arch.kwargs if loaded.arch else {})
    teacher = load_model(path, arch=arch, arch_kwargs=kwargs, trust_pickle=recipe.trust_pickle,
                         arch_for_checkpoints_only=True)
    return teacher.model.eval()


def check_scratch_teacher(recipe: Recipe, loaded: LoadedModel) -> None:
    """Refuse to distil from a model built from a bare architecture spec (random weights,
    training from scratch) unless ``distillation.teacher`` names a trained one."""
    distill = recipe.distillation
    if (distill is not None and distill.alpha > 0 and distill.teacher is None
            and loaded.source is None and not loaded.is_archive):
        raise BadInput("the model is an architecture spec with random weights, which cannot "
                       "teach: write 'distillation: null' to train it from scratch on the "
                       "labels, or set distillation.teacher to a trained model")


def _archive_metadata(loaded: LoadedModel, extra: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in loaded.metadata.items()
            if k not in ("bscompress_version", "created", "source_sha256")}
    return {**kept, **extra}


def finetune(loaded: LoadedModel, recipe: Recipe, output_dir: Path, output: Path,
             world: World, resume: bool = False, force: bool = False,
             teacher: nn.Module | None = None, log: Log = _quiet,
             on_step: Callable[[dict], None] | None = None,
             interrupt_after: int | None = None,
             data: tuple[DataSource, DataSource | None] | None = None
             ) -> tuple[nn.Module, Result]:
    """Fine-tune ``loaded`` by ``recipe`` in ``output_dir``; the best model (never worse
    than the starting one on the validation data) is written to ``output`` as an archive.
    ``data``: the (train, val) sources when the caller has opened them (``open_data``).

    Raises:
        BadInput: bad recipe data, no teacher, an existing run without ``resume``/``force``.
        finetune.Interrupted: SIGINT/SIGTERM; the checkpoint resumes the run.
    """
    if loaded.arch is None:
        raise BadInput("fine-tuning writes an archive: a pickled module needs --arch")
    output_dir = Path(output_dir)
    checkpoint = output_dir / "checkpoint.pt"
    if resume and not checkpoint.is_file():
        raise BadInput(f"--resume: {checkpoint} does not exist; start without --resume")
    if not resume and checkpoint.exists() and not force:
        raise BadInput(f"{output_dir} holds a run already: pass --resume to continue it or "
                       "--force to start over")
    if (loaded.source is not None and output.exists()
            and output.resolve() == Path(loaded.source).resolve()):
        raise BadInput(f"output {output} is also the model being trained (an input): choose "
                       "another output path")
    if output.exists() and not (force or resume):
        raise BadInput(f"{output} exists: pass --force to overwrite it")
    train, val = data or open_data(recipe, loaded)
    teacher = load_teacher(recipe, loaded, teacher)
    plan = loaded.plan or Plan(layers=[], input_shape=recipe.input_shape,
                               meta={"method": None})
    best = output_dir / "best.pt"
    source_sha = loaded.metadata.get("source_sha256") or loaded.sha256

    def save_best(model: nn.Module, top1: float | None) -> None:
        save_archive(best, model, loaded.arch, plan, source_sha256=source_sha, force=True,
                     metadata=_archive_metadata(loaded, {
                         "preprocessing": train.preprocessing,
                         "finetune": {"recipe": recipe.name, "val_top1": top1}}))

    if world.main:
        output_dir.mkdir(parents=True, exist_ok=True)
    model = loaded.model.train()
    trainer = Trainer(model, plan, recipe, train.dataset, val.dataset if val else None,
                      output_dir, save_best, teacher=teacher, world=world, on_step=on_step,
                      collate=train._collate)
    log(f"fine-tuning on {world.device} ({world.size} process{'es' * (world.size > 1)}): "
        f"{recipe.epochs} epochs × {trainer.steps_per_epoch} steps of {recipe.batch_size}"
        + (f", teacher T={recipe.distillation.temperature} α={recipe.distillation.alpha}"
           if teacher is not None else "") + f", precision {trainer.precision}")
    result = trainer.fit(resume=resume, interrupt_after=interrupt_after)
    if world.main:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(f".{output.name}.tmp")
        shutil.copyfile(best, tmp)
        tmp.replace(output)
    final = load_model(output).model if world.main else model
    return final, result


def decompose_step(loaded: LoadedModel, recipe: Recipe, shape: list[int],
                   progress: Callable[[str], None] | None = None,
                   device: str | None = None
                   ) -> tuple[nn.Module, Plan, dict[str, Any]]:
    """The recipe's ``decompose`` section applied to a copy of ``loaded.model``; a
    reconstruction step trains on ``device`` (the model's when ``None``)."""
    from bscompress.decomposition import Budget, decompose
    from bscompress.methods import RankOptions
    from bscompress.reconstruct import ReconstructionOptions
    from bscompress.surgery import Eligibility

    step = recipe.decompose
    options = RankOptions(rank=step.rank, energy=step.energy, p=step.p,
                          tucker_ranks=step.tucker_ranks, cp_rank=step.cp_rank,
                          round_to=step.round_to, cp_iters=step.cp_iters)
    budget = Budget.parse(step.budget) if step.budget else None
    calib, batches, metadata = step.calibration, None, {}
    if calib is not None:
        spec = calib.data or recipe.data.train
        source = open_data_spec(spec, split=calib.split, limit=calib.samples,
                                **preprocessing(recipe, loaded, spec))
        batches = [x for x, _ in source.loader(calib.batch)]
        metadata = {"preprocessing": source.preprocessing,
                    "calibration": {"data": spec, "split": calib.split,
                                    "samples": sum(len(x) for x in batches)}}
    model, plan = decompose(
        copy.deepcopy(loaded.model), step.method, shape, options,
        Eligibility(tuple(step.include), tuple(step.exclude), step.min_in_channels),
        progress=progress, budget=budget, calibration=batches,
        calib_max_bytes=(calib.max_mb if calib else 1024) * 2**20,
        als_iters=calib.als_iters if calib else 1,
        sequential=bool(calib and calib.sequential),
        sensitivity=bool(calib and calib.sensitivity),
        reconstruction=ReconstructionOptions(
            steps=calib.reconstruct.steps, lr=calib.reconstruct.lr, batch=calib.reconstruct.batch,
            max_bytes=calib.max_mb * 2**20, seed=recipe.seed,
            device=None if device is None else str(device))
        if calib is not None and calib.reconstruct is not None else None)
    if calib is not None:
        plan.meta["calibration"].update(metadata["calibration"])
    if step.fixed_kernels is not None:
        from bscompress.fixed_kernels import FixedKernelOptions, fix_kernels

        model, plan = fix_kernels(model, plan, shape,
                                  FixedKernelOptions(step.fixed_kernels, step.match))
    return model, plan, metadata


def upcycle_step(model: nn.Module, plan: Plan | None, recipe: Recipe,
                 shape: list[int]) -> tuple[nn.Module, Plan]:
    """The recipe's ``upcycle`` section applied, in place, to ``model`` (output unchanged)."""
    from bscompress.upcycle import UpcycleOptions, upcycle

    step = recipe.upcycle
    options = UpcycleOptions(step.experts, step.routing, tuple(step.include),
                             tuple(step.exclude), step.noise, step.share_routing, step.seed)
    return upcycle(model, shape, options, plan)


def run(recipe: Recipe, output_dir: Path, world: World, force: bool = False,
        resume: bool = False, log: Log = _quiet,
        on_step: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """The whole pipeline into ``output_dir``: ``decomposed.pt`` → ``model.pt`` (fine-tuned)
    → ``model.onnx`` → ``report.json``/``report.md``/``report.png``, with ``metrics.jsonl``
    and ``run.json`` (every step's figures and seconds). Returns the run summary; its
    ``gate_failures`` list is empty when the bench gates pass."""
    from bscompress.bench import bench_models, gate_failures, markdown_table
    from bscompress.export import export_onnx
    from bscompress.io import default_input_shape

    if recipe.model is None:
        raise BadInput("the recipe names no model: add 'model: path/to/checkpoint.pt' (and "
                       "'arch:' for a bare state dict)")
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not (force or resume):
        raise BadInput(f"{output_dir} is not empty: pass --force to overwrite the run, or "
                       "--resume to continue its fine-tuning")
    summary: dict[str, Any] = {"recipe": recipe.model_dump(mode="json"), "steps": {}}
    loaded = load_model(recipe.model, arch=recipe.arch, arch_kwargs=recipe.arch_kwargs,
                        trust_pickle=recipe.trust_pickle)
    data = open_data(recipe, loaded)  # bad data fails here, before anything is written
    if loaded.is_archive:
        raise BadInput(f"{recipe.model} is already a bscompress archive: name the original "
                       "checkpoint as the recipe's model")
    shape = recipe.input_shape or default_input_shape(loaded.arch)
    if shape is None:
        raise BadInput("cannot infer the model's input shape: add 'input_shape: [1, C, H, W]' "
                       "to the recipe")
    original = copy.deepcopy(loaded.model).eval()
    check_scratch_teacher(recipe, loaded)  # before anything is written
    output_dir.mkdir(parents=True, exist_ok=True)

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        value = fn()
        summary["steps"].setdefault(name, {})["seconds"] = round(time.perf_counter() - start, 2)
        return value

    student, current = loaded, output_dir / "decomposed.pt"
    model, plan, metadata = loaded.model, loaded.plan, {}  # loaded.model: `original` is a copy
    if recipe.decompose is not None:
        log(f"decomposing with {recipe.decompose.method}"
            + (f" under --budget {recipe.decompose.budget}" if recipe.decompose.budget else ""))
        model, plan, metadata = timed("decompose", lambda: decompose_step(
            loaded, recipe, shape, device=str(world.device)))
        summary["steps"]["decompose"].update(
            macs=[plan.meta["macs_before"], plan.meta["macs_after"]],
            params=[plan.meta["params_before"], plan.meta["params_after"]],
            layers=len(plan.replaced()))
    if recipe.upcycle is not None:
        log(f"upcycling to CondConv with {recipe.upcycle.experts} experts")
        model, plan = timed("upcycle", lambda: upcycle_step(model, plan, recipe, list(shape)))
        summary["steps"]["upcycle"].update(
            convs=plan.meta["upcycle"]["convs"],
            macs=[plan.meta["macs_before"], plan.meta["macs_after"]],
            params=[plan.meta["params_before"], plan.meta["params_after"]])
    if recipe.decompose is not None or recipe.upcycle is not None:
        if world.main:
            save_archive(current, model, loaded.arch, plan, source_sha256=loaded.sha256,
                         metadata=metadata, force=True)
        student = LoadedModel(model, loaded.arch, plan, current, loaded.sha256, None,
                              {**metadata, "source_sha256": loaded.sha256})
    final_path = output_dir / "model.pt"
    if recipe.epochs > 0:
        final, result = timed("finetune", lambda: finetune(
            student, recipe, output_dir, final_path, world, resume=resume, force=True,
            # a bare spec (training from scratch) has no trained original to teach
            teacher=original if loaded.source is not None else None, log=log,
            on_step=on_step, data=data))
        summary["steps"]["finetune"].update(
            initial_top1=result.initial_top1, best_top1=result.best_top1,
            best_epoch=result.best_epoch, seconds_per_epoch=result.seconds_per_epoch)
    else:
        final = student.model
        if world.main:
            save_archive(final_path, final, loaded.arch,
                         student.plan or Plan(layers=[], input_shape=list(shape)),
                         source_sha256=loaded.sha256, force=True,
                         metadata=_archive_metadata(student, {}))
    if not world.main:
        return summary
    val = data[1]
    if recipe.export.enabled:
        report = timed("export", lambda: export_onnx(
            final, shape, output_dir / "model.onnx", opset=recipe.export.opset,
            rtol=recipe.export.rtol, atol=recipe.export.atol, samples=val.images[:8],
            force=True))
        summary["steps"]["export"].update(passed=report.passed, path=str(report.path),
                                          bytes=report.file_bytes)
    if recipe.bench.enabled:
        bench = recipe.bench
        results = timed("bench", lambda: bench_models(
            [("original", original), ("compressed", final)], shape, val.images, val.labels,
            batch=bench.batch, runs=bench.runs, threads=bench.threads))
        (output_dir / "report.json").write_text(
            json.dumps([r.to_dict() for r in results], indent=2))
        (output_dir / "report.md").write_text(markdown_table(results, bench.batch))
        from bscompress.report import plot_bench

        plot_bench(results, [None, student.plan], output_dir / "report.png")
        summary["gate_failures"] = gate_failures(results, bench.max_accuracy_drop,
                                                 bench.min_speedup)
        summary["steps"]["bench"].update(
            top1=[r.top1 for r in results],
            latency_b1_ms=[r.latency["ort_b1"].p50 if "ort_b1" in r.latency else None
                           for r in results])
    (output_dir / "run.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


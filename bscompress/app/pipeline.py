"""The recipe pipeline: load → decompose (calibrated) → fine-tune → export → bench.

``finetune`` and ``run`` on the command line are thin wrappers around these functions;
each step writes its output atomically into the run folder.

Everything that can be checked cheaply is checked before the run folder is made: every
recipe section, the model's input shape, the data, the teacher, the outputs against the
inputs (:mod:`bscompress.core.files`) and, with ``resume``, that the checkpoint was made from the
same model and recipe. A run folder that this call made and that holds no checkpoint yet is
removed again when the run stops on bad input (exit code 2).
"""

from __future__ import annotations

import contextlib
import copy
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bscompress.core.errors import BadInput
from bscompress.core.files import (
    ARCHIVE_SUFFIXES,
    atomic_output,
    check_not_input,
    check_output_dir,
    check_output_path,
    dumps,
    lock_folder,
    remove_stale_temporaries,
    unlock_folder,
    write_text_atomic,
)
from bscompress.core.plan import Plan
from bscompress.core.progress import Reporter
from bscompress.core.recipe import Decompose, Recipe
from bscompress.core.stats import check_threads, evaluating, first_tensor, module_device
from bscompress.data import DEMO_DATA_DIR, DataSource, open_data_spec, recorded_preprocessing
from bscompress.io.arch import default_input_shape, looks_like_arch_spec
from bscompress.io.archive import LoadedModel, load_model, save_archive
from bscompress.io.checkpoint import file_sha256
from bscompress.io.trust import is_builtin_arch
from bscompress.train.finetune import Result, Trainer, World, check_resume, fingerprint

Log = Callable[[str], None]

# what the fine-tuning writes into its folder, and what ``run`` adds
TRAINER_FILES = ("checkpoint.pt", "best.pt", "metrics.jsonl")
RUN_FILES = ("decomposed.pt", "model.pt", "model.onnx", "model.onnx.data", "report.json",
             "report.md", "report.png", "run.json", *TRAINER_FILES)
# a run folder holding only these was stopped before its first checkpoint: nothing to resume
_FRESH_LEFTOVERS = ("decomposed.pt", "best.pt", "metrics.jsonl")
#: an empty file each run and fine-tuning writes first into its folder: files of the names
#: above are a killed run's left-overs, to be written over, only beside it (else they are
#: the user's, and need --force)
RUN_MARK = ".bscompress-run"
_DATA_KINDS = ("fashion-mnist", "cifar10", "imagefolder")


def _quiet(_: str) -> None:
    pass


def preprocessing(recipe: Recipe, loaded: LoadedModel, spec: str) -> dict[str, Any]:
    """``open_data_spec`` options: the recipe's transforms, else the ones the archive
    records, else the dataset's own statistics; the model's input channels where its input
    shape is known (an image folder is read as grayscale for one)."""
    t = recipe.transforms
    shape = recipe.input_shape or loaded.known_input_shape
    channels = {"channels": shape[1]} if shape is not None and len(shape) > 1 else {}
    given = {"mean": t.mean, "std": t.std, "resize": t.resize, "crop": t.crop}
    given = {k: v for k, v in given.items() if v is not None}
    if given:
        return {**given, **channels}
    record = loaded.metadata.get("preprocessing")
    return {**(recorded_preprocessing(spec, record) if record else {}), **channels}


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
    named = train.classes, val.classes
    if None not in named and named[0] != named[1]:
        extra = sorted(set(named[0]) ^ set(named[1]))
        which = ", ".join(extra[:5]) if extra else "none, in another order"
        raise BadInput(f"recipe data.train ({train.spec}, {data.train_split}) and data.val "
                       f"({val.spec}, {data.val_split}) have other class folders (not in "
                       f"both: {which}), so a label would name one class in training and "
                       "another in validation: give both the same class folders")
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
                         arch_for_checkpoints_only=True,
                         input_shape=recipe.input_shape or loaded.known_input_shape)
    if teacher.source is None and not teacher.is_archive:
        raise BadInput(f"the distillation teacher {path} is an architecture spec, built with "
                       "random weights, which cannot teach: set distillation.teacher to the "
                       "trained checkpoint the model was compressed from, or write "
                       "'distillation: null'")
    return teacher.model.eval()


def _sample_output(net: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``net``'s first output tensor on the one sample ``x`` (a batch of one, eval mode,
    no grad, on the device of its weights); the module's own exception when it fails."""
    with torch.no_grad(), evaluating(net):
        return first_tensor(net(x.unsqueeze(0).to(module_device(net))))


def check_data_fits(model: nn.Module, sources: dict[str, DataSource | None],
                    shape: Sequence[int] | None) -> None:
    """The model runs on a sample of each data source of the recipe (``{recipe key:
    source}``), whose shape is the recipe's input shape where one is known, before anything
    is written: a model of 3 channels on 1-channel data ended in a conv error in training,
    and data of another size than ``input_shape`` was refused at the export, after the
    training.

    Raises:
        BadInput: naming the recipe key, the sample's shape and what to change.
    """
    for key, source in sources.items():
        if source is None:
            continue
        x = source.dataset[0][0]
        try:
            _sample_output(model, x)
        except Exception as err:  # the user's module: any failure is the data or the module
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise BadInput(f"the model does not run on a sample of recipe data.{key} "
                           f"({source.spec}, shape {list(x.shape)}: {first}): give data of "
                           "the channels and size the model was trained on") from None
        if shape is not None and list(x.shape) != list(shape[1:]):
            raise BadInput(f"recipe data.{key} ({source.spec}) gives samples of shape "
                           f"{list(x.shape)}, the input shape is {list(shape)}: set "
                           "input_shape to the data's, or resize the data (transforms.resize "
                           "and crop, for image folders)")


def check_ranks_agree(world: World, identity: dict[str, str]) -> None:
    """Under torchrun, every rank fine-tunes the same model by the same recipe (``identity``,
    the checkpoint's fingerprint): ranks given different recipes trained on, their
    all-reduces pairing up different steps.

    Raises:
        BadInput: on every rank, naming what differs.
    """
    if not world.distributed:
        return
    import torch.distributed as dist

    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, identity)
    for rank, other in enumerate(gathered):
        if other != identity:
            words = {"model_sha256": "models", "recipe_sha256": "recipes"}
            differs = sorted(words.get(k, k) for k in {*identity, *other}
                             if identity.get(k) != other.get(k))
            raise BadInput(f"rank {world.rank} and rank {rank} were given different "
                           f"{' and '.join(differs)}: launch every rank with the same model "
                           "and recipe")


def check_teacher(teacher: nn.Module | None, model: nn.Module, train: DataSource) -> None:
    """The distillation teacher runs on a training sample and gives logits of the shape the
    model gives (same classes), before any training: the KL term would end in a shape error
    at the first step.

    Raises:
        BadInput: the teacher does not run on the data, or its output has another shape.
    """
    if teacher is None or teacher is model:
        return
    x = train.dataset[0][0]
    shapes = []
    for who, net in (("the distillation teacher", teacher), ("the model", model)):
        try:
            out = _sample_output(net, x)
        except Exception as err:  # the user's module: any failure is the data or the module
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise BadInput(f"{who} does not run on a sample of the training data ({first}): "
                           "distil from the model this one was compressed from (set "
                           "distillation.teacher and teacher_arch), or write "
                           "'distillation: null'") from None
        shapes.append(None if out is None else list(out.shape))
    if shapes[0] != shapes[1]:
        raise BadInput(f"the distillation teacher gives outputs of shape {shapes[0]} on a "
                       f"training sample, the model {shapes[1]}: distil from the model this "
                       "one was compressed from, with the same classes (set "
                       "distillation.teacher and teacher_arch), or write 'distillation: null'")


def consented(recipe: Recipe, trusted: bool) -> Recipe:
    """``recipe`` with ``trust_pickle`` set to the consent of the command line
    (``--trust-pickle`` / ``--trust-code``, ``trusted``); refused, before anything is loaded,
    where it would run code without that consent.

    A recipe is an input like a checkpoint (docs/security.md): someone else may have written
    it. Building an architecture imports and calls what its spec names, and a spec such as
    ``shutil:rmtree`` with ``arch_kwargs`` is any call at all; so the specs a recipe names
    (``arch``, a ``model`` or ``distillation.teacher`` that is a spec, ``distillation.
    teacher_arch``) are built without consent only when built-in, as an archive's are. And
    ``trust_pickle: true`` in a recipe is a request, not the consent itself.
    """
    if trusted:
        return recipe.model_copy(update={"trust_pickle": True})
    if recipe.trust_pickle:
        raise BadInput("the recipe sets trust_pickle: true, but consent to run a file's code "
                       "comes from your command line, not from a file: pass --trust-pickle "
                       "if you trust the recipe and the files it names, or remove the key")
    distill = recipe.distillation
    named = {"arch": recipe.arch, "model": recipe.model,
             "distillation.teacher": distill.teacher if distill else None,
             "distillation.teacher_arch": distill.teacher_arch if distill else None}
    for key, spec in named.items():
        if (spec and looks_like_arch_spec(spec) and not Path(spec).is_file()
                and not is_builtin_arch(spec)):
            raise BadInput(
                f"the recipe's {key} {spec!r} is code that building the model would import "
                "and run, and it is not built-in (torchvision:NAME, timm:NAME, "
                "bscompress.demo or bscompress.models): pass --trust-code if you trust the "
                "recipe as you would its code")
    return recipe


def check_scratch_teacher(recipe: Recipe, loaded: LoadedModel) -> None:
    """Refuse to distil from a model built from a bare architecture spec (random weights,
    training from scratch) unless ``distillation.teacher`` names a trained one."""
    distill = recipe.distillation
    if (distill is not None and distill.alpha > 0 and distill.teacher is None
            and loaded.source is None and not loaded.is_archive):
        raise BadInput("the model is an architecture spec with random weights, which cannot "
                       "teach: write 'distillation: null' to train it from scratch on the "
                       "labels, or set distillation.teacher to a trained model")


def _data_path(spec: str | None) -> Path | None:
    if not spec:
        return None
    kind, _, arg = spec.partition(":")
    if kind == "demo" and not arg:
        return DEMO_DATA_DIR
    return Path(arg) if kind in _DATA_KINDS and arg else None


def _spec_file(spec: str | None) -> Path | None:
    if spec and ".py:" in spec:
        return Path(spec.rsplit(":", 1)[0])
    return None


def recipe_inputs(recipe: Recipe) -> tuple[Path, ...]:
    """The files and folders a recipe reads: its model, teacher, architecture files and data
    folders (outputs may replace none of them)."""
    distill = recipe.distillation
    calib = recipe.decompose.calibration if recipe.decompose is not None else None
    models = [recipe.model, distill.teacher if distill is not None else None]
    items = [
        *(Path(m) for m in models if m and not Path(m).is_dir()),  # a folder is no model
        _spec_file(recipe.model), _spec_file(recipe.arch),
        _spec_file(distill.teacher_arch if distill is not None else None),
        _data_path(recipe.data.train), _data_path(recipe.data.val),
        _data_path(calib.data if calib is not None else None),
    ]
    return tuple(item for item in items if item is not None)


def _check_in_folder(folder: Path, names: Iterable[str], inputs: tuple) -> None:
    """The files a run writes into ``folder``: none of them an input (through links too),
    none of them anything but a regular file."""
    for name in names:
        path = folder / name
        check_not_input(path, inputs)
        if path.is_symlink() or path.exists():
            try:
                mode = path.stat().st_mode
            except OSError:
                continue  # a dangling link: the rename replaces the link itself
            if not stat.S_ISREG(mode):
                raise BadInput(f"output {path} is not a regular file: bscompress never writes "
                               "over one, even with --force; remove it or choose another "
                               "output folder")


_OPTION = re.compile(r"--([a-z][a-z-]*)")


def _in_recipe(section: str, err: BadInput) -> BadInput:
    """A message about command-line options reworded for the recipe section ``section``."""
    text = _OPTION.sub(lambda m: f"{section}.{m.group(1).replace('-', '_')}", str(err))
    return BadInput(f"recipe {text}" if text.startswith(f"{section}.")
                    else f"recipe {section}: {text}")


def check_sections(recipe: Recipe) -> None:
    """Every check of the ``decompose`` and ``upcycle`` sections that needs no
    model or data: method names, budgets, option ranges and their combinations (the
    schema has checked the types and single ranges)."""
    from bscompress.compress.decomposition import AUTO, Budget
    from bscompress.methods import METHODS, RankOptions

    if recipe.bench.enabled:
        try:
            check_threads(recipe.bench.threads, "bench.threads")
        except BadInput as err:
            raise _in_recipe("bench", err) from None
    step = recipe.decompose
    if step is not None:
        try:
            check_threads(step.latency_threads, "latency_threads")
        except BadInput as err:
            raise _in_recipe("decompose", err) from None
        if step.method not in (AUTO, "none") and step.method not in METHODS:
            raise BadInput(f"recipe decompose.method {step.method!r} is unknown; choose auto, "
                           f"none (with fixed_kernels) or one of {', '.join(METHODS)}")
        budget = None
        if step.budget is not None:
            try:
                budget = Budget.parse(step.budget)
            except BadInput:
                raise BadInput(f"recipe decompose.budget {step.budget!r}: write macs=F, "
                               "params=F or latency=F with 0 < F ≤ 1, e.g. macs=0.25") from None
        if step.method == AUTO and budget is None:
            raise BadInput("recipe decompose.method auto chooses per layer under a budget: "
                           "add decompose.budget, e.g. 'budget: macs=0.25'")
        if (step.energy is not None and step.method in METHODS
                and not METHODS[step.method].energy_supported):
            raise BadInput(f"recipe decompose.energy does not apply to {step.method} (it has no "
                           "singular values): use decompose.rank or the method's own rank "
                           "field")
        try:
            RankOptions(rank=step.rank, energy=step.energy, p=step.p,
                        tucker_ranks=step.tucker_ranks, cp_rank=step.cp_rank,
                        round_to=step.round_to or 1, cp_iters=step.cp_iters)
        except BadInput as err:
            raise _in_recipe("decompose", err) from None
        calib = step.calibration
        if calib is not None and calib.sensitivity and budget is None:
            raise BadInput("recipe decompose.calibration.sensitivity allocates a budget: add "
                           "decompose.budget, or set sensitivity to false")
        if step.fixed_kernels is not None:
            from bscompress.transforms.fixed_kernels import FixedKernelOptions

            try:
                FixedKernelOptions(step.fixed_kernels, step.match)
            except BadInput as err:
                raise _in_recipe("decompose", err) from None
    if recipe.upcycle is not None:
        from bscompress.transforms.upcycle import UpcycleOptions

        up = recipe.upcycle
        try:
            UpcycleOptions(up.experts, up.routing, tuple(up.include), tuple(up.exclude),
                           up.noise, up.share_routing, up.seed)
        except BadInput as err:
            raise _in_recipe("upcycle", err) from None


def open_calibration(recipe: Recipe, loaded: LoadedModel) -> DataSource | None:
    """The calibration data of the ``decompose`` section, when it has some."""
    step = recipe.decompose
    calib = step.calibration if step is not None else None
    if calib is None:
        return None
    spec = calib.data or recipe.data.train
    try:
        return open_data_spec(spec, split=calib.split, limit=calib.samples,
                              **preprocessing(recipe, loaded, spec))
    except BadInput as err:
        raise BadInput(f"recipe decompose.calibration.data: {err}") from None


def check_batches(recipe: Recipe, train: DataSource, world: World) -> None:
    """At least one training batch per process (the trainer's own check, made early)."""
    samples = len(train.dataset)
    if samples // world.size // recipe.batch_size == 0:
        raise BadInput(f"the training data has {samples} samples, fewer than one batch of "
                       f"{recipe.batch_size} per process: lower batch_size in the recipe")


@contextlib.contextmanager
def _clean_on_bad_input(folder: Path, world: World) -> Iterator[None]:
    """Remove ``folder`` again when this call made it and a :class:`BadInput` stops the run
    before it holds a checkpoint (never an empty or half-made folder on exit code 2), or
    anything else (an interrupt during start-up) while it holds nothing but its mark."""
    made = not folder.exists()
    try:
        yield
    except BadInput:
        if made and world.main and folder.is_dir() and not (folder / "checkpoint.pt").exists():
            shutil.rmtree(folder, ignore_errors=True)
        raise
    except BaseException:  # an interrupt or a failure: a folder holding only its mark goes
        if (made and world.main and folder.is_dir()
                and {p.name for p in folder.iterdir()} <= {RUN_MARK}):
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _archive_metadata(loaded: LoadedModel, extra: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in loaded.metadata.items()
            if k not in ("bscompress_version", "created", "source_sha256")}
    return {**kept, **extra}


def finetune(loaded: LoadedModel, recipe: Recipe, output_dir: Path, output: Path,
             world: World, resume: bool = False, force: bool = False,
             teacher: nn.Module | None = None, log: Log = _quiet,
             on_step: Callable[[dict], None] | None = None,
             interrupt_after: int | None = None,
             data: tuple[DataSource, DataSource | None] | None = None,
             inputs: Iterable[str | Path | None] = (),
             teacher_ready: bool = False,
             model_sha256: str | None = None,
             ) -> tuple[nn.Module, Result]:
    """Fine-tune ``loaded`` by ``recipe`` in ``output_dir``; the best model (never worse
    than the starting one on the validation data) is written to ``output`` as an archive.
    ``data``: the (train, val) sources when the caller has opened them (``open_data``).
    ``inputs``: the command's other input files (the recipe file, ...), which no output may
    replace. ``teacher_ready``: ``teacher`` is the resolved teacher (``load_teacher``).
    ``model_sha256``: the identity of the model in the checkpoint's fingerprint
    (``loaded.sha256`` by default).

    Raises:
        BadInput: bad recipe data, no teacher, an output that is an input, an existing run
            without ``resume``/``force``, a resume from another model or recipe.
        CheckFailed: the training diverged (a loss or weight that is not finite).
        finetune.Interrupted: SIGINT/SIGTERM; the checkpoint resumes the run.
    """
    if loaded.arch is None:
        raise BadInput("fine-tuning writes an archive: a pickled module needs --arch")
    output_dir, output = Path(output_dir), Path(output)
    inputs = tuple(Path(i) for i in (*inputs, loaded.source, *recipe_inputs(recipe))
                   if i is not None)
    checkpoint = output_dir / "checkpoint.pt"
    identity = fingerprint(model_sha256 or loaded.sha256, loaded.arch, recipe)
    check_ranks_agree(world, identity)
    if resume:
        check_resume(checkpoint, recipe, identity)
    elif checkpoint.exists() and not force:
        raise BadInput(f"{output_dir} holds a run already: pass --resume to continue it or "
                       "--force to start over")
    elif not force and not (output_dir / RUN_MARK).exists():
        foreign = [name for name in TRAINER_FILES if (output_dir / name).exists()]
        if foreign:
            raise BadInput(f"{output_dir} holds {', '.join(foreign)}, not written by a "
                           "bscompress run: pass --force to write over them, or choose "
                           "another --output-dir")
    check_output_dir(output_dir, inputs, what="run folder")
    _check_in_folder(output_dir, TRAINER_FILES, inputs)
    if output.parent.exists() or not output.parent.resolve().is_relative_to(
            output_dir.resolve()):
        check_output_path(output, force or resume, inputs, suffixes=ARCHIVE_SUFFIXES)
    else:  # in the run folder, made below
        _check_in_folder(output.parent, [output.name], inputs)
    if loaded.plan is None and recipe.input_shape is not None:
        from bscompress.core.stats import check_input_shape

        check_input_shape(loaded.model, recipe.input_shape, what="the recipe's input_shape")
    train, val = data or open_data(recipe, loaded)
    check_data_fits(loaded.model, {"train": train, "val": val}, recipe.input_shape)
    if not teacher_ready:
        teacher = load_teacher(recipe, loaded, teacher)
        check_teacher(teacher, loaded.model, train)
    check_batches(recipe, train, world)
    plan = loaded.plan or Plan(layers=[], input_shape=recipe.input_shape)
    best = output_dir / "best.pt"
    source_sha = loaded.metadata.get("source_sha256") or loaded.sha256

    def save_best(model: nn.Module, top1: float | None) -> None:
        save_archive(best, model, loaded.arch, plan, source_sha256=source_sha, force=True,
                     inputs=inputs,
                     metadata=_archive_metadata(loaded, {
                         "preprocessing": train.preprocessing,
                         "finetune": {"recipe": recipe.name, "val_top1": top1}}))

    with _clean_on_bad_input(output_dir, world):
        owner = False
        if world.main:
            output_dir.mkdir(parents=True, exist_ok=True)
            owner = lock_folder(output_dir, RUN_MARK)  # one writer per folder
            # left by writers killed while saving (a run never writes these concurrently)
            remove_stale_temporaries(output_dir, TRAINER_FILES)
            remove_stale_temporaries(output.parent, [output.name])
        try:
            model = loaded.model.train()
            trainer = Trainer(model, plan, recipe, train.dataset, val.dataset if val else None,
                              output_dir, save_best, teacher=teacher, world=world,
                              on_step=on_step, collate=train._collate, fingerprint=identity,
                              inputs=inputs)
            log(f"fine-tuning on {world.device} ({world.size} process{'es' * (world.size > 1)}): "
                f"{recipe.epochs} epochs × {trainer.steps_per_epoch} steps of {recipe.batch_size}"
                + (f", teacher T={recipe.distillation.temperature} "
                   f"α={recipe.distillation.alpha}" if teacher is not None else "")
                + f", precision {trainer.precision}")
            result = trainer.fit(resume=resume, interrupt_after=interrupt_after)
            if world.main:
                output.parent.mkdir(parents=True, exist_ok=True)
                with atomic_output(output, force=True, inputs=inputs) as tmp:
                    shutil.copyfile(best, tmp)
        finally:
            if owner:
                unlock_folder(output_dir)
    final = load_model(output).model if world.main else model
    return final, result


def decompose_step(loaded: LoadedModel, recipe: Recipe, shape: list[int],
                   progress: Reporter | None = None,
                   device: str | None = None,
                   calibration: DataSource | None = None,
                   ) -> tuple[nn.Module, Plan, dict[str, Any]]:
    """The recipe's ``decompose`` section applied to a copy of ``loaded.model``; a
    reconstruction step trains on ``device`` (the model's when ``None``). ``calibration``:
    the calibration source when the caller has opened it (``open_calibration``)."""
    step = recipe.decompose
    calib, batches, metadata = step.calibration, None, {}
    if calib is not None:
        source = calibration or open_calibration(recipe, loaded)
        batches = [x for x, _ in source.loader(calib.batch)]
        if batches:  # in the layout decompose runs them in, held once
            from bscompress.compress.calibrate import in_fast_layout

            batches = in_fast_layout(loaded.model, batches)
        metadata = {"preprocessing": source.preprocessing,
                    "calibration": {"data": calib.data or recipe.data.train,
                                    "split": calib.split,
                                    "samples": sum(len(x) for x in batches)}}
    model, plan = run_decompose(copy.deepcopy(loaded.model), step, shape, batches,
                                metadata.get("calibration"), progress=progress, device=device,
                                seed=recipe.seed)
    return model, plan, metadata


def run_decompose(model: nn.Module, step: Decompose, shape: list[int],
                  batches: list[torch.Tensor] | None = None,
                  described: dict[str, Any] | None = None, *,
                  progress: Reporter | None = None, device: str | None = None,
                  seed: int = 0) -> tuple[nn.Module, Plan | None]:
    """A ``decompose`` section (a recipe's, or the one the command's options fill) applied to
    ``model`` in place: the factorization (``decomposition.decompose``) and then the fixed
    kernels; the plan is ``None`` for ``method: none`` without fixed kernels to set.

    ``batches``: the calibration inputs when the section calibrates, ``described`` what they
    are (``{"data": spec, "split": ..., "samples": n}``, recorded in the plan's summary); a
    reconstruction trains on ``device`` (the model's when ``None``), seeded by ``seed``.
    """
    from bscompress.compress.decomposition import Budget, decompose
    from bscompress.compress.guard import LatencyGuard, runtime_of
    from bscompress.compress.reconstruct import ReconstructionOptions
    from bscompress.compress.sensitivity import default_cache_dir
    from bscompress.core.surgery import Eligibility
    from bscompress.deploy.latency import channel_block, default_cache_path, make_timer
    from bscompress.methods import RankOptions

    calib = step.calibration
    if calib is not None and batches is None:
        raise ValueError("a calibrated decompose section needs its calibration batches")
    plan = None
    if step.method != "none":
        budget = Budget.parse(step.budget) if step.budget else None
        timer = (make_timer(step.latency_runtime, step.latency_cache or default_cache_path(),
                            threads=step.latency_threads)
                 if budget is not None and (budget.kind == "latency" or step.guarded)
                 else None)
        # where time is measured, widths keep the runtime's fast channel layout
        round_to = step.round_to or (channel_block(step.latency_runtime) if timer else 1)
        options = RankOptions(rank=step.rank, energy=step.energy, p=step.p,
                              tucker_ranks=step.tucker_ranks, cp_rank=step.cp_rank,
                              round_to=round_to, allow_growth=step.allow_growth,
                              tucker_iters=step.tucker_iters, cp_iters=step.cp_iters)
        guard = (LatencyGuard(timer, batches=tuple(sorted({1, step.serving_batch})),
                              share=step.guard_share,
                              runtime=f"{runtime_of(timer)}, {step.latency_threads} thread"
                              + "s" * (step.latency_threads > 1))
                 if step.guarded else None)
        rebuild = calib.reconstruct if calib is not None else None
        model, plan = decompose(
            model, step.method, shape, options,
            Eligibility(tuple(step.include), tuple(step.exclude), step.min_in_channels,
                        step.include_classifier),
            progress=progress, budget=budget, calibration=batches,
            calib_max_bytes=(calib.max_mb if calib else 1024) * 2**20,
            als_iters=calib.als_iters if calib else 1,
            reestimate_bn=calib.bn_reestimate if calib else True,
            holdout=calib.holdout if calib else 0.0,
            sequential=bool(calib and calib.sequential),
            latency=timer if budget is not None and budget.kind == "latency" else None,
            guard=guard,
            sensitivity=bool(calib and calib.sensitivity),
            sensitivity_cache=step.sensitivity_cache or default_cache_dir(),
            reconstruction=None if rebuild is None else ReconstructionOptions(
                steps=rebuild.steps, lr=rebuild.lr, batch=rebuild.batch,
                max_bytes=calib.max_mb * 2**20, seed=seed,
                device=None if device is None else str(device)))
        if not (plan.replaced() or budget or step.fixed_kernels):  # a copy of the original
            # (a budget may keep every layer dense: it raises where none was eligible)
            from bscompress.compress.planning import nothing_to_rewrite

            raise BadInput(nothing_to_rewrite(step.method, plan.layers, Eligibility(
                tuple(step.include), tuple(step.exclude))))
        if calib is not None and described:
            plan.summary.calibration = plan.summary.calibration.model_copy(
                update=described)  # the data, split and samples
    if step.fixed_kernels is not None:
        from bscompress.transforms.fixed_kernels import FixedKernelOptions, fix_kernels

        model, plan = fix_kernels(model, plan, shape,
                                  FixedKernelOptions(step.fixed_kernels, step.match), batches,
                                  max_bytes=(calib.max_mb if calib else 1024) * 2**20)
        if step.method == "none" and plan.summary.fixed_kernels.kernels == 0:
            raise BadInput("--fixed-kernels found no depthwise 2-D kernel to examine in this "
                           "model (it fixes the k×k depthwise convs of a network or of its "
                           "blocks, not 1×1 or 1-D kernels), so -m none would write it "
                           "unchanged: pick a method, or leave --fixed-kernels out")
    return model, plan


def upcycle_step(model: nn.Module, plan: Plan | None, recipe: Recipe,
                 shape: list[int]) -> tuple[nn.Module, Plan]:
    """The recipe's ``upcycle`` section applied, in place, to ``model`` (output unchanged)."""
    from bscompress.transforms.upcycle import UpcycleOptions, upcycle

    step = recipe.upcycle
    options = UpcycleOptions(step.experts, step.routing, tuple(step.include),
                             tuple(step.exclude), step.noise, step.share_routing, step.seed)
    return upcycle(model, shape, options, plan)


def _check_run_folder(output_dir: Path, force: bool, resume: bool, inputs: tuple) -> None:
    """A fresh run goes into a missing or empty folder, or one that a run left before its
    first checkpoint (nothing there to resume); a folder holding a run needs ``--resume``
    or ``--force``; other files in it need ``--force``."""
    check_output_dir(output_dir, inputs, what="run folder")
    _check_in_folder(output_dir, RUN_FILES, inputs)
    if force or resume or not output_dir.is_dir():
        return
    names = {p.name for p in output_dir.iterdir()
             if not (p.name.startswith(".") and p.name.endswith(".tmp")) and p.name != RUN_MARK}
    if names - set(RUN_FILES) or (names and not (output_dir / RUN_MARK).exists()):
        raise BadInput(f"{output_dir} is not empty and not a run folder: pass --force to "
                       "write the run into it anyway, or choose another --output-dir")
    if names - set(_FRESH_LEFTOVERS):
        raise BadInput(f"{output_dir} holds a run already: pass --resume to continue it or "
                       "--force to start over")


def run(recipe: Recipe, output_dir: Path, world: World, force: bool = False,
        resume: bool = False, log: Log = _quiet,
        on_step: Callable[[dict], None] | None = None,
        inputs: Iterable[str | Path | None] = ()) -> dict[str, Any]:
    """The whole pipeline into ``output_dir``: ``decomposed.pt`` → ``model.pt`` (fine-tuned)
    → ``model.onnx`` → ``report.json``/``report.md``/``report.png``, with ``metrics.jsonl``
    and ``run.json`` (every step's figures and seconds). Returns the run summary; its
    ``gate_failures`` list is empty when the bench gates pass. ``inputs``: the command's
    other input files (the recipe file), which no output may replace.

    Every check that can fail runs before the folder is made (see the module's docstring).
    """
    from bscompress.core.stats import check_input_shape

    if recipe.model is None:
        raise BadInput("the recipe names no model: add 'model: path/to/checkpoint.pt' (and "
                       "'arch:' for a bare state dict)")
    output_dir = Path(output_dir)
    inputs = tuple(Path(i) for i in (*inputs, *recipe_inputs(recipe)) if i is not None)
    check_sections(recipe)
    _check_run_folder(output_dir, force, resume, inputs)
    summary: dict[str, Any] = {"recipe": recipe.model_dump(mode="json"), "steps": {}}
    loaded = load_model(recipe.model, arch=recipe.arch, arch_kwargs=recipe.arch_kwargs,
                        trust_pickle=recipe.trust_pickle, input_shape=recipe.input_shape)
    if loaded.rewritten:
        raise BadInput(f"{recipe.model} is already a compressed bscompress archive: name the "
                       "original checkpoint (or its packed archive) as the recipe's model")
    shape = recipe.input_shape or default_input_shape(loaded.arch)
    if shape is None:
        raise BadInput("cannot infer the model's input shape: add 'input_shape: [1, C, H, W]' "
                       "to the recipe")
    check_input_shape(loaded.model, shape, what="the recipe's input_shape")
    data = open_data(recipe, loaded)  # bad data fails here, before anything is written
    calibration = open_calibration(recipe, loaded)
    check_data_fits(loaded.model, {"train": data[0], "val": data[1],
                                   "decompose.calibration": calibration}, shape)
    if recipe.bench.enabled:  # its batch fits in memory (the original's activations)
        from bscompress.deploy.bench import check_batch_memory

        try:
            check_batch_memory("the model", loaded.model, shape, recipe.bench.batch)
        except BadInput as err:
            raise _in_recipe("bench", err) from None
    original = copy.deepcopy(loaded.model).eval()
    check_scratch_teacher(recipe, loaded)
    teacher = None
    if recipe.epochs > 0:
        # a bare spec (training from scratch) has no trained original to teach
        teacher = load_teacher(recipe, loaded, original if loaded.source is not None else None)
        check_teacher(teacher, loaded.model, data[0])
        check_batches(recipe, data[0], world)
        if resume:
            check_resume(output_dir / "checkpoint.pt", recipe,
                         fingerprint(loaded.sha256, loaded.arch, recipe))
    try:
        with _clean_on_bad_input(output_dir, world):
            summary = _run_steps(recipe, output_dir, world, resume, log, on_step, inputs,
                                 summary, loaded, list(shape), data, calibration, original,
                                 teacher)
        if world.main:
            write_text_atomic(output_dir / "run.json", dumps(summary, indent=2, default=str),
                              inputs=inputs)
    finally:
        unlock_folder(output_dir)
    return summary


def _run_steps(recipe: Recipe, output_dir: Path, world: World, resume: bool, log: Log,
               on_step: Callable[[dict], None] | None, inputs: tuple,
               summary: dict[str, Any], loaded: LoadedModel, shape: list[int],
               data: tuple[DataSource, DataSource | None], calibration: DataSource | None,
               original: nn.Module, teacher: nn.Module | None) -> dict[str, Any]:
    from bscompress.deploy.bench import bench_models, gate_failures, markdown_table
    from bscompress.deploy.export import export_onnx

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        value = fn()
        summary["steps"].setdefault(name, {})["seconds"] = round(time.perf_counter() - start, 2)
        return value

    def make_folder() -> None:
        if world.main:
            output_dir.mkdir(parents=True, exist_ok=True)
            lock_folder(output_dir, RUN_MARK)  # one writer per folder, until run() returns
            remove_stale_temporaries(output_dir, RUN_FILES)

    student, current = loaded, output_dir / "decomposed.pt"
    model, plan, metadata = loaded.model, loaded.plan, {}  # loaded.model: `original` is a copy
    if recipe.decompose is not None:
        log(f"decomposing with {recipe.decompose.method}"
            + (f" under --budget {recipe.decompose.budget}" if recipe.decompose.budget else ""))
        model, plan, metadata = timed("decompose", lambda: decompose_step(
            loaded, recipe, shape, device=str(world.device), calibration=calibration))
        totals = plan.summary
        summary["steps"]["decompose"].update(
            macs=[totals.macs_before, totals.macs_after],
            params=[totals.params_before, totals.params_after], layers=len(plan.replaced()))
    if recipe.upcycle is not None:
        log(f"upcycling to CondConv with {recipe.upcycle.experts} experts")
        model, plan = timed("upcycle", lambda: upcycle_step(model, plan, recipe, shape))
        totals = plan.summary
        summary["steps"]["upcycle"].update(
            convs=totals.upcycle.convs, macs=[totals.macs_before, totals.macs_after],
            params=[totals.params_before, totals.params_after])
    make_folder()  # the first write: every check has passed
    if recipe.decompose is not None or recipe.upcycle is not None:
        if world.main:
            save_archive(current, model, loaded.arch, plan, source_sha256=loaded.sha256,
                         metadata=metadata, force=True, inputs=inputs)
        student = LoadedModel(model, loaded.arch, plan, current, loaded.sha256, None,
                              {**metadata, "source_sha256": loaded.sha256})
    final_path = output_dir / "model.pt"
    if recipe.epochs > 0:
        final, result = timed("finetune", lambda: finetune(
            student, recipe, output_dir, final_path, world, resume=resume, force=True,
            teacher=teacher, teacher_ready=True, log=log, on_step=on_step, data=data,
            inputs=inputs, model_sha256=loaded.sha256))
        summary["steps"]["finetune"].update(
            initial_top1=result.initial_top1, best_top1=result.best_top1,
            best_epoch=result.best_epoch, seconds_per_epoch=result.seconds_per_epoch)
    else:
        final = student.model
        if world.main:
            save_archive(final_path, final, loaded.arch,
                         student.plan or Plan(layers=[], input_shape=list(shape)),
                         source_sha256=loaded.sha256, force=True, inputs=inputs,
                         metadata=_archive_metadata(student, {}))
    if not world.main:
        return summary
    val = data[1]
    if recipe.export.enabled:
        report = timed("export", lambda: export_onnx(
            final, shape, output_dir / "model.onnx", **recipe.export.arguments(),
            samples=val.images[:8], force=True, inputs=inputs))
        summary["steps"]["export"].update(passed=report.passed, path=str(report.path),
                                          bytes=report.file_bytes)
    if recipe.bench.enabled:
        bench = recipe.bench
        results = timed("bench", lambda: bench_models(
            [("original", original), ("compressed", final)], shape, val.images, val.labels,
            **bench.timing()))
        write_text_atomic(output_dir / "report.json",
                          dumps([r.to_dict() for r in results], indent=2), inputs=inputs)
        write_text_atomic(output_dir / "report.md", markdown_table(results, bench.batch),
                          inputs=inputs)
        from bscompress.deploy.report import plot_bench

        with atomic_output(output_dir / "report.png", force=True, inputs=inputs) as tmp:
            plot_bench(results, [None, student.plan], tmp)
        summary["gate_failures"] = gate_failures(results, **bench.gates())
        summary["steps"]["bench"].update(
            top1=[r.top1 for r in results],
            latency_b1_ms=[r.latency["ort_b1"].p50 if "ort_b1" in r.latency else None
                           for r in results])
    return summary

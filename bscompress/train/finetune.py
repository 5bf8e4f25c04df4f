"""Fine-tuning a compressed model with knowledge distillation, resumable and distributed.

The loop is deterministic on CPU given the recipe's seed: each epoch's sample order comes
from (seed, epoch) through a ``DistributedSampler`` (one replica when not distributed), each
step's augmentation from (seed, epoch, step), the learning rate is a function of the global
step, and a checkpoint holds model, optimizer, epoch, step within the epoch, best accuracy
and the RNG states — so a run stopped anywhere and resumed ends with the same weights as an
uninterrupted one.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel
(NCCL on CUDA, gloo on CPU); rank 0 alone evaluates, logs and writes checkpoints.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import hashlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from bscompress.compress.calibrate import reestimate_batchnorm
from bscompress.core.errors import BadInput, CheckFailed
from bscompress.core.files import atomic_output, dumps
from bscompress.core.plan import Plan
from bscompress.core.recipe import Optimizer, Recipe, Schedule
from bscompress.core.stats import first_tensor
from bscompress.data import evaluate
from bscompress.layers.condconv import CondConv2d
from bscompress.methods import lr_group

CHECKPOINT_FORMAT = "bscompress-finetune"
# recipe sections that do not change the trained weights: a resume may change them
NOT_TRAINING = ("name", "output", "export", "bench")


#: The weight of an auxiliary classifier's cross-entropy in the loss (GoogLeNet's 0.3,
#: Szegedy et al. 2015; torchvision's Inception v3 reference uses 0.4)
AUX_WEIGHT = 0.3


def training_outputs(out: object) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(logits, auxiliary logits)`` of a model's training-mode output: a tensor, or a tuple,
    list or dict with the logits first (``stats.first_tensor``), like torchvision's GoogLeNet
    and Inception v3 with ``aux_logits`` (a namedtuple in training mode only). The other
    entries of the logits' shape are auxiliary classifiers; any other entry is left out.

    Raises:
        BadInput: an output that holds no tensor.
    """
    logits = first_tensor(out)
    if logits is None:
        raise BadInput(f"the model's training-mode output is a {type(out).__name__} with no "
                       "tensor in it: fine-tuning needs the logits first (a tensor, or the "
                       "first entry of a tuple, list or dict)")
    rest = (list(out)[1:] if isinstance(out, (tuple, list))
            else list(out.values())[1:] if isinstance(out, dict) else [])
    return logits, [t for t in rest if isinstance(t, torch.Tensor) and t.shape == logits.shape]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor | None,
                      targets: torch.Tensor, temperature: float = 4.0, alpha: float = 0.9,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """(1 − α)·CE(s, y) + α·T²·KL(softmax(t/T) ‖ softmax(s/T)), both batch means.

    ``student``/``teacher``: logits ``[B, K]``; ``targets``: ``[B]``. Without a teacher (or
    α = 0) it is the cross-entropy alone. The T² keeps the soft term's gradients at the
    scale of the hard term's (Hinton et al.).
    """
    ce = F.cross_entropy(student, targets, label_smoothing=label_smoothing)
    if teacher is None or alpha == 0:
        return ce
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher.detach() / t, 1),
                  log_target=True, reduction="batchmean")
    return (1 - alpha) * ce + alpha * t * t * kl


def feature_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of ‖s − t‖² / ‖t‖²: each factorized block against the original
    layer's output on the same input batch (layer-wise distillation)."""
    terms = [(s.float() - t.float().detach()).square().sum()
             / t.float().square().sum().clamp_min(1e-12) for s, t in zip(student, teacher,
                                                                           strict=True)]
    return torch.stack(terms).mean()


class _Outputs:
    """Forward hooks recording the outputs of named modules while ``active``."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.active, self.outputs = False, {}
        self.names = names
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n))
                        for n in names]

    def _hook(self, name: str):
        def hook(_module, _args, output):
            if self.active:
                self.outputs[name] = output
        return hook

    def take(self) -> list[torch.Tensor]:
        values = [self.outputs[n] for n in self.names]
        self.outputs = {}
        return values


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def ema_update(decay: float) -> Callable:
    """``multi_avg_fn`` for :class:`AveragedModel`: ``e ← e + (1 − d)(w − e)`` with the
    decay warmed up as ``d = min(decay, (1 + n)/(10 + n))`` after ``n`` averages (early
    weights leave fast); integer buffers (BatchNorm's batch counts) are copied."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor],
               count: torch.Tensor) -> None:
        n = float(count)
        d = min(decay, (1 + n) / (10 + n))
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1 - d)
        else:
            torch._foreach_copy_(averaged, current)
    return update


def param_groups(model: nn.Module, plan: Plan | None, config: Optimizer) -> list[dict]:
    """Optimizer groups: the factorized blocks of ``plan`` at ``lr·factor_lr`` (those of a
    method whose ``lr_group`` is ``"cp"`` at ``lr·cp_lr``), the rest at ``lr``; the experts of
    a CondConv at that rate times ``expert_lr`` (by default, with SGD, its ``lr_compensation``:
    E under gates summing to 1, so the mixed kernel moves as fast as the conv it came from;
    AdamW's steps do not scale with the gradient, so 1 there); no weight decay on biases and
    normalisation weights (parameters with one dimension, and the experts' biases). Each
    group carries its ``lr_scale``."""
    methods = {e.name: e.method for e in plan.replaced()} if plan is not None else {}
    scales = {"base": 1.0, "factor": config.factor_lr, "cp": config.cp_lr}
    groups: dict[tuple[str, bool, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        owner = next((n for n in methods
                      if module_name == n or module_name.startswith(n + ".")), None)
        kind = "base" if owner is None else lr_group(methods[owner])
        scale = scales[kind]
        experts = isinstance(module, CondConv2d)
        if experts:  # each expert gets its gate's share of the gradient: give it back
            kind = f"{kind} experts"
            default = module.lr_compensation if config.name == "sgd" else 1.0  # Adam: scale-free
            scale *= config.expert_lr if config.expert_lr is not None else default
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            decay = param.ndim > 1 and not (experts and param_name == "bias")
            groups.setdefault((kind, decay, scale), []).append(param)
    return [{"params": params, "name": f"{kind}{'' if decay else ' (no decay)'}",
             "lr": config.lr * scale, "lr_scale": scale,
             "weight_decay": config.weight_decay if decay else 0.0}
            for (kind, decay, scale), params in groups.items()]


def make_optimizer(groups: list[dict], config: Optimizer) -> torch.optim.Optimizer:
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0)
    return torch.optim.AdamW(groups, lr=config.lr)


def lr_factor(schedule: Schedule, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Multiplier of the base learning rate at global ``step`` (0-based)."""
    total = max(steps_per_epoch * epochs, 1)
    warmup = schedule.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if schedule.name == "constant":
        return 1.0
    if schedule.name == "step":
        return schedule.gamma ** int(step / steps_per_epoch // schedule.step_epochs)
    progress = (step - warmup) / max(total - warmup, 1)
    return schedule.min_lr + (1 - schedule.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def augment(x: torch.Tensor, generator: torch.Generator, flip: bool, pad: int) -> torch.Tensor:
    """Random horizontal flip and random crop after ``pad`` zero pixels, per sample, drawn
    from ``generator`` (on CPU, so the draw is the same on any device)."""
    if flip:
        mask = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    if pad:
        h, w = x.shape[-2:]
        padded = F.pad(x, (pad, pad, pad, pad))
        offsets = torch.randint(0, 2 * pad + 1, (len(x), 2), generator=generator).tolist()
        x = torch.stack([padded[i, :, dy:dy + h, dx:dx + w]
                         for i, (dy, dx) in enumerate(offsets)])
    return x


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled by seed and epoch, equal shares per rank) that can
    start ``start`` samples into its epoch, for a resumed run."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return super().__len__() - self.start


@dataclass
class World:
    """Where this process runs: ``rank`` of ``size`` processes on ``device``."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def resolve_device(device: str | None = None) -> torch.device:
    """``device`` (``cuda``, ``cuda:1``, ``cpu``), or CUDA when there is one, else the CPU."""
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"--device {name}: this machine has no CUDA device; use --device cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise BadInput(f"--device {name}: not a device name; use cuda, cuda:N or cpu") from err
    if dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise BadInput(f"--device {name}: bscompress runs on the CPU or on CUDA devices; use "
                       "cuda, cuda:N or cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BadInput(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                       "devices (cuda:0 …); pick one of them")
    return dev


def _environ_int(name: str, default: int) -> int:
    """A whole-number environment variable of torchrun's (``WORLD_SIZE``, ``LOCAL_RANK``).

    Raises:
        BadInput: it is set to something else than a whole number from 0.
    """
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit():
        raise BadInput(f"the environment sets {name}={text!r}, not a whole number: unset it, "
                       "or launch with torchrun, which sets it")
    return int(text)


def setup_world(device: str | None = None) -> World:
    """The device (CUDA when available unless ``device`` says otherwise) and, under
    torchrun (``WORLD_SIZE`` > 1), the process group: NCCL on CUDA, gloo on CPU."""
    size, local = _environ_int("WORLD_SIZE", 1), _environ_int("LOCAL_RANK", 0)
    if size > 1 and not all(os.environ.get(v) for v in ("RANK", "MASTER_ADDR", "MASTER_PORT")):
        raise BadInput(f"WORLD_SIZE={size} is set, but not the RANK, MASTER_ADDR and "
                       "MASTER_PORT that torchrun sets with it: launch with torchrun "
                       "--nproc_per_node N, or unset WORLD_SIZE for one process")
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if size > 1 else torch.cuda.current_device())
    if size > 1:
        if not dist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
            # torch asks for an explicit teardown: gloo's threads left to the interpreter's
            # exit can abort the process ("terminate called without an active exception")
            atexit.register(_destroy_process_group)
        return World(dist.get_rank(), dist.get_world_size(), dev)
    return World(0, 1, dev)


@contextlib.contextmanager
def joined_world(device: str | None = None) -> Iterator[World]:
    """:func:`setup_world` for the length of a command whose ranks leave together.

    After a normal end every rank meets the others at a barrier (rank 0 may still be
    writing the outputs) and then releases the process group: a rank that tears down its
    gloo threads while a peer still talks to it can abort ("terminate called without an
    active exception"). After an error the group is released at exit (no barrier: the other
    ranks may never reach it).
    """
    world = setup_world(device)
    yield world
    if world.distributed and dist.is_initialized():
        dist.barrier()
        _destroy_process_group()


def _destroy_process_group() -> None:
    if dist.is_initialized():
        gc.collect()  # a module or work still holding the group lets it go first
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


class Interrupted(Exception):
    """A signal stopped the run; ``checkpoint`` resumes it."""

    def __init__(self, checkpoint: Path, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.checkpoint, self.signum = checkpoint, signum


_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_EXIT_AFTER_STOP = False


@contextlib.contextmanager
def exit_after_stop() -> Iterator[None]:
    """For a process that ends once a run is stopped (the CLI): after the first SIGINT or
    SIGTERM has been taken, further ones stay ignored until the process exits, so that a
    second signal can cut short neither the checkpoint's save nor the exit with code 130.
    (Without it, the handlers in place before the run come back when it stops.)"""
    global _EXIT_AFTER_STOP
    previous, _EXIT_AFTER_STOP = _EXIT_AFTER_STOP, True
    try:
        yield
    finally:
        _EXIT_AFTER_STOP = previous


@contextlib.contextmanager
def _stop_on_signals(flag: dict) -> Iterator[None]:
    """SIGINT/SIGTERM set ``flag["signum"]`` instead of killing the process (main thread);
    once one has been taken the next ones are ignored (the checkpoint is being saved)."""
    def handler(signum, _frame):
        flag.setdefault("signum", signum)
        for s in _SIGNALS:
            signal.signal(s, signal.SIG_IGN)

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = {s: signal.signal(s, handler) for s in _SIGNALS}
    try:
        yield
    finally:
        if not (flag.get("signum") and _EXIT_AFTER_STOP):
            for s, h in previous.items():
                signal.signal(s, h)


def training_fields(recipe: dict | Recipe) -> dict:
    """The recipe's fields that shape the trained weights (all but ``NOT_TRAINING``)."""
    data = recipe.model_dump(mode="json") if isinstance(recipe, Recipe) else dict(recipe)
    return {k: v for k, v in data.items() if k not in NOT_TRAINING}


def fingerprint(model_sha256: str | None, arch: Any, recipe: Recipe) -> dict[str, str]:
    """What a checkpoint was made from: the SHA-256 of the model file or archive (of the
    architecture spec for a model built from a bare spec) and of the recipe's training
    fields. A resume from another model or recipe is refused."""
    if model_sha256 is None:
        spec = arch.to_dict() if hasattr(arch, "to_dict") else str(arch)
        model_sha256 = "spec:" + hashlib.sha256(
            json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
    recipe_sha = hashlib.sha256(json.dumps(training_fields(recipe), sort_keys=True,
                                           default=str).encode()).hexdigest()
    return {"model_sha256": model_sha256, "recipe_sha256": recipe_sha}


def read_checkpoint_state(path: Path, mmap: bool = False) -> dict:
    """A fine-tuning checkpoint's state (weights only: no code is unpickled); ``mmap``: map
    the tensors instead of reading them (a look at the identity only)."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            # not a zip archive (mmap needs one): the error below names it
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise BadInput(f"cannot resume from {path} ({err.strerror or err}): pass --force to "
                       "start over") from None
    except Exception as err:  # noqa: BLE001 — any unreadable file is one message
        raise BadInput(f"cannot resume from {path}: it is damaged or not a fine-tuning "
                       f"checkpoint ({type(err).__name__}); pass --force to start "
                       "over") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise BadInput(f"{path} is not a bscompress fine-tuning checkpoint: pass --force to "
                       "start over")
    return state


def check_identity(state: dict, path: Path, recipe: Recipe,
                   expected: dict[str, str] | None) -> None:
    """Refuse to resume from a checkpoint made from another model or recipe (``expected``:
    this run's :func:`fingerprint`; checkpoints written before fingerprints were stored are
    checked by their recipe alone)."""
    stored = state.get("fingerprint")
    if isinstance(stored, dict) and expected is not None \
            and stored.get("model_sha256") != expected["model_sha256"]:
        raise BadInput(f"{path} was written for a different model (its SHA-256 differs from "
                       "the model this run trains): resume with the model the run started "
                       "from, or pass --force to start over")
    old = state.get("recipe")
    if not isinstance(old, dict):  # only the hash to compare
        if isinstance(stored, dict) and expected is not None \
                and stored.get("recipe_sha256") == expected["recipe_sha256"]:
            return
        raise BadInput(f"{path} does not record the recipe it was written by: pass --force "
                       "to start over")
    new = training_fields(recipe)
    old = training_fields(old)
    if old != new:
        keys = sorted((k for k in set(old) | set(new) if old.get(k) != new.get(k)), key=str)
        what = ", ".join(map(str, keys)) or "its fields"
        raise BadInput(f"{path} was written by a different recipe ({what} "
                       f"differ{'s' if len(keys) == 1 else ''}): resume with the same recipe, "
                       "or pass --force to start over")


def check_resume(path: Path, recipe: Recipe, expected: dict[str, str] | None) -> None:
    """Before any work: ``path`` exists, is a checkpoint, and was made from this model and
    recipe."""
    if path.exists() and not path.is_file():
        raise BadInput(f"--resume: {path} is not a regular file: remove it, or pass --force "
                       "to start over")
    if not path.is_file():
        raise BadInput(f"--resume: {path.parent} holds no checkpoint.pt, so there is nothing "
                       "to resume: start without --resume (a fresh start reuses the folder)")
    check_identity(read_checkpoint_state(path, mmap=True), path, recipe, expected)


@dataclass
class Result:
    """What a run ended with: the best model's accuracy and where it is."""

    initial_top1: float | None
    best_top1: float | None
    best_epoch: int
    epochs: int
    seconds_per_epoch: list[float]
    history: list[dict]


class Trainer:
    """Runs a recipe's fine-tuning on ``model``.

    Args:
        model: the student (e.g. a decomposed archive's model), on CPU.
        plan: its Plan (the factorized blocks get their own learning rates), or ``None``.
        recipe: the validated recipe.
        train: training dataset of ``(x [C,H,W], y)``; ``val``: evaluation dataset or ``None``.
        output_dir: where ``checkpoint.pt`` (resumable), ``metrics.jsonl`` and the best
            weights go; ``save_best(model, top1)`` writes the best model (rank 0).
        teacher: the distillation teacher, or ``None`` for plain cross-entropy.
        world: device and process group (``setup_world``).
        on_step: called on rank 0 after every step with ``{epoch, step, steps, loss, lr,
            samples_per_s}``.
        fingerprint: what the run is made from (:func:`fingerprint`), stored in the
            checkpoint and checked on resume.
        inputs: the command's input files, which no output may replace.

    A loss that is not finite stops the run with :class:`CheckFailed` before the optimizer
    steps: the checkpoint and the best model stay those of the last good epoch.
    """

    def __init__(self, model: nn.Module, plan: Plan | None, recipe: Recipe, train: Dataset,
                 val: Dataset | None, output_dir: Path,
                 save_best: Callable[[nn.Module, float | None], None],
                 teacher: nn.Module | None = None, world: World | None = None,
                 on_step: Callable[[dict], None] | None = None,
                 collate: Callable | None = None,
                 fingerprint: dict[str, str] | None = None,
                 inputs: tuple = ()) -> None:
        self.recipe, self.plan, self.world = recipe, plan, world or World()
        self.fingerprint, self.inputs = fingerprint, tuple(inputs)
        self.output_dir, self.save_best, self.on_step = Path(output_dir), save_best, on_step
        self.device = self.world.device
        self.model = model.to(self.device)
        if recipe.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.teacher = teacher.to(self.device).eval() if teacher is not None else None
        # before the feature hooks: the average's deep copy must not carry them
        self.ema = (AveragedModel(self.model, multi_avg_fn=ema_update(recipe.ema),
                                  use_buffers=True) if recipe.ema else None)
        distill = recipe.distillation
        self.features = None
        if (self.teacher is not None and distill is not None and distill.features > 0
                and plan is not None and plan.replaced()):
            names = [e.name for e in plan.replaced()]
            try:
                self.features = (_Outputs(self.model, names), _Outputs(self.teacher, names))
            except AttributeError:
                missing = next(n for n in names if not _has_module(self.teacher, n))
                raise BadInput(f"distillation.features compares each factorized block with the "
                               f"teacher's layer of the same name, and the teacher has no "
                               f"{missing!r}: use the original model as the teacher, or set "
                               "distillation.features to 0") from None
        self.train_set, self.val_set, self.collate = train, val, collate
        self.sampler = ResumableSampler(train, self.world.size, self.world.rank, recipe.seed)
        per_rank = len(self.sampler) // recipe.batch_size
        if per_rank == 0:
            raise BadInput(f"the training data has {len(train)} samples, fewer than one batch "
                           f"of {recipe.batch_size} per process: lower batch_size")
        self.steps_per_epoch = min(per_rank, recipe.steps_per_epoch or per_rank)
        self.groups = param_groups(self.model, plan, recipe.optimizer)
        self.optimizer = make_optimizer(self.groups, recipe.optimizer)
        self.precision = recipe.precision if self.device.type == "cuda" else "fp32"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.epoch = self.step = 0
        self.best_top1: float | None = None
        self.best_epoch = 0
        self.initial_top1: float | None = None
        self.history: list[dict] = []
        self.checkpoint = self.output_dir / "checkpoint.pt"
        self.metrics = self.output_dir / "metrics.jsonl"

    # -- state -----------------------------------------------------------------------------
    def state(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"format": CHECKPOINT_FORMAT, "epoch": self.epoch, "step": self.step,
                "model": {k: v.detach().cpu() for k, v in self._raw().state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "best_top1": self.best_top1, "best_epoch": self.best_epoch,
                "initial_top1": self.initial_top1, "history": self.history, "rng": rng,
                "recipe": self.recipe.model_dump(mode="json"),
                "fingerprint": self.fingerprint}

    def load(self, path: Path) -> None:
        """Continue from a checkpoint written by :meth:`save_checkpoint` (weights only: no
        code is unpickled) — one made from the same model and recipe."""
        state = read_checkpoint_state(path)
        check_identity(state, path, self.recipe, self.fingerprint)
        try:
            self._raw().load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            self.epoch, self.step = int(state["epoch"]), int(state["step"])
            self.best_top1, self.best_epoch = state["best_top1"], state["best_epoch"]
            self.initial_top1, self.history = state["initial_top1"], list(state["history"])
            torch.set_rng_state(state["rng"]["torch"])
            if "cuda" in state["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
            self._check_resumed()
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise BadInput(f"cannot resume from {path}: it does not fit this model and recipe "
                           f"({first[:200]}); pass --force to start over") from None

    def _check_resumed(self) -> None:
        """What :meth:`load` read is what :meth:`save_checkpoint` writes: counters within the
        recipe, accuracies as fractions, and optimizer state of each parameter's shape (an
        edited checkpoint otherwise failed at the first comparison or step, exit 3).

        Raises:
            ValueError: naming the first field that is not.
        """
        if not 0 <= self.epoch <= self.recipe.epochs or self.step < 0:
            raise ValueError(f"epoch {self.epoch} / step {self.step} outside the recipe's "
                             f"{self.recipe.epochs} epochs")
        for name in ("best_top1", "initial_top1"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float))
                                      or not 0 <= value <= 1):
                raise ValueError(f"{name} {value!r} is not an accuracy from 0 to 1")
        if not isinstance(self.best_epoch, int):
            raise ValueError(f"best_epoch {self.best_epoch!r} is not a whole number")
        for param, values in self.optimizer.state.items():
            for key, value in values.items():
                if (isinstance(value, torch.Tensor) and value.dim() > 0
                        and value.shape != param.shape):
                    raise ValueError(f"the optimizer's {key} has shape {list(value.shape)}, "
                                     f"its parameter {list(param.shape)}")

    def save_checkpoint(self) -> None:
        if self.world.main:
            state = self.state()
            with atomic_output(self.checkpoint, force=True, inputs=self.inputs) as tmp:
                torch.save(state, tmp)

    def _diverged(self, what: str, step: str) -> CheckFailed:
        lr = self.recipe.optimizer.lr
        return CheckFailed(
            f"training diverged at epoch {self.epoch + 1}, {step} ({what}): "
            f"lower the learning rate (optimizer.lr, now {lr:g}) or set grad_clip in the "
            f"recipe, then start over with --force; {self.output_dir / 'best.pt'} keeps the "
            "best model so far")

    def _check_loss(self, loss: torch.Tensor) -> None:
        """Stop before the optimizer steps on a loss that is not finite (every rank)."""
        bad = torch.zeros(1) if bool(torch.isfinite(loss.detach()).all()) else torch.ones(1)
        if self.world.distributed:
            bad = bad.to(self.device)
            dist.all_reduce(bad)
        if bad.item() > 0:
            raise self._diverged(f"the loss is {float(loss.detach().float().mean())}",
                                 f"step {self.step + 1}")

    def _check_weights(self) -> None:
        """Never keep or evaluate a model whose weights are not finite."""
        models = [("", self._raw())] + ([("ema ", self.ema.module)] if self.ema else [])
        for prefix, module in models:
            for name, tensor in module.state_dict().items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise self._diverged(f"{prefix}weight {name} is no longer finite",
                                         f"after step {self.step}")

    def _raw(self) -> nn.Module:
        return self.model.module if hasattr(self.model, "module") else self.model

    def _final(self) -> nn.Module:
        """The model evaluated, kept and written: the weight average when there is one."""
        return self.ema.module if self.ema is not None else self._raw()

    # -- loop ------------------------------------------------------------------------------
    def _loader(self) -> DataLoader:
        self.sampler.set_epoch(self.epoch)
        self.sampler.start = self.step * self.recipe.batch_size
        # a private generator: the loader's base seed must not draw from the global RNG,
        # whose state the checkpoint restores (dropout), or a resumed run would diverge
        return DataLoader(self.train_set, batch_size=self.recipe.batch_size,
                          sampler=self.sampler, drop_last=True,
                          generator=torch.Generator().manual_seed(self.recipe.seed),
                          **({"collate_fn": self.collate} if self.collate else {}))

    def _evaluate(self) -> dict | None:
        if self.val_set is None:
            return None
        loader = DataLoader(self.val_set, batch_size=self.recipe.eval_batch_size,
                            **({"collate_fn": self.collate} if self.collate else {}))
        return evaluate(self._final(), loader, self.device)

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.world.main:
            with self.metrics.open("a") as handle:
                handle.write(dumps(record) + "\n")

    def _record_best(self, top1: float | None, epoch: int) -> None:
        if self.world.main and (self.best_top1 is None or (top1 or 0) > self.best_top1):
            self.best_top1, self.best_epoch = top1, epoch
            self.save_best(self._final(), top1)

    def _begin(self) -> None:
        """Before the first step of a fresh run: BatchNorm re-estimation, the starting
        accuracy (the best so far: a run never ends below it)."""
        recipe = self.recipe
        reestimate = recipe.bn_reestimate
        if reestimate is None:  # a block-wise reconstruction fitted the blocks to the stats
            reestimate = not (self.plan is not None
                              and self.plan.summary.reconstruction is not None)
        if reestimate:
            count = max(1, min(len(self.train_set), 2048) // recipe.batch_size)
            loader = DataLoader(self.train_set, batch_size=recipe.batch_size, shuffle=False,
                                **({"collate_fn": self.collate} if self.collate else {}))
            batches = (x for i, (x, _) in zip(range(count), loader, strict=False))
            reestimate_batchnorm(self._raw(), batches)
        if self.ema is not None:  # the average starts from the (re-estimated) start
            self.ema.update_parameters(self._raw())
        if self.world.main:
            metrics = self._evaluate()
            self.initial_top1 = metrics["top1"] if metrics else None
            self._log({"epoch": 0, "val_top1": self.initial_top1,
                       "val_top5": metrics["top5"] if metrics else None})
            self._record_best(self.initial_top1, 0)
        self._barrier()

    def _barrier(self) -> None:
        if self.world.distributed:
            dist.barrier()

    def _stop_requested(self, flag: dict) -> bool:
        stop = torch.tensor([1.0 if flag.get("signum") else 0.0])
        if self.world.distributed:  # every rank stops after the same step
            stop = stop.to(self.device)
            dist.all_reduce(stop)
        return bool(stop.item() > 0)

    def fit(self, resume: bool = False,
            interrupt_after: int | None = None) -> Result:
        """Train ``recipe.epochs`` epochs (from the checkpoint with ``resume``).

        ``interrupt_after``: deliver SIGINT to this process after that many steps (tests).
        """
        recipe = self.recipe
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.load(self.checkpoint)
        elif self.world.main:
            self.metrics.unlink(missing_ok=True)
        model = self.model
        if self.world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                else None)
        forward = torch.compile(model) if recipe.compile else model
        flag: dict = {}
        steps_done = 0
        seconds = self._seconds_so_far() if resume else []
        with _stop_on_signals(flag):
            if not resume:
                self._begin()
            if self._stop_requested(flag):  # a signal during the first evaluation
                self._stop(flag)
            while self.epoch < recipe.epochs:
                model.train()
                if recipe.freeze_bn:
                    for module in self._raw().modules():
                        if isinstance(module, _BatchNorm):
                            module.eval()
                start, samples, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
                for x, y in self._loader():
                    if self.step >= self.steps_per_epoch:
                        break
                    loss, hits = self._train_step(forward, x, y)
                    self.step += 1
                    steps_done += 1
                    samples += len(x)
                    loss_sum += loss * len(x)
                    correct += hits
                    if self.on_step is not None and self.world.main:
                        self.on_step({"epoch": self.epoch + 1, "step": self.step,
                                      "steps": self.steps_per_epoch, "loss": loss,
                                      "lr": self.optimizer.param_groups[0]["lr"]
                                      / self.groups[0]["lr_scale"],
                                      "samples_per_s": samples * self.world.size
                                      / (time.perf_counter() - start)})
                    if interrupt_after is not None and steps_done == interrupt_after:
                        os.kill(os.getpid(), signal.SIGINT)
                    if self._stop_requested(flag):
                        self._stop(flag)
                elapsed = time.perf_counter() - start
                seconds.append(elapsed)
                self._check_weights()  # before anything is evaluated, kept or saved
                self.epoch += 1
                self.step = 0
                record = {"epoch": self.epoch, "train_loss": loss_sum / max(samples, 1),
                          "train_top1": correct / max(samples, 1), "seconds": elapsed,
                          "samples_per_s": samples * self.world.size / max(elapsed, 1e-9)}
                if self.epoch % recipe.eval_interval == 0 or self.epoch == recipe.epochs:
                    if self.world.main:
                        metrics = self._evaluate()
                        record.update(val_top1=metrics and metrics["top1"],
                                      val_top5=metrics and metrics["top5"])
                        self._record_best(record["val_top1"], self.epoch)
                    self._barrier()
                self._log(record)
                self.save_checkpoint()
            if self._stop_requested(flag):  # a signal while the last checkpoint was saved
                self._stop(flag)
        return Result(self.initial_top1, self.best_top1, self.best_epoch, self.epoch, seconds,
                      self.history)

    def _stop(self, flag: dict) -> None:
        """Save what resumes the run and raise :class:`Interrupted` (every rank)."""
        self._check_weights()
        self.save_checkpoint()
        self._barrier()
        raise Interrupted(self.checkpoint, flag.get("signum") or signal.SIGINT)

    def _seconds_so_far(self) -> list[float]:
        """The epoch times a resumed run's earlier process wrote in ``metrics.jsonl``, for
        the epochs the checkpoint holds (of an epoch cut short, only the part run after the
        resume is timed)."""
        if not self.metrics.is_file():
            return []
        seconds = {}
        for line in self.metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if (isinstance(record, dict) and isinstance(record.get("seconds"), (int, float))
                    and isinstance(record.get("epoch"), int)
                    and 1 <= record["epoch"] <= self.epoch):
                seconds[record["epoch"]] = float(record["seconds"])
        return [seconds[e] for e in sorted(seconds)]

    def _train_step(self, model: nn.Module, x: torch.Tensor,
                    y: torch.Tensor) -> tuple[float, int]:
        recipe = self.recipe
        global_step = self.epoch * self.steps_per_epoch + self.step
        factor = lr_factor(recipe.schedule, global_step, self.steps_per_epoch, recipe.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = recipe.optimizer.lr * group["lr_scale"] * factor
        generator = torch.Generator().manual_seed(
            (recipe.seed * 1_000_003 + self.epoch) * 1_000_003 + self.step)
        x = augment(x, generator, recipe.transforms.flip, recipe.transforms.pad)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if recipe.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        autocast = (torch.autocast(self.device.type, dtype=dtype) if dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            if self.features is not None:
                for hooks in self.features:
                    hooks.active = True
            try:
                logits, aux = training_outputs(model(x))
                teacher = None
                if self.teacher is not None:
                    with torch.no_grad():
                        teacher = training_outputs(self.teacher(x))[0]
            finally:
                if self.features is not None:
                    for hooks in self.features:
                        hooks.active = False
            distill = recipe.distillation
            loss = distillation_loss(
                logits.float(), None if teacher is None else teacher.float(), y,
                distill.temperature if distill else 1.0, distill.alpha if distill else 0.0,
                recipe.label_smoothing)
            for head in aux:  # auxiliary classifiers: trained on the labels
                loss = loss + AUX_WEIGHT * F.cross_entropy(
                    head.float(), y, label_smoothing=recipe.label_smoothing)
            if self.features is not None:
                student_out, teacher_out = (hooks.take() for hooks in self.features)
                loss = loss + distill.features * feature_loss(student_out, teacher_out)
            if recipe.orthogonality:
                loss = loss + recipe.orthogonality * sum(
                    (m.orthogonality_loss() for m in self._raw().modules()
                     if hasattr(m, "orthogonality_loss")), torch.zeros((), device=self.device))
        self._check_loss(loss)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if recipe.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self._raw().parameters(), recipe.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update_parameters(self._raw())
        hits = int((logits.argmax(1) == y).sum())
        return float(loss.detach()), hits

"""The configuration schema: one pydantic model per step — decompose (with its calibration
and reconstruction), upcycle, fine-tune, export, bench — that is at once a section of a recipe
(one YAML file describing the whole pipeline) and what the command-line options fill.

Every section forbids unknown keys: a typo is an error that names the key, where it is, and
the keys valid there; a value of the wrong type names the field and the type expected. Rules
that tie fields together (a budget and a fixed rank exclude each other) live here too, once,
and speak of fields: :func:`describe` names them as recipe keys (``decompose.rank``) or,
given the command's mapping, as flags (``--rank``). ``load_recipe`` turns any of these into
one :class:`BadInput` sentence (exit code 2).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bscompress.core.errors import BadInput

#: the latency guard (``decompose.latency_guard``) runs under a macs or params budget unless
#: a section turns it off; the test suite turns this off (tests/conftest.py), as it keeps
#: timing out of unit tests
GUARD_BY_DEFAULT = True
#: the share of the fraction of its layer's MACs a block removes that it must remove of the
#: layer's time for the guard to let it in (``decompose.guard_share``; ``guard.time_bound``).
#: 0.5: on ResNet-18 at 224² it leaves out the few blocks that cost accuracy for little
#: time (docs/benchmarks.md, latency guard)
GUARD_SHARE = 0.5


class _Section(BaseModel):
    #: no unknown keys; no NaN or ±Inf in any number (a rate, a rank fraction, a bound)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class FieldRule(ValueError):
    """A rule between fields, broken: ``template`` names the fields as ``{path}`` (relative
    to the section that checks it, e.g. ``{calibration.sensitivity}``), rendered by
    :func:`describe` as recipe keys or flags."""

    FIELD = re.compile(r"\{([\w.]+)\}")

    def __init__(self, template: str) -> None:
        super().__init__(self.FIELD.sub(r"\1", template))
        self.template = template

    def render(self, name: Any) -> str:
        """The sentence with each field path given to ``name``."""
        return self.FIELD.sub(lambda m: name(m.group(1)), self.template)


class Data(_Section):
    """Dataset specs (``bscompress evaluate --help``): ``train`` for fine-tuning (its
    ``train_split``), ``val`` for evaluation (its ``val_split``; the same spec by default)."""

    train: str
    val: str | None = None
    train_split: Literal["train", "test"] = "train"
    val_split: Literal["train", "test"] = "test"
    limit_train: int | None = Field(default=None, ge=1)
    limit_val: int | None = Field(default=None, ge=1)


class Transforms(_Section):
    """Preprocessing (``resize``/``crop`` for image folders, ``mean``/``std`` per channel;
    the dataset's own statistics when unset) and train-time augmentation: random horizontal
    ``flip`` and a random crop after zero ``pad`` pixels on each side."""

    resize: int | None = Field(default=None, ge=1)
    crop: int | None = Field(default=None, ge=1)
    mean: list[float] | None = None
    std: list[float] | None = None
    flip: bool = False
    pad: int = Field(default=0, ge=0, le=1024)


class Reconstruction(_Section):
    """``decompose --reconstruct``: block-wise reconstruction after the closed-form fits."""

    steps: int = Field(default=500, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    batch: int = Field(default=64, ge=1)


class Calibration(_Section):
    """``decompose --calib``: the data (the training data by default) and its options."""

    data: str | None = None
    split: Literal["train", "test"] = "train"
    samples: int = Field(default=512, ge=1)
    batch: int = Field(default=64, ge=1)
    sequential: bool = False
    als_iters: int = Field(default=1, ge=1)
    holdout: float = Field(default=0.25, ge=0, lt=1)
    max_mb: int = Field(default=1024, ge=1)
    sensitivity: bool = False
    bn_reestimate: bool = True
    reconstruct: Reconstruction | None = None


def _timed(step: Decompose) -> bool:
    """Whether ``step`` times blocks: the latency guard, or a latency budget."""
    return step.guarded or bool(step.budget and step.budget.split("=")[0].strip() == "latency")


#: the options of a decompose section that mean something only with another: field → (is
#: it used by the section, what it needs); one given where it is not used is refused rather
#: than ignored
USED_WITH: dict[str, tuple[Callable[[Decompose], bool], str]] = {
    "match": (lambda s: s.fixed_kernels is not None, "{fixed_kernels}"),
    "guard_share": (lambda s: s.guarded, "the latency guard (a macs or params {budget})"),
    "serving_batch": (lambda s: s.guarded, "the latency guard (a macs or params {budget})"),
    "latency_runtime": (_timed, "the latency guard or a latency {budget}"),
    "latency_threads": (_timed, "the latency guard or a latency {budget}"),
    "latency_cache": (_timed, "the latency guard or a latency {budget}"),
    "p": (lambda s: s.method in ("bsconv-s", "auto"), "{method} bsconv-s (or auto)"),
    "tucker_ranks": (lambda s: s.method in ("tucker2", "auto"), "{method} tucker2 (or auto)"),
    "tucker_iters": (lambda s: s.method in ("tucker2", "auto"), "{method} tucker2 (or auto)"),
    "cp_rank": (lambda s: s.method in ("cp", "cp4", "auto"), "{method} cp or cp4 (or auto)"),
    "cp_iters": (lambda s: s.method in ("cp", "cp4", "auto"), "{method} cp or cp4 (or auto)"),
}


class Decompose(_Section):
    """The ``decompose`` step (``bscompress decompose --help`` for each option)."""

    method: str = "auto"
    budget: str | None = None
    rank: int | None = Field(default=None, ge=1)
    energy: float | None = Field(default=None, gt=0, le=1)
    p: float = Field(default=0.25, gt=0, le=1)
    tucker_ranks: float = Field(default=0.25, gt=0)
    cp_rank: float = Field(default=0.25, gt=0)
    tucker_iters: int = Field(default=5, ge=0)
    cp_iters: int = Field(default=50, ge=1)
    #: None: the runtime's channel block where time is measured (a latency budget or the
    #: guard: ``latency.channel_block``), else 1
    round_to: int | None = Field(default=None, ge=1)
    allow_growth: bool = False
    include: list[str] = []
    exclude: list[str] = []
    min_in_channels: int = Field(default=8, ge=1)
    include_classifier: bool = False
    latency_threads: int = Field(default=1, ge=1)
    latency_cache: str | None = None
    latency_runtime: Literal["onnxruntime", "eager", "eager-channels-last",
                             "eager-cuda"] = "onnxruntime"
    #: None: on under a macs or params budget (:data:`GUARD_BY_DEFAULT`); true: on; false: off
    latency_guard: bool | None = None
    serving_batch: int = Field(default=32, ge=1)
    guard_share: float = Field(default=GUARD_SHARE, ge=0, le=1)
    sensitivity_cache: str | None = None
    calibration: Calibration | None = None
    fixed_kernels: Literal["strided-gaussian", "bank", "identity"] | None = None
    match: float = Field(default=0.9, gt=0, le=1)

    @model_validator(mode="after")
    def _rules(self) -> Decompose:
        calib = self.calibration
        if self.method == "none":
            if self.fixed_kernels is None:
                raise FieldRule("{method} none factorizes nothing: add {fixed_kernels}, or "
                            "choose a method")
            if self.budget is not None:
                raise FieldRule("{method} none factorizes nothing: {budget} needs a method")
            if calib is not None and (calib.sequential or calib.sensitivity
                                      or calib.reconstruct is not None):
                raise FieldRule("{method} none factorizes nothing: the calibration matches "
                                "the fixed kernels only, and {calibration.sequential}, "
                                "{calibration.sensitivity} and {calibration.reconstruct} "
                                "need a method")
            unused = sorted((calib.model_fields_set if calib is not None else set())
                            & {"holdout", "als_iters", "bn_reestimate"})
            if unused:
                raise FieldRule(f"{{method}} none factorizes nothing: the calibration "
                                f"matches the fixed kernels only, so {{calibration.{unused[0]}}} "
                                "would be ignored: drop it, or choose a method")
        if self.method == "auto" and self.budget is None:
            raise FieldRule("{method} auto chooses per layer under a budget: add {budget}, e.g. "
                        "macs=0.25")
        if self.rank is not None and self.energy is not None:
            raise FieldRule("{rank} and {energy} both choose the ranks: give one of them")
        for name, value in (("tucker_ranks", self.tucker_ranks), ("cp_rank", self.cp_rank)):
            if value > 1 and value != int(value):
                raise FieldRule(f"{{{name}}} is a fraction of the channels (≤ 1) or a whole "
                                f"number of them, not {value}")
        if self.budget is not None and (self.rank is not None or self.energy is not None):
            raise FieldRule("{budget} allocates the ranks itself: drop {rank} and {energy}")
        if self.latency_guard is True and self.budget is None:
            raise FieldRule("{latency_guard} times the candidates of a budget: add {budget}")
        if calib is not None and calib.sensitivity and self.budget is None:
            raise FieldRule("{calibration.sensitivity} measures candidates on the calibration "
                        "data to allocate a budget: add {budget}")
        for name, (used, needs) in USED_WITH.items():
            if name in self.model_fields_set and not used(self):
                raise FieldRule(f"{{{name}}} is used only with {needs}, so it would be "
                                f"ignored here: add that, or drop {{{name}}}")
        return self

    @property
    def guarded(self) -> bool:
        """Whether the latency guard runs: as ``latency_guard`` says, and by default
        (``None``) under a ``macs`` or ``params`` budget while :data:`GUARD_BY_DEFAULT`."""
        if self.latency_guard is not None:
            return self.latency_guard
        kind = self.budget.partition("=")[0].strip() if self.budget else None
        return GUARD_BY_DEFAULT and kind in ("macs", "params")


class Upcycle(_Section):
    """The ``upcycle`` step, after ``decompose`` (``bscompress upcycle --help``): CondConv
    experts on the pointwise convs of the blocks (or the convs ``include`` names)."""

    experts: int = Field(default=4, ge=2)
    routing: Literal["normalized-sigmoid", "softmax", "sigmoid"] = "normalized-sigmoid"
    include: list[str] = []
    exclude: list[str] = []
    noise: float = Field(default=0.0, ge=0)
    share_routing: bool = False
    seed: int = Field(default=0, ge=0, le=2**32 - 1)


class Optimizer(_Section):
    """``lr`` is the base learning rate; the factorized blocks train at ``lr·factor_lr``,
    and CP blocks (unstable under plain SGD) at ``lr·cp_lr``; CondConv experts at that rate
    times ``expert_lr`` (default: E with SGD, 1 with AdamW; see ``finetune.param_groups``).
    No weight decay on biases and normalisation weights."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(default=5e-4, ge=0)
    factor_lr: float = Field(default=1.0, gt=0)
    cp_lr: float = Field(default=0.1, gt=0)
    expert_lr: float | None = Field(default=None, gt=0)


class Schedule(_Section):
    """Per-step learning-rate schedule: linear warm-up over ``warmup_epochs`` (fractions
    allowed), then ``cosine`` to ``min_lr``·lr, ``step`` (×``gamma`` every ``step_epochs``)
    or ``constant``."""

    name: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(default=0.1, ge=0)
    min_lr: float = Field(default=0.0, ge=0, le=1)
    step_epochs: int = Field(default=30, ge=1)
    gamma: float = Field(default=0.1, gt=0, le=1)


class Distillation(_Section):
    """Knowledge distillation: loss = (1 − alpha)·CE(student, y) + alpha·T²·KL(teacher_T ‖
    student_T) with temperature T, plus ``features`` × the layer-wise loss: the mean over the
    factorized blocks of ‖block output − original layer output‖² / ‖original‖² (the teacher's
    layer of the same name, on the same batch). ``teacher``: a model file (with
    ``teacher_arch`` when it is a bare checkpoint); by default the original model the archive
    was decomposed from."""

    teacher: str | None = None
    teacher_arch: str | None = None
    temperature: float = Field(default=4.0, ge=0.05, le=100)
    alpha: float = Field(default=0.9, ge=0, le=1)
    features: float = Field(default=0.0, ge=0)


#: the oldest ONNX opset written (the dynamo exporter's own)
MIN_OPSET = 18


@functools.cache
def max_opset() -> int:
    """The newest opset the installed exporter writes: the dynamo exporter builds an opset-18
    graph and converts it with onnxscript's version converter, which falls back to ONNX's own
    (``onnx.version_converter``) up to the newest opset the installed ``onnx`` knows."""
    import onnx

    return max(int(onnx.defs.onnx_opset_version()), MIN_OPSET)


class Export(_Section):
    """ONNX export and its parity checks: the recipe's ``export`` section (``enabled: false``
    skips it), what ``bscompress export`` fills, and the keywords of
    ``deploy.export.export_onnx`` (:meth:`arguments`).

    ``rtol``/``atol``: parity tolerances, relative to each output's scale.
    ``external_data``: weights in ``FILE.data``; ``None``: only above protobuf's 2 GB.
    ``keep_failed``: keep the file when parity fails.
    """

    enabled: bool = True
    opset: int = MIN_OPSET
    dynamic_batch: bool = True
    rtol: float = Field(default=1e-4, ge=0, allow_inf_nan=False)
    atol: float = Field(default=1e-5, ge=0, allow_inf_nan=False)
    external_data: bool | None = None
    keep_failed: bool = False

    @model_validator(mode="after")
    def _opset_range(self) -> Export:
        newest = max_opset()
        if not MIN_OPSET <= self.opset <= newest:
            raise FieldRule(f"{{opset}} {self.opset} is outside the range the installed "
                            f"exporter writes ({MIN_OPSET}–{newest}): choose an opset in it, "
                            f"e.g. {MIN_OPSET}")
        return self

    def arguments(self) -> dict[str, Any]:
        """The keywords of ``export_onnx`` this section sets."""
        return self.model_dump(exclude={"enabled"})


class Bench(_Section):
    """Timing and gates of ``bscompress bench``: the recipe's ``bench`` section (the original
    against the fine-tuned model), what the command fills, and the keywords of
    ``deploy.bench.bench_models`` (:meth:`timing`) and ``gate_failures`` (:meth:`gates`).

    Gates: ``max_accuracy_drop`` and ``max_agreement_drop`` in top-1 points (a negative bound
    asks for a gain), ``min_speedup`` the ONNX Runtime batch-1 p50 ratio. ``compile``: also
    time torch.compile at batch 1. ``channels_last``: also time eager PyTorch with the model
    and its inputs channels-last. ``profile_top``: name the K slowest modules of an ONNX
    Runtime profile (0: none).
    """

    enabled: bool = True
    runs: int = Field(default=50, ge=1)
    warmup: int = Field(default=10, ge=0)
    threads: int | None = Field(default=None, ge=1)
    batch: int = Field(default=32, ge=1)
    compile: bool = False
    channels_last: bool = False
    profile_top: int = Field(default=5, ge=0)
    max_accuracy_drop: float | None = Field(default=None, allow_inf_nan=False)
    min_speedup: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_agreement_drop: float | None = Field(default=None, allow_inf_nan=False)

    def timing(self) -> dict[str, Any]:
        """The keywords of ``bench_models`` this section sets."""
        return {"batch": self.batch, "runs": self.runs, "warmup": self.warmup,
                "threads": self.threads, "torch_compile": self.compile,
                "channels_last": self.channels_last, "profile_top": self.profile_top}

    def gates(self) -> dict[str, float | None]:
        """The bounds, as the keywords of ``gate_failures`` and ``check_gates``."""
        return {"max_accuracy_drop": self.max_accuracy_drop, "min_speedup": self.min_speedup,
                "max_agreement_drop": self.max_agreement_drop}


class Recipe(_Section):
    """A whole pipeline. ``model``/``arch`` may also come from the command line.

    ``freeze_bn``: BatchNorm layers normalise with their running statistics while training
    (their affine weights still learn). ``ema``: keep an exponential moving average of the
    weights and buffers with this decay (warmed up as min(ema, (1 + n)/(10 + n)) after n
    steps); it is the model evaluated, kept and written.
    """

    name: str | None = None
    model: str | None = None
    arch: str | None = None
    arch_kwargs: dict[str, Any] = {}
    trust_pickle: bool = False
    input_shape: list[int] | None = None
    data: Data
    transforms: Transforms = Transforms()
    decompose: Decompose | None = None
    upcycle: Upcycle | None = None
    epochs: int = Field(default=1, ge=0)
    steps_per_epoch: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=128, ge=1)
    eval_batch_size: int = Field(default=512, ge=1)
    optimizer: Optimizer = Optimizer()
    schedule: Schedule = Schedule()
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    distillation: Distillation | None = Distillation()
    orthogonality: float = Field(default=0.0, ge=0)
    bn_reestimate: bool | None = None
    freeze_bn: bool = False
    ema: float | None = Field(default=None, gt=0, lt=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    grad_clip: float | None = Field(default=None, gt=0)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    eval_interval: int = Field(default=1, ge=1)
    output: str | None = None
    export: Export = Export()
    bench: Bench = Bench()

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (len(value) < 3 or min(value) < 1):
            raise ValueError("write the input shape with its batch, e.g. [1, 3, 32, 32]")
        return value


def _section(path: tuple) -> type[BaseModel] | None:
    """The model class that the location ``path`` (field names, list indices) lies in."""
    cls: Any = Recipe
    for part in path:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        found = next((c for c in candidates
                      if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if found is None:
            return None
        cls = found
    return cls


_TYPES = {"int_parsing": "an integer", "int_type": "an integer", "float_parsing": "a number",
          "float_type": "a number", "bool_parsing": "true or false", "bool_type": "true or false",
          "string_type": "a string", "list_type": "a list", "dict_type": "a mapping",
          "model_type": "a mapping of keys", "int_from_float": "an integer"}


def describe(error: dict[str, Any], name: Any = None) -> str:
    """One sentence for one pydantic error: the key, what is wrong, what to write.

    ``name`` turns a field path (``decompose.rank``) into what the user wrote (a flag of the
    command line); by default the recipe key itself, quoted."""
    loc = tuple(error["loc"])
    name = name or repr
    rule = (error.get("ctx") or {}).get("error")
    if isinstance(rule, FieldRule):
        prefix = ".".join(str(p) for p in loc)
        return rule.render(lambda field: name(f"{prefix}.{field}" if prefix else field))
    where = name(".".join(str(p) for p in loc))
    kind = error["type"]
    if kind == "extra_forbidden":
        section = _section(loc[:-1])
        valid = ", ".join(section.model_fields) if section else "?"
        place = ".".join(str(p) for p in loc[:-1]) or "the top level"
        return f"unknown key {loc[-1]!r} in {place}; valid keys are: {valid}"
    if kind == "missing":
        return f"{where} is required"
    if kind in _TYPES:
        return f"{where} must be {_TYPES[kind]}, got {error.get('input')!r}"
    if kind == "literal_error":
        return f"{where} must be {error['ctx']['expected']}, got {error['input']!r}"
    msg = error["msg"]
    return f"{where}: {msg[:1].lower()}{msg[1:]} (got {error.get('input')!r})"


def validate_section(section: type[BaseModel], fields: dict[str, Any], name: Any
                     ) -> BaseModel:
    """``section`` built from ``fields`` (a command's options), or :class:`BadInput` naming
    the first problem with ``name`` (field path → the flag the user wrote)."""
    try:
        return section.model_validate(fields)
    except ValidationError as err:
        raise BadInput(describe(err.errors()[0], name)) from None


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a mapping (parsed YAML) into a :class:`Recipe`; :class:`BadInput` naming the
    first problem (and how many more there are) otherwise."""
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a string", int: "a number", float: "a number",
                bool: "true or false"}.get(type(data), type(data).__name__)
        raise BadInput(f"{source}: a recipe is a YAML mapping of keys (data, epochs, …), got "
                       f"{kind}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        errors = err.errors()
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise BadInput(f"{source}: {describe(errors[0])}{more}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; every problem is a :class:`BadInput` sentence naming
    the file: missing, a folder, unreadable, binary, not UTF-8, empty, not YAML, not a
    mapping, or a schema error."""
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"recipe {path} is a folder: pass a YAML file such as "
                       "recipes/fmnist-bsconvu-kd.yaml")
    if path.exists() and not path.is_file():
        raise BadInput(f"recipe {path} is not a regular file: pass a YAML file such as "
                       "recipes/fmnist-bsconvu-kd.yaml")
    if not path.is_file():
        raise BadInput(f"recipe {path} does not exist: pass a YAML file such as "
                       "recipes/fmnist-bsconvu-kd.yaml")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise BadInput(f"cannot read recipe {path} ({err.strerror or err}): check its "
                       "permissions") from None
    if b"\0" in raw:
        raise BadInput(f"recipe {path} is a binary file, not a YAML recipe: pass the recipe's "
                       ".yaml file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise BadInput(f"recipe {path} is not UTF-8 text (byte {err.start}): save it as "
                       "UTF-8") from None
    if not text.strip():
        raise BadInput(f"recipe {path} is empty: write a YAML mapping of keys such as "
                       "data, epochs and optimizer")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except _DuplicateKey as err:
        raise BadInput(f"recipe {path} sets {err.key!r} twice in one mapping (line "
                       f"{err.line}): keep one of them") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise BadInput(f"recipe {path} is not valid YAML{line}: fix the syntax") from None
    except RecursionError:
        raise BadInput(f"recipe {path} nests too deeply to be a recipe: write a YAML "
                       "mapping of keys such as data and epochs") from None
    if data is None:
        raise BadInput(f"recipe {path} holds no keys: write a YAML mapping of keys such as "
                       "data, epochs and optimizer")
    if _expands_beyond(data, MAX_RECIPE_NODES):
        raise BadInput(f"recipe {path} expands to more than {MAX_RECIPE_NODES:,} values "
                       "through its YAML aliases (*name): write the values out, or refer to "
                       "fewer anchors")
    return parse_recipe(data, f"recipe {path}")


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key set twice in one mapping (PyYAML keeps the last
    silently: ``epochs: 1`` … ``epochs: 2`` trained two epochs)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                repeated = key in seen
            except TypeError:  # an unhashable key: the base class names it
                break
            if repeated:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep)


#: the most values (mappings, lists and scalars, each alias expanded) a recipe may hold: a
#: recipe has hundreds; a kilobyte of nested aliases ("billion laughs") expands to billions,
#: which validation, the run's fingerprint and its error messages would each write out
MAX_RECIPE_NODES = 100_000


def _expands_beyond(data: Any, limit: int) -> bool:
    """Whether ``data`` (as the YAML loader built it: aliases are shared objects, and may
    refer to themselves) holds more than ``limit`` values once every alias is expanded."""
    stack, count = [data], 0
    while stack:
        item = stack.pop()
        count += 1
        if count > limit:
            return True
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False

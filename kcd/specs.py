"""Run specifications: what one job of Algorithm 1 does, as plain data.

A spec is built from the config by :mod:`kcd.config` (or by hand in a notebook), travels to
the job as JSON, and is turned back into these dataclasses by :func:`from_dict`, which
rejects unknown keys by name. The engines take specs; they never read the config file.
This module imports no torch: the workflow and the config tools read specs without it.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kcd.errors import KcdError

T = TypeVar("T")


@dataclass
class DataSpec:
    """Where a dataset lives and how to read it."""

    name: str
    root: str
    image_size: int | None = None  # imagenet/coco; CIFAR is always 32
    fast_loader: bool = True  # tensor-resident batches when the split fits in memory
    workers: int = 0  # DataLoader workers for the standard (PIL) path
    pin_memory: bool = True  # page-locked batches for non-blocking copies (CUDA only)
    prefetch_factor: int = 2  # batches each worker prepares ahead (with workers > 0)
    eval_limit: int | None = None  # evaluate on the first N evaluation images only
    download: bool = False  # let torchvision fetch CIFAR-100 into root (cluster use)
    augment: bool = True  # training augmentation (crop + flip); false: the evaluation transform
    decoded: str | None = None  # folder of <split>.pt decoded once (kcd.data.decoded; workflow)


@dataclass
class Recipe:
    """Iteration-based SGD (Section 4.1 expresses every schedule in iterations)."""

    iterations: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    nesterov: bool = False
    checkpoint_every: int = 0  # 0: every iterations // 10
    log_every: int = 20
    eval_batch_size: int = 256
    channels_last: bool = True
    micro_batches: int = 1  # split each batch (strided) and accumulate gradients
    grad_clip: float | None = None  # clip the gradient's total norm (None: the paper's recipes)
    precision: str = "fp32"  # "bf16": forward passes under bf16 autocast on CUDA (CPU: fp32)
    cudnn_benchmark: bool = True  # let cuDNN pick the fastest kernels for the fixed shapes
    # on a CPU: the weight gradients oneDNN computes slowly (depthwise convolutions, k x k ones
    # on maps of <= 4 pixels) by per-tap products instead (kcd.models.small_conv)
    cpu_small_conv_grads: bool = True
    # one fused kernel per SGD step instead of a loop of tensor ops per parameter (kcd.optim)
    fused_optimizer: bool = True


@dataclass
class LayerPair:
    """One (teacher layer, student layer) pair of Eq. 2 with its weight alpha."""

    teacher: str
    student: str
    weight: float = 1.0


@dataclass
class DistillSpec:
    """The distillation part of a run (absent for pre-training)."""

    method: str  # a kcd.losses name, or "baseline" (cross-entropy only)
    teacher: str | None = None
    teacher_weights: str | None = None
    weight: float | None = None  # None: the method's paper default
    options: dict[str, Any] = field(default_factory=dict)
    layers: list[LayerPair] = field(default_factory=list)  # empty: the models' defaults
    pre_relu: bool = False  # tap the pairs before the stage's last ReLU (AB)
    transforms: list[str | None] = field(default_factory=list)  # one file per pair, or None
    anchors: list[str] = field(default_factory=list)  # RCO: teacher anchor weights, route order
    init_iterations: int = 0  # AB: iterations of the initialisation stage
    dynamic_every: int = 0  # Table 5: recompute the transform every E iterations (0: static)
    dynamic_metric: str = "correlation"
    dynamic_strategy: str = "bipartite"
    # the teacher's answers computed once (kcd.teacher_outputs): on the training split, read
    # instead of a teacher forward per step (needs data.augment false), and on the evaluation
    # split
    teacher_outputs: str | None = None
    teacher_eval_outputs: str | None = None
    # RCO: each anchor's answers on the (unaugmented) training split, in the order of
    # ``anchors``; read instead of loading the anchor into the teacher
    anchor_outputs: list[str] = field(default_factory=list)


@dataclass
class TrainSpec:
    """One training job: pre-training (``distill`` is None) or a distillation run."""

    arch: str
    seed: int
    num_classes: int
    theta0: str
    out_dir: str
    data: DataSpec
    recipe: Recipe
    distill: DistillSpec | None = None
    anchor_iterations: list[int] = field(default_factory=list)  # pre-training: RCO anchors
    tags: dict[str, Any] = field(default_factory=dict)  # identity: dataset, teacher, method...


@dataclass
class StatisticsSpec:
    """One statistics pass (Algorithm 1 step 4) over the training images."""

    teacher: str
    teacher_weights: str
    student: str
    student_weights: str
    layers: list[str]  # [teacher layer, student layer]
    data: DataSpec
    num_classes: int
    out: str
    metrics: list[str] = field(default_factory=lambda: ["correlation"])
    groups: list[int] = field(default_factory=list)  # Table 6: also per-class, K groups
    group_metrics: list[str] = field(default_factory=lambda: ["correlation"])  # of the groups
    batch_size: int = 256
    max_images: int | None = None  # every k-th training image up to this many (None: all)


@dataclass
class DecodeSpec:
    """One split of an image-folder dataset, decoded once (:mod:`kcd.data.decoded`)."""

    data: DataSpec
    split: str
    out: str


@dataclass
class TeacherOutputsSpec:
    """A teacher's logits and features on one split, computed once (:mod:`kcd.teacher_outputs`)."""

    teacher: str
    teacher_weights: str
    num_classes: int
    data: DataSpec
    split: str  # train (read by runs on unaugmented images) or val (by every evaluation)
    # (teacher_weights may be an RCO anchor of the teacher: its outputs on train)
    layers: list[str]  # every teacher layer the pair's runs distil
    out: str
    batch_size: int = 256


ANCHOR_SIZES = [32, 64, 128, 256, 512]
"""torchvision's anchor sizes of the five FPN levels (P2-P6) for COCO-size images."""


@dataclass
class DetectionDistill:
    """The distillation part of a detection run (absent when pre-training)."""

    teacher: str  # the teacher's backbone, e.g. resnet152
    teacher_weights: str  # the teacher detector's final.pt
    method: str = "l2"  # plain feature L2; "Ours" is l2 with a transform
    weight: float = 1e-4  # Section 4.1, on the per-image sum of squares (kcd.detection)
    transform: str | None = None  # a channel transform file (kcd.statistics.make_transform)


@dataclass
class DetectionSpec:
    """One detection job (Table 9, :mod:`kcd.detection`): pre-training (``distill`` is None)
    or a distillation run."""

    backbone: str
    seed: int
    num_classes: int  # largest category id + 1 (kcd.data.datasets.num_classes)
    theta0: str
    out_dir: str
    data: DataSpec
    recipe: Recipe
    min_size: int = 800  # GeneralizedRCNNTransform: shorter side after resizing
    max_size: int = 1333  # ... and the cap on the longer side
    anchor_sizes: list[int] = field(default_factory=lambda: list(ANCHOR_SIZES))
    options: dict[str, int | float] = field(default_factory=dict)  # numeric FasterRCNN args
    warmup_iterations: int = 0  # linear warm-up from lr / 3 (Detectron's factor)
    distill: DetectionDistill | None = None
    tags: dict[str, Any] = field(default_factory=dict)  # identity: dataset, teacher, method...


# Fields that change how a job runs, not what it computes. The workflow passes them apart
# from the spec (``--runtime``), so changing one re-runs nothing; a checkpoint written under
# other values still resumes.
RUNTIME_FIELDS = {"recipe": ("log_every", "checkpoint_every", "eval_batch_size",
                             "cudnn_benchmark", "cpu_small_conv_grads", "fused_optimizer"),
                  "data": ("workers", "pin_memory", "prefetch_factor")}


def split_runtime(spec: dict) -> tuple[dict, dict]:
    """(``spec`` without its :data:`RUNTIME_FIELDS`, those fields), both JSON-ready dicts."""
    result = copy.deepcopy(spec)
    runtime: dict = {}
    for section, keys in RUNTIME_FIELDS.items():
        part = result.get(section)
        if isinstance(part, dict):
            taken = {k: part.pop(k) for k in keys if k in part}
            if taken:
                runtime[section] = taken
    return result, runtime


def runtime_text(runtime: dict) -> str:
    """``section.key=value,...``: run-time fields as the workflow passes them (no braces, which
    Snakemake would try to format in a resource)."""
    return ",".join(f"{section}.{k}={json.dumps(v)}" for section, values in sorted(runtime.items())
                    for k, v in sorted(values.items()))


def parse_runtime(text: str) -> dict:
    """The inverse of :func:`runtime_text`."""
    runtime: dict = {}
    for item in filter(None, text.strip().split(",")):
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise KcdError(f"--runtime: {item!r} is not SECTION.KEY=VALUE "
                           "(e.g. recipe.log_every=10)")
        try:
            runtime.setdefault(section, {})[name] = json.loads(value)
        except ValueError:
            raise KcdError(f"--runtime: the value of {key} is not a number, true/false or null: "
                           f"{value!r}") from None
    return runtime


def merge_runtime(spec: dict, runtime: dict) -> dict:
    """``spec`` with the run-time fields ``runtime`` put back (inverse of :func:`split_runtime`)."""
    out = copy.deepcopy(spec)
    for section, values in runtime.items():
        keys = RUNTIME_FIELDS.get(section)
        if keys is None or not isinstance(values, dict) or not isinstance(out.get(section), dict):
            raise KcdError(f"--runtime: {section!r} is not a run-time section of this spec "
                           f"(known: {', '.join(RUNTIME_FIELDS)})")
        unknown = sorted(set(values) - set(keys))
        if unknown:
            raise KcdError(f"--runtime: {section}.{unknown[0]} is not a run-time field "
                           f"(known: {', '.join(keys)})")
        out[section].update(values)
    return out


def fingerprint(spec: Any) -> str:
    """A hash of everything in a run's spec that shapes the run: not its run-time fields
    (:data:`RUNTIME_FIELDS`) nor its tags. A checkpoint resumes only under the same one."""
    d, _ = split_runtime(to_dict(spec))
    d.pop("tags", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from nested dicts, naming any unknown or missing key."""
    where = where or cls.__name__
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise KcdError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise KcdError(f"unknown key {where}.{unknown[0]}; known: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise KcdError(f"missing key {where}.{name}")
            continue
        value = data[name]
        sub = _nested(cls, name)
        if sub is not None and value is not None:
            if isinstance(value, list):
                value = [from_dict(sub, v, f"{where}.{name}[{i}]") for i, v in enumerate(value)]
            else:
                value = from_dict(sub, value, f"{where}.{name}")
        _check_type(value, _field_types(cls)[name], f"{where}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _check_type(value: Any, hint: Any, where: str) -> None:
    """Refuse a value that is not of its field's declared type, naming the key (a spec read
    from JSON is checked here, not deep inside training)."""
    if not _is_instance(value, hint):
        raise KcdError(f"key {where} must be {_type_name(hint)}, got {type(value).__name__} "
                       f"{json.dumps(value, default=str)[:60]}")


def _is_instance(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(
            _is_instance(v, args[0]) for v in value) if args else isinstance(value, (list, tuple))
    if origin is dict or hint is dict:
        return isinstance(value, dict) and (not args or all(
            _is_instance(k, args[0]) and _is_instance(v, args[1]) for k, v in value.items()))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def to_dict(spec: Any) -> dict:
    """The JSON-ready form of a spec (inverse of :func:`from_dict`)."""
    return dataclasses.asdict(spec)


def _nested(cls: type, name: str) -> type | None:
    """The dataclass a field holds (itself, optional, or in a list), read from its type."""
    hint = _field_types(cls)[name]
    for candidate in (hint, *typing.get_args(hint)):
        inner = typing.get_args(candidate) if typing.get_origin(candidate) is list else ()
        for t in (candidate, *inner):
            if dataclasses.is_dataclass(t):
                return t
    return None

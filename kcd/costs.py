"""What a run will cost before it starts: GPU-hours per job of a dry run, from a throughput table.

A job's images are what its spec says it processes (``iterations x batch_size`` for training,
the training split once for statistics, the evaluation split for the final evaluation); its
GPU-hours are those images divided by the throughput of one GPU for that kind of step, divided
by the data-parallel efficiency of its GPU count, times its GPUs. The throughput table has one
entry per step, in images per second per GPU, keyed

- ``<dataset>/<arch>``: a training step of ``arch`` (pre-training; a detector's, on ``coco``);
- ``<dataset>/<student><-<teacher>``: a distillation step (teacher forward, student step).

``bench/bench_gpu.py --json FILE`` measures these on a GPU and writes that format; ``kcd config
show --cost --throughput FILE`` uses its entries and falls back, per step, on
:data:`ASSUMED`, which are stated assumptions for one A100-class GPU with bf16 autocast, not
measurements. Each job's row says which it used.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from kcd.errors import KcdError

# Training-step throughput (images/s on one GPU) assumed when no measurement is given:
# ImageNet models at 224 px including JPEG decoding on ~10 CPU workers per GPU, CIFAR ResNets
# at 32 px from the in-memory loader, Faster R-CNN + FPN at ~800x1333 px.
ASSUMED: dict[str, float] = {
    "cifar100/resnet20": 24000.0, "cifar100/resnet32": 15000.0, "cifar100/resnet44": 11000.0,
    "cifar100/resnet56": 9000.0, "cifar100/resnet110": 4500.0,
    "cifar100/resnet20_0.5x": 32000.0, "cifar100/resnet56_0.5x": 14000.0,
    "imagenet/resnet18": 2800.0, "imagenet/resnet50": 1200.0, "imagenet/resnet152": 480.0,
    "imagenet/mobilenetv2_0.5x": 3000.0,
    "coco/resnet18": 45.0, "coco/resnet50": 35.0, "coco/resnet152": 18.0,
}
FORWARD_SPEEDUP = 3.0  # a forward pass without gradients vs a training step of the same model
SCALING_EFFICIENCY = 0.9  # data-parallel efficiency of a multi-GPU job
SPLIT_IMAGES = {  # training / evaluation split sizes of the paper's datasets
    "cifar100": (50000, 10000), "cifar10": (50000, 10000),
    "imagenet": (1281167, 50000), "coco": (118287, 5000),
}
SAME_STEPS = {"cifar10": "cifar100"}  # a dataset whose steps cost another's (same image size)


@dataclass
class Cost:
    images: int  # images through the model(s), training and evaluation
    images_per_s: float  # per GPU
    source: str  # "measured" or "assumed"
    gpus: int
    gpu_hours: float


THROUGHPUT_FORMAT = "kcd-throughput/1"
"""The ``format`` of the throughput table ``bench/bench_gpu.py`` writes (its docstring shows it)."""


def read_throughput(path: str | Path | None) -> dict[str, float]:
    """The images/s per step of a throughput table: a file written by ``bench/bench_gpu.py
    --throughput FILE`` (JSON, or YAML for .yaml/.yml) or ``--json FILE`` (the table is its
    ``throughput`` entry), or a bare JSON mapping of step names to images/s."""
    if path is None:
        return {}
    p = Path(path)
    write = "write it with `python bench/bench_gpu.py --throughput FILE` on a GPU machine"
    try:
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ValueError(str(e).replace("\n", " ")) from None
        else:
            data = json.loads(text)
    except (OSError, ValueError) as e:
        raise KcdError(f"throughput table {p} is unreadable ({e}); {write}") from None
    if isinstance(data, dict) and isinstance(data.get("throughput"), dict) \
            and "format" in data["throughput"]:
        data = data["throughput"]  # bench_gpu.py --json: the table beside its rows
    if isinstance(data, dict) and "format" in data and data["format"] != THROUGHPUT_FORMAT:
        raise KcdError(f"throughput table {p} has format {data['format']!r}, not "
                       f"{THROUGHPUT_FORMAT!r}; {write}")
    table = data.get("throughput", data) if isinstance(data, dict) else None
    if not isinstance(table, dict) or not all(
            isinstance(v, (int, float)) and v > 0 for v in table.values()):
        raise KcdError(f"throughput table {p} is not a mapping of step names to positive "
                       f"images/s; {write}")
    return {str(k): float(v) for k, v in table.items()}


def _train_rate(dataset: str, arch: str, measured: dict[str, float]) -> tuple[float, str]:
    key = f"{dataset}/{arch}"
    if key in measured:
        return measured[key], "measured"
    family = SAME_STEPS.get(dataset, dataset)
    fallback = f"{family}/{arch}"
    if fallback in ASSUMED:
        return ASSUMED[fallback], "assumed"
    raise KcdError(f"no throughput for a training step of {arch} on {dataset}: add "
                   f"'{key}' to the throughput table (bench/bench_gpu.py measures it) or to "
                   "kcd.costs.ASSUMED")


def _combined(*rates: float) -> float:
    """Throughput of steps run one after the other on the same images."""
    return 1.0 / sum(1.0 / r for r in rates)


def step_rate(kind: str, dataset: str, arch: str, teacher: str | None,
              measured: dict[str, float]) -> tuple[float, str]:
    """Images/s on one GPU for a job of ``kind`` (``train``, ``distill`` or ``forward``)."""
    if kind == "distill" and teacher:
        key = f"{dataset}/{arch}<-{teacher}"
        if key in measured:
            return measured[key], "measured"
        s, s_src = _train_rate(dataset, arch, measured)
        t, t_src = _train_rate(dataset, teacher, measured)
        return _combined(s, t * FORWARD_SPEEDUP), "measured" if s_src == t_src == "measured" \
            else "assumed"
    s, src = _train_rate(dataset, arch, measured)
    if kind == "forward":
        rates = [s * FORWARD_SPEEDUP]
        if teacher:
            t, t_src = _train_rate(dataset, teacher, measured)
            rates.append(t * FORWARD_SPEEDUP)
            src = src if t_src == src else "assumed"
        return _combined(*rates), src
    return s, src


def _analysis_archs(spec: dict) -> list[str]:
    """The architectures an analysis spec runs forward (its models, teacher and student)."""
    models = [m for m in (spec.get("models") or {}).values() if isinstance(m, dict)]
    teacher = spec.get("teacher")
    archs = [m["arch"] for m in models] + ([teacher["arch"]] if isinstance(teacher, dict) else [])
    if isinstance(spec.get("student"), str):
        archs += [spec["student"]] * max(1, len(spec.get("rows") or []))
    return archs


def _forward_hours(dataset: str, archs: list[str], images: int,
                   measured: dict[str, float]) -> tuple[float, float, str]:
    """(GPU-hours, combined images/s, source) of forward passes of ``archs`` over ``images``."""
    seconds, sources = 0.0, set()
    for arch in archs:
        rate, source = step_rate("forward", dataset, arch, None, measured)
        seconds += images / rate
        sources.add(source)
    rate = images / seconds if seconds else 0.0
    return seconds / 3600.0, rate, "measured" if sources == {"measured"} else "assumed"


def job_cost(row: dict[str, Any], spec: dict | None, measured: dict[str, float],
             args: dict[str, Any] | None = None) -> Cost | None:
    """The cost of one dry-run job (a :func:`kcd.dryrun.summary` row, its spec and its
    command's flags); None for jobs that use no GPU."""
    gpus = int(row.get("gpus") or 0)
    if not gpus or spec is None:
        return None
    args = args or {}
    dataset, arch = row["dataset"], row["model"]
    if dataset not in SPLIT_IMAGES:
        raise KcdError(f"no split sizes for dataset {dataset}: add its training and evaluation "
                       "image counts to kcd.costs.SPLIT_IMAGES")
    train_split, eval_split = SPLIT_IMAGES[dataset]
    data = spec.get("data") or {}
    eval_images = min(eval_split, data.get("eval_limit") or eval_split)
    recipe = spec.get("recipe") or {}
    teacher = row.get("teacher") or None
    if row["rule"] in ANALYSES:  # forward passes of the analysis's models
        images = ANALYSES[row["rule"]](train_split, eval_split, spec)
        hours, rate, source = _forward_hours(dataset, _analysis_archs(spec), images, measured)
        return Cost(images, rate, source, gpus, hours * gpus)
    if not recipe:  # statistics (the training split) or a learned transform (its steps)
        images = int(spec.get("max_images") or train_split)
        if "steps" in args:
            images = int(args["steps"]) * int(args.get("batch_size", 256))
        rate, source = step_rate("forward", dataset, arch, teacher, measured)
    else:
        images = int(recipe.get("iterations", 0)) * int(recipe.get("batch_size", 0))
        rate, source = step_rate("distill" if teacher else "train", dataset, arch, teacher,
                                 measured)
        eval_rate, _ = step_rate("forward", dataset, arch, None, measured)
        seconds = images / rate + eval_images / eval_rate
        images += eval_images
        rate = images / seconds if seconds else rate
    efficiency = SCALING_EFFICIENCY if gpus > 1 else 1.0
    hours = images / (rate * gpus * efficiency) / 3600.0 * gpus
    return Cost(images, rate, source, gpus, hours)


# Images an analysis runs through each of its models: (train split, eval split, spec) -> n.
ANALYSES = {
    "overlap": lambda train, evaluation, spec: train,  # class-averaged activations
    "feature_consistency": lambda train, evaluation, spec: evaluation,
    "figure1": lambda train, evaluation, spec: train // max(1, int(spec.get("num_classes", 1))),
}


def cost_rows(rows: Iterable[dict], specs: Iterable[dict | None],
              measured: dict[str, float], args: Iterable[dict] | None = None) -> list[dict]:
    """The rows of :func:`kcd.dryrun.summary` with ``images``, ``img/s/GPU``, ``source`` and
    ``GPU-h`` added (GPU jobs only)."""
    out = []
    rows, specs = list(rows), list(specs)
    for row, spec, flags in zip(rows, specs, list(args) if args is not None else [{}] * len(rows)):
        cost = job_cost(row, spec, measured, flags)
        if cost is None:
            continue
        out.append({"rule": row["rule"], "dataset": row["dataset"], "model": row["model"],
                    "teacher": row.get("teacher", ""), "method": row.get("method", ""),
                    "transform": row.get("transform", ""), "gpus": cost.gpus,
                    "images": cost.images, "img/s/GPU": round(cost.images_per_s),
                    "source": cost.source, "GPU-h": round(cost.gpu_hours, 1),
                    "wall-h": round(cost.gpu_hours / cost.gpus, 1)})
    return out

"""Benchmark: images/s of the paper-scale training steps on one GPU, and JPEG decoding per worker.

Every step runs on synthetic data of the real shapes (random images and labels, one fixed batch
reused every iteration, so no data loading is timed) with randomly initialised models; the
throughput of a step does not depend on the weights. Rows:

``pretrain``
    one training step of a model alone: forward, cross-entropy, backward, SGD with momentum
    (the recipe's settings). CIFAR-100 ResNet-56 (the teacher) and ResNet-20 at batch 128 and
    32x32; ImageNet ResNet-50 (the teacher), ResNet-18 and MobileNetV2-0.5x at 224x224. The
    students' rows are the "student-only step" the distillation rows are compared with.
``teacher-fwd``
    the teacher's forward pass in eval mode under ``torch.no_grad()``, as in distillation.
``distill``
    one distillation step: the student's forward with its distillation layer tapped
    (:class:`kcd.features.FeatureTap` at the model's ``default_layer``), the teacher's tapped
    forward under ``no_grad``, cross-entropy plus the method's loss from
    :func:`kcd.losses.build_loss`, backward, SGD over the student and the loss's trainable
    parameters. Methods: ``fitnets`` (1x1 conv + BN regressor), ``ours`` (the paper's L2 to the
    teacher seen through a fixed :class:`kcd.transforms.ChannelTransform`, a seeded choice of
    c_S teacher channels) and ``kd`` (T = 4; lambda 16 on CIFAR-100, 9 on ImageNet).
    Pairs: ResNet-56 -> ResNet-20 at batch 128; ResNet-50 -> ResNet-18 and ResNet-50 ->
    MobileNetV2-0.5x at the largest batch that fits the GPU.
``loader``
    ImageNet-style decoding: a few hundred generated 500x375 JPEGs (smooth colour fields plus
    noise, quality 90, about 70 KiB each; ImageNet's training JPEGs average about 110 KB at a
    similar pixel count, and decoding time follows the pixels) in an ``ImageFolder`` with the
    ImageNet training transform (:func:`kcd.data.datasets.imagenet_transform`: random-resized
    crop to 224, flip, to tensor, normalise) through a ``DataLoader`` with 1, 2, 4, ... workers
    up to the CPU count (shuffled passes, batch 32); after two batches per worker are taken
    untimed, batches are counted for ``--loader-seconds``; images/s and images/s per worker.
    Run first, before any CUDA work, so the workers fork a process without a CUDA context.

Batch on ImageNet: the largest that fits, found by doubling from 32 until a step raises
``torch.cuda.OutOfMemoryError`` (capped at 512; each trial runs two steps of every distillation
method of the pair, the second one with the optimizer's momentum buffers allocated). The
pair's student-only step and teacher forward are timed at the pair's batch; ResNet-50
pre-training gets its own search. On the CPU there is no search (``--imagenet-batch``, default 32).

Ratios (distillation rows): ``x student`` = distillation images/s / the student-only step's
images/s; ``x T+S`` = distillation images/s / (1 / (1/teacher-forward + 1/student-step)), the
rate if a distillation step cost exactly one teacher forward plus one student step, measured
separately. ``x T+S`` near 1.00 means the distillation machinery (hooks, loss, regressor,
transform) costs almost nothing beyond the two networks. Peak GiB is
``torch.cuda.max_memory_allocated`` over the row's warm-up and timed iterations (it includes
the weights of the other models resident in that section: at most a ResNet-50).

On CUDA: ``torch.backends.cudnn.benchmark = True``, bf16 autocast (``--amp``), channels-last
memory format (``--no-channels-last`` turns it off), ``--warmup`` untimed iterations before
every timed region, ``torch.cuda.synchronize()`` on both sides of it; the timed region is
``--iterations`` steps, repeated until it lasts ``--min-seconds`` (2 s on CUDA), so that the
fast CIFAR rows are timed over more than a few milliseconds. Expected run time on one H200:
about 3-4 minutes (an estimate: not yet run on a GPU), within an 8-minute budget.

Throughput table (``--throughput OUT``; JSON, or YAML when OUT ends in .yaml/.yml; also inside
``--json``): format ``kcd-throughput/1``, what a cost plan reads::

    {"format": "kcd-throughput/1",
     "unit": "images/s per GPU",
     "device": "NVIDIA H200", "torch": "2.x", "amp": "bf16", "channels_last": true, "tiny": false,
     "throughput": {                     # pretrain rule: "<dataset>/<model>"
         "cifar100/resnet56": 0.0,       # distill rule:  "<dataset>/<student><-<teacher>"
         "cifar100/resnet20": 0.0,       #   (the slowest measured method of the pair)
         "cifar100/resnet20<-resnet56": 0.0,
         "imagenet/resnet50": 0.0,
         "imagenet/resnet18": 0.0,
         "imagenet/resnet18<-resnet50": 0.0,
         "imagenet/mobilenetv2_0.5x": 0.0,
         "imagenet/mobilenetv2_0.5x<-resnet50": 0.0},
     "methods": {"<distill key>": {"fitnets": 0.0, "ours": 0.0, "kd": 0.0}},
     "batch": {"<key>": 128},
     "loader_per_worker": {"imagenet": 0.0}}   # images/s per worker at the most workers run

Keys of sections or methods not run are absent. ``throughput_table(rows, meta)`` builds it
from the measured rows.

    python bench/bench_gpu.py [--device cuda|cpu] [--tiny] [--amp bf16|none]
                              [--channels-last|--no-channels-last] [--json OUT]
                              [--throughput OUT] [--sections cifar imagenet loader]
                              [--methods fitnets ours kd] [--iterations N] [--warmup N]
                              [--min-seconds S] [--max-batch 512] [--imagenet-batch N]
                              [--jpegs 256] [--loader-seconds 4] [--threads T]

``--tiny``: batch 4 everywhere, 32x32 ImageNet inputs, 1 warm-up and 2 timed iterations,
8 JPEGs, 2 timed loader batches, one torch thread (``--threads``; several threads on a small,
busy CPU slow each step down many times): the whole script in seconds on a CPU (what the test
runs). Its numbers only show that every row runs.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Sampler
from torchvision.datasets import ImageFolder

from kcd.costs import THROUGHPUT_FORMAT
from kcd.data.datasets import imagenet_transform
from kcd.features import FeatureTap
from kcd.losses import DistillBatch, build_loss
from kcd.models import build_model, model_spec
from kcd.transforms import ChannelTransform

METHODS = ("fitnets", "ours", "kd")
SECTIONS = ("cifar", "imagenet", "loader")

CIFAR = {"dataset": "cifar100", "classes": 100, "size": 32, "teacher": "resnet56",
         "students": ("resnet20",), "kd_weight": 16.0, "lr": 0.1, "weight_decay": 5e-4}
IMAGENET = {"dataset": "imagenet", "classes": 1000, "size": 224, "teacher": "resnet50",
            "students": ("resnet18", "mobilenetv2_0.5x"), "kd_weight": 9.0, "lr": 0.2,
            "weight_decay": 1e-4}
FEATURE_WEIGHT = 1e2  # FitNets' and "Ours"' loss weight (Section 4.1 / kcd.losses)
JPEG_SIZE = (500, 375)
JPEG_CLASSES = 4
SEED = 0
MAX_TIMED_STEPS = 2000  # --min-seconds stops adding rounds of --iterations here


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    device: torch.device
    amp: torch.dtype | None
    channels_last: bool
    tiny: bool
    warmup: int
    iterations: int
    min_seconds: float
    cifar_batch: int
    imagenet_size: int
    imagenet_batch: int | None  # None: search (CUDA)
    batch_start: int
    max_batch: int
    methods: tuple[str, ...]
    jpegs: int
    loader_batch: int
    loader_seconds: float
    loader_max_batches: int | None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def inputs(self, batch: int, size: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(SEED)
        x = torch.randn(batch, 3, size, size, generator=g)
        y = torch.randint(0, classes, (batch,), generator=g)
        x = x.to(self.device).contiguous(memory_format=self.memory_format)
        return x, y.to(self.device)

    def model(self, arch: str, classes: int) -> nn.Module:
        torch.manual_seed(SEED)
        return build_model(arch, classes).to(self.device, memory_format=self.memory_format)


@dataclass
class Row:
    step: str  # pretrain | teacher-fwd | distill | loader
    setting: str  # dataset/model, dataset/student<-teacher, imagenet/jpeg-500x375
    method: str  # distillation method, workers=N for the loader, "-" otherwise
    batch: int
    images_per_s: float
    seconds: float
    images: int
    peak_gib: float | None = None
    x_student: float | None = None
    x_teacher_plus_student: float | None = None
    note: str = ""


def release(s: Settings) -> None:
    gc.collect()
    if s.cuda:
        torch.cuda.empty_cache()


def log(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:7.1f} s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- steps


class Step:
    """A callable training (or forward) step on a fixed batch; :meth:`close` frees its state."""

    def __call__(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TrainStep(Step):
    """Forward, cross-entropy, backward and SGD of one model (pre-training / student-only)."""

    def __init__(self, s: Settings, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 lr: float, weight_decay: float) -> None:
        self.s, self.model, self.x, self.y = s, model, x, y
        model.train().requires_grad_(True)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9,
                                         weight_decay=weight_decay)

    def __call__(self) -> None:
        with self.s.autocast():
            loss = F.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer = None


class TeacherForward(Step):
    """The frozen teacher's forward under ``no_grad``."""

    def __init__(self, s: Settings, teacher: nn.Module, x: torch.Tensor) -> None:
        self.s, self.teacher, self.x = s, teacher, x

    def __call__(self) -> None:
        with torch.no_grad(), self.s.autocast():
            self.teacher(self.x)


def make_loss(method: str, student: str, teacher: str, kd_weight: float) -> nn.Module:
    """The distillation loss of ``method`` for the pair's default layers."""
    c_s, c_t = model_spec(student).channels, model_spec(teacher).channels
    if method == "kd":
        return build_loss("kd", [], [], None, weight=kd_weight)
    if method == "fitnets":
        return build_loss("fitnets", [c_s], [c_t], [None], weight=FEATURE_WEIGHT)
    if method == "ours":  # a fixed channel transform: c_S distinct teacher channels
        index = torch.randperm(c_t, generator=torch.Generator().manual_seed(SEED))[:c_s]
        return build_loss("l2", [c_s], [c_t], [ChannelTransform(index, c_t)],
                          weight=FEATURE_WEIGHT)
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


class DistillStep(Step):
    """Student forward (tapped), teacher forward (tapped, no_grad), CE + loss, backward, SGD."""

    def __init__(self, s: Settings, cfg: dict, student_arch: str, student: nn.Module,
                 teacher: nn.Module, method: str, x: torch.Tensor, y: torch.Tensor) -> None:
        self.s, self.student, self.teacher, self.x, self.y = s, student, teacher, x, y
        self.loss = make_loss(method, student_arch, cfg["teacher"], cfg["kd_weight"])
        self.loss.to(s.device, memory_format=s.memory_format).train()
        self.uses_features = self.loss.uses_features
        self.s_layer = model_spec(student_arch).default_layer
        self.t_layer = model_spec(cfg["teacher"]).default_layer
        self.s_tap = FeatureTap(student, [self.s_layer])
        self.t_tap = FeatureTap(teacher, [self.t_layer])
        student.train().requires_grad_(True)
        teacher.eval().requires_grad_(False)
        params = list(student.parameters())
        params += [p for p in self.loss.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=cfg["lr"], momentum=0.9,
                                         weight_decay=cfg["weight_decay"])

    def __call__(self) -> None:
        with self.s.autocast():
            logits = self.student(self.x)
            with torch.no_grad():
                t_logits = self.teacher(self.x)
            features = self.uses_features
            batch = DistillBatch(
                labels=self.y, student_logits=logits, teacher_logits=t_logits,
                student_features=[self.s_tap.features[self.s_layer]] if features else [],
                teacher_features=[self.t_tap.features[self.t_layer]] if features else [],
            )
            loss = F.cross_entropy(logits, self.y) + sum(self.loss(batch).values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def close(self) -> None:
        self.s_tap.remove()
        self.t_tap.remove()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer = None


# --------------------------------------------------------------------------- timing


def timed(s: Settings, step: Step) -> tuple[int, float, float | None]:
    """(steps, seconds, peak GiB on CUDA): ``s.warmup`` untimed steps, then ``s.iterations``
    timed ones, repeated until at least ``s.min_seconds`` have passed (fast rows)."""
    if s.cuda:
        torch.cuda.synchronize(s.device)
        torch.cuda.reset_peak_memory_stats(s.device)
    for _ in range(s.warmup):
        step()
    s.sync()
    steps = 0
    start = time.perf_counter()
    while True:
        for _ in range(s.iterations):
            step()
        s.sync()
        steps += s.iterations
        seconds = time.perf_counter() - start
        if seconds >= s.min_seconds or steps >= MAX_TIMED_STEPS:
            break
    peak = torch.cuda.max_memory_allocated(s.device) / 2**30 if s.cuda else None
    return steps, seconds, peak


def is_oom(error: BaseException) -> bool:
    """A CUDA out-of-memory error, also when cuDNN reports it as a plain RuntimeError."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("CUDA out of memory", "CUDNN_STATUS_ALLOC_FAILED",
                                      "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"))


def measure(s: Settings, step: str, setting: str, method: str, batch: int,
            make: Callable[[int], Step], clock: float) -> Row:
    """Time the step ``make(batch)``; on a CUDA out-of-memory error, retry at half the batch."""
    note = ""
    while True:
        oom = False
        runner = None
        try:
            runner = make(batch)
            steps, seconds, peak = timed(s, runner)
        except RuntimeError as e:
            if not is_oom(e):
                raise
            oom = True
        finally:
            if runner is not None:
                runner.close()
            runner = None
            release(s)
        if not oom:
            break
        if batch <= 1:
            raise SystemExit(f"{step} {setting} {method}: out of GPU memory even at batch 1")
        batch //= 2
        note = f"OOM at the searched batch; batch {batch}"
    images = batch * steps
    row = Row(step, setting, method, batch, images / seconds, seconds, images, peak, note=note)
    log(f"{step} {setting} {method} batch {batch}: {row.images_per_s:.1f} images/s"
        + (f", peak {peak:.2f} GiB" if peak is not None else ""), clock)
    return row


def largest_batch(s: Settings, trial: Callable[[int], Iterator[Step]], what: str,
                  clock: float) -> int:
    """The largest batch, doubling from ``s.batch_start`` up to ``s.max_batch``, at which two
    steps of every step ``trial(batch)`` yields run without a CUDA out-of-memory error."""
    if not s.cuda:  # no search on the CPU
        return s.batch_start
    best = None
    batch = s.batch_start
    while batch <= s.max_batch:
        oom = False
        try:
            for step in trial(batch):
                try:
                    step()
                    step()
                    s.sync()
                finally:
                    step.close()
        except RuntimeError as e:
            if not is_oom(e):
                raise
            oom = True
        release(s)
        log(f"batch search {what}: {batch} {'OOM' if oom else 'fits'}", clock)
        if oom:
            break
        best = batch
        batch *= 2
    if best is None:
        raise SystemExit(f"{what}: batch {s.batch_start} does not fit the GPU; "
                         "give a smaller one with --imagenet-batch")
    return best


# --------------------------------------------------------------------------- sections


def pretrain_row(s: Settings, cfg: dict, arch: str, batch: int | None, clock: float) -> Row:
    """The pre-training step of ``arch`` alone (its own batch search when ``batch`` is None);
    the model lives only as long as this call."""
    size, classes = cfg["size"], cfg["classes"]
    model = s.model(arch, classes)

    def pretrain(b: int) -> Step:
        return TrainStep(s, model, *s.inputs(b, size, classes), cfg["lr"], cfg["weight_decay"])

    if batch is None:
        batch = largest_batch(s, lambda b: iter([pretrain(b)]), f"{cfg['dataset']}/{arch}",
                              clock)
    return measure(s, "pretrain", f"{cfg['dataset']}/{arch}", "-", batch, pretrain, clock)


def pair_rows(s: Settings, cfg: dict, student_arch: str, teacher: nn.Module, batch: int | None,
              clock: float) -> list[Row]:
    """Student-only step, teacher forward and each distillation method of one pair, at the
    pair's batch (searched on the distillation steps when ``batch`` is None); the student
    lives only as long as this call."""
    dataset, size, classes = cfg["dataset"], cfg["size"], cfg["classes"]
    student = s.model(student_arch, classes)

    def distill(method: str, b: int) -> Step:
        x, y = s.inputs(b, size, classes)
        return DistillStep(s, cfg, student_arch, student, teacher, method, x, y)

    def trial(b: int) -> Iterator[Step]:
        for method in s.methods:
            yield distill(method, b)

    if batch is None:
        batch = largest_batch(s, trial, f"{dataset}/{student_arch}<-{cfg['teacher']}", clock)
    rows = [
        measure(s, "pretrain", f"{dataset}/{student_arch}", "-", batch,
                lambda b: TrainStep(s, student, *s.inputs(b, size, classes), cfg["lr"],
                                    cfg["weight_decay"]), clock),
        measure(s, "teacher-fwd", f"{dataset}/{cfg['teacher']}", "-", batch,
                lambda b: TeacherForward(s, teacher, s.inputs(b, size, classes)[0]), clock),
    ]
    student_row, teacher_row = rows
    for method in s.methods:
        row = measure(s, "distill", f"{dataset}/{student_arch}<-{cfg['teacher']}", method,
                      batch, lambda b, m=method: distill(m, b), clock)
        row.x_student = row.images_per_s / student_row.images_per_s
        both = 1.0 / (1.0 / teacher_row.images_per_s + 1.0 / student_row.images_per_s)
        row.x_teacher_plus_student = row.images_per_s / both
        rows.append(row)
    return rows


def section(s: Settings, cfg: dict, batch: int | None, clock: float) -> list[Row]:
    """The teacher's pre-training row, then every pair of the dataset with one frozen teacher."""
    rows = [pretrain_row(s, cfg, cfg["teacher"], batch, clock)]
    release(s)
    teacher = s.model(cfg["teacher"], cfg["classes"]).eval().requires_grad_(False)
    for student in cfg["students"]:
        # MobileNetV2's recipe starts at lr 0.1 (Section 4.1); the rate does not depend on it
        student_cfg = dict(cfg, lr=0.1) if student.startswith("mobilenet") else cfg
        rows += pair_rows(s, student_cfg, student, teacher, batch, clock)
        release(s)
    del teacher
    release(s)
    return rows


# --------------------------------------------------------------------------- loader


def write_jpegs(folder: Path, count: int) -> Path:
    """``count`` 500x375 JPEGs in ``JPEG_CLASSES`` class folders: smooth colour fields + noise."""
    rng = np.random.default_rng(SEED)
    width, height = JPEG_SIZE
    for c in range(JPEG_CLASSES):
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC),
                           dtype=np.float32)
        pixels = (field + rng.normal(0.0, 12.0, field.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"class{i % JPEG_CLASSES}" / f"{i:05d}.jpg",
                                     quality=90)
    return folder


class _Endless(Sampler[int]):
    """Shuffled passes over ``n`` indices, forever (the timing decides when to stop)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(SEED)
        while True:
            yield from torch.randperm(self.n, generator=g).tolist()


def worker_counts() -> list[int]:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = max(1, cpus or 1)
    counts = [1]
    while counts[-1] * 2 <= cpus:
        counts.append(counts[-1] * 2)
    if counts[-1] != cpus:
        counts.append(cpus)
    return counts


def loader_rate(s: Settings, dataset: ImageFolder, workers: int) -> tuple[int, float]:
    """(images, seconds) decoded by ``workers`` workers once every worker is warm."""
    loader = DataLoader(dataset, batch_size=s.loader_batch, sampler=_Endless(len(dataset)),
                        num_workers=workers, prefetch_factor=2)
    it = iter(loader)
    try:
        for _ in range(2 * workers):  # every worker started and its prefetch queue filled
            next(it)
        images, batches = 0, 0
        start = time.perf_counter()
        while True:
            x, _ = next(it)
            images += x.shape[0]
            batches += 1
            elapsed = time.perf_counter() - start
            if elapsed >= s.loader_seconds or (s.loader_max_batches is not None
                                               and batches >= s.loader_max_batches):
                return images, elapsed
    finally:
        del it  # shuts the workers down


def loader_section(s: Settings, clock: float) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="kcd-bench-jpeg-") as tmp:
        t0 = time.perf_counter()
        folder = write_jpegs(Path(tmp) / "train", s.jpegs)
        log(f"{s.jpegs} JPEGs of {JPEG_SIZE[0]}x{JPEG_SIZE[1]} written in "
            f"{time.perf_counter() - t0:.1f} s", clock)
        dataset = ImageFolder(str(folder), transform=imagenet_transform(True, s.imagenet_size))
        setting = f"imagenet/jpeg-{JPEG_SIZE[0]}x{JPEG_SIZE[1]}"
        for workers in worker_counts():
            try:
                images, seconds = loader_rate(s, dataset, workers)
            except (RuntimeError, OSError) as e:  # e.g. a worker killed (small /dev/shm)
                log(f"loader with {workers} workers failed: {e}", clock)
                break
            rate = images / seconds
            rows.append(Row("loader", setting, f"workers={workers}", s.loader_batch, rate,
                            seconds, images, note=f"{rate / workers:.1f}/worker"))
            log(f"loader {workers} workers: {rate:.1f} images/s ({rate / workers:.1f} per worker)",
                clock)
    return rows


# --------------------------------------------------------------------------- reporting


def throughput_table(rows: list[Row], meta: dict) -> dict:
    """The ``kcd-throughput/1`` table (module docstring) of the measured rows."""
    throughput: dict[str, float] = {}
    methods: dict[str, dict[str, float]] = {}
    batch: dict[str, int] = {}
    loader: dict[str, float] = {}
    for row in rows:
        if row.step == "pretrain":
            throughput[row.setting] = round(row.images_per_s, 1)
            batch[row.setting] = row.batch
        elif row.step == "distill":
            methods.setdefault(row.setting, {})[row.method] = round(row.images_per_s, 1)
            batch[row.setting] = row.batch
        elif row.step == "loader":
            workers = int(row.method.split("=")[1])
            loader[row.setting.split("/")[0]] = round(row.images_per_s / workers, 1)
    for key, by_method in methods.items():
        throughput[key] = min(by_method.values())  # a cost plan wants the slowest method
    table = {"format": THROUGHPUT_FORMAT, "unit": "images/s per GPU",
             **{k: meta[k] for k in ("device", "torch", "amp", "channels_last", "tiny")},
             "throughput": throughput, "methods": methods, "batch": batch}
    if loader:
        table["loader_per_worker"] = loader
    return table


def dump_table(table: dict, path: Path) -> None:
    if path.suffix in (".yaml", ".yml"):
        import yaml

        path.write_text(yaml.safe_dump(table, sort_keys=False))
    else:
        path.write_text(json.dumps(table, indent=1) + "\n")


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_table(rows: list[Row], meta: dict) -> None:
    print(f"device: {meta['device']} ({meta['device_type']}, {meta['cpus']} CPUs) | "
          f"torch {meta['torch']} | amp {meta['amp']} | channels_last "
          f"{'on' if meta['channels_last'] else 'off'} | cudnn.benchmark "
          f"{'on' if meta['cudnn_benchmark'] else 'off'} | {meta['warmup']} warm-up + "
          f"{meta['iterations']} timed iterations (repeated to >= {meta['min_seconds']:g} s)"
          + (" | tiny" if meta["tiny"] else ""))
    header = (f"{'step':<12} {'setting':<37} {'method':<10} {'batch':>5} {'images/s':>10} "
              f"{'x student':>9} {'x T+S':>6} {'peak GiB':>8}  note")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.step:<12} {r.setting:<37} {r.method:<10} {r.batch:>5} "
              f"{r.images_per_s:>10.1f} {_num(r.x_student, '.2f'):>9} "
              f"{_num(r.x_teacher_plus_student, '.2f'):>6} {_num(r.peak_gib, '.2f'):>8}  "
              f"{r.note}".rstrip())
    print("-" * len(header))
    print("x student: distill images/s / the student's own training step (pretrain row); "
          "x T+S: / 1/(1/teacher-fwd + 1/student step), both at the same batch.")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true",
                        help="batch 4, 32 px ImageNet inputs, 2 timed iterations, 8 JPEGs")
    parser.add_argument("--amp", choices=("bf16", "none"), default=None,
                        help="autocast dtype (default: bf16 on CUDA, none on the CPU)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels-last memory format (default: on for CUDA, off on the CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    parser.add_argument("--throughput", type=Path, default=None,
                        help=f"write the {THROUGHPUT_FORMAT} table (YAML if .yaml/.yml, "
                             "else JSON)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--iterations", type=int, default=None,
                        help="timed iterations per row (default 20, --tiny 2)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed iterations first (default 5, --tiny 1)")
    parser.add_argument("--min-seconds", type=float, default=None,
                        help="repeat the timed iterations until this long (default: 2 on CUDA, "
                             "0 on the CPU and with --tiny)")
    parser.add_argument("--max-batch", type=int, default=512, help="cap of the ImageNet search")
    parser.add_argument("--imagenet-batch", type=int, default=None,
                        help="fixed ImageNet batch instead of the search (CPU default 32)")
    parser.add_argument("--jpegs", type=int, default=None, help="JPEGs written (default 256)")
    parser.add_argument("--loader-seconds", type=float, default=4.0,
                        help="timed seconds per worker count")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own; --tiny: 1)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here; use --device cpu")
    for name in ("iterations", "imagenet_batch", "jpegs", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.max_batch < 32:
        parser.error("--max-batch must be >= 32 (the search starts at 32)")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    cuda = args.device == "cuda"
    amp = args.amp or ("bf16" if cuda else "none")
    tiny = args.tiny
    return Settings(
        device=torch.device(args.device),
        amp=torch.bfloat16 if amp == "bf16" else None,
        channels_last=cuda if args.channels_last is None else args.channels_last,
        tiny=tiny,
        warmup=args.warmup if args.warmup is not None else (1 if tiny else 5),
        iterations=args.iterations or (2 if tiny else 20),
        min_seconds=args.min_seconds if args.min_seconds is not None else (
            2.0 if cuda and not tiny else 0.0),
        cifar_batch=4 if tiny else 128,
        imagenet_size=32 if tiny else 224,
        imagenet_batch=args.imagenet_batch or (4 if tiny else None if cuda else 32),
        batch_start=32,
        max_batch=args.max_batch,
        methods=tuple(m for m in METHODS if m in args.methods),
        jpegs=args.jpegs or (8 if tiny else 256),
        loader_batch=4 if tiny else 32,
        loader_seconds=args.loader_seconds,
        loader_max_batches=2 if tiny else None,
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    s = settings_from(args)
    threads = args.threads or (1 if s.tiny else None)
    if threads is not None:  # --tiny: one thread, robust on a small, busy CPU
        torch.set_num_threads(threads)
    clock = time.perf_counter()
    if s.cuda:
        torch.backends.cudnn.benchmark = True
    rows: list[Row] = []
    if "loader" in args.sections:  # first: the workers fork a process without CUDA
        rows_loader = loader_section(s, clock)
    else:
        rows_loader = []
    if "cifar" in args.sections:
        rows += section(s, CIFAR, s.cifar_batch, clock)
    if "imagenet" in args.sections:
        rows += section(s, dict(IMAGENET, size=s.imagenet_size), s.imagenet_batch, clock)
    rows += rows_loader
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    meta = {
        "device": torch.cuda.get_device_name(s.device) if s.cuda
        else (platform.processor() or platform.machine() or "cpu"),
        "device_type": s.device.type,
        "cpus": cpus,
        "torch_threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "amp": "bf16" if s.amp is not None else "none",
        "channels_last": s.channels_last,
        "cudnn_benchmark": bool(s.cuda and torch.backends.cudnn.benchmark),
        "warmup": s.warmup,
        "iterations": s.iterations,
        "min_seconds": s.min_seconds,
        "tiny": s.tiny,
        "seconds": round(time.perf_counter() - clock, 1),
    }
    print()
    print_table(rows, meta)
    table = throughput_table(rows, meta)
    print(f"\nthroughput table ({THROUGHPUT_FORMAT}):")
    print(json.dumps(table["throughput"], indent=1))
    print(f"total {meta['seconds']:.1f} s")
    if args.json is not None:
        args.json.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows],
                                         "throughput": table}, indent=1) + "\n")
    if args.throughput is not None:
        dump_table(table, args.throughput)
    return table


if __name__ == "__main__":
    main()

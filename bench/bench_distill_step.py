"""Benchmark: distillation step throughput on the CPU, teacher resnet56 -> student resnet20_0.5x.

Three variants of one distillation step (student forward with the distillation layer tapped,
teacher forward under ``no_grad``, cross-entropy + the method's loss from
:func:`kcd.losses.build_loss`, backward, SGD step), timed side by side in one run:

``ours``
    :func:`kcd.train.train` itself, on a :class:`~kcd.specs.TrainSpec` with the fast tensor
    data path (``DataSpec(fast_loader=True)``) and the recipe's default ``channels_last``.
    The run is ``warmup + iterations`` long; a tracker called after every iteration
    (``log_every=1``) stamps the clock after iteration ``warmup`` and after iteration
    ``warmup + iterations``, so exactly ``iterations`` full loop iterations are timed
    (data, forward, losses, backward, step, scheduler and the loop's per-step bookkeeping),
    and neither the setup before the loop nor the evaluation after it (kept tiny with
    ``DataSpec.eval_limit``) counts. Mid-run checkpoints are switched off
    (``checkpoint_every`` = the run length): the recipe default, one every tenth of the run,
    would save every few iterations of a run this short. ``train_seconds`` of the run's
    result (all iterations, warm-up included) is printed as well.
``reference``
    a plain loop: the torchvision ``CIFAR100`` dataset with the standard PIL transforms
    (:func:`kcd.data.datasets.build_dataset`) in a ``torch.utils.data.DataLoader``
    (shuffled, ``drop_last``, ``--workers`` worker processes), the same models and loss, a
    plain forward hook for the feature, the same SGD settings, contiguous memory format.
``bare``
    the compute alone: the step of ``ours`` (``channels_last``, :class:`kcd.features.FeatureTap`,
    same loss and optimizer) on one fixed random batch reused every iteration; no data loading.

Every variant starts from the same weight files and runs ``warmup`` untimed iterations first.
The data is the demo CIFAR-100 (10k training images), written to a temporary folder unless
``--root`` names a folder holding ``cifar-100-python/``. The teacher is untrained (throughput does
not depend on its accuracy), but its batch-norm statistics are first estimated on a few training
batches so that its features, and hence the loss, have a trained-like scale.

Targets (stated under the table): ``ours`` at least 1.3x the reference loop and at least 0.85x
bare compute. Timings move with the load of the CPU; the load average is printed.

    python bench/bench_distill_step.py [--iterations 30] [--warmup 5] [--batch-size 128]
                                       [--method fitnets] [--workers 2] [--threads T]
                                       [--root DIR]
"""
from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from kcd.checkpoint import atomic_save
from kcd.data.datasets import build_dataset
from kcd.data.demo import DemoSizes, write_demo_data
from kcd.data.loader import TensorDataLoader
from kcd.features import FeatureTap, feature_shapes
from kcd.losses import LOSSES, DistillBatch, build_loss
from kcd.models import model_spec
from kcd.specs import DataSpec, DistillSpec, Recipe, TrainSpec
from kcd.train import init_weights, load_model, train

TEACHER = "resnet56"
STUDENT = "resnet20_0.5x"
NUM_CLASSES = 100
SEED = 0
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4  # the CIFAR-100 recipe's SGD settings
EVAL_LIMIT = 256  # evaluation images after the ours run (not timed)
CALIBRATION_BATCHES = 4  # teacher batch-norm statistics
METHODS = ("fitnets", "at", "kd", "rkd")  # need no transform, pre-ReLU taps or anchors


def load_avg() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


# --------------------------------------------------------------------------- setup


def make_weights(root: str, folder: Path, batch_size: int) -> tuple[Path, Path]:
    """theta0 of the student and a teacher file whose batch-norm statistics fit the data."""
    student_path = init_weights(STUDENT, SEED, NUM_CLASSES, folder / "theta0.pt")
    teacher_path = init_weights(TEACHER, SEED, NUM_CLASSES, folder / "teacher.pt")
    teacher = load_model(TEACHER, teacher_path, NUM_CLASSES, "teacher weights")
    for m in teacher.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    loader = TensorDataLoader.from_cifar(build_dataset("cifar100", root, "train"),
                                         batch_size=batch_size, shuffle=True, augment=True,
                                         seed=SEED, drop_last=True)
    teacher.train()
    with torch.no_grad():
        for _, (x, _) in zip(range(CALIBRATION_BATCHES), loader.iterate_forever()):
            teacher(x)
    atomic_save({"arch": TEACHER, "seed": SEED, "num_classes": NUM_CLASSES,
                 "state_dict": teacher.state_dict()}, teacher_path)
    return student_path, teacher_path


class Pieces:
    """Student, teacher, loss and optimizer of one variant, built as ``train()`` builds them."""

    def __init__(self, method: str, student_path: Path, teacher_path: Path,
                 memory_format: torch.memory_format) -> None:
        torch.manual_seed(SEED)
        self.student = load_model(STUDENT, student_path, NUM_CLASSES, "theta0")
        self.teacher = load_model(TEACHER, teacher_path, NUM_CLASSES, "teacher weights")
        self.teacher.eval().requires_grad_(False)
        self.uses_features = LOSSES.get(method).uses_features
        self.t_layer = model_spec(TEACHER).default_layer
        self.s_layer = model_spec(STUDENT).default_layer
        if self.uses_features:
            size = model_spec(STUDENT).input_size
            c_s = feature_shapes(self.student, [self.s_layer], size)[self.s_layer][0]
            c_t = feature_shapes(self.teacher, [self.t_layer], size)[self.t_layer][0]
            self.loss = build_loss(method, [c_s], [c_t], [None])
        else:
            self.loss = build_loss(method, [], [], None)
        self.student.to(memory_format=memory_format)
        self.teacher.to(memory_format=memory_format)
        params = list(self.student.parameters())
        params += [p for p in self.loss.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM,
                                         weight_decay=WEIGHT_DECAY)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, [], gamma=0.1)
        self.student.train()
        self.loss.train()

    def step(self, x: torch.Tensor, y: torch.Tensor, s_feature, t_feature) -> None:
        """One distillation step; ``s_feature``/``t_feature`` return the tapped features."""
        logits = self.student(x)
        with torch.no_grad():
            t_logits = self.teacher(x)
        batch = DistillBatch(
            labels=y, student_logits=logits, teacher_logits=t_logits,
            student_features=[s_feature()] if self.uses_features else [],
            teacher_features=[t_feature()] if self.uses_features else [],
        )
        loss = F.cross_entropy(logits, y) + sum(self.loss(batch).values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()


def timed(step, warmup: int, iterations: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    return time.perf_counter() - start


# --------------------------------------------------------------------------- variants


class _Clock:
    """Tracker for ``train()``: stamps the time after the given steps."""

    def __init__(self, marks: set[int]) -> None:
        self.marks = marks
        self.stamps: dict[int, float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step in self.marks and step not in self.stamps:  # train() logs eval at the end too
            self.stamps[step] = time.perf_counter()


def run_ours(args, root: str, work: Path, student_path: Path, teacher_path: Path) -> float:
    total = args.warmup + args.iterations
    spec = TrainSpec(
        arch=STUDENT, seed=SEED, num_classes=NUM_CLASSES, theta0=str(student_path),
        out_dir=str(work / "ours"),
        data=DataSpec(name="cifar100", root=root, fast_loader=True, eval_limit=EVAL_LIMIT),
        recipe=Recipe(iterations=total, batch_size=args.batch_size, lr=LR, momentum=MOMENTUM,
                      weight_decay=WEIGHT_DECAY, checkpoint_every=total, log_every=1,
                      channels_last=True),
        distill=DistillSpec(method=args.method, teacher=TEACHER,
                            teacher_weights=str(teacher_path)),
        tags={"method": args.method, "bench": "distill_step"},
    )
    clock = _Clock({args.warmup, total})
    if args.warmup == 0:
        clock.stamps[0] = time.perf_counter()  # approximate: includes the loop's last setup
    result = train(spec, tracker=clock, progress=False)
    print(f"  ours: train() train_seconds = {result['train_seconds']:.2f} s for all {total} "
          f"iterations (warm-up included)")
    return clock.stamps[total] - clock.stamps[args.warmup]


def run_reference(args, root: str, student_path: Path, teacher_path: Path) -> float:
    pieces = Pieces(args.method, student_path, teacher_path, torch.contiguous_format)
    features: dict[str, torch.Tensor] = {}
    modules = {"s": dict(pieces.student.named_modules())[pieces.s_layer],
               "t": dict(pieces.teacher.named_modules())[pieces.t_layer]}
    handles = [m.register_forward_hook(lambda _m, _i, out, key=key: features.__setitem__(key, out))
               for key, m in modules.items()]
    dataset = build_dataset("cifar100", root, "train")  # PIL crop + flip + ToTensor + Normalize
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                        num_workers=args.workers, drop_last=True)

    def batches():
        while True:
            yield from loader

    stream = batches()

    def step() -> None:
        x, y = next(stream)
        pieces.step(x, y, lambda: features["s"], lambda: features["t"])

    try:
        return timed(step, args.warmup, args.iterations)
    finally:
        stream.close()  # shuts the workers down
        for h in handles:
            h.remove()


def run_bare(args, student_path: Path, teacher_path: Path) -> float:
    pieces = Pieces(args.method, student_path, teacher_path, torch.channels_last)
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=g)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=g)
    with FeatureTap(pieces.student, [pieces.s_layer]) as s_tap, \
            FeatureTap(pieces.teacher, [pieces.t_layer]) as t_tap:
        return timed(lambda: pieces.step(x, y, lambda: s_tap.features[pieces.s_layer],
                                         lambda: t_tap.features[pieces.t_layer]),
                     args.warmup, args.iterations)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=30, help="timed iterations per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations first")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--method", default="fitnets", choices=METHODS)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (reference)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--root", default=None,
                        help="CIFAR-100 root (holding cifar-100-python/); default: demo data")
    args = parser.parse_args()
    if args.iterations < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("need --iterations >= 1, --warmup >= 0 and --batch-size >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="kcd-bench-") as tmp:
        work = Path(tmp)
        if args.root is None:
            t0 = time.perf_counter()
            root = str(write_demo_data(work / "data", kinds=("cifar100",), sizes=DemoSizes(),
                                       progress=False)["cifar100"])
            print(f"demo CIFAR-100 written in {time.perf_counter() - t0:.1f} s")
        else:
            root = args.root
        n_train = len(build_dataset("cifar100", root, "train", train_transform=False))
        student_path, teacher_path = make_weights(root, work / "weights", args.batch_size)
        print(f"{TEACHER} -> {STUDENT}, method {args.method}, batch {args.batch_size}, "
              f"{n_train} training images; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
              f"{args.workers} reference workers")
        start_load = load_avg()
        print(f"load average (1/5/15 min) at start: {start_load}")

        runs = [
            ("bare", lambda: run_bare(args, student_path, teacher_path)),
            ("ours", lambda: run_ours(args, root, work, student_path, teacher_path)),
            ("reference", lambda: run_reference(args, root, student_path, teacher_path)),
        ]
        seconds: dict[str, float] = {}
        loads: dict[str, str] = {}
        for name, run in runs:
            print(f"running {name} ({args.warmup} warm-up + {args.iterations} timed iterations)",
                  flush=True)
            seconds[name] = run()
            loads[name] = load_avg()
            gc.collect()

    ips = {k: args.iterations * args.batch_size / s for k, s in seconds.items()}
    header = (f"{'variant':<10} {'iters':>6} {'seconds':>9} {'images/s':>9} "
              f"{'vs ref':>7} {'vs bare':>8}  load after")
    print()
    print(header)
    print("-" * len(header))
    for name in ("ours", "reference", "bare"):
        print(f"{name:<10} {args.iterations:>6} {seconds[name]:>9.2f} {ips[name]:>9.1f} "
              f"{ips[name] / ips['reference']:>6.2f}x {ips[name] / ips['bare']:>7.2f}x  "
              f"{loads[name]}")
    print("-" * len(header))
    vs_ref = ips["ours"] / ips["reference"]
    vs_bare = ips["ours"] / ips["bare"]
    print(f"target: ours >= 1.30x reference: {vs_ref:.2f}x {'met' if vs_ref >= 1.3 else 'MISSED'}")
    print(f"target: ours >= 0.85x bare:      {vs_bare:.2f}x "
          f"{'met' if vs_bare >= 0.85 else 'MISSED'}")
    print(f"load average (1/5/15 min): start {start_load}, end {load_avg()}; "
          f"{os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()

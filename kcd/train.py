"""The training engine: theta0, pre-training and distillation runs (Algorithm 1, steps 1-3, 6-7).

One loop serves both: pre-training is a run without a :class:`~kcd.specs.DistillSpec`;
``method: baseline`` is the same loop with cross-entropy only. A run:

- starts from the theta0 file of its (architecture, seed) -- never from fresh weights;
- is iteration-based SGD with a multi-step schedule (Section 4.1's recipes as written), in the
  stages the distillation loss asks for (:meth:`~kcd.losses.base.DistillationLoss.stages`:
  AB's initialisation stage comes first, with an optimizer of its own); the loss's hooks run
  around each main-stage iteration (RCO's teacher anchors) and so do the dynamic transforms
  (Table 5, :class:`~kcd.transforms.DynamicMatching`). The engine knows no method by name;
- writes an atomic checkpoint (model, optimizer, scheduler, loss modules, data stream and every
  RNG state) every ``checkpoint_every`` iterations, and a rerun of the same command resumes
  from it, ending bit-identical to an uninterrupted run on the CPU;
- stops on a NaN/inf loss with an error naming the iteration and the loss term;
- runs under DistributedDataParallel when ``WORLD_SIZE`` > 1 (torchrun or SLURM tasks); each
  rank takes a strided share of every global batch, so the processes together see exactly the
  batches of a single process with the same global batch. ``recipe.micro_batches`` splits a
  batch the same strided way and accumulates gradients: one process with ``micro_batches = W``
  computes the same parameter updates as W DDP processes (batch-norm statistics per
  micro-batch, like per rank), and keeps the paper's per-GPU batch on fewer GPUs. With DDP,
  batch-norm running statistics follow rank 0 (DDP broadcasts its buffers);
- ends with ``final.pt`` and ``result.json`` (written last: its presence means done).
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from kcd.checkpoint import (
    atomic_save,
    atomic_write_json,
    load_file,
    load_model_weights,
    rng_state,
    set_rng_state,
)
from kcd.data.datasets import check_num_classes
from kcd.data.streams import eval_batches, train_stream
from kcd.errors import KcdError
from kcd.evaluate import evaluate
from kcd.features import FeatureTap, feature_shapes
from kcd.losses import BASELINE, LOSSES, build_loss
from kcd.losses.base import DistillBatch, DistillContext, Stage
from kcd.models import build_model, model_spec
from kcd.specs import DistillSpec, LayerPair, TrainSpec, split_runtime, to_dict
from kcd.transforms import ChannelTransform, DynamicMatching, load_transform

CHECKPOINT = "checkpoint.pt"
FINAL = "final.pt"
RESULT = "result.json"


class Tracker(Protocol):
    """What the engine needs from experiment tracking (see :mod:`kcd.tracking`)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class _NullTracker:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass


# --------------------------------------------------------------------------- theta0


def init_weights(arch: str, seed: int, num_classes: int, path: str | os.PathLike) -> Path:
    """Write theta0 of ``arch`` for ``seed``: the weights every run of this student starts from."""
    torch.manual_seed(seed)
    model = build_model(arch, num_classes)
    return atomic_save(
        {"arch": arch, "seed": seed, "num_classes": num_classes, "state_dict": model.state_dict()},
        path,
    )


def load_model(arch: str, path: str | os.PathLike, num_classes: int, what: str) -> nn.Module:
    """Build ``arch`` and load a kcd model file into it, checking architecture and classes."""
    obj = load_model_weights(path, arch, what)
    if obj.get("num_classes", num_classes) != num_classes:
        raise KcdError(
            f"{what} {path} has {obj['num_classes']} classes but the dataset has {num_classes}"
        )
    model = build_model(arch, num_classes)
    model.load_state_dict(obj["state_dict"])
    return model


# --------------------------------------------------------------------------- distributed


def _distributed() -> tuple[int, int, int]:
    """(rank, local_rank, world_size), initialising torch.distributed when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_world_size()


# --------------------------------------------------------------------------- the run


class _Distillation:
    """Teacher, taps, transforms, loss modules and stages of one run.

    Pre-training and cross-entropy-only runs have no teacher and no loss modules: their one
    stage is the recipe's. Otherwise there is one loss module per layer pair (one for a
    logits-only method); the modules' hooks (:class:`~kcd.losses.base.DistillationLoss`) and
    the dynamic transforms (:class:`~kcd.transforms.DynamicMatching`) run through this class,
    which knows no method by name.
    """

    def __init__(self, spec: TrainSpec, student: nn.Module, device: torch.device) -> None:
        d = spec.distill
        self.teacher: nn.Module | None = None
        self.losses = nn.ModuleList()
        self.pairs: list[tuple[str, str, float]] = []
        self.transforms: list[nn.Module | None] = []
        self.dynamic: list[DynamicMatching | None] = []
        self.context: DistillContext | None = None
        self.stages = [Stage("main", spec.recipe.iterations, _no_terms)]
        self._stage_terms: list[list] = [[]]
        if d is None:
            return
        if d.method == BASELINE:  # the registry's name for cross-entropy only
            for name in ("init_iterations", "anchors"):
                if getattr(d, name):
                    raise KcdError(f"distill.{name} is not for '{d.method}', which trains with "
                                   "cross-entropy only")
            return
        method = LOSSES.get(d.method)
        if not d.teacher or not d.teacher_weights:
            raise KcdError(f"method '{d.method}' needs distill.teacher and distill.teacher_weights")
        self.teacher = load_model(d.teacher, d.teacher_weights, spec.num_classes, "teacher weights")
        self.teacher.to(device).eval().requires_grad_(False)
        self.context = DistillContext(d, spec.recipe, self._teacher_loader(d.teacher, device))
        if not method.uses_features:
            if any(d.transforms):
                raise KcdError(f"method '{d.method}' distils logits only; a channel transform "
                               "has nothing to apply to (use transform 'none')")
            self.losses.append(build_loss(d.method, [], [], None, weight=d.weight, **d.options))
        else:
            self._feature_losses(spec, student, device, method.default_weight)
        self.losses.to(device)
        for module in self.losses:
            module.setup(self.context)
        self._plan_stages(spec)

    def _feature_losses(self, spec: TrainSpec, student: nn.Module, device: torch.device,
                        default_weight: float) -> None:
        d: DistillSpec = spec.distill  # type: ignore[assignment]
        layers = d.layers or [
            LayerPair(model_spec(d.teacher).default_layer, model_spec(spec.arch).default_layer)
        ]
        suffix = ":pre_relu" if d.pre_relu else ""
        for p in layers:
            t_layer = p.teacher if p.teacher.endswith(":pre_relu") else p.teacher + suffix
            s_layer = p.student if p.student.endswith(":pre_relu") else p.student + suffix
            self.pairs.append((t_layer, s_layer, p.weight))
        size = _input_size(spec)
        s_shapes = feature_shapes(student, [s for _, s, _ in self.pairs], size)
        t_shapes = feature_shapes(self.teacher, [t for t, _, _ in self.pairs], size)
        paths = d.transforms or [None] * len(self.pairs)
        if len(paths) != len(self.pairs):
            raise KcdError(
                f"distill.transforms has {len(paths)} entries for {len(self.pairs)} layer pairs"
            )
        base_weight = d.weight if d.weight is not None else default_weight
        for (t_layer, s_layer, alpha), path in zip(self.pairs, paths):
            c_t, c_s = t_shapes[t_layer][0], s_shapes[s_layer][0]
            transform = None
            if path:
                transform = load_transform(path)
                _check_transform(transform, path, spec.arch, d.teacher, s_layer, c_t, c_s)
                transform.to(device).eval().requires_grad_(False)
            self.transforms.append(transform)
            self.losses.append(
                build_loss(d.method, [c_s], [c_t], [transform], weight=base_weight * alpha,
                           **d.options)
            )
            self.dynamic.append(
                DynamicMatching(transform, d.dynamic_every, d.dynamic_metric, d.dynamic_strategy)
                if d.dynamic_every > 0 else None
            )

    def _teacher_loader(self, arch: str, device: torch.device):
        def load(path: str, what: str) -> None:
            obj = load_model_weights(path, arch, what)
            self.teacher.load_state_dict(obj["state_dict"])
            self.teacher.to(device).eval()

        return load

    def _plan_stages(self, spec: TrainSpec) -> None:
        """The stages of the loss modules (one method, so one plan), and each module's terms."""
        plans = [module.stages(self.context) for module in self.losses]
        shape = [(s.name, s.iterations, s.cross_entropy, s.main) for s in plans[0]]
        if any([(s.name, s.iterations, s.cross_entropy, s.main) for s in p] != shape
               for p in plans):
            raise KcdError(f"the loss modules of method '{spec.distill.method}' disagree on "
                           "the stages of training")
        if [s.main for s in plans[0]].count(True) != 1:
            raise KcdError(f"method '{spec.distill.method}' must have exactly one main stage")
        self.stages = plans[0]
        self._stage_terms = [[p[k].terms for p in plans] for k in range(len(self.stages))]

    @property
    def uses_features(self) -> bool:
        return bool(self.pairs)

    def before_step(self, iteration: int) -> None:
        for module in self.losses:
            module.before_step(iteration, self.context)

    def after_step(self, iteration: int) -> None:
        for module in self.losses:
            module.after_step(iteration, self.context)
        for dynamic in self.dynamic:
            if dynamic is not None:
                dynamic.after_step(iteration)

    def terms(self, stage: int, batch: DistillBatch, s_feats: list[torch.Tensor],
              t_feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named, weighted terms of every loss module (one module per layer pair) in ``stage``;
        ``batch`` holds the labels, logits and iteration, the features go pair by pair."""
        terms: dict[str, torch.Tensor] = {}
        fns = self._stage_terms[stage]
        for i, fn in enumerate(fns):
            if self.uses_features:
                batch = replace(batch, student_features=[s_feats[i]],
                                teacher_features=[t_feats[i]])
            for k, v in fn(batch).items():
                terms[f"{k}/{i}" if len(fns) > 1 else k] = v
        return terms

    def observe(self, t_feats: list[torch.Tensor], s_feats: list[torch.Tensor]) -> None:
        """Show the dynamic transforms the features of a main-stage forward."""
        for dynamic, ft, fs in zip(self.dynamic, t_feats, s_feats):
            if dynamic is not None:
                dynamic.observe(ft, fs)

    def state_dict(self) -> dict:
        return {
            "losses": self.losses.state_dict(),
            "transform_index": [t.index.clone() if isinstance(t, ChannelTransform) else None
                                for t in self.transforms],
            "dynamic": [s.state_dict() if s is not None else None for s in self.dynamic],
        }

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:  # a pre-training checkpoint
            return
        self.losses.load_state_dict(state["losses"])
        for t, idx in zip(self.transforms, state["transform_index"]):
            if idx is not None:
                t.index.copy_(idx)
        for s, st in zip(self.dynamic, state["dynamic"]):
            if s is not None:
                s.load_state_dict(st)


def _no_terms(batch: DistillBatch) -> dict[str, torch.Tensor]:
    return {}


def _input_size(spec: TrainSpec) -> int:
    return spec.data.image_size or model_spec(spec.arch).input_size


def _check_transform(t: nn.Module, path: str, arch: str, teacher: str, layer: str, c_t: int,
                     c_s: int) -> None:
    meta = getattr(t, "meta", {}) or {}
    student = meta.get("student")
    if student and student != arch:
        raise KcdError(f"transform {path} was made for student {student}, not {arch}")
    if meta.get("teacher") and teacher and meta["teacher"] != teacher:
        raise KcdError(f"transform {path} was made for teacher {meta['teacher']}, not {teacher}")
    if t.c_t != c_t or t.c_s != c_s:
        raise KcdError(
            f"transform {path} maps {t.c_t}->{t.c_s} channels but the pair at student layer "
            f"{layer} needs {c_t}->{c_s}"
        )


def _checkpoint_every(spec: TrainSpec) -> int:
    return spec.recipe.checkpoint_every or max(1, spec.recipe.iterations // 10)


def train(spec: TrainSpec, tracker: Tracker | None = None, progress: bool = True) -> dict:
    """Run (or resume) one training job and return its result (also in ``result.json``)."""
    tracker = tracker or _NullTracker()
    out = Path(spec.out_dir)
    r = spec.recipe
    if r.iterations < 1 or r.batch_size < 1 or not r.lr > 0:
        raise KcdError("recipe needs iterations >= 1, batch_size >= 1 and lr > 0")
    rank, local_rank, world = _distributed()
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if r.micro_batches < 1 or r.batch_size % (world * r.micro_batches):
        raise KcdError(f"recipe.batch_size {r.batch_size} is not divisible by {world} process(es) "
                       f"x {r.micro_batches} micro-batch(es)")

    torch.manual_seed(spec.seed)
    student = load_model(spec.arch, spec.theta0, spec.num_classes, "theta0")
    distill = _Distillation(spec, student, device)
    student.to(device)
    memory_format = torch.channels_last if r.channels_last else torch.contiguous_format
    student.to(memory_format=memory_format)
    if distill.teacher is not None:
        distill.teacher.to(memory_format=memory_format)
    stages = distill.stages

    model: nn.Module = student
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[local_rank] if device.type == "cuda" else None,
            # a stage without the cross-entropy (AB's initialisation) leaves the classifier out
            find_unused_parameters=not all(stage.cross_entropy for stage in stages),
        )
    params = list(student.parameters())
    params += [p for p in distill.losses.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=r.lr, momentum=r.momentum,
                                weight_decay=r.weight_decay, nesterov=r.nesterov)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, r.milestones, gamma=r.gamma)
    # each stage's optimizer: the run's for the main stage, a stage's own before it
    optimizers = [optimizer if stage.main else stage.optimizer(params) for stage in stages]
    own = {stage.name: opt for stage, opt in zip(stages, optimizers) if not stage.main}
    stream = train_stream(spec.data, r.batch_size // world, seed=spec.seed, rank=rank,
                          world_size=world, channels_last=r.channels_last)
    check_num_classes(spec.data.name, spec.data.root, spec.num_classes)
    total_steps = sum(stage.iterations for stage in stages)
    main_start = sum(stage.iterations for stage in stages[:[s.main for s in stages].index(True)])
    ends = list(itertools.accumulate(stage.iterations for stage in stages))

    step = 0
    ckpt_path = out / CHECKPOINT
    fingerprint = _fingerprint(spec)
    if ckpt_path.exists():
        state = load_file(ckpt_path, "checkpoint")
        if state.get("spec_hash") != fingerprint:
            raise KcdError(f"checkpoint {ckpt_path} belongs to another version of this run "
                           "(its spec changed); delete it to start over")
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        saved = state.get("stage_optimizers")
        if saved is None and state.get("init_optimizer") is not None:
            saved = {next(iter(own)): state["init_optimizer"]}  # written before stages had names
        for name, opt in own.items():
            opt.load_state_dict(saved[name])
        distill.load_state_dict(state["distill"])
        stream.load_state_dict(state["stream"])
        set_rng_state(state["rng"])
        step = state["step"]
        if rank == 0:
            print(f"kcd: resuming {out} from its checkpoint at step {step} of {total_steps}",
                  file=sys.stderr, flush=True)

    taps = ExitStack()
    s_tap = t_tap = None
    if distill.uses_features:
        s_tap = taps.enter_context(FeatureTap(student, [s for _, s, _ in distill.pairs]))
        t_tap = taps.enter_context(FeatureTap(distill.teacher, [t for t, _, _ in distill.pairs]))

    every = _checkpoint_every(spec)
    anchors = set(spec.anchor_iterations)
    logged: dict[str, torch.Tensor] = {}
    n_logged = 0
    started = time.time()
    bar = tqdm(total=total_steps, initial=step, desc=f"{spec.arch} {spec.tags.get('method', '')}",
               disable=not progress or rank != 0, mininterval=1.0 if _tty() else 30.0)
    model.train()
    batches = stream.iterate_forever()
    with taps:
        while step < total_steps:
            k = bisect.bisect_right(ends, step)  # the stage of this step
            stage, opt = stages[k], optimizers[k]
            it = step - main_start  # the main-stage iteration (negative before the main stage)
            if stage.main:
                distill.before_step(it)
            x, y = next(batches)
            x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            m = r.micro_batches
            terms: dict[str, torch.Tensor] = {}
            for i in range(m):
                xi, yi = (x[i::m], y[i::m]) if m > 1 else (x, y)
                got = _forward_terms(model, distill, s_tap, t_tap, xi, yi, k, it)
                loss = sum(got.values())
                if not torch.isfinite(loss):
                    bad = [n for n, v in got.items() if not torch.isfinite(v)] or ["total"]
                    raise KcdError(
                        f"loss term '{bad[0]}' is {got.get(bad[0], loss).item()} at iteration "
                        f"{it}; lower the learning rate or the method's weight"
                    )
                (loss / m).backward()
                for name, v in got.items():
                    terms[name] = terms.get(name, 0.0) + v.detach() / m
            if world > 1:
                _average_gradients(distill.losses.parameters(), world)
            if r.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, r.grad_clip)
            opt.step()
            if stage.main:
                scheduler.step()
            step += 1
            bar.update(1)
            for name, v in terms.items():  # summed on the device; read back at log time only
                logged[name] = logged.get(name, 0.0) + v
            n_logged += 1
            if n_logged >= r.log_every or step == total_steps:
                metrics = {f"train/{name}": float(v) / n_logged for name, v in logged.items()}
                metrics["train/lr"] = opt.param_groups[0]["lr"]
                if rank == 0:
                    tracker.log_metrics(metrics, step)
                bar.set_postfix(loss=f"{float(sum(logged.values())) / n_logged:.3f}")
                logged, n_logged = {}, 0
            if stage.main:
                distill.after_step(it)
            if rank == 0 and stage.main and (it + 1) in anchors:
                _save_model(student, spec, out / "anchors" / f"iter-{it + 1}.pt", it + 1)
            if rank == 0 and step % every == 0 and step < total_steps:
                atomic_save(
                    {
                        "spec_hash": fingerprint,
                        "step": step,
                        "model": student.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "stage_optimizers": {name: o.state_dict() for name, o in own.items()},
                        "distill": distill.state_dict(),
                        "stream": stream.state_dict(),
                        "rng": rng_state(),
                    },
                    ckpt_path,
                )
    bar.close()
    train_seconds = time.time() - started
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return {}
    _save_model(student, spec, out / FINAL, r.iterations)
    result = evaluate(
        student,
        eval_batches(spec.data, r.eval_batch_size),
        teacher=distill.teacher,
        layers=[(t, s) for t, s, _ in distill.pairs],
        transforms=distill.transforms,
        device=device,
        channels_last=r.channels_last,
        progress=progress,
    )
    result.update(
        iterations=r.iterations,
        train_seconds=round(train_seconds, 2),
        arch=spec.arch,
        seed=spec.seed,
        tags=spec.tags,
        spec=to_dict(spec),
    )
    tracker.log_metrics({f"eval/{k}": v for k, v in result.items()
                         if isinstance(v, (int, float)) and v is not None}, r.iterations)
    atomic_write_json(result, out / RESULT)
    if ckpt_path.exists():
        ckpt_path.unlink()
    return result


def _forward_terms(
    model: nn.Module,
    distill: _Distillation,
    s_tap: FeatureTap | None,
    t_tap: FeatureTap | None,
    x: torch.Tensor,
    y: torch.Tensor,
    stage: int,
    iteration: int,
) -> dict[str, torch.Tensor]:
    """Forward one (micro-)batch in ``stage``: the cross-entropy (if the stage has it) and the
    distillation terms, by name."""
    logits = model(x)
    terms: dict[str, torch.Tensor] = {}
    main = distill.stages[stage].main
    if distill.stages[stage].cross_entropy:
        terms["ce"] = F.cross_entropy(logits, y)
    if distill.teacher is not None:
        with torch.no_grad():
            t_logits = distill.teacher(x)
        s_feats = [s_tap.features[s] for _, s, _ in distill.pairs] if s_tap else []
        t_feats = [t_tap.features[t] for t, _, _ in distill.pairs] if t_tap else []
        batch = DistillBatch(labels=y, student_logits=logits, teacher_logits=t_logits,
                             iteration=iteration)
        terms.update(distill.terms(stage, batch, s_feats, t_feats))
        if main:
            distill.observe(t_feats, s_feats)
    return terms


def _average_gradients(params, world: int) -> None:
    """All-reduce (mean) the gradients of parameters DDP does not own (regressors,
    connectors of the distillation losses)."""
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def _save_model(model: nn.Module, spec: TrainSpec, path: Path, iterations: int) -> None:
    atomic_save(
        {
            "arch": spec.arch,
            "seed": spec.seed,
            "num_classes": spec.num_classes,
            "iterations": iterations,
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        },
        path,
    )


def _fingerprint(spec: TrainSpec) -> str:
    """A hash of everything in the spec that shapes the run (not logging or evaluation)."""
    d, _ = split_runtime(to_dict(spec))
    d.pop("tags", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _tty() -> bool:
    return sys.stderr.isatty()

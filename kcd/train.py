"""The training engine: theta0, pre-training and distillation runs (Algorithm 1, steps 1-3, 6-7).

One loop serves both: pre-training is a run without a :class:`~kcd.specs.DistillSpec`;
``method: baseline`` is the same loop with cross-entropy only. A run:

- starts from the theta0 file of its (architecture, seed) -- never from fresh weights;
- is iteration-based SGD with a multi-step schedule (Section 4.1's recipes as written), in the
  stages the distillation loss asks for (:meth:`~kcd.losses.base.DistillationLoss.stages`:
  AB's initialisation stage comes first, with an optimizer of its own); the loss's hooks run
  around each main-stage iteration (RCO's teacher anchors) and so do the dynamic transforms
  (Table 5, :class:`~kcd.transforms.DynamicMatching`). Beyond the registry's ``baseline``
  (no loss at all), the engine knows no method by name;
- runs in the loop every engine shares (:func:`kcd.run.run`), which writes an atomic
  checkpoint (here: model, optimizers, scheduler, loss modules, data stream, and every RNG
  state) every ``checkpoint_every`` iterations; a rerun of the same command resumes from it,
  ending bit-identical to an uninterrupted run on the CPU;
- reads the teacher's answers from its cached outputs (:mod:`kcd.teacher_outputs`) when the
  spec names them: at evaluation, and at every step when the training images are not
  augmented (the stream then yields each batch's dataset indices); an RCO run reads each
  anchor's own (``distill.anchor_outputs``) while that anchor is current;
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
import itertools
import os
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kcd.checkpoint import atomic_save, load_model, load_model_weights
from kcd.data.datasets import check_num_classes
from kcd.data import EVAL_SPLIT, TRAIN_SPLIT
from kcd.data.streams import eval_batches, train_stream
from kcd.errors import KcdError
from kcd.evaluate import evaluate
from kcd.features import FeatureTap, feature_shapes
from kcd.losses import BASELINE, LOSSES, build_loss
from kcd.losses.base import DistillBatch, DistillContext, Stage
from kcd.models import build_model, model_spec
from kcd.models.small_conv import use_small_conv_grads
from kcd.optim import load_sgd_state, sgd
from kcd.run import (
    CHECKPOINT,
    FINAL,
    RESULT,
    Phases,
    RunTask,
    Tracker,
    FiniteGuard,
    divergence_advice,
    run,
)

__all__ = ["CHECKPOINT", "FINAL", "RESULT", "Tracker", "init_weights", "load_model", "train"]
from kcd.specs import DistillSpec, LayerPair, TrainSpec, to_dict
from kcd.teacher_outputs import TeacherOutputs, load as load_teacher_outputs
from kcd.transforms import ChannelTransform, DynamicMatching, check_transform, load_transform

# --------------------------------------------------------------------------- theta0


PRECISIONS = ("fp32", "bf16")
"""``recipe.precision``: fp32, or bf16 autocast of the forward passes (CUDA only)."""


def init_weights(arch: str, seed: int, num_classes: int, path: str | os.PathLike) -> Path:
    """Write theta0 of ``arch`` for ``seed``: the weights every run of this student starts from."""
    torch.manual_seed(seed)
    model = build_model(arch, num_classes)
    return atomic_save(
        {"arch": arch, "seed": seed, "num_classes": num_classes, "state_dict": model.state_dict()},
        path,
    )


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
        self.cached: TeacherOutputs | None = None  # the teacher's answers on the training split
        self.cached_eval: TeacherOutputs | None = None  # ... and on the evaluation split
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
        self.context = DistillContext(d, spec.recipe, self._teacher_loader(spec, device))
        if method.uses_features:
            self.pairs = _layer_pairs(spec)
        self.cached = self._cached(spec, d.teacher_outputs, TRAIN_SPLIT, device)
        self.cached_eval = self._cached(spec, d.teacher_eval_outputs, EVAL_SPLIT, device)
        self._anchor: int | None = None  # the anchor whose cached answers are in self.cached
        if d.anchor_outputs:
            self._cached_anchor(spec, 0, device)
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

    def _cached(self, spec: TrainSpec, path: str | None, split: str,
                device: torch.device) -> TeacherOutputs | None:
        """The teacher's cached answers on ``split``, when the spec names a file for them."""
        d = spec.distill
        if not path:
            return None
        if d.anchors and split == TRAIN_SPLIT:
            raise KcdError("distill.anchors replace the teacher during training; the final "
                           "teacher's cached outputs cannot answer for them (leave "
                           "distill.teacher_outputs empty; distill.anchor_outputs has one file "
                           "per anchor)")
        if split == TRAIN_SPLIT:
            _require_unaugmented(spec, "teacher_outputs")
        return load_teacher_outputs(path, d.teacher, d.teacher_weights, spec.data, split,
                                    [t for t, _, _ in self.pairs]).to(device)

    def _feature_losses(self, spec: TrainSpec, student: nn.Module, device: torch.device,
                        default_weight: float) -> None:
        d: DistillSpec = spec.distill  # type: ignore[assignment]
        size = _input_size(spec)
        s_shapes = feature_shapes(student, [s for _, s, _ in self.pairs], size)
        cached = self.cached or self.cached_eval
        if cached is not None:  # the teacher's answers are known: no forward to measure them
            t_shapes = {t: tuple(cached.features[t].shape[1:]) for t, _, _ in self.pairs}
        else:
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
                check_transform(transform, path, teacher=d.teacher, student=spec.arch,
                                c_t=c_t, c_s=c_s, layer=None)
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

    def _cached_anchor(self, spec: TrainSpec, index: int, device: torch.device) -> None:
        """Put anchor ``index``'s cached answers (``distill.anchor_outputs``) in place of the
        teacher's, checked against that anchor's weights."""
        d = spec.distill
        if len(d.anchor_outputs) != len(d.anchors):
            raise KcdError(f"distill.anchor_outputs has {len(d.anchor_outputs)} files for "
                           f"{len(d.anchors)} anchors; give one per anchor, in route order")
        _require_unaugmented(spec, "anchor_outputs")
        if index != self._anchor:
            self.cached = load_teacher_outputs(d.anchor_outputs[index], d.teacher,
                                               d.anchors[index], spec.data, TRAIN_SPLIT,
                                               [t for t, _, _ in self.pairs]).to(device)
            self._anchor = index

    def _teacher_loader(self, spec: TrainSpec, device: torch.device):
        arch, d = spec.distill.teacher, spec.distill

        def load(path: str, what: str) -> None:
            if d.anchor_outputs and path in d.anchors:  # its answers are cached: no weights
                self._cached_anchor(spec, d.anchors.index(path), device)
                return
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


def _require_unaugmented(spec: TrainSpec, field: str) -> None:
    """Cached answers to training images (``distill.<field>``) hold only without augmentation."""
    if spec.data.augment:
        raise KcdError(f"distill.{field} answer for unaugmented training images; set "
                       f"datasets.{spec.data.name}.augment to false or leave them out")


def _layer_pairs(spec: TrainSpec) -> list[tuple[str, str, float]]:
    """The (teacher layer, student layer, weight) pairs a feature method distils: the spec's
    or the models' distillation layers, before the ReLU when ``distill.pre_relu``."""
    d: DistillSpec = spec.distill  # type: ignore[assignment]
    layers = d.layers or [
        LayerPair(model_spec(d.teacher).default_layer, model_spec(spec.arch).default_layer)
    ]
    suffix = ":pre_relu" if d.pre_relu else ""
    return [(p.teacher if p.teacher.endswith(":pre_relu") else p.teacher + suffix,
             p.student if p.student.endswith(":pre_relu") else p.student + suffix, p.weight)
            for p in layers]


def _no_terms(batch: DistillBatch) -> dict[str, torch.Tensor]:
    return {}


def _input_size(spec: TrainSpec) -> int:
    return spec.data.image_size or model_spec(spec.arch).input_size


def train(spec: TrainSpec, tracker: Tracker | None = None, progress: bool = True) -> dict:
    """Run (or resume) one training job and return its result (also in ``result.json``)."""
    phases = Phases()
    with phases("setup"):  # models, teacher, cached outputs, data
        task = _Classification(spec, progress)
    return run(spec, task, tracker, progress, phases)


class _Classification(RunTask):
    """A pre-training or distillation run of an image classifier, as the run loop drives it."""

    def __init__(self, spec: TrainSpec, progress: bool) -> None:
        self.spec = spec
        self.guard = FiniteGuard(divergence_advice(
            spec.data.name, spec.arch,
            spec.distill.method if spec.distill and spec.distill.method != BASELINE else None))
        self.progress = progress
        self.out = Path(spec.out_dir)
        r = self.recipe = spec.recipe
        if r.iterations < 1 or r.batch_size < 1 or not r.lr > 0:
            raise KcdError("recipe needs iterations >= 1, batch_size >= 1 and lr > 0")
        self.rank, local_rank, self.world = _distributed()
        world = self.world
        device = self.device = torch.device(
            f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        if r.precision not in PRECISIONS:
            raise KcdError(f"recipe.precision {r.precision!r} is not one of "
                           f"{', '.join(PRECISIONS)}")
        # bf16 autocast where it pays (CUDA); on a CPU it is many times slower: fp32 there
        self.precision = "bf16" if r.precision == "bf16" and device.type == "cuda" else "fp32"
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = r.cudnn_benchmark
        if r.micro_batches < 1 or r.batch_size % (world * r.micro_batches):
            raise KcdError(f"recipe.batch_size {r.batch_size} is not divisible by {world} "
                           f"process(es) x {r.micro_batches} micro-batch(es)")

        torch.manual_seed(spec.seed)
        student = self.student = load_model(spec.arch, spec.theta0, spec.num_classes, "theta0")
        distill = self.distill = _Distillation(spec, student, device)
        student.to(device)
        # on a CPU, the convolutions oneDNN computes slowly (the student's, the regressors')
        self.small_conv_grads = (use_small_conv_grads(student)
                                 + use_small_conv_grads(distill.losses)
                                 if r.cpu_small_conv_grads and device.type == "cpu" else 0)
        self.memory_format = torch.channels_last if r.channels_last else torch.contiguous_format
        student.to(memory_format=self.memory_format)
        if distill.teacher is not None:
            distill.teacher.to(memory_format=self.memory_format)
        stages = self.stages = distill.stages

        self.model: nn.Module = student
        if world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                student, device_ids=[local_rank] if device.type == "cuda" else None,
                # a stage without the cross-entropy (AB's initialisation) leaves the classifier out
                find_unused_parameters=not all(stage.cross_entropy for stage in stages),
            )
        params = self.params = list(student.parameters())
        params += [p for p in distill.losses.parameters() if p.requires_grad]
        self.optimizer = sgd(params, r)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, r.milestones,
                                                              gamma=r.gamma)
        # each stage's optimizer: the run's for the main stage, a stage's own before it
        self.optimizers = [self.optimizer if stage.main else stage.optimizer(params)
                           for stage in stages]
        self.own = {stage.name: opt for stage, opt in zip(stages, self.optimizers)
                    if not stage.main}
        self.stream = train_stream(spec.data, r.batch_size // world, seed=spec.seed,
                                   rank=self.rank, world_size=world,
                                   channels_last=r.channels_last)
        check_num_classes(spec.data.name, spec.data.root, spec.num_classes)
        self.steps = sum(stage.iterations for stage in stages)
        self.iterations = r.iterations
        self.main_start = sum(s.iterations for s in stages[:[s.main for s in stages].index(True)])
        self.ends = list(itertools.accumulate(stage.iterations for stage in stages))
        self.description = f"{spec.arch} {spec.tags.get('method', '')}".strip()
        self.anchors = set(spec.anchor_iterations)
        self._batches = None
        self._opt = self.optimizers[0]

        self.taps = ExitStack()
        self.s_tap = self.t_tap = None
        if distill.uses_features:
            self.s_tap = self.taps.enter_context(
                FeatureTap(student, [s for _, s, _ in distill.pairs]))
            if distill.cached is None:
                self.t_tap = self.taps.enter_context(
                    FeatureTap(distill.teacher, [t for t, _, _ in distill.pairs]))
        self.model.train()

    def step(self, step: int) -> dict[str, torch.Tensor]:
        r, distill = self.recipe, self.distill
        if self._batches is None:
            self._batches = self.stream.iterate_forever(indices=distill.cached is not None)
        k = bisect.bisect_right(self.ends, step)  # the stage of this step
        stage, opt = self.stages[k], self.optimizers[k]
        self._opt = opt
        it = step - self.main_start  # the main-stage iteration (negative before the main stage)
        if stage.main:
            distill.before_step(it)
        x, y, *index = next(self._batches)
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        y = y.to(self.device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        m = r.micro_batches
        terms: dict[str, torch.Tensor] = {}
        for i in range(m):
            xi, yi = (x[i::m], y[i::m]) if m > 1 else (x, y)
            answers = None
            if index:  # the teacher's cached answers to these images
                answers = distill.cached.take(index[0][i::m] if m > 1 else index[0],
                                              [t for t, _, _ in distill.pairs])
            with torch.autocast(self.device.type, dtype=torch.bfloat16,
                                enabled=self.precision == "bf16"):
                got = _forward_terms(self.model, distill, self.s_tap, self.t_tap, xi, yi, k, it,
                                     answers)
            loss = self.guard.total(got, it)  # checked by the run loop, no sync per step
            (loss / m).backward()
            for name, v in got.items():
                terms[name] = terms.get(name, 0.0) + v.detach() / m
        if self.world > 1:
            _average_gradients(distill.losses.parameters(), self.world)
        if r.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, r.grad_clip)
        opt.step()
        if stage.main:
            self.scheduler.step()
            distill.after_step(it)
            if self.rank == 0 and (it + 1) in self.anchors:
                _save_model(self.student, self.spec, self.out / "anchors" / f"iter-{it + 1}.pt",
                            it + 1)
        return terms  # summed on the device by the loop; read back at log time only

    @property
    def lr(self) -> float:
        return self._opt.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {
            "model": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "stage_optimizers": {name: o.state_dict() for name, o in self.own.items()},
            "distill": self.distill.state_dict(),
            "stream": self.stream.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["model"])
        load_sgd_state(self.optimizer, state["optimizer"], self.spec.recipe)
        self.scheduler.load_state_dict(state["scheduler"])
        saved = state.get("stage_optimizers")
        if saved is None and state.get("init_optimizer") is not None:
            saved = {next(iter(self.own)): state["init_optimizer"]}  # before stages had names
        for name, opt in self.own.items():
            load_sgd_state(opt, saved[name], self.spec.recipe)
        self.distill.load_state_dict(state["distill"])
        self.stream.load_state_dict(state["stream"])

    def close(self) -> None:
        self.taps.close()

    def finish(self, train_seconds: float) -> dict | None:
        spec, r = self.spec, self.recipe
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
        if self.rank != 0:
            return None
        with self.phases("save"):
            _save_model(self.student, spec, self.out / FINAL, r.iterations)
        with self.phases("evaluate"):
            result = self._evaluate()
        result.update(
            iterations=r.iterations,
            precision=self.precision,
            small_conv_grads=self.small_conv_grads,
            train_seconds=round(train_seconds, 2),
            arch=spec.arch,
            seed=spec.seed,
            tags=spec.tags,
            spec=to_dict(spec),
        )
        return result

    def _evaluate(self) -> dict:
        spec, r, distill = self.spec, self.recipe, self.distill
        return evaluate(
            self.student,
            eval_batches(spec.data, r.eval_batch_size),
            teacher=distill.teacher,
            teacher_outputs=distill.cached_eval,
            layers=[(t, s) for t, s, _ in distill.pairs],
            transforms=distill.transforms,
            device=self.device,
            channels_last=r.channels_last,
            progress=self.progress,
        )


def _forward_terms(
    model: nn.Module,
    distill: _Distillation,
    s_tap: FeatureTap | None,
    t_tap: FeatureTap | None,
    x: torch.Tensor,
    y: torch.Tensor,
    stage: int,
    iteration: int,
    answers: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Forward one (micro-)batch in ``stage``: the cross-entropy (if the stage has it) and the
    distillation terms, by name. ``answers``: the teacher's logits and features for ``x``
    from its cached outputs, instead of a teacher forward."""
    logits = model(x)
    terms: dict[str, torch.Tensor] = {}
    main = distill.stages[stage].main
    if distill.stages[stage].cross_entropy:
        terms["ce"] = F.cross_entropy(logits, y)
    if distill.teacher is not None:
        s_feats = [s_tap.features[s] for _, s, _ in distill.pairs] if s_tap else []
        if answers is not None:
            t_logits, t_feats = answers
        else:
            with torch.no_grad():
                t_logits = distill.teacher(x)
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

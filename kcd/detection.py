"""Object detection on COCO (Section 4.4, Table 9): Faster R-CNN + FPN students and teacher.

The detector is torchvision's ``FasterRCNN`` on a ResNet + FPN backbone
(``torchvision.models.detection.backbone_utils.BackboneWithFPN``). Detectron's 2x setting,
which the paper uses, starts from ImageNet-pretrained backbones; nothing is downloaded here, so
every detector trains from scratch, from its theta0 file: every layer is trainable and batch
norm is the ordinary, trainable ``BatchNorm2d`` (torchvision's default ``FrozenBatchNorm2d``
only makes sense on top of pretrained weights), and the last batch norm of every residual
branch starts at zero (see :func:`build_detector`). Two sizes shape the weights and are
recorded in every weights file: the FPN width (``fpn_channels``, torchvision's 256) and the
width of the two-layer box head (``representation_size``, torchvision's 1024); the demo
shrinks both. What shapes only the computation is part of the run's
:class:`~kcd.specs.DetectionSpec`:
the resize of torchvision's ``GeneralizedRCNNTransform`` (``min_size``/``max_size``), the
anchor size of each of the five FPN levels and FasterRCNN's numeric keyword arguments
(``options``: proposal counts, sampling sizes, thresholds).

Distillation (Algorithm 1, Eq. 9-10 on detection) happens at :data:`LAYER`, the output of the
backbone's last stage before its final ReLU (Section 4.1, following Heo et al. [8]), captured
with hooks (:class:`kcd.features.FeatureTap`); the model code stays untouched. The teacher runs
in eval mode without gradient on exactly the normalised, resized and padded batch the student's
backbone sees. Table 9's settings map onto :mod:`kcd.losses` as follows (our interpretation):

- ``L2`` (no transform): plain feature L2 (``l2``, the identity special case of Section 3.3)
  when teacher and student have the same channel count (ResNet-50 student, 2048 channels).
  A ResNet-18 student has 512 channels against the ResNet-152 teacher's 2048, so plain L2 is
  undefined; the student's map then goes through FitNets' trainable 1x1 conv + BN regressor to
  the teacher's channels (``fitnets``), trained with the detector.
- ``Ours``: ``l2`` to the transformed teacher; the channel transform (bipartite matching on the
  correlation of global-average-pooled maps, :func:`detection_statistics` then
  :func:`kcd.statistics.make_transform`) selects as many teacher channels as the student has,
  so no regressor is needed.
- The weight: Section 4.1 sets 1e-4 "to balance with task loss", the weight of [8], whose
  distillation loss is the sum of squared differences over the whole map of an image, averaged
  over the batch (their public ImageNet code: ``loss_distill.sum() / batch_size / 10000``).
  :mod:`kcd.losses` average over elements instead, so the distillation term here is the loss
  module's value times the number of elements of one image's target map (c x h x w):
  ``weight * sum((S - T)^2) / batch``. On the demo this term starts near the size of the
  detector's own losses.

A run (:func:`train_detector`) is iteration-based SGD with a multi-step schedule and an
optional linear warm-up (Detectron's schedules start with one), sampling images in a seeded
per-epoch order with seeded horizontal flips, so the batches of an iteration depend only on the
seed and the iteration. It runs in the loop every engine shares (:func:`kcd.run.run`): an atomic
checkpoint every ``checkpoint_every`` iterations (a rerun resumes from it and ends with the same
weights as an uninterrupted run on the CPU); it stops on a NaN/inf loss naming the iteration and
the term, and ends with ``final.pt`` and
``result.json`` (COCO AP, AP50 and AP75 in percent on the evaluation split; written last, its
presence means done). Of the :class:`~kcd.specs.Recipe`, ``channels_last`` applies to student and
teacher (faster for bottleneck backbones on the CPU) and ``micro_batches`` must be 1; of the
:class:`~kcd.specs.DataSpec`, ``image_size`` and ``fast_loader`` do not apply (the detector
resizes; images are decoded per batch by ``workers`` processes).
"""
from __future__ import annotations

import bisect
import contextlib
import inspect
import io
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.models import resnet
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.transforms.functional import to_tensor
from tqdm import tqdm

from kcd.checkpoint import atomic_save, load_model_weights
from kcd.consistency import ConsistencyStatistics
from kcd.data.datasets import CheckedCocoDetection, build_dataset, coco_target_to_tensors
from kcd.data.streams import mix_seed
from kcd.errors import KcdError
from kcd.features import FeatureTap, global_avg_pool
from kcd.losses import DistillBatch, build_loss
from kcd.optim import load_sgd_state, sgd
from kcd.run import FINAL, FiniteGuard, Phases, RunTask, Tracker, divergence_advice, run
from kcd.models import DETECTOR_BACKBONES as BACKBONES
from kcd.specs import (
    ANCHOR_SIZES,
    DataSpec,
    DetectionDistill,
    DetectionSpec,
    Recipe,
    to_dict,
)
from kcd.transforms import PerClassTransform, check_transform, load_transform

LAYER = "backbone.body.layer4:pre_relu"
"""The distilled layer: the backbone's last stage before its final ReLU (Section 4.1)."""

METHODS = ("l2",)
TRAIN_SPLIT, EVAL_SPLIT = "train", "val"


# --------------------------------------------------------------------------- the detector


def _option_names() -> tuple[str, ...]:
    """FasterRCNN's numeric keyword arguments other than the resize (a spec's ``options``)."""
    parameters = inspect.signature(FasterRCNN.__init__).parameters.values()
    return tuple(
        p.name for p in parameters
        if type(p.default) in (int, float) and p.name not in ("min_size", "max_size")
    )


def build_detector(
    backbone: str,
    num_classes: int,
    *,
    fpn_channels: int = 256,
    representation_size: int = 1024,
    min_size: int = 800,
    max_size: int = 1333,
    anchor_sizes: Sequence[int] = ANCHOR_SIZES,
    options: dict[str, int | float] | None = None,
) -> FasterRCNN:
    """A randomly initialised Faster R-CNN + FPN on ``backbone``, every layer trainable.

    The last batch norm of every residual branch starts at zero (torchvision's
    ``zero_init_residual``), so each block starts as the identity: without it a ResNet-152
    trained from scratch diverged within ten iterations at the demo's learning rate.
    """
    if backbone not in BACKBONES:
        raise KcdError(f"unknown detection backbone '{backbone}'; known: {', '.join(BACKBONES)}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise KcdError(f"a detector needs num_classes >= 2 (background + 1), got {num_classes!r}")
    if len(anchor_sizes) != 5 or any(not isinstance(s, int) or s < 1 for s in anchor_sizes):
        raise KcdError(f"anchor_sizes needs one positive size for each of the 5 FPN levels, "
                       f"got {anchor_sizes}")
    options = dict(options or {})
    known = _option_names()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise KcdError(f"unknown detector option {unknown[0]}; known: {', '.join(known)}")
    body = resnet.__dict__[backbone](weights=None, norm_layer=nn.BatchNorm2d,
                                     zero_init_residual=True)
    stage = body.fc.in_features // 8  # channels of layer1; each later stage doubles them
    fpn = BackboneWithFPN(
        body,
        return_layers={f"layer{k}": str(k - 1) for k in range(1, 5)},
        in_channels_list=[stage * 2**k for k in range(4)],
        out_channels=fpn_channels,
    )
    anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    resolution = 7  # torchvision's MultiScaleRoIAlign output size
    return FasterRCNN(
        fpn,
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=anchors,
        box_head=TwoMLPHead(fpn_channels * resolution**2, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes),
        **options,
    )


def _arch(backbone: str) -> str:
    """The architecture name in weights files, distinct from the classifiers' names."""
    return f"fasterrcnn_{backbone}_fpn"


def layer4_channels(model: FasterRCNN) -> int:
    """Channel count of the distilled map: 512 times the expansion of the backbone's blocks."""
    return 512 * model.backbone.body.layer4[-1].expansion


def init_detector(
    backbone: str,
    num_classes: int,
    seed: int,
    path: str | os.PathLike,
    *,
    fpn_channels: int = 256,
    representation_size: int = 1024,
) -> Path:
    """Write theta0 of a (backbone, seed): the weights every run of this detector starts from."""
    torch.manual_seed(seed)
    model = build_detector(backbone, num_classes, fpn_channels=fpn_channels,
                           representation_size=representation_size)
    return _save_detector(model, path, backbone=backbone, seed=seed, num_classes=num_classes,
                          fpn_channels=fpn_channels, representation_size=representation_size)


def _save_detector(model: nn.Module, path: str | os.PathLike, **meta: Any) -> Path:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return atomic_save({"arch": _arch(meta["backbone"]), **meta, "state_dict": state}, path)


def load_detector(
    backbone: str,
    path: str | os.PathLike,
    num_classes: int,
    what: str = "weights",
    *,
    min_size: int = 800,
    max_size: int = 1333,
    anchor_sizes: Sequence[int] = ANCHOR_SIZES,
    options: dict[str, int | float] | None = None,
) -> FasterRCNN:
    """Build the detector a weights file (theta0 or final.pt) describes and load it.

    Raises:
        KcdError: the file is missing, unreadable or truncated, holds another backbone or
            another class count, or its weights do not fit the detector it describes.
    """
    obj = load_model_weights(path, _arch(backbone), what)
    if obj.get("num_classes") != num_classes:
        raise KcdError(f"{what} {path} has {obj.get('num_classes')} classes but the dataset has "
                       f"{num_classes}")
    model = build_detector(
        backbone, num_classes, fpn_channels=obj["fpn_channels"],
        representation_size=obj["representation_size"], min_size=min_size, max_size=max_size,
        anchor_sizes=anchor_sizes, options=options,
    )
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as e:
        raise KcdError(f"{what} {path} does not fit a {_arch(backbone)} "
                       f"({str(e).strip().splitlines()[0]})") from None
    return model


def _load_for_spec(spec: DetectionSpec, backbone: str, path: str, what: str) -> FasterRCNN:
    return load_detector(backbone, path, spec.num_classes, what, min_size=spec.min_size,
                         max_size=spec.max_size, anchor_sizes=spec.anchor_sizes,
                         options=spec.options)


# --------------------------------------------------------------------------- data


class _Items(Dataset):
    """COCO images addressed as ``(index, flip)``: an RGB tensor in [0, 1] and its target.

    Boxes without area (which torchvision's detector rejects in training) are left out;
    an image without annotations gets empty ``boxes`` (0 x 4) and ``labels``.
    """

    def __init__(self, coco: CheckedCocoDetection) -> None:
        self.coco = coco

    def __len__(self) -> int:
        return len(self.coco)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[Tensor, dict[str, Tensor]]:
        index, flip = key
        image, annotations = self.coco[index]
        x = to_tensor(image.convert("RGB"))
        target = coco_target_to_tensors(annotations, self.coco.ids[index])
        boxes = target["boxes"]
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, target["labels"] = boxes[keep], target["labels"][keep]
        if flip:
            x = x.flip(-1)
            x0, y0, x1, y1 = boxes.unbind(1)
            boxes = torch.stack([x.shape[-1] - x1, y0, x.shape[-1] - x0, y1], dim=1)
        target["boxes"] = boxes
        return x, target


def _collate(items: list) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    images, targets = zip(*items)
    return list(images), list(targets)


def _loader(items: _Items, plan: Iterable[list[tuple[int, bool]]], workers: int) -> DataLoader:
    """Batches of ``items`` in the order of ``plan`` (lists of keys), decoded by ``workers``.

    The loader gets its own generator: by default it would draw its workers' base seed from
    the global RNG, which the detector's samplers use and a resumed run restores.
    """
    return DataLoader(items, batch_sampler=plan, num_workers=workers, collate_fn=_collate,
                      generator=torch.Generator().manual_seed(0))


def _train_plan(n: int, batch_size: int, seed: int, start: int, stop: int
                ) -> Iterator[list[tuple[int, bool]]]:
    """The keys of the batches of iterations ``start`` .. ``stop - 1``.

    Each epoch is a permutation of the images drawn from ``(seed, epoch)``, cut into full
    batches; each image of an epoch is flipped with probability 1/2 by the same draw. The
    batch of an iteration is thus a function of (seed, iteration) only.
    """
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise KcdError(f"{n} training images are fewer than one batch of {batch_size}; "
                       "lower recipe.batch_size")
    drawn_epoch, order, flips = -1, None, None
    for step in range(start, stop):
        epoch, b = divmod(step, per_epoch)
        if epoch != drawn_epoch:
            g = torch.Generator().manual_seed(mix_seed(seed, epoch))
            order = torch.randperm(n, generator=g).tolist()
            flips = (torch.rand(n, generator=g) < 0.5).tolist()
            drawn_epoch = epoch
        yield [(i, flips[i]) for i in order[b * batch_size:(b + 1) * batch_size]]


def _ordered_plan(n: int, batch_size: int) -> list[list[tuple[int, bool]]]:
    """The first ``n`` images in dataset order, unflipped."""
    return [[(i, False) for i in range(s, min(n, s + batch_size))] for s in range(0, n, batch_size)]


def _dataset(data: DataSpec, split: str) -> CheckedCocoDetection:
    """A detection dataset's split (the registry's ``task: detection``, read COCO-style)."""
    from kcd.data import DATASETS, datasets_of_task

    if DATASETS.get(data.name).task != "detection":
        raise KcdError(f"detection runs on a detection dataset "
                       f"({', '.join(datasets_of_task('detection'))}), not on '{data.name}'")
    return build_dataset(data.name, data.root, split)


def _to_device(images: list[Tensor], targets: list[dict[str, Tensor]], device: torch.device):
    return ([x.to(device) for x in images],
            [{k: v.to(device) for k, v in t.items()} for t in targets])


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- evaluation


def coco_ap(coco: COCO, results: list[dict], image_ids: Sequence[int]) -> dict[str, float]:
    """COCO bbox AP, AP50 and AP75 in percent of ``results`` on ``image_ids`` (pycocotools).

    ``results`` are COCO result entries (``image_id``, ``category_id``, ``bbox`` as
    [x, y, w, h], ``score``); without any, every AP is 0.
    """
    if not coco.getAnnIds(imgIds=list(image_ids)):
        raise KcdError("the evaluated images have no annotations, so AP is undefined; "
                       "evaluate on more images (data.eval_limit)")
    if not results:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        evaluator = COCOeval(coco, coco.loadRes(results), iouType="bbox")
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    ap, ap50, ap75 = (100.0 * max(0.0, float(v)) for v in evaluator.stats[:3])
    return {"AP": ap, "AP50": ap50, "AP75": ap75}


def _results(image_id: int, detections: dict[str, Tensor]) -> list[dict]:
    """COCO result entries of one image's detections (boxes x0, y0, x1, y1 -> x, y, w, h)."""
    corners = detections["boxes"].detach().cpu()
    boxes = torch.cat([corners[:, :2], corners[:, 2:] - corners[:, :2]], dim=1)
    return [
        {"image_id": image_id, "category_id": int(label), "bbox": [round(v, 3) for v in box],
         "score": round(float(score), 5)}
        for box, label, score in zip(boxes.tolist(), detections["labels"].tolist(),
                                     detections["scores"].tolist())
    ]


@torch.no_grad()
def evaluate_detector(
    model: FasterRCNN,
    data: DataSpec,
    split: str = EVAL_SPLIT,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """COCO AP of ``model`` on ``split`` (the first ``data.eval_limit`` images, if set), on the
    device the model is on.

    Returns ``AP``, ``AP50``, ``AP75`` (percent), ``eval_images`` and ``detections``.
    """
    dataset = _dataset(data, split)
    n = len(dataset) if data.eval_limit is None else min(len(dataset), data.eval_limit)
    if n < 1:
        raise KcdError(f"the {split} split of coco at {data.root} has no images to evaluate")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[dict] = []
    try:
        batches = _loader(_Items(dataset), _ordered_plan(n, batch_size), data.workers)
        for images, targets in tqdm(batches, desc="evaluate", disable=not progress, leave=False):
            outputs = model([x.to(device) for x in images])
            for target, detections in zip(targets, outputs):
                results.extend(_results(int(target["image_id"]), detections))
    finally:
        model.train(was_training)
    scores = coco_ap(dataset.coco, results, dataset.ids[:n])
    return {**scores, "eval_images": n, "detections": len(results)}


# --------------------------------------------------------------------------- statistics


@torch.no_grad()
def detection_statistics(
    *,
    teacher: str,
    teacher_weights: str,
    student: str,
    student_weights: str,
    data: DataSpec,
    num_classes: int,
    out: str | os.PathLike,
    min_size: int = 800,
    max_size: int = 1333,
    metrics: Sequence[str] = ("correlation",),
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Algorithm 1 step 4 on detection: pooled :data:`LAYER` maps of two trained detectors.

    One pass over the training images (eval mode, no flips, the detectors' own resize and
    normalisation) writes a statistics file in the format of
    :func:`kcd.statistics.compute_statistics` (no per-class groups: detection images have no
    single label), which :func:`kcd.statistics.make_transform` turns into a transform.
    Returns the number of images and the channel counts.
    """
    device = _device()
    sizes = {"min_size": min_size, "max_size": max_size}
    t = load_detector(teacher, teacher_weights, num_classes, "teacher weights", **sizes)
    s = load_detector(student, student_weights, num_classes, "student weights", **sizes)
    t.to(device).eval()
    s.to(device).eval()
    dataset = _dataset(data, TRAIN_SPLIT)
    stats = ConsistencyStatistics(layer4_channels(t), layer4_channels(s), metrics=list(metrics))
    batches = _loader(_Items(dataset), _ordered_plan(len(dataset), batch_size), data.workers)
    with FeatureTap(t, [LAYER]) as t_tap, FeatureTap(s, [LAYER]) as s_tap:
        for images, _ in tqdm(batches, desc="statistics", disable=not progress, leave=False):
            batch = s.transform([x.to(device) for x in images])[0].tensors
            t.backbone.body(batch)
            s.backbone.body(batch)
            stats.update(global_avg_pool(t_tap.features[LAYER]).float().cpu(),
                         global_avg_pool(s_tap.features[LAYER]).float().cpu())
    if stats.n == 0:
        raise KcdError(f"the training split of coco at {data.root} is empty")
    atomic_save(
        {
            "kind": "kcd-statistics",
            "teacher": teacher,
            "student": student,
            "layers": [LAYER, LAYER],
            "num_classes": num_classes,
            "global": stats.state_dict(),
            "groups": {},
        },
        out,
    )
    return {"samples": stats.n, "c_t": stats.c_t, "c_s": stats.c_s}


# --------------------------------------------------------------------------- distillation


class _Distillation:
    """Teacher, hooks and loss module of one detection distillation run.

    The student's tap also records the output of its ``transform`` (the normalised, resized,
    padded batch), which the teacher's backbone then reads: both see the same tensor.
    """

    def __init__(self, spec: DetectionSpec, student: FasterRCNN, device: torch.device) -> None:
        d: DetectionDistill = spec.distill  # type: ignore[assignment]
        if d.method not in METHODS:
            raise KcdError(f"unknown detection distillation method '{d.method}'; known: "
                           f"{', '.join(METHODS)} ('Ours' is l2 with a transform)")
        self.teacher = _load_for_spec(spec, d.teacher, d.teacher_weights, "teacher weights")
        self.teacher.to(device).eval().requires_grad_(False)
        c_t, c_s = layer4_channels(self.teacher), layer4_channels(student)
        transform = None
        if d.transform:
            transform = load_transform(d.transform)
            _check_transform(transform, d.transform, spec.backbone, d.teacher, c_t, c_s)
        name = "l2" if transform is not None or c_t == c_s else "fitnets"
        self.loss = build_loss(name, [c_s], [c_t], [transform], weight=d.weight).to(device)
        self.student_tap = FeatureTap(student, ["transform", LAYER])
        self.teacher_tap = FeatureTap(self.teacher, [LAYER])

    def terms(self) -> dict[str, Tensor]:
        """The weighted distillation term of the student's latest forward, by name."""
        features = self.student_tap.features
        with torch.no_grad():
            self.teacher.backbone.body(features["transform"][0].tensors)
        student = features[LAYER]
        empty = student.new_empty(0)  # detection has no image labels or logits
        batch = DistillBatch(labels=empty.long(), student_logits=empty,
                             student_features=[student],
                             teacher_features=[self.teacher_tap.features[LAYER]])
        per_image = self.loss.target_channels[0] * student.shape[2] * student.shape[3]
        return {k: v * per_image for k, v in self.loss(batch).items()}

    def close(self) -> None:
        self.student_tap.remove()
        self.teacher_tap.remove()


def _check_transform(t: nn.Module, path: str, student: str, teacher: str, c_t: int, c_s: int
                     ) -> None:
    """Refuse a per-class transform (detection images have no single class) or one made for
    another pair, layer or channel counts."""
    if isinstance(t, PerClassTransform):
        raise KcdError(f"transform {path} is per-class; detection images have no single class")
    check_transform(t, path, teacher=teacher, student=student, layer=LAYER, c_t=c_t, c_s=c_s)


# --------------------------------------------------------------------------- the run


def _check_recipe(r: Recipe) -> None:
    if r.iterations < 1 or r.batch_size < 1 or not r.lr > 0:
        raise KcdError("recipe needs iterations >= 1, batch_size >= 1 and lr > 0")
    if r.micro_batches != 1:
        raise KcdError("recipe.micro_batches is not supported for detection; set it to 1")
    if r.precision != "fp32":
        raise KcdError(f"recipe.precision {r.precision!r} is not supported for detection (it "
                       "trains in fp32); set recipes.coco.*.precision to fp32")


def _lr(spec: DetectionSpec, step: int) -> float:
    """The learning rate of iteration ``step``: linear warm-up from lr/3, then multi-step."""
    r = spec.recipe
    factor = r.gamma ** bisect.bisect_right(sorted(r.milestones), step)
    if step < spec.warmup_iterations:
        factor *= 1 / 3 + (2 / 3) * step / spec.warmup_iterations
    return r.lr * factor


def train_detector(spec: DetectionSpec, tracker: Tracker | None = None, progress: bool = True
                   ) -> dict:
    """Run (or resume) one detection job and return its result (also in ``result.json``)."""
    phases = Phases()
    with phases("setup"):  # detectors, teacher, data
        task = _DetectionRun(spec, progress)
    return run(spec, task, tracker, progress, phases)


class _DetectionRun(RunTask):
    """A detector's pre-training or distillation run, as the run loop drives it."""

    def __init__(self, spec: DetectionSpec, progress: bool) -> None:
        self.spec, self.progress = spec, progress
        r = self.recipe = spec.recipe
        self.guard = FiniteGuard(divergence_advice(spec.data.name, spec.backbone, None)
                                 + " or the distillation weight (detection.weight)")
        _check_recipe(r)
        self.device = _device()
        dataset = _dataset(spec.data, TRAIN_SPLIT)
        largest = max(dataset.coco.getCatIds(), default=0)
        if largest >= spec.num_classes:
            raise KcdError(f"category id {largest} needs num_classes > {largest}, "
                           f"got {spec.num_classes}")
        torch.manual_seed(spec.seed)  # the RPN's and the box head's samplers draw from it
        memory_format = torch.channels_last if r.channels_last else torch.contiguous_format
        model = self.model = _load_for_spec(spec, spec.backbone, spec.theta0, "theta0")
        model.to(self.device, memory_format=memory_format)
        distill = self.distill = (_Distillation(spec, model, self.device) if spec.distill
                                  else None)
        if distill is not None:
            distill.teacher.to(memory_format=memory_format)
        params = list(model.parameters())
        if distill is not None:
            params += [p for p in distill.loss.parameters() if p.requires_grad]
        self.optimizer = sgd(params, r)
        self.items = _Items(dataset)
        self._batches: Iterator | None = None
        self.steps = self.iterations = r.iterations
        self.description = f"{spec.backbone} {spec.tags.get('method', '')}".strip()
        model.train()

    def step(self, step: int) -> dict[str, torch.Tensor]:
        r, spec = self.recipe, self.spec
        if self._batches is None:  # the batches of iterations step .. iterations - 1
            plan = _train_plan(len(self.items), r.batch_size, spec.seed, step, r.iterations)
            self._batches = iter(_loader(self.items, plan, spec.data.workers))
        images, targets = _to_device(*next(self._batches), self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = _lr(spec, step)
        terms = self.model(images, targets)  # the detector's four losses
        if self.distill is not None:
            terms.update(self.distill.terms())
        total = self.guard.total(terms, step)  # checked by the run loop, no sync per step
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if r.grad_clip:
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], r.grad_clip)
        self.optimizer.step()
        return {k: v.detach() for k, v in terms.items()}  # read back at log time only

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "distill": self.distill.loss.state_dict() if self.distill is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        load_sgd_state(self.optimizer, state["optimizer"], self.recipe)
        if self.distill is not None:
            self.distill.loss.load_state_dict(state["distill"])

    def close(self) -> None:
        self._batches = None  # stops the loader's workers
        if self.distill is not None:
            self.distill.close()

    def finish(self, train_seconds: float) -> dict:
        """Write ``final.pt`` and evaluate; the run loop writes ``result.json``."""
        spec, model = self.spec, self.model
        with self.phases("save"):
            _save_detector(model, Path(spec.out_dir) / FINAL, backbone=spec.backbone,
                           seed=spec.seed, num_classes=spec.num_classes,
                           fpn_channels=model.backbone.out_channels,
                           representation_size=model.roi_heads.box_head.fc7.out_features,
                           iterations=spec.recipe.iterations)
        with self.phases("evaluate"):
            result = evaluate_detector(model, spec.data, batch_size=spec.recipe.eval_batch_size,
                                       progress=self.progress)
        result.update(iterations=spec.recipe.iterations, train_seconds=round(train_seconds, 2),
                      backbone=spec.backbone, seed=spec.seed, tags=spec.tags, spec=to_dict(spec))
        return result

    def eval_metrics(self, result: dict) -> dict[str, float]:
        return {f"eval/{k}": result[k] for k in ("AP", "AP50", "AP75")}

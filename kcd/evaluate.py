"""Evaluation of a classifier, alone or against its teacher (Table 11's columns).

- ``top1`` / ``top5``: accuracy in percent on the evaluation split, ``loss``: mean cross-entropy.
- ``teacher_kl``: mean over images of KL(p_teacher || p_student) of the softmax outputs
  (temperature 1).
- ``feature_l2``: mean over images of the L2 norm of (transformed teacher feature map -
  student feature map) at the distilled layer, the whole c x h x w map per image. When the
  channel counts differ and no transform maps them, the distance is undefined and reported
  as ``None``.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from kcd.errors import KcdError
from kcd.features import FeatureTap
from kcd.teacher_outputs import TeacherOutputs


@torch.no_grad()
def evaluate(
    student: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    teacher: nn.Module | None = None,
    teacher_outputs: TeacherOutputs | None = None,
    layers: Sequence[tuple[str, str]] = (),
    transforms: Sequence[nn.Module | None] = (),
    device: torch.device | str = "cpu",
    channels_last: bool = False,
    progress: bool = False,
) -> dict:
    """Evaluate ``student`` (and its distance to ``teacher`` at ``layers``) on ``batches``.

    ``layers`` holds (teacher layer, student layer) specs; ``transforms`` the transform of
    each pair (or None). Only the first pair enters ``feature_l2``. ``teacher_outputs``: the
    teacher's answers to ``batches`` (in their order), computed once
    (:mod:`kcd.teacher_outputs`), instead of running ``teacher``.
    """
    was_training = student.training
    student.eval()
    s_tap = t_tap = None
    if teacher is not None and layers:
        s_tap = FeatureTap(student, [layers[0][1]])
        if teacher_outputs is None:
            t_tap = FeatureTap(teacher, [layers[0][0]])
    transform = transforms[0] if transforms else None
    n = correct1 = correct5 = 0
    loss_sum = kl_sum = l2_sum = 0.0
    l2_defined = True
    try:
        for x, y in tqdm(batches, desc="evaluate", disable=not progress, leave=False):
            x, y = x.to(device), y.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = student(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top.eq(y[:, None])
            correct1 += hit[:, 0].sum().item()
            correct5 += hit.any(dim=1).sum().item()
            n += y.numel()
            if teacher is not None:
                if teacher_outputs is not None:
                    if n > len(teacher_outputs):
                        raise KcdError(f"the cached teacher outputs hold "
                                       f"{len(teacher_outputs)} images, the evaluation split "
                                       "more; rebuild them (rule teacher_outputs)")
                    index = torch.arange(n - y.numel(), n, device=teacher_outputs.logits.device)
                    t_logits, cached_features = teacher_outputs.take(
                        index, [layers[0][0]] if layers else [])
                    t_logits = t_logits.to(logits.device)
                else:
                    t_logits = teacher(x)
                kl = F.kl_div(
                    F.log_softmax(logits, 1), F.log_softmax(t_logits, 1),
                    reduction="sum", log_target=True,
                )
                kl_sum += kl.item()
                if s_tap is not None and l2_defined:
                    fs = s_tap.features[layers[0][1]].float()
                    ft = (t_tap.features[layers[0][0]] if t_tap is not None
                          else cached_features[0].to(fs.device)).float()
                    if transform is not None:
                        ft = transform(ft, y)
                    if ft.shape != fs.shape:
                        l2_defined = False
                    else:
                        l2_sum += (ft - fs).flatten(1).norm(dim=1).sum().item()
    finally:
        for tap in (s_tap, t_tap):
            if tap is not None:
                tap.remove()
        student.train(was_training)
    if n == 0:
        raise KcdError("the evaluation split is empty; check the dataset root")
    if teacher is not None and teacher_outputs is not None and n != len(teacher_outputs):
        raise KcdError(f"the cached teacher outputs hold {len(teacher_outputs)} images, the "
                       f"evaluation split {n}; rebuild them (rule teacher_outputs)")
    result = {
        "top1": 100.0 * correct1 / n,
        "top5": 100.0 * correct5 / n,
        "loss": loss_sum / n,
        "eval_images": n,
    }
    if teacher is not None:
        result["teacher_kl"] = kl_sum / n
        result["feature_l2"] = (l2_sum / n) if (s_tap is not None and l2_defined) else None
    return result

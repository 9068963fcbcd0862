"""Table 11: how consistent a student's outputs and features are with its teacher's.

For each row, on the evaluation split (:func:`kcd.evaluate.evaluate` does the measuring):

- ``kl_divergence``: mean over images of KL(p_teacher || p_student) of the softmax outputs;
- ``l2_distance``: mean over images of the L2 norm of (teacher view - student) feature maps at
  the distilled layers, the whole c x h x w map per image.

The *teacher view* is the row's transform applied to the teacher's map (the transformed
teacher), or, for rows without one, the teacher's leading c_S channels
(:func:`kcd.analysis.overlap.leading_channels`: the identity pairing the transform replaces;
it is the whole teacher when the channel counts agree). The paper does not say how it compares
a 2048-channel teacher with a 1280-channel student without a transform; this is our reading.
"""
from __future__ import annotations

import torch

from kcd.errors import KcdError


def leading_view(c_t: int, c_s: int) -> torch.nn.Module:
    """The transform that keeps a teacher's first ``c_s`` channels."""
    from kcd.transforms import ChannelTransform

    if c_t < c_s:
        raise KcdError(f"the teacher has {c_t} channels, fewer than the student's {c_s}; "
                       "compare them through a transform")
    return ChannelTransform(torch.arange(c_s), c_t, meta={"strategy": "leading-channels"})


def feature_consistency_job(*, data: dict, num_classes: int, teacher: dict, student: str,
                            rows: list[dict], out: str, batch_size: int = 256,
                            progress: bool = True) -> dict:
    """Evaluate every row ``{"label", "seed", "weights", "transform"}`` against the teacher;
    writes ``{label: {"s<seed>": {"kl_divergence", "l2_distance", "top1"}}}`` to ``out``."""
    from tqdm import tqdm

    from kcd.analysis import default_layer, load_view
    from kcd.checkpoint import atomic_write_json
    from kcd.data.streams import eval_batches
    from kcd.evaluate import evaluate
    from kcd.features import feature_shapes
    from kcd.models import model_spec
    from kcd.specs import DataSpec, from_dict

    spec = from_dict(DataSpec, data)
    t_model, _ = load_view(teacher, num_classes)
    layers = (default_layer(teacher["arch"]), default_layer(student))
    size = spec.image_size or model_spec(student).input_size
    c_t = feature_shapes(t_model, [layers[0]], size)[layers[0]][0]
    batches = list(eval_batches(spec, batch_size))
    result: dict = {}
    for row in tqdm(rows, desc="feature consistency", disable=not progress):
        s_model, transform = load_view({"arch": student, "weights": row["weights"],
                                        "transform": row.get("transform")}, num_classes)
        if transform is None:
            c_s = feature_shapes(s_model, [layers[1]], size)[layers[1]][0]
            transform = leading_view(c_t, c_s)
        r = evaluate(s_model, batches, teacher=t_model, layers=[layers], transforms=[transform])
        if r.get("feature_l2") is None:
            raise KcdError(f"row '{row['label']}': the teacher view and the student's maps differ "
                           "in shape, so their L2 distance is undefined")
        result.setdefault(row["label"], {})[f"s{row['seed']}"] = {
            "kl_divergence": r["teacher_kl"], "l2_distance": r["feature_l2"], "top1": r["top1"]}
    atomic_write_json(result, out)
    return result

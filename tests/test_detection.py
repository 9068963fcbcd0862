"""The detection engine (Table 9): COCO AP, the pre-ReLU tap, distillation, statistics, resume,
bad input. Tiny detectors (narrow FPN and box head) on the tiny demo COCO at 64 px."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kcd.checkpoint import load_file
from kcd.data.datasets import build_dataset
from kcd.detection import (
    LAYER,
    _Distillation,
    _Items,
    _lr,
    coco_ap,
    detection_statistics,
    evaluate_detector,
    init_detector,
    load_detector,
    train_detector,
)
from kcd.errors import KcdError
from kcd.features import FeatureTap
from kcd.run import CHECKPOINT, FINAL, RESULT
from kcd.specs import DataSpec, DetectionDistill, DetectionSpec, Recipe, from_dict, to_dict
from kcd.statistics import make_transform

NUM_CLASSES = 4  # tiny demo: 3 categories, ids 1..3
SIZES = {"fpn_channels": 16, "representation_size": 32}
GEOMETRY = {
    "min_size": 64,
    "max_size": 64,
    "anchor_sizes": [8, 16, 32, 64, 128],
    "options": {"rpn_post_nms_top_n_train": 50, "rpn_post_nms_top_n_test": 20,
                "box_batch_size_per_image": 16, "rpn_batch_size_per_image": 32},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny detectors run faster on one thread (no OpenMP hand-offs), above all on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    """The tiny demo COCO: 8 train and 4 val images at 64 px."""
    from kcd.data.demo import DemoSizes, write_demo_data

    root = tmp_path_factory.mktemp("demo")
    return write_demo_data(root, kinds=("coco",), sizes=DemoSizes.tiny(), progress=False)["coco"]


def _theta0(folder: Path, backbone: str, seed: int = 0) -> str:
    path = folder / f"{backbone}-s{seed}.pt"
    if not path.exists():
        init_detector(backbone, NUM_CLASSES, seed, path, **SIZES)
    return str(path)


def _spec(coco: Path, folder: Path, backbone: str, out: str, iterations: int = 2,
          distill: DetectionDistill | None = None, **recipe) -> DetectionSpec:
    r = {"iterations": iterations, "batch_size": 2, "lr": 0.01, "weight_decay": 1e-4,
         "milestones": [iterations - 1], "checkpoint_every": 2, "log_every": 1,
         "eval_batch_size": 4, **recipe}
    return DetectionSpec(backbone=backbone, seed=0, num_classes=NUM_CLASSES,
                         theta0=_theta0(folder, backbone), out_dir=str(folder / out),
                         data=DataSpec("coco", str(coco)), recipe=Recipe(**r), distill=distill,
                         **GEOMETRY)


@pytest.fixture(scope="module")
def trained(coco, tmp_path_factory) -> dict[str, str]:
    """A resnet50 teacher and a resnet18 student, each trained for two iterations (enough to
    move the zero-initialised last batch norm of every residual branch)."""
    folder = tmp_path_factory.mktemp("trained")
    weights = {}
    for backbone in ("resnet50", "resnet18"):
        spec = _spec(coco, folder, backbone, backbone)
        train_detector(spec, progress=False)
        weights[backbone] = str(folder / backbone / FINAL)
    return weights


def _batch(coco: Path, indices=(0, 1)):
    items = _Items(build_dataset("coco", coco, "train"))
    images, targets = zip(*(items[(i, i % 2 == 1)] for i in indices))
    return list(images), list(targets)


class _Recorder:
    """A tracker that keeps what it is given, and can fail at one step like a killed job."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.metrics: dict[int, dict[str, float]] = {}
        self.fail_at = fail_at

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step == self.fail_at:
            raise KeyboardInterrupt("killed")
        self.metrics[step] = metrics


def test_ground_truth_as_detections_scores_ap_100(coco):
    dataset = build_dataset("coco", coco, "val")
    anns = dataset.coco.loadAnns(dataset.coco.getAnnIds())
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 1.0} for a in anns]
    scores = coco_ap(dataset.coco, results, dataset.ids)
    assert scores == pytest.approx({"AP": 100.0, "AP50": 100.0, "AP75": 100.0})
    assert coco_ap(dataset.coco, [], dataset.ids) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}


def test_evaluation_of_an_untrained_detector(coco, tmp_path):
    model = load_detector("resnet18", _theta0(tmp_path, "resnet18"), NUM_CLASSES, **GEOMETRY)
    result = evaluate_detector(model, DataSpec("coco", str(coco), eval_limit=3))
    assert result["eval_images"] == 3 and 0.0 <= result["AP"] <= 100.0


def test_pre_relu_tap_is_before_the_last_relu(coco, trained):
    model = load_detector("resnet18", trained["resnet18"], NUM_CLASSES, **GEOMETRY).eval()
    images, _ = _batch(coco)
    with torch.no_grad(), FeatureTap(model, [LAYER, "backbone.body.layer4"]) as tap:
        model(images)
        pre, post = tap.features[LAYER], tap.features["backbone.body.layer4"]
    assert pre.shape[1] == 512 and (pre < 0).any()
    assert torch.equal(post, torch.relu(pre))


@pytest.mark.parametrize("teacher, loss_name", [("resnet50", "fitnets"), ("resnet18", "l2")])
def test_distillation_forward_backward(coco, trained, tmp_path, teacher, loss_name):
    """Plain L2 without a transform: a regressor when the channels differ (2048 vs 512)."""
    spec = _spec(coco, tmp_path, "resnet18", "run",
                 distill=DetectionDistill(teacher=teacher, teacher_weights=trained[teacher]))
    student = load_detector("resnet18", spec.theta0, NUM_CLASSES, **GEOMETRY).train()
    distill = _Distillation(spec, student, torch.device("cpu"))
    try:
        terms = student(*_batch(coco))
        terms.update(distill.terms())
    finally:
        distill.close()
    assert loss_name in terms and all(torch.isfinite(v) for v in terms.values())
    terms[loss_name].backward()
    grad = student.backbone.body.conv1.weight.grad  # the stem: through the whole backbone
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in distill.teacher.parameters())


def test_statistics_transform_and_distillation_run(coco, trained, tmp_path):
    stats = tmp_path / "stats.pt"
    summary = detection_statistics(
        teacher="resnet50", teacher_weights=trained["resnet50"], student="resnet18",
        student_weights=trained["resnet18"], data=DataSpec("coco", str(coco)),
        num_classes=NUM_CLASSES, out=stats, min_size=64, max_size=64, batch_size=4,
        progress=False)
    assert summary == {"samples": 8, "c_t": 2048, "c_s": 512}
    meta = make_transform(stats, "bipartite", "correlation", tmp_path / "t.pt")
    assert (meta["teacher"], meta["student"], meta["layer"]) == ("resnet50", "resnet18", LAYER)

    distill = DetectionDistill(teacher="resnet50", teacher_weights=trained["resnet50"],
                               transform=str(tmp_path / "t.pt"))
    tracker = _Recorder()
    result = train_detector(_spec(coco, tmp_path, "resnet18", "ours", distill=distill),
                            tracker=tracker, progress=False)
    assert "train/l2" in tracker.metrics[1]  # Ours: L2 to the transformed teacher
    saved = json.loads((tmp_path / "ours" / RESULT).read_text())
    assert saved["AP"] == result["AP"] and {"AP50", "AP75", "train_seconds"} <= set(saved)
    assert load_file(tmp_path / "ours" / FINAL)["backbone"] == "resnet18"

    obj = load_file(stats)
    obj["student"] = "resnet34"
    torch.save(obj, tmp_path / "other.pt")
    make_transform(tmp_path / "other.pt", "bipartite", "correlation", tmp_path / "t34.pt")
    distill.transform = str(tmp_path / "t34.pt")
    with pytest.raises(KcdError, match="was made for student resnet34, not resnet18"):
        train_detector(_spec(coco, tmp_path, "resnet18", "bad", distill=distill), progress=False)


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(coco, trained, tmp_path):
    distill = DetectionDistill(teacher="resnet50", teacher_weights=trained["resnet50"])
    reference = _spec(coco, tmp_path, "resnet18", "ref", iterations=5, distill=distill)
    train_detector(reference, progress=False)

    spec = _spec(coco, tmp_path, "resnet18", "killed", iterations=5, distill=distill)
    with pytest.raises(KeyboardInterrupt):
        train_detector(spec, tracker=_Recorder(fail_at=3), progress=False)
    out = Path(spec.out_dir)
    assert load_file(out / CHECKPOINT)["step"] == 2 and not (out / RESULT).exists()

    changed = _spec(coco, tmp_path, "resnet18", "killed", iterations=5, distill=distill, lr=0.02)
    with pytest.raises(KcdError, match="belongs to another version of this run"):
        train_detector(changed, progress=False)

    result = train_detector(spec, progress=False)
    a = load_file(tmp_path / "ref" / FINAL)["state_dict"]
    b = load_file(out / FINAL)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert result["AP"] == json.loads((tmp_path / "ref" / RESULT).read_text())["AP"]
    assert not (out / CHECKPOINT).exists()


def test_learning_rate_warms_up_then_steps_down(coco, tmp_path):
    spec = _spec(coco, tmp_path, "resnet18", "x", iterations=10, lr=0.3, milestones=[6, 8])
    spec.warmup_iterations = 3
    rates = [_lr(spec, step) for step in range(10)]
    assert rates == pytest.approx([0.1, 0.1 + 0.2 / 3, 0.1 + 0.4 / 3, 0.3, 0.3, 0.3, 0.03, 0.03,
                                   0.003, 0.003])


def test_nan_loss_names_the_iteration_and_term(coco, tmp_path):
    spec = _spec(coco, tmp_path, "resnet18", "nan", lr=1e30)
    with pytest.raises(KcdError, match=r"loss term '\w+' is (nan|inf) at iteration \d+"):
        train_detector(spec, progress=False)
    assert not (tmp_path / "nan" / RESULT).exists()


def test_image_without_annotations_trains(coco, tmp_path):
    root = _copy(coco, tmp_path)
    path = root / "annotations" / "instances_train2017.json"
    doc = json.loads(path.read_text())
    first = doc["images"][0]["id"]
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != first]
    path.write_text(json.dumps(doc))
    images, targets = _batch(root)
    assert targets[0]["boxes"].shape == (0, 4) and targets[0]["labels"].shape == (0,)
    model = load_detector("resnet18", _theta0(tmp_path, "resnet18"), NUM_CLASSES,
                          **GEOMETRY).train()
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


def test_load_detector_errors(tmp_path):
    path = _theta0(tmp_path, "resnet18")
    with pytest.raises(KcdError, match="holds a fasterrcnn_resnet18_fpn but a "
                                       "fasterrcnn_resnet50_fpn was asked for"):
        load_detector("resnet50", path, NUM_CLASSES)
    with pytest.raises(KcdError, match="has 4 classes but the dataset has 81"):
        load_detector("resnet18", path, 81)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(Path(path).read_bytes()[:1000])
    with pytest.raises(KcdError, match="truncated.pt is unreadable or truncated") as e:
        load_detector("resnet18", truncated, NUM_CLASSES)
    assert "\n" not in str(e.value)


def test_spec_round_trip_and_unknown_key(coco, tmp_path):
    spec = _spec(coco, tmp_path, "resnet18", "x",
                 distill=DetectionDistill(teacher="resnet50", teacher_weights="w.pt"))
    assert from_dict(DetectionSpec, json.loads(json.dumps(to_dict(spec)))) == spec
    with pytest.raises(KcdError, match="unknown key DetectionSpec.distill.temperature"):
        from_dict(DetectionSpec, {**to_dict(spec), "distill": {
            "teacher": "resnet50", "teacher_weights": "w", "temperature": 4}})


def _copy(coco: Path, tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    shutil.copytree(coco, root)
    return root


def _not_json(root: Path) -> str:
    path = root / "annotations" / "instances_train2017.json"
    path.write_text("this is not json")
    return r"instances_train2017.json is not JSON"


def _unknown_category(root: Path) -> str:
    path = root / "annotations" / "instances_train2017.json"
    doc = json.loads(path.read_text())
    doc["annotations"][0]["category_id"] = 99
    path.write_text(json.dumps(doc))
    return r"instances_train2017.json: annotation \d+ has category_id 99"


def _missing_image(root: Path) -> str:
    victim = sorted((root / "train2017").iterdir())[0]
    victim.unlink()
    return rf"image .*{victim.name} listed in .*instances_train2017.json is missing"


@pytest.mark.parametrize("corrupt", [_not_json, _unknown_category, _missing_image])
def test_bad_coco_input_is_one_line_naming_the_file(coco, tmp_path, corrupt):
    root = _copy(coco, tmp_path)
    pattern = corrupt(root)
    spec = _spec(root, tmp_path, "resnet18", "bad")
    with pytest.raises(KcdError, match=pattern) as e:
        train_detector(spec, progress=False)
    assert "\n" not in str(e.value)

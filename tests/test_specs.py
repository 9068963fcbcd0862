"""Run specs: the run-time fields the workflow passes apart from the spec (``--runtime``)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kcd.config import train_spec, validate_config
from kcd.errors import KcdError
from kcd.specs import (
    ANCHOR_SIZES,
    RUNTIME_FIELDS,
    DataSpec,
    DetectionDistill,
    DetectionSpec,
    Recipe,
    TrainSpec,
    fingerprint,
    from_dict,
    merge_runtime,
    parse_runtime,
    runtime_text,
    split_runtime,
    to_dict,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def spec() -> dict:
    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    validate_config(cfg)
    return to_dict(train_spec(cfg, dataset="cifar100", arch="resnet20", seed=0, theta0="t.pt",
                              out_dir="run", method="kd", teacher="resnet56",
                              teacher_weights="teacher.pt"))


def test_split_takes_exactly_the_run_time_fields_and_merge_restores_them(spec):
    result, runtime = split_runtime(spec)
    assert runtime == {section: {k: spec[section][k] for k in keys}
                       for section, keys in RUNTIME_FIELDS.items()}
    for section, keys in RUNTIME_FIELDS.items():
        assert not set(keys) & set(result[section])
    assert result["recipe"]["lr"] == spec["recipe"]["lr"]
    assert merge_runtime(result, runtime) == spec
    text = runtime_text(runtime)
    assert "{" not in text and " " not in text  # Snakemake formats braces in a resource
    assert parse_runtime(text) == runtime
    assert from_dict(TrainSpec, merge_runtime(result, runtime)) == from_dict(TrainSpec, spec)
    assert spec["recipe"]["log_every"] is not None  # split copied, did not mutate


def test_a_spec_without_its_run_time_fields_still_loads_with_defaults(spec):
    result, _ = split_runtime(spec)
    loaded = from_dict(TrainSpec, result)
    assert loaded.recipe.lr == spec["recipe"]["lr"] and loaded.data.workers == 0


@pytest.mark.parametrize("runtime, message", [
    ({"recipe": {"lr": 0.1}}, "recipe.lr is not a run-time field"),
    ({"model": {"x": 1}}, "'model' is not a run-time section"),
])
def test_merge_refuses_result_fields(spec, runtime, message):
    with pytest.raises(KcdError, match=message):
        merge_runtime(split_runtime(spec)[0], runtime)


def test_cli_names_a_bad_runtime_field_in_one_line(spec, tmp_path):
    result, _ = split_runtime(spec)
    run = subprocess.run([sys.executable, "-m", "kcd.cli", "distill", "--spec", json.dumps(result),
                          "--runtime", "recipe.lr=1", "--no-track"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "kcd: error: --runtime: recipe.lr is not a run-time field "
        "(known: log_every, checkpoint_every, eval_batch_size, cudnn_benchmark, "
        "cpu_small_conv_grads, fused_optimizer)"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, message", [
    ("recipe.log_every", "is not SECTION.KEY=VALUE"),
    ("log_every=3", "is not SECTION.KEY=VALUE"),
    ("recipe.log_every=ten", "the value of recipe.log_every is not a number"),
])
def test_runtime_text_errors_name_the_item(text, message):
    with pytest.raises(KcdError, match=message):
        parse_runtime(text)


def test_fingerprint_ignores_run_time_fields_and_tags_only(spec):
    base = fingerprint(from_dict(TrainSpec, spec))
    same = json.loads(json.dumps(spec))
    same["recipe"].update(log_every=1, checkpoint_every=7, eval_batch_size=3)
    same["data"]["workers"] = 5
    same["tags"] = {"anything": "else"}
    assert fingerprint(from_dict(TrainSpec, same)) == base
    other = json.loads(json.dumps(spec))
    other["recipe"]["lr"] *= 2
    assert fingerprint(from_dict(TrainSpec, other)) != base


def test_detection_specs_live_here_and_round_trip():
    spec = DetectionSpec(backbone="resnet18", seed=0, num_classes=4, theta0="t.pt", out_dir="o",
                         data=DataSpec("coco", "root"), recipe=Recipe(iterations=2, batch_size=2,
                                                                      lr=0.01),
                         distill=DetectionDistill(teacher="resnet50", teacher_weights="w.pt"))
    assert spec.anchor_sizes == ANCHOR_SIZES and spec.anchor_sizes is not ANCHOR_SIZES
    data = json.loads(json.dumps(to_dict(spec)))
    assert from_dict(DetectionSpec, data) == spec
    assert fingerprint(spec) == fingerprint(from_dict(DetectionSpec, {**data, "tags": {"a": 1}}))
    with pytest.raises(KcdError, match="unknown key DetectionSpec.recipe.epochs"):
        from_dict(DetectionSpec, {**data, "recipe": {**data["recipe"], "epochs": 3}})
    with pytest.raises(KcdError, match="missing key DetectionSpec.backbone"):
        from_dict(DetectionSpec, {k: v for k, v in data.items() if k != "backbone"})


def test_specs_import_no_torch():
    code = "import sys, kcd.specs; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr

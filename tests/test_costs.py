"""The cost plan: GPU-hours of each job of a dry run from a throughput table (kcd.costs)."""
from __future__ import annotations

import json

import pytest
import yaml

from kcd.costs import (
    ASSUMED,
    FORWARD_SPEEDUP,
    SCALING_EFFICIENCY,
    THROUGHPUT_FORMAT,
    cost_rows,
    job_cost,
    read_throughput,
)
from kcd.dryrun import Job, needed_by
from kcd.errors import KcdError

ROW = {"rule": "distill", "dataset": "imagenet", "model": "resnet18", "teacher": "resnet50",
       "method": "kd", "transform": "none", "gpus": 32}
SPEC = {"recipe": {"iterations": 1000, "batch_size": 2048}, "data": {}}


def test_a_distillation_costs_its_images_over_the_combined_step_rate():
    cost = job_cost(ROW, SPEC, {"imagenet/resnet18<-resnet50": 1000.0,
                                "imagenet/resnet18": 3000.0})
    train = 1000 * 2048
    seconds = train / 1000.0 + 50000 / (3000.0 * FORWARD_SPEEDUP)  # + the evaluation
    assert cost.images == train + 50000 and cost.source == "measured"
    assert cost.gpu_hours == pytest.approx(seconds / SCALING_EFFICIENCY / 3600)


def test_assumed_rates_combine_teacher_forward_and_student_step():
    cost = job_cost(ROW, SPEC, {})
    s, t = ASSUMED["imagenet/resnet18"], ASSUMED["imagenet/resnet50"] * FORWARD_SPEEDUP
    step = 1 / (1 / s + 1 / t)
    assert cost.source == "assumed"
    # the evaluation's forward passes (faster than training steps) are included
    assert step < cost.images_per_s < 1.05 * step


def test_cpu_jobs_cost_nothing_and_rows_say_their_source():
    assert job_cost({**ROW, "gpus": 0}, SPEC, {}) is None
    rows = cost_rows([ROW, {**ROW, "gpus": 0}], [SPEC, SPEC], {})
    assert len(rows) == 1 and rows[0]["source"] == "assumed" and rows[0]["GPU-h"] > 0
    assert rows[0]["wall-h"] == pytest.approx(rows[0]["GPU-h"] / 32, abs=0.1)


def test_a_step_without_a_rate_names_the_key_to_add():
    with pytest.raises(KcdError, match="'imagenet/vit' to the throughput table"):
        job_cost({**ROW, "model": "vit"}, SPEC, {})
    with pytest.raises(KcdError, match=r"no split sizes for dataset svhn: add .* kcd\.costs\.SPLIT_IMAGES"):
        job_cost({**ROW, "dataset": "svhn"}, SPEC, {})


def test_throughput_files_are_checked(tmp_path):
    good = tmp_path / "t.json"
    good.write_text(json.dumps({"device": "x", "throughput": {"cifar100/resnet56": 9e3}}))
    assert read_throughput(good) == {"cifar100/resnet56": 9000.0}
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"cifar100/resnet56": "fast"}))
    with pytest.raises(KcdError, match="not a mapping of step names to positive images/s"):
        read_throughput(bad)
    with pytest.raises(KcdError, match="is unreadable"):
        read_throughput(tmp_path / "missing.json")


def test_throughput_tables_of_the_bench_and_its_json_are_read(tmp_path):
    table = {"format": THROUGHPUT_FORMAT, "unit": "images/s per GPU",
             "throughput": {"cifar100/resnet56": 9e3}, "batch": {"cifar100/resnet56": 128}}
    plain, nested, as_yaml = (tmp_path / n for n in ("t.json", "bench.json", "t.yaml"))
    plain.write_text(json.dumps(table))
    nested.write_text(json.dumps({"meta": {}, "rows": [], "throughput": table}))
    as_yaml.write_text(yaml.safe_dump(table))
    for path in (plain, nested, as_yaml):
        assert read_throughput(path) == {"cifar100/resnet56": 9000.0}, path
    other = tmp_path / "v9.json"
    other.write_text(json.dumps({**table, "format": "kcd-throughput/9"}))
    with pytest.raises(KcdError, match="has format 'kcd-throughput/9', not 'kcd-throughput/1'"):
        read_throughput(other)
    broken = tmp_path / "b.yaml"
    broken.write_text("throughput: {a: [1\n")
    with pytest.raises(KcdError, match=r"b\.yaml is unreadable"):
        read_throughput(broken)


def test_a_table_needs_the_jobs_that_make_its_inputs():
    init = Job("init", "init", outputs=["t0.pt"])
    pre = Job("pretrain", "pretrain", inputs=["t0.pt"], outputs=["final.pt"])
    other = Job("pretrain", "pretrain", inputs=["t0.pt"], outputs=["other.pt"])
    table = Job("table", "table", inputs=["final.pt"], outputs=["table7.csv"])
    assert needed_by([init, pre, other, table], table) == [init, pre, table]

"""End to end: Tables 1-6, 10, 11 and Figure 1 through the real DAG at the smallest scale.

A CIFAR pair with unequal channel counts (ResNet-20 teacher, 64 channels; ResNet-20-0.5x
student, 32), like the paper's ResNet-50 -> MobileNetV2-0.5x, on the tiny demo data.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from tests.test_workflow import _config, _snakemake

pytestmark = pytest.mark.slow
TEACHER, STUDENT = "resnet20", "resnet20_0.5x"


def _ablation_config() -> dict:
    cfg = _config()
    cfg["tables"]["table7"]["rows"] = ["Baseline", "FitNets", "Ours + FitNets"]
    cfg["ablations"] = {
        "dataset": "cifar100", "teacher": TEACHER, "student": STUDENT,
        "tables": [1, 2, 3, 4, 5, 6, 10, 11], "reinit_seeds": [1], "dynamic_every": 2,
        "groups": [0, 1, 2], "second_seed": 1, "overlap_k": [4, 0.25],
        "learned": {"steps": 3, "lr": 1.0e-3, "batch_size": 16},
    }
    cfg["figure1"] = {"dataset": "cifar100", "teacher": TEACHER, "student": STUDENT,
                      "class": "class_03", "seeds": [0, 1]}
    # Table 9 with a ResNet-50 teacher (2048 channels) and a ResNet-18 student (512)
    cfg["datasets"]["coco"] = {"root": "resources/demo/coco", "num_classes": 4, "workers": 0}
    cfg["recipes"]["coco"] = {"default": {
        "iterations": 4, "batch_size": 4, "lr": 0.02, "milestones": [3], "checkpoint_every": 2,
        "log_every": 2, "eval_batch_size": 4}}
    cfg["detection"] = {
        "dataset": "coco", "teacher": "resnet50", "students": ["resnet18"], "weight": 1.0e-4,
        "fpn_channels": 16, "representation_size": 32, "min_size": 64, "max_size": 64,
        "anchor_sizes": [8, 16, 32, 64, 128], "statistics_batch_size": 4,
        "options": {"rpn_post_nms_top_n_train": 50, "rpn_post_nms_top_n_test": 50}}
    return cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    work = tmp_path_factory.mktemp("ablations")
    (work / "config").mkdir()
    (work / "config" / "demo.yaml").write_text(yaml.safe_dump(_ablation_config()))
    dry = _snakemake(work, "results/tables.md", "-n", "--quiet", "rules")
    assert dry.returncode == 0, dry.stderr[-4000:]
    run = _snakemake(work, "results/tables.md")
    assert run.returncode == 0, run.stderr[-4000:]
    return work, dry.stdout + dry.stderr


def _runs(work, teacher_seed=0):
    return work / "results" / "cifar100" / "runs" / f"{TEACHER}-s{teacher_seed}__{STUDENT}"


def test_every_table_and_the_figure_are_built(built):
    work, _ = built
    md = (work / "results" / "tables.md").read_text()
    for n in (1, 2, 3, 4, 5, 6, 7, 9, 10, 11):
        assert f"### Table {n}:" in md
        assert (work / "results" / f"table{n}.tex").is_file()
    assert "figure1.png" in md
    assert (work / "results" / "figure1.png").stat().st_size > 1000
    assert (work / "results" / "figure1.pdf").read_bytes().startswith(b"%PDF")


def test_ablation_cells_come_from_their_runs(built):
    work, _ = built
    runs = _runs(work)
    models = work / "results" / "cifar100" / "models"

    def top1(path):
        return json.loads(path.read_text())["top1"]

    t1 = pd.read_csv(work / "results" / "table1.csv").set_index("row")
    # the ablations' Baseline is distillation without a transform: the pair's FitNets run,
    # the same run as Table 7's FitNets row (not the independently trained student)
    assert t1.loc["Baseline", STUDENT] == pytest.approx(top1(runs / "fitnets/none/s0/result.json"))
    t7 = pd.read_csv(work / "results" / "table7.csv").set_index("row")
    assert t7.loc["FitNets", STUDENT] == t1.loc["Baseline", STUDENT]
    assert t7.loc["Baseline", STUDENT] == pytest.approx(top1(models / f"{STUDENT}-s0/result.json"))
    assert t1.loc["Sub-net-FC", STUDENT] == pytest.approx(
        top1(runs / "l2/subnet-fc-correlation/s0/result.json"))
    assert t1.loc["Bipartite", f"{STUDENT}_paper"] == 68.35
    t3 = pd.read_csv(work / "results" / "table3.csv").set_index("row")
    assert t3.loc["a: S1 (theta1)", STUDENT] == pytest.approx(
        top1(runs / "l2/bipartite-correlation@s0/s1/result.json"))
    assert t3.loc["b: T1 (theta1)", STUDENT] == pytest.approx(
        top1(_runs(work, 1) / "l2/bipartite-correlation@t0/s0/result.json"))
    t4 = pd.read_csv(work / "results" / "table4.csv").set_index("row")
    assert t4.loc["S0/T0", STUDENT] == pytest.approx(
        top1(runs / "l2/bipartite-correlation@init-st/s0/result.json"))
    assert t4.loc["S0/T0", f"{STUDENT}_paper"] == 67.47
    t6 = pd.read_csv(work / "results" / "table6.csv").set_index("row")
    assert t6.loc["K=2", STUDENT] == pytest.approx(
        top1(runs / "l2/bipartite-correlation-k2/s0/result.json"))
    assert t6.loc["K=0", STUDENT] == t1.loc["Baseline", STUDENT]
    t5 = pd.read_csv(work / "results" / "table5.csv").set_index("row")
    assert t5.loc["Baseline", STUDENT] == t1.loc["Baseline", STUDENT]


def test_transform_sources_and_the_dynamic_run(built):
    work, _ = built
    transforms = work / "results" / "cifar100" / "transforms"
    init_pair = transforms / f"{TEACHER}-s0-init__{STUDENT}-s0-init"
    assert (init_pair / "bipartite-correlation.pt").is_file()
    spec = json.loads((_runs(work) / "l2/bipartite-correlation+dyn/s0/result.json").read_text())
    assert spec["spec"]["distill"]["dynamic_every"] == 2
    from kcd.transforms import load_transform

    k2 = load_transform(transforms / f"{TEACHER}-s0__{STUDENT}-s0/bipartite-correlation-k2.pt")
    assert k2.meta["groups"] == 2


def test_runs_are_shared_between_tables(built):
    """The Bipartite / Correlation / S (theta0) / S/T / Static / K=1 cells are one run."""
    dry = built[1]
    cells = set()
    work = built[0]
    for n in (1, 2, 3, 4, 5, 6):
        plan_rows = pd.read_csv(work / "results" / f"table{n}.csv")
        for _, line in plan_rows.iterrows():
            if line["transform"] == "bipartite-correlation" and line["method"] == "l2":
                cells.add(line[STUDENT])
    assert len(cells) == 1
    distills = [line for line in dry.splitlines() if line.strip().startswith("distill ")]
    # 2 table 7 runs + 4 (T1) + 4 (T2) + 2 (T3) + 3 (T4) + 1 (T5) + 1 (T6) + 1 (Ours) + 6 (T11)
    # + 2 (Table 9's L2 and Ours: detectors run through the same rule)
    assert distills and int(distills[0].split()[1]) == 26


def test_analysis_tables_measure_what_they_say(built):
    work, _ = built
    t10 = pd.read_csv(work / "results" / "table10.csv").set_index("row")
    assert list(t10.index) == ["S vs T", "S1 vs S2", "S vs T(T)"]
    assert {"top4", "top25%"} <= set(t10.columns)
    assert t10["top4"].between(0, 100).all()
    assert pd.isna(t10.loc["S vs T", "top4_paper"])  # the paper has no top-4 column
    t11 = pd.read_csv(work / "results" / "table11.csv").set_index("row")
    # a channel transform does not change the teacher's logits: row 2 has no KL of its own
    row2 = "Transformed T vs trained S (before distillation)"
    assert pd.isna(t11.loc[row2, "kl_divergence"]) and "KL not applicable" in t11.loc[row2, "note"]
    assert (t11["kl_divergence"].drop(row2) >= 0).all() and (t11["l2_distance"] > 0).all()
    assert t11.loc["Baseline (T vs trained S)", "l2_distance_paper"] == 277.19
    assert pd.isna(t11.loc["Baseline (T vs trained S)", "note"])
    assert t11.loc["Ours + RCO", "note"].startswith("row label inferred")
    md = (work / "results" / "table11.md").read_text()
    assert "Ours + RCO †" in md



def test_table9_cells_come_from_the_detection_runs(built):
    work, _ = built
    coco = work / "results" / "coco"
    t9 = pd.read_csv(work / "results" / "table9.csv").set_index("row")
    assert list(t9.index) == ["Student", "L2", "Ours"]
    runs = coco / "runs" / "resnet50-s0__resnet18"
    for row, path in (("Student", coco / "models/resnet18-s0/result.json"),
                      ("L2", runs / "l2/none/s0/result.json"),
                      ("Ours", runs / "l2/bipartite-correlation/s0/result.json")):
        # the csv rounds to 4 decimals
        assert t9.loc[row, "resnet18"] == pytest.approx(json.loads(path.read_text())["AP"], abs=5e-5)
    assert t9.loc["Ours", "resnet18_paper"] == 36.8
    assert pd.isna(t9["teacher_AP_paper"].iloc[0])  # the paper's teacher is a ResNet-152
    from kcd.transforms import load_transform

    t = load_transform(coco / "transforms/resnet50-s0__resnet18-s0/bipartite-correlation.pt")
    assert (t.c_t, t.c_s) == (2048, 512)

"""The DAG's content as plain Python: paths (kcd.layout) and plans (kcd.plans), no Snakemake."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kcd.errors import KcdError
from kcd.layout import Layout
from kcd.plans import Plans

REPO = Path(__file__).resolve().parents[1]
R = "res"
IMAGENET_PAIR = ("imagenet", "resnet50", "mobilenetv2_0.5x")


@pytest.fixture(scope="module")
def demo() -> Plans:
    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg["results"] = R
    return Plans(cfg)


@pytest.fixture(scope="module")
def paper() -> Plans:
    cfg = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    cfg["results"] = R
    cfg["ablations"]["reinit_seeds"] = [1, 2, 3]
    return Plans(cfg)


def _rows(plan: dict) -> dict:
    return {r["label"]: r for r in plan["rows"]}


def test_layout_paths():
    L = Layout(R)
    assert L.theta0("cifar100", "resnet20", 0) == "res/cifar100/init/resnet20-s0.pt"
    assert L.weights("imagenet", "resnet50", "s1-init") == "res/imagenet/init/resnet50-s1.pt"
    assert L.weights("imagenet", "resnet50", "s1") == "res/imagenet/models/resnet50-s1/final.pt"
    assert L.run_file("imagenet", "resnet50", 0, "resnet18", "baseline", "none", 2) == \
        "res/imagenet/models/resnet18-s2/result.json"
    assert L.run_transform("imagenet", "resnet50", 0, "resnet18", 2, "greedy-kl@init-st") == \
        "res/imagenet/transforms/resnet50-s0-init__resnet18-s2-init/greedy-kl.pt"
    assert L.run_transform("imagenet", "resnet50", 0, "resnet18", 2, "none") is None
    assert L.log("tables", "table7") == "res/logs/tables/table7.log"


def test_table8_baseline_is_the_students_pretraining_run(demo):
    rows = _rows(demo.table_plan(8))
    assert rows["Baseline"]["cells"]["resnet18"] == ["res/imagenet/models/resnet18-s0/result.json"]
    assert rows["Ours + FitNets"]["cells"]["resnet18"] == [
        "res/imagenet/runs/resnet50-s0__resnet18/fitnets/bipartite-correlation/s0/result.json"]


def test_ablation_baselines_are_table8s_fitnets_run(demo):
    fitnets = _rows(demo.table_plan(8))["FitNets"]["cells"]["mobilenetv2_0.5x"]
    assert fitnets == ["res/imagenet/runs/resnet50-s0__mobilenetv2_0.5x/fitnets/none/s0/"
                       "result.json"]
    assert _rows(demo.table_plan(1))["Baseline"]["cells"]["mobilenetv2_0.5x"] == fitnets
    assert _rows(demo.table_plan(5))["Baseline"]["cells"]["mobilenetv2_0.5x"] == fitnets
    assert _rows(demo.table_plan(6))["K=0"]["cells"]["mobilenetv2_0.5x"] == fitnets


def test_table3_s1_uses_the_transform_computed_for_the_theta0_pair(paper):
    rows = _rows(paper.table_plan(3))
    (cell,) = rows["a: S1 (theta1)"]["cells"]["mobilenetv2_0.5x"]
    assert cell.endswith("/l2/bipartite-correlation@s0/s1/result.json")
    spec = paper.distill_spec(*IMAGENET_PAIR[:2], 0, IMAGENET_PAIR[2], "l2",
                              "bipartite-correlation@s0", 1)
    assert spec["theta0"] == "res/imagenet/init/mobilenetv2_0.5x-s1.pt"  # its own theta1
    assert spec["distill"]["transforms"] == [
        "res/imagenet/transforms/resnet50-s0__mobilenetv2_0.5x-s0/bipartite-correlation.pt"]
    (cell,) = rows["b: T2 (theta2)"]["cells"]["mobilenetv2_0.5x"]
    assert cell == ("res/imagenet/runs/resnet50-s2__mobilenetv2_0.5x/l2/"
                    "bipartite-correlation@t0/s0/result.json")


def test_distill_spec_carries_its_row_the_teacher_and_rcos_route(paper):
    spec = paper.distill_spec("cifar100", "resnet56", 0, "resnet20", "rco",
                              "bipartite-correlation", 0)
    assert spec["tags"]["row"] == "Ours + RCO"
    assert spec["distill"]["teacher_weights"] == "res/cifar100/models/resnet56-s0/final.pt"
    assert spec["distill"]["anchors"] == [
        "res/cifar100/models/resnet56-s0/anchors/iter-16000.pt",
        "res/cifar100/models/resnet56-s0/anchors/iter-32000.pt",
        "res/cifar100/models/resnet56-s0/anchors/iter-48000.pt",
        "res/cifar100/models/resnet56-s0/final.pt"]
    assert paper.pretrain_spec("cifar100", "resnet56", 0)["anchor_iterations"] == [
        16000, 32000, 48000]  # the teacher saves them; a student does not
    assert paper.pretrain_spec("cifar100", "resnet20", 0)["anchor_iterations"] == []


def test_dynamic_runs_and_per_class_statistics_belong_to_the_ablation_pair(paper):
    spec = paper.distill_spec(*IMAGENET_PAIR[:2], 0, IMAGENET_PAIR[2], "l2",
                              "bipartite-correlation+dyn", 0)
    assert spec["distill"]["dynamic_every"] == 3125
    ds, teacher, student = IMAGENET_PAIR
    assert paper.stats_groups(ds, teacher, "s0", student, "s1") == [10, 100, 1000]
    # Table 6's K-group transforms read trained pairs only: theta0 pairs (Tables 3, 4) skip them
    for tw, sw in (("s0-init", "s0"), ("s0", "s0-init"), ("s0-init", "s0-init")):
        assert paper.stats_groups(ds, teacher, tw, student, sw) == []
    assert paper.stats_groups("imagenet", "resnet50", "s0", "resnet18", "s0") == []


def test_transform_arguments_and_names_come_from_one_grammar(demo):
    from kcd.naming import LEARNED_STRATEGIES
    from kcd.transforms import LEARNED_KINDS

    assert demo.transform_args("greedy-kl-k10") == ["--strategy", "greedy", "--metric", "kl",
                                                    "--groups", "10"]
    assert demo.learned_args() == ["--steps", "20", "--lr", "0.001", "--batch-size", "32"]
    assert tuple(LEARNED_STRATEGIES) == tuple(LEARNED_KINDS)


def test_table_inputs_and_the_gathered_page(demo):
    plan = demo.table_plan(11)
    assert demo.plan_inputs(plan) == ["res/imagenet/analysis/feature_consistency.json"]
    parts = demo.gathered_parts()
    assert parts[11] == "res/figure1.png"  # after the tables, before the consistency pictures
    assert all(p.endswith(".png") and "consistency-" in p for p in parts[12:])
    assert demo.gathered_parts()[:2] == ["res/table1.md", "res/table2.md"]
    with pytest.raises(KcdError, match="table 12 is not configured; configured: 1, 2, 3, 4, 5, "
                                       "6, 7, 8, 9, 10, 11"):
        demo.table_plan(12)


def test_resources_merge_default_dataset_and_rule(paper):
    assert paper.resources("distill", "imagenet")["gpus"] == 8
    assert paper.resources("analysis", "imagenet")["gpus"] == 1
    args = paper.launch_args("distill", "x", "cifar100")
    assert args[args.index("--gpus") + 1] == "2" and args[args.index("--launcher") + 1] == "local"
    with pytest.raises(KcdError, match="'anaylsis' is not a heavy rule with resources"):
        paper.resources("anaylsis", "imagenet")


def test_the_heavy_rules_are_the_rules_the_workflow_launches():
    """A ``resources`` entry is checked against RESOURCE_RULES: exactly the names the
    workflow's rules pass to ``launch(...)``."""
    import re

    from kcd.config import RESOURCE_RULES

    launched = {m for f in (REPO / "workflow").rglob("*.smk")
                for m in re.findall(r'\blaunch\("(\w+)"', f.read_text())}
    launched |= set(re.findall(r'\blaunch\("(\w+)"', (REPO / "workflow/Snakefile").read_text()))
    assert launched == set(RESOURCE_RULES)


def test_table9_rows_name_their_method_and_transform(demo):
    plan = demo.table_plan(9)
    rows = _rows(plan)
    assert (rows["Student"]["method"], rows["Student"]["transform"]) == ("baseline", "none")
    assert (rows["L2"]["method"], rows["L2"]["transform"]) == ("l2", "none")
    assert (rows["Ours"]["method"], rows["Ours"]["transform"]) == ("l2", demo.kcd)
    assert "Seeds per cell" not in plan["description"]  # the renderer adds the count


def test_ablation_plans_take_the_teachers_paper_number_from_table8(demo):
    for n in demo.ablation_tables():
        if n <= 6:
            assert demo.table_plan(n)["teacher_paper"]["table"] == 8


def test_each_distilled_pair_has_a_consistency_picture_of_its_kcd_transform(demo):
    pairs = demo.heatmap_pairs()
    assert ("imagenet", "resnet50", "mobilenetv2_0.5x") in pairs
    assert ("cifar100", "resnet56", "resnet20") in pairs and len(pairs) == len(set(pairs))
    inputs = demo.heatmap_inputs("cifar100", "resnet56", "resnet20")
    assert inputs == {"stats": "res/cifar100/stats/resnet56-s0__resnet20-s0.pt",
                      "transform": "res/cifar100/transforms/resnet56-s0__resnet20-s0/"
                                   "bipartite-correlation.pt", "metric": "correlation"}
    assert demo.layout.heatmap(*pairs[0]) + ".png" in demo.gathered_parts()


def test_data_inputs_are_the_demo_manifest_or_a_checked_root(tmp_path):
    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg["results"] = R
    cfg["datasets"]["cifar10"] = {"root": str(tmp_path), "num_classes": 10}
    cfg["datasets"]["imagenet"]["root"] = str(tmp_path / "missing")
    plans = Plans(cfg)
    assert plans.data_input("cifar100") == ["resources/demo/cifar-100-python/.kcd-demo.json"]
    assert plans.data_input("cifar10") == []  # a real root that exists: nothing to build
    with pytest.raises(KcdError, match="config key datasets.imagenet.root"):
        plans.data_input("imagenet")
    with pytest.raises(KcdError, match="add datasets.svhn.root"):
        plans.data_input("svhn")


def test_the_demo_data_rule_and_inputs_take_the_registrys_demo_folders(monkeypatch):
    from dataclasses import replace

    from kcd.data import DATASETS
    from kcd.data.demo import FOLDERS

    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg["results"] = R
    cfg["demo_data"].update(seed=3, size="tiny")
    cfg["datasets"]["cifar10"] = {"root": "resources/demo/c10", "num_classes": 10}
    plans = Plans(cfg)
    assert plans.data_input("cifar10") == [f"resources/demo/{FOLDERS['cifar10']}/.kcd-demo.json"]
    assert plans.demo_args(FOLDERS["imagenet"]) == [
        "--root", "resources/demo", "--seed", "3", "--kinds", "imagenet", "--tiny"]
    # a registered dataset the demo does not write, configured inside the demo folder
    monkeypatch.setitem(DATASETS._items, "cifar10",
                        replace(DATASETS.get("cifar10"), demo_folder=None))
    with pytest.raises(KcdError, match="datasets.cifar10.root: .* the demo has no cifar10 data"):
        plans.data_input("cifar10")
    assert Layout.tag_seed("s12") == Layout.tag_seed("s12-init") == "12"

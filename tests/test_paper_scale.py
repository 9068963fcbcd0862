"""The resolved-spec contract: every job of the paper-scale DAG runs Section 4.1 as written.

A dry run of every table at paper scale (dataset roots: empty stand-in folders), both ways a
cluster user starts it:

* ``snakemake results/tables.md --configfile config/paper.yaml SITE``
* ``snakemake --profile slurm --configfile SITE results/tables.md``, with a demo config full
  of demo-only keys beside it (they must not reach any job).

SITE sets only dataset roots and ``launcher.slurm`` keys. Each job's spec is read back from
the command Snakemake would run (``kcd.dryrun``), not from the config file, and checked against
the table below, written from Section 4.1 of the paper ("CIFAR-100 [13] is commonly used",
"ImageNet [3] is a large-scale dataset", "We compare our proposed method", "On COCO").
``CHOSEN`` names what config/paper.yaml had to choose where the paper says nothing (the
README's fidelity notes say why).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kcd.dryrun import RESOLVED_CONFIG_ENV, Job, parse_dry_run

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------- Section 4.1, as written
CIFAR = {"iterations": 64000, "batch_size": 128, "lr": 0.1, "momentum": 0.9,
         "weight_decay": 5e-4, "milestones": [32000, 48000], "gamma": 0.1}
CIFAR_GPUS = 2  # "trained with 2 GPUs with batch size 64 on each of them"
IMAGENET_RESNET = {"iterations": 65000, "batch_size": 2048, "lr": 0.2,
                   "milestones": [20000, 40000, 60000], "gamma": 0.1, "weight_decay": 1e-4}
IMAGENET_GPUS = 32  # "batch size is 2048 with 32 GPUs"
IMAGENET_MOBILENET = {"iterations": 130000, "lr": 0.1, "milestones": [45000, 75000, 100000],
                      "gamma": 0.1}
KD = {"cifar100": 16, "imagenet": 9}  # "T = 4 and lambda = 16, 9 for CIFAR-100 and ImageNet"
KD_TEMPERATURE = 4
WEIGHTS = {"fitnets": 1e2, "at": 1e3, "ab": 10, "rkd": 10, "rco": 1e2}
COCO_L2_WEIGHT = 1e-4  # "the loss weight we used for L_2 loss is set to be 10^{-4}"
COCO_LAYER = "backbone.body.layer4:pre_relu"  # "before ReLU at the end of the last layer block"

# ----------------------------------------------------------------- where the paper is silent
CHOSEN = {
    # ImageNet: the momentum is stated for CIFAR-100 only; the ResNet paragraph's weight decay
    # and batch (2048 on 32 GPUs) are kept for MobileNetV2, whose paragraph gives only the lr
    "imagenet momentum": 0.9,
    "mobilenetv2 weight_decay": 1e-4,
    "mobilenetv2 batch_size": 2048,
    # "Ours" (L2 to the transformed teacher): no classification weight stated; FitNets' 1e2
    "l2 weight": 1e2,
    # Ours + RKD's added L2 term: the weight of "Ours"
    "rkd l2_weight": 1e2,
    # AB: the initialisation stage's length and RCO's number of anchors are not stated
    "ab init_iterations": 1000,
    "rco anchors": 4,
    # AB's weighted term stays after its initialisation stage (the paper gives it a weight)
    "ab throughout": True,
    # COCO: Detectron's 2x schedule ("The 2x setting released by Detectron is used")
    "coco recipe": {"iterations": 180000, "batch_size": 16, "lr": 0.02,
                    "milestones": [120000, 160000], "weight_decay": 1e-4},
    "coco warmup_iterations": 500,
    # Table 5's dynamic transform "every 5 epoch": 5 x 1.28M images / 2048 per iteration
    "dynamic_every": 3125,
}
DEMO_ONLY = {"grad_clip", "eval_limit", "max_images"}  # must be absent (None) everywhere


def _site(folder: Path) -> Path:
    roots = {}
    for ds in ("cifar100", "imagenet", "coco"):
        (folder / "data" / ds).mkdir(parents=True)
        roots[ds] = {"root": str(folder / "data" / ds)}
    site = folder / "site.yaml"
    site.write_text(yaml.safe_dump({"datasets": roots,
                                    "launcher": {"slurm": {"partition": "gpu",
                                                           "account": "lab"}}}))
    return site


def _poisoned_demo(config_dir: Path) -> None:
    """A demo config whose every demo-only key would be visible in a spec if it leaked."""
    demo = yaml.safe_load((config_dir / "demo.yaml").read_text())
    for ds in demo["recipes"].values():
        for recipe in ds.values():
            recipe["grad_clip"] = 0.5
            recipe["iterations"] = 7
    for d in demo["datasets"].values():
        d["eval_limit"] = 13
    demo["statistics"]["max_images"] = 11
    demo["method_overrides"] = {ds: {m: {"weight": 0.125} for m in demo["methods"]}
                                for ds in ("cifar100", "imagenet")}
    (config_dir / "demo.yaml").write_text(yaml.safe_dump(demo))


def _dry_run(work: Path, *args: str) -> tuple[list[Job], dict]:
    resolved = work / "resolved.yaml"
    env = {**os.environ, "PYTHONPATH": str(REPO), RESOLVED_CONFIG_ENV: str(resolved)}
    env.pop("MLFLOW_TRACKING_URI", None)
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s",
                          str(REPO / "workflow" / "Snakefile"), "-n", "-p", *args], cwd=work,
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return parse_dry_run(run.stdout + run.stderr), yaml.safe_load(resolved.read_text())


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> dict[str, tuple[list[Job], dict]]:
    """(jobs, resolved config) of a paper-scale dry run of every table, both ways."""
    runs = {}
    site = _site(tmp_path_factory.mktemp("site"))
    work = tmp_path_factory.mktemp("paper-configfile")
    (work / "config").symlink_to(REPO / "config")
    runs["configfile"] = _dry_run(work, "results/tables.md", "--configfile",
                                  "config/paper.yaml", str(site))
    work = tmp_path_factory.mktemp("paper-profile")
    shutil.copytree(REPO / "config", work / "config")
    _poisoned_demo(work / "config")
    (work / "slurm").symlink_to(REPO / "slurm")
    runs["profile"] = _dry_run(work, "--profile", "slurm", "--configfile", str(site), "--",
                               "results/tables.md")
    return runs


@pytest.fixture(params=["configfile", "profile"])
def paper(request, dry_runs):
    """(how, jobs, resolved config) of one of the two dry runs."""
    return (request.param, *dry_runs[request.param])


def _specs(jobs: list[Job], *rules: str, detection: bool = False) -> list[tuple[Job, dict]]:
    """The jobs of ``rules`` with their specs: classifiers', or with ``detection`` the
    detectors' (both run through the same rules)."""
    found = [(j, j.spec) for j in jobs if j.rule in rules
             and ((j.spec.get("data") or {}).get("name") == "coco") == detection]
    assert found, f"no {rules} job in the dry run"
    return found


def _leaves(value, path=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{path}.{k}" if path else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, value


def test_the_dag_holds_every_kind_of_job(paper):
    _, jobs, cfg = paper
    rules = {j.rule for j in jobs}
    assert {"init", "pretrain", "statistics", "transform", "learned_transform", "distill",
            "overlap", "feature_consistency", "figure1", "consistency_heatmap", "table",
            "tables_md"} <= rules
    # detectors run through the same rules as classifiers (the dataset's task chooses)
    coco = {j.rule for j in jobs if '"name": "coco"' in j.args.get("spec", "")
            or '"dataset": "coco"' in j.args.get("spec", "")}
    assert coco == {"init", "pretrain", "statistics", "distill"}
    assert cfg["scale"] == "paper"


def test_nothing_demo_only_reaches_any_job(paper):
    how, jobs, cfg = paper
    for job in jobs:
        for path, value in _leaves(job.spec or {}):
            if path.rsplit(".", 1)[-1] in DEMO_ONLY:
                assert value is None, f"{how}: {job.rule} has {path}={value}"
    assert cfg["method_overrides"] == {"imagenet": {"kd": {"weight": 9}}}
    assert "grad_clip" not in json.dumps(cfg["recipes"])


def test_the_site_file_is_applied_on_top(paper):
    how, jobs, cfg = paper
    for ds in ("cifar100", "imagenet", "coco"):
        assert cfg["datasets"][ds]["root"].endswith(f"data/{ds}")
    heavy = [j for j in jobs if j.resources]
    assert heavy
    for job in heavy:
        assert job.resources["launcher"] == ("slurm" if how == "profile" else "local")
        if how == "profile":
            assert (job.resources["partition"], job.resources["account"]) == ("gpu", "lab")


def _recipe_expected(ds: str, arch: str) -> dict:
    if ds == "cifar100":
        return dict(CIFAR)
    if ds == "imagenet" and arch.startswith("mobilenetv2"):
        return {**IMAGENET_MOBILENET, "momentum": CHOSEN["imagenet momentum"],
                "weight_decay": CHOSEN["mobilenetv2 weight_decay"],
                "batch_size": CHOSEN["mobilenetv2 batch_size"]}
    assert ds == "imagenet" and arch.startswith("resnet"), (ds, arch)
    return {**IMAGENET_RESNET, "momentum": CHOSEN["imagenet momentum"]}


def test_every_classification_run_has_section_4_1s_recipe_and_gpus(paper):
    how, jobs, _ = paper
    for job, spec in _specs(jobs, "pretrain", "distill"):
        ds, arch = spec["tags"]["dataset"], spec["arch"]
        got = {k: spec["recipe"][k] for k in _recipe_expected(ds, arch)}
        assert got == _recipe_expected(ds, arch), f"{how}: {job.rule} {ds} {arch}"
        assert spec["data"]["eval_limit"] is None  # the whole test / validation split
        gpus = CIFAR_GPUS if ds == "cifar100" else IMAGENET_GPUS
        assert job.gpus == gpus, f"{how}: {job.rule} {ds} {arch} on {job.gpus} GPUs"
        # one DDP process per GPU, each with an equal share of the batch
        assert int(job.resources["tasks"]) == int(job.resources["gpus"])
        assert spec["recipe"]["batch_size"] % gpus == 0
        if ds == "cifar100":
            assert spec["recipe"]["batch_size"] // gpus == 64


def test_every_distillation_run_has_section_4_1s_loss_weights(paper):
    how, jobs, _ = paper
    seen = set()
    for job, spec in _specs(jobs, "distill"):
        d, ds = spec["distill"], spec["tags"]["dataset"]
        method = d["method"]
        seen.add(method)
        if method == "kd":
            assert d["weight"] == KD[ds] and d["options"] == {"temperature": KD_TEMPERATURE}
        elif method == "l2":
            assert d["weight"] == CHOSEN["l2 weight"]
        else:
            assert d["weight"] == WEIGHTS[method], f"{how}: {method} on {ds}"
        if method == "ab":
            assert d["pre_relu"] is True
            assert d["init_iterations"] == CHOSEN["ab init_iterations"]
            assert d["options"].get("throughout", True) is CHOSEN["ab throughout"]
        if method == "rkd":
            assert d["options"].get("l2_weight", 100.0) == CHOSEN["rkd l2_weight"]
        if method == "rco":
            assert len(d["anchors"]) == CHOSEN["rco anchors"]
        if d.get("dynamic_every"):
            assert d["dynamic_every"] == CHOSEN["dynamic_every"]
    assert seen == {"kd", "fitnets", "at", "ab", "rkd", "rco", "l2"}


def test_statistics_read_every_training_image(paper):
    _, jobs, _ = paper
    for job, spec in _specs(jobs, "statistics"):
        assert spec["max_images"] is None and spec["data"]["eval_limit"] is None


def test_detection_runs_have_the_coco_settings(paper):
    from kcd.detection import LAYER

    assert LAYER == COCO_LAYER
    _, jobs, _ = paper
    for job, spec in _specs(jobs, "pretrain", "distill", detection=True):
        got = {k: spec["recipe"][k] for k in CHOSEN["coco recipe"]}
        assert got == CHOSEN["coco recipe"]
        assert spec["warmup_iterations"] == CHOSEN["coco warmup_iterations"]
        assert spec["data"]["eval_limit"] is None and spec["recipe"]["grad_clip"] is None
        assert spec["options"] == {}  # torchvision's detector defaults, not the demo's
        if job.rule == "distill":
            assert spec["distill"]["method"] == "l2"
            assert spec["distill"]["weight"] == COCO_L2_WEIGHT


def test_the_ablation_baselines_are_distillation_without_a_transform(paper):
    _, jobs, _ = paper
    plans = {}
    for job in jobs:
        if job.rule == "table":
            plan = json.loads(job.args["plan"])
            plans[plan["table"]] = {r["label"]: r for r in plan["rows"]}
    fitnets = plans[8]["FitNets"]["cells"]["mobilenetv2_0.5x"]
    assert all("/fitnets/none/" in p for p in fitnets)
    for table, label in ((1, "Baseline"), (5, "Baseline"), (6, "K=0")):
        assert plans[table][label]["cells"]["mobilenetv2_0.5x"] == fitnets
    assert plans[8]["Baseline"]["cells"]["mobilenetv2_0.5x"] == [
        "results/imagenet/models/mobilenetv2_0.5x-s0/result.json"]


def test_both_ways_resolve_to_the_same_specs(dry_runs):
    """The profile run (with a poisoned demo config beside it) and the --configfile run start
    the same jobs with the same specs; only the launcher differs."""
    def key(jobs):
        return sorted(json.dumps([j.rule, j.command, j.spec], sort_keys=True) for j in jobs)

    assert key(dry_runs["profile"][0]) == key(dry_runs["configfile"][0])
    assert len(dry_runs["profile"][0]) > 100


def test_kcd_config_show_lists_each_job_of_the_profile_run(tmp_path):
    site = _site(tmp_path)
    (tmp_path / "config").symlink_to(REPO / "config")
    (tmp_path / "slurm").symlink_to(REPO / "slurm")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    nowhere = subprocess.run([sys.executable, "-m", "kcd.cli", "config", "show", "-n"],
                             cwd=tmp_path, capture_output=True, text=True, env=env, timeout=60)
    assert nowhere.returncode == 2 and "Snakefile" in nowhere.stderr  # says what is missing
    (tmp_path / "workflow").symlink_to(REPO / "workflow")
    env.pop("MLFLOW_TRACKING_URI", None)
    show = subprocess.run([sys.executable, "-m", "kcd.cli", "config", "show", "--profile",
                           "slurm", "results/table8.csv", "--configfile", str(site)],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert show.returncode == 0, show.stderr[-3000:]
    out = show.stdout
    assert "# resolved config (scale paper)" in out and "partition: gpu" in out
    assert "# 33 jobs, 27 of them on GPUs" in out
    lines = [line.split() for line in out.splitlines() if line.lstrip().startswith("distill")]
    assert len(lines) == 22
    assert all(line[-1] == "32" for line in lines)  # gpus, and an empty limits column
    wrong = subprocess.run([sys.executable, "-m", "kcd.cli", "config", "show", "--configfile",
                            "config/paper.yaml", "results/table8.csv"], cwd=tmp_path,
                           capture_output=True, text=True, env=env, timeout=60)
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines() == [
        "kcd: error: config file results/table8.csv does not exist; if it is a target, put "
        "targets before --configfile or end its list with --"]


def test_the_cost_plan_gives_gpu_hours_for_tables_7_and_8(dry_runs):
    """`kcd config show --cost`: every GPU job of the paper-scale DAG has a cost, and the
    tables' totals follow from the jobs each table needs (Table 8's ImageNet runs on 32 GPUs
    cost far more than Table 7's CIFAR runs on 2)."""
    from kcd.costs import cost_rows
    from kcd.dryrun import needed_by, summary

    jobs, _ = dry_runs["configfile"]

    def hours(of):
        kcd_jobs = [j for j in of if j.command]
        rows = cost_rows([summary([j])[0] for j in kcd_jobs], [j.spec for j in kcd_jobs], {},
                         [j.args for j in kcd_jobs])
        return sum(r["GPU-h"] for r in rows), rows

    total, rows = hours(jobs)
    assert len(rows) == sum(1 for j in jobs if j.gpus)
    tables = {j.args["out"].rsplit("/", 1)[-1]: j for j in jobs if j.command == "table"}
    t7, _ = hours(needed_by(jobs, tables["table7"]))
    t8, t8_rows = hours(needed_by(jobs, tables["table8"]))
    assert 0 < t7 < t8 < total
    assert {r["model"] for r in t8_rows if r["rule"] == "distill"} == {"resnet18",
                                                                      "mobilenetv2_0.5x"}


def test_per_class_statistics_are_computed_where_a_k_group_transform_reads_them(paper):
    """Table 6's K-group cross matrices (one per group, c_t x c_s in fp64) go into exactly the
    statistics files its K > 1 transforms read, with every K they ask for, and no other."""
    _, jobs, _ = paper
    wanted: dict[str, set[int]] = {}
    for job in jobs:
        if job.rule == "transform" and int(job.args.get("groups", 0)) > 1:
            (stats,) = job.inputs
            wanted.setdefault(stats, set()).add(int(job.args["groups"]))
    assert wanted, "no K-group transform in the dry run"
    computed = {j.outputs[0]: set(j.spec["groups"]) for j, _ in _specs(jobs, "statistics")
                if j.spec["groups"]}
    assert computed == wanted

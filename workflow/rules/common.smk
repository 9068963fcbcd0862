# Paths, wildcards and input functions of the DAG: the one home of the file layout.
import json
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from kcd.config import anchor_iterations, statistics_spec, train_spec, validate_config
from kcd.errors import KcdError
from kcd.specs import to_dict
from kcd.tables import comparison_row, row_label
from kcd.tracking import ensure_store, tracking_uri

# `--config seeds=[0,1,2]` arrives as strings; seeds are integers.
for _key in ("seeds",):
    if isinstance(config.get(_key), list):
        config[_key] = [int(v) if isinstance(v, str) and v.isdigit() else v for v in config[_key]]

try:
    validate_config(config)
except KcdError as e:
    raise WorkflowError(f"invalid config: {e}")

RESULTS = config["results"]
LOGS = f"{RESULTS}/logs"
PY = sys.executable
KCD = f"{shlex.quote(PY)} -m kcd.cli"
DEMO = config.get("demo_data", {}).get("root", "resources/demo")
DEMO_FOLDERS = {"cifar100": "cifar-100-python", "imagenet": "imagenet", "coco": "coco"}
TSEED = int(config.get("teacher_seed", 0))
KCD_TRANSFORM = config.get("kcd_transform", "bipartite-correlation")
TRACKING_URI = tracking_uri(config.get("tracking", {}).get("uri"), RESULTS)

STRATEGIES = "identity|random|greedy|bipartite"
METRICS = "l1|l2|correlation|cosine|kl"

# No wildcard may carry a path separator or a shell metacharacter.
wildcard_constraints:
    ds=r"[a-z0-9]+",
    arch=r"[A-Za-z0-9_.]+",
    teacher=r"[A-Za-z0-9_.]+",
    student=r"[A-Za-z0-9_.]+",
    seed=r"\d+",
    tseed=r"\d+",
    method=r"[a-z0-9]+",
    transform=r"[a-z0-9]+(-[a-z0-9]+)*",
    strategy=STRATEGIES,
    metric=METRICS,
    folder=r"cifar-100-python|imagenet|coco",
    n=r"\d+",


def ensure_tracking_store():
    """Create the MLflow store's schema once, before parallel jobs write to it."""
    ensure_store(TRACKING_URI)


# --------------------------------------------------------------------------- the layout


def theta0_path(ds, arch, seed):
    return f"{RESULTS}/{ds}/init/{arch}-s{seed}.pt"


def model_dir(ds, arch, seed):
    return f"{RESULTS}/{ds}/models/{arch}-s{seed}"


def pair_name(teacher, tseed, student, seed):
    return f"{teacher}-s{tseed}__{student}-s{seed}"


def stats_path(ds, teacher, tseed, student, seed):
    return f"{RESULTS}/{ds}/stats/{pair_name(teacher, tseed, student, seed)}.pt"


def transform_path(ds, teacher, tseed, student, seed, name):
    return f"{RESULTS}/{ds}/transforms/{pair_name(teacher, tseed, student, seed)}/{name}.pt"


def run_dir(ds, teacher, tseed, student, method, transform, seed):
    return f"{RESULTS}/{ds}/runs/{teacher}-s{tseed}__{student}/{method}/{transform}/s{seed}"


def run_result(ds, teacher, tseed, student, method, transform, seed):
    """The result of a table cell's run: 'baseline' is the student's own pre-training."""
    if method == "baseline":
        return f"{model_dir(ds, student, seed)}/result.json"
    return f"{run_dir(ds, teacher, tseed, student, method, transform, seed)}/result.json"


def anchor_paths(ds, teacher, tseed):
    """RCO's route: the teacher's intermediate checkpoints, then the teacher itself."""
    d = model_dir(ds, teacher, tseed)
    return [f"{d}/anchors/iter-{i}.pt" for i in anchor_iterations(config, ds, teacher)] + [
        f"{d}/final.pt"
    ]


def log_path(*parts):
    return f"{LOGS}/" + "/".join(str(p) for p in parts) + ".log"


# --------------------------------------------------------------------------- data


def is_demo(ds):
    root = Path(config["datasets"][ds]["root"]).resolve()
    return root == Path(DEMO).resolve() or Path(DEMO).resolve() in root.parents


def data_input(ds):
    """The demo data's manifest (which triggers its generation), or a check of a real root."""
    if ds not in config["datasets"]:
        raise WorkflowError(f"dataset '{ds}' has no entry under datasets in the config")
    if is_demo(ds):
        return f"{DEMO}/{DEMO_FOLDERS[ds]}/.kcd-demo.json"
    root = config["datasets"][ds]["root"]
    if not Path(root).is_dir():
        raise WorkflowError(
            f"dataset root {root} (config key datasets.{ds}.root) does not exist; "
            f"point it at your {ds} copy"
        )
    return []


# --------------------------------------------------------------------------- jobs


def resources_of(rule_name, ds=None):
    """A job's resources: `default`, then the dataset's entry, then the rule's."""
    table = config.get("resources", {})
    res = dict(table.get("default", {}))
    res.update(table.get(ds, {}) if ds else {})
    res.update(table.get(rule_name, {}))
    return res


def launch(rule_name, name, ds=None):
    """The `python -m kcd.launch ... --` prefix of a heavy rule's command."""
    res = resources_of(rule_name, ds)
    launcher = config.get("launcher", {})
    args = [PY, "-m", "kcd.launch", "--launcher", launcher.get("kind", "local"),
            "--name", f"kcd-{name}", "--log-dir", f"{LOGS}/jobs",
            "--cpus", str(res.get("cpus", 1)), "--gpus", str(res.get("gpus", 0)),
            "--tasks", str(res.get("tasks", 1)), "--nodes", str(res.get("nodes", 1)),
            "--mem-mb", str(res.get("mem_mb", 4000)), "--time-min", str(res.get("runtime", 120))]
    slurm = launcher.get("slurm", {}) or {}
    for key in ("partition", "account", "qos", "constraint"):
        if slurm.get(key):
            args += [f"--{key}", str(slurm[key])]
    if slurm.get("extra"):
        args += ["--slurm-extra", json.dumps(slurm["extra"])]
    return shlex.join(args) + " --"


def spec_json(spec):
    return json.dumps(to_dict(spec), sort_keys=True)


def teachers(ds):
    return {t["teacher"] for t in config.get("tables", {}).values() if t["dataset"] == ds}


def pretrain_spec(w):
    return spec_json(train_spec(
        config, dataset=w.ds, arch=w.arch, seed=int(w.seed),
        theta0=theta0_path(w.ds, w.arch, w.seed), out_dir=model_dir(w.ds, w.arch, w.seed),
        save_anchors=w.arch in teachers(w.ds)))


def distill_transform(w):
    if w.transform == "none":
        return []
    return [transform_path(w.ds, w.teacher, w.tseed, w.student, w.seed, w.transform)]


def distill_spec(w):
    return spec_json(train_spec(
        config, dataset=w.ds, arch=w.student, seed=int(w.seed),
        theta0=theta0_path(w.ds, w.student, w.seed),
        out_dir=run_dir(w.ds, w.teacher, w.tseed, w.student, w.method, w.transform, w.seed),
        method=w.method, teacher=w.teacher,
        teacher_weights=f"{model_dir(w.ds, w.teacher, w.tseed)}/final.pt",
        transforms=distill_transform(w) or None,
        anchors=anchor_paths(w.ds, w.teacher, w.tseed),
        tags={"teacher": w.teacher, "teacher_seed": int(w.tseed), "transform": w.transform,
              "row": row_label(w.method, w.transform, KCD_TRANSFORM) or ""},
    ))


def stats_spec(w):
    return spec_json(statistics_spec(
        config, dataset=w.ds, teacher=w.teacher,
        teacher_weights=f"{model_dir(w.ds, w.teacher, w.tseed)}/final.pt",
        student=w.student, student_weights=f"{model_dir(w.ds, w.student, w.seed)}/final.pt",
        out=stats_path(w.ds, w.teacher, w.tseed, w.student, w.seed)))


# --------------------------------------------------------------------------- tables


def comparison_plan(name):
    """The plan of Table 7/8: which result.json makes each cell (all seeds)."""
    t = config["tables"][name]
    ds, teacher = t["dataset"], t["teacher"]
    rows = []
    for label in t["rows"]:
        row = comparison_row(label, KCD_TRANSFORM)
        cells = {s: [run_result(ds, teacher, TSEED, s, row.method, row.transform, seed)
                     for seed in config["seeds"]] for s in t["students"]}
        rows.append({"label": label, "method": row.method, "transform": row.transform,
                     "cells": cells})
    return {
        "table": int(name.removeprefix("table")),
        "title": {"table7": "comparison with other methods on CIFAR-100",
                  "table8": "comparison with other methods on ImageNet"}.get(name, name),
        "dataset": ds,
        "teacher": teacher,
        "teacher_results": [f"{model_dir(ds, teacher, TSEED)}/result.json"],
        "columns": list(t["students"]),
        "rows": rows,
        "metric": "top1",
        "scale": config.get("scale", "demo"),
    }


def plan_inputs(plan):
    paths = list(plan["teacher_results"])
    for row in plan["rows"]:
        for cell in row["cells"].values():
            paths += cell
    return paths


def table_names():
    return list(config.get("tables", {}))

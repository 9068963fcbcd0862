# Paths, wildcards and input functions of the DAG: the one home of the file layout.
import json
import os
import shlex
import sys
from pathlib import Path

import yaml

from snakemake.exceptions import WorkflowError

from kcd.config import (
    anchor_iterations,
    check_results_scale,
    data_spec,
    detection_init_args,
    detection_spec,
    detection_statistics_args,
    mark_results_scale,
    num_classes,
    statistics_spec,
    train_spec,
    resolve_config,
)
from kcd.dryrun import RESOLVED_CONFIG_ENV
from kcd.errors import KcdError
from kcd import warm
from kcd.launch import cancel_jobs_on_sigterm
from kcd.specs import runtime_text, split_runtime, to_dict
from kcd.naming import WILDCARD as TRANSFORM_NAMES, parse_transform_name, source_pair
from kcd.analysis.overlap import column_name as overlap_column
from kcd.tables import (
    ABLATION_TITLES,
    FEATURE_CONSISTENCY_ROWS,
    KCD as KCD_PLACEHOLDER,
    ablation_rows,
    comparison_row,
    row_label,
)
from kcd.tracking import ensure_store, tracking_uri

# The config is one scale's values plus the user's layers (kcd.config.resolve_config): the
# Snakefile names no configfile, so Snakemake's config holds only what the command line gave.
try:
    _resolved = resolve_config(workflow.config_settings.configfiles,
                               workflow.config_settings.config)
    check_results_scale(_resolved["results"], _resolved["scale"])
except KcdError as e:
    raise WorkflowError(f"invalid config: {e}")
config.clear()
config.update(_resolved)
if os.environ.get(RESOLVED_CONFIG_ENV):  # `kcd config show` asks for the config it resolved
    Path(os.environ[RESOLVED_CONFIG_ENV]).write_text(yaml.safe_dump(config, sort_keys=False))

RESULTS = config["results"]
SCALE = config["scale"]
LOGS = f"{RESULTS}/logs"
PY = sys.executable
KCD = f"{shlex.quote(PY)} -m kcd.warm run --"  # light rules: `kcd ...`, warm when it can
DEMO = config.get("demo_data", {}).get("root", "resources/demo")
DEMO_FOLDERS = {"cifar100": "cifar-100-python", "cifar10": "cifar-10-batches-py",
                "imagenet": "imagenet", "coco": "coco"}
TSEED = int(config.get("teacher_seed", 0))
KCD_TRANSFORM = config.get("kcd_transform", "bipartite-correlation")
TRACKING_URI = tracking_uri(config.get("tracking", {}).get("uri"), RESULTS)

ABLATIONS = config.get("ablations") or {}
FIGURE1 = config.get("figure1") or {}
DETECTION = config.get("detection") or {}
# Detection datasets have their own rules (rules/detection.smk) on the same layout.
DETECTION_DATASETS = "coco"
CLASSIFICATION_DATASETS = r"(?!coco\b)[a-z0-9]+"

METRICS = "l1|l2|correlation|cosine|kl"
STATS_TRANSFORM_FILES = rf"(identity|random|greedy|bipartite)-({METRICS})(-k([2-9]|[1-9]\d+))?"
LEARNED_TRANSFORM_FILES = rf"(subnet-fc|subnet-res)-({METRICS})"

# No wildcard may carry a path separator or a shell metacharacter.
wildcard_constraints:
    ds=r"[a-z0-9]+",
    arch=r"[A-Za-z0-9_.]+",
    teacher=r"[A-Za-z0-9_.]+",
    student=r"[A-Za-z0-9_.]+",
    seed=r"\d+",
    tseed=r"\d+",
    method=r"[a-z0-9]+",
    transform=TRANSFORM_NAMES,
    tw=r"s\d+(-init)?",
    sw=r"s\d+(-init)?",
    folder="|".join(DEMO_FOLDERS.values()),
    n=r"\d+",


def ensure_tracking_store():
    """Create the MLflow store's schema once, before parallel jobs write to it."""
    ensure_store(TRACKING_URI)


def mark_results():
    """Record the config's scale in the results folder (a later run at another scale is
    refused before any job)."""
    mark_results_scale(RESULTS, SCALE)


_WARM = []


def start_warm_worker():
    """Local launcher: one warm worker whose forks run the jobs (kcd/warm.py)."""
    launcher = config.get("launcher", {})
    if launcher.get("kind", "local") == "local" and launcher.get("warm", True):
        worker = warm.start()
        if worker is not None:
            _WARM.append(worker)
            os.environ[warm.ENV] = worker.path


def stop_warm_worker():
    os.environ.pop(warm.ENV, None)
    while _WARM:
        _WARM.pop().stop()


# --------------------------------------------------------------------------- the layout


def theta0_path(ds, arch, seed):
    return f"{RESULTS}/{ds}/init/{arch}-s{seed}.pt"


def model_dir(ds, arch, seed):
    return f"{RESULTS}/{ds}/models/{arch}-s{seed}"


def pair_name(teacher, tw, student, sw):
    """A (teacher, student) pair by weight tags: `s<seed>` (trained) or `s<seed>-init` (theta0)."""
    return f"{teacher}-{tw}__{student}-{sw}"


def weights_path(ds, arch, tag):
    """The weights a tag names: the trained model, or theta0 for `s<seed>-init`."""
    seed = tag[1:].removesuffix("-init")
    return theta0_path(ds, arch, seed) if tag.endswith("-init") else f"{model_dir(ds, arch, seed)}/final.pt"


def stats_path(ds, teacher, tw, student, sw):
    return f"{RESULTS}/{ds}/stats/{pair_name(teacher, tw, student, sw)}.pt"


def transform_path(ds, teacher, tw, student, sw, file_name):
    return f"{RESULTS}/{ds}/transforms/{pair_name(teacher, tw, student, sw)}/{file_name}.pt"


def run_transform_path(ds, teacher, tseed, student, seed, transform):
    """The transform file a run named `transform` uses (kcd.naming), or None for `none`."""
    name = parse_transform_name(transform)
    if name is None:
        return None
    tw, sw = source_pair(name, int(tseed), int(seed))
    return transform_path(ds, teacher, tw, student, sw, name.file_name)


def transform_args(file_name):
    """`kcd transform` flags of a transform file name: strategy, metric and K groups."""
    name = parse_transform_name(file_name)
    return f"--strategy {name.strategy} --metric {name.metric} --groups {name.groups}"


def learned_args():
    learned = ABLATIONS.get("learned", {})
    return (f"--steps {int(learned.get('steps', 200))} --lr {float(learned.get('lr', 1e-3))} "
            f"--batch-size {int(learned.get('batch_size', 128))}")


def analysis_path(ds, name):
    return f"{RESULTS}/{ds}/analysis/{name}"


def run_dir(ds, teacher, tseed, student, method, transform, seed):
    return f"{RESULTS}/{ds}/runs/{teacher}-s{tseed}__{student}/{method}/{transform}/s{seed}"


def run_result(ds, teacher, tseed, student, method, transform, seed, file="result.json"):
    """A file of a table cell's run (its result, or `final.pt`): 'baseline' is the student's
    own pre-training."""
    if method == "baseline":
        return f"{model_dir(ds, student, seed)}/{file}"
    return f"{run_dir(ds, teacher, tseed, student, method, transform, seed)}/{file}"


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


def result_fields(spec_fn):
    """params: the job's spec (``spec_fn(w)``, a dict) without its run-time fields, as JSON
    (Snakemake re-runs a job whose params changed; logging or checkpoint periods must not)."""
    return lambda w: json.dumps(split_runtime(spec_fn(w))[0], sort_keys=True)


def runtime_fields(spec_fn):
    """resources: the spec's run-time fields, passed as `--runtime` (not a rerun trigger)."""
    return lambda w: runtime_text(split_runtime(spec_fn(w))[1])


def teachers(ds):
    return {t["teacher"] for t in config.get("tables", {}).values() if t["dataset"] == ds}


def pretrain_spec(w):
    return to_dict(train_spec(
        config, dataset=w.ds, arch=w.arch, seed=int(w.seed),
        theta0=theta0_path(w.ds, w.arch, w.seed), out_dir=model_dir(w.ds, w.arch, w.seed),
        save_anchors=w.arch in teachers(w.ds)))


def distill_transform(w):
    path = run_transform_path(w.ds, w.teacher, w.tseed, w.student, w.seed, w.transform)
    return [path] if path else []


def dynamic_options(transform):
    """Table 5's Dynamic: recompute the transform every E iterations (`+dyn` names)."""
    name = parse_transform_name(transform)
    if name is None or not name.dynamic:
        return {}
    return {"dynamic_every": int(ABLATIONS.get("dynamic_every", 20)),
            "dynamic_metric": name.metric, "dynamic_strategy": name.strategy}


def distill_spec(w):
    return to_dict(train_spec(
        config, dataset=w.ds, arch=w.student, seed=int(w.seed),
        theta0=theta0_path(w.ds, w.student, w.seed),
        out_dir=run_dir(w.ds, w.teacher, w.tseed, w.student, w.method, w.transform, w.seed),
        method=w.method, teacher=w.teacher,
        teacher_weights=f"{model_dir(w.ds, w.teacher, w.tseed)}/final.pt",
        transforms=distill_transform(w) or None,
        anchors=anchor_paths(w.ds, w.teacher, w.tseed),
        tags={"teacher": w.teacher, "teacher_seed": int(w.tseed), "transform": w.transform,
              "row": row_label(w.method, w.transform, KCD_TRANSFORM) or ""},
        **dynamic_options(w.transform),
    ))


def stats_groups(ds, teacher, student):
    """Table 6's per-class statistics (K > 1) are computed for the ablation pair only."""
    if (ds, teacher, student) != (ABLATIONS.get("dataset"), ABLATIONS.get("teacher"),
                                  ABLATIONS.get("student")) or 6 not in ablation_tables():
        return []
    return sorted(k for k in ABLATIONS.get("groups", []) if k > 1)


def stats_spec(w):
    return to_dict(statistics_spec(
        config, dataset=w.ds, teacher=w.teacher,
        teacher_weights=weights_path(w.ds, w.teacher, w.tw),
        student=w.student, student_weights=weights_path(w.ds, w.student, w.sw),
        out=stats_path(w.ds, w.teacher, w.tw, w.student, w.sw),
        groups=stats_groups(w.ds, w.teacher, w.student)))


def learn_spec(w):
    """A learned transform reads the pair's models and data: a statistics spec carries them."""
    return to_dict(statistics_spec(
        config, dataset=w.ds, teacher=w.teacher,
        teacher_weights=weights_path(w.ds, w.teacher, w.tw),
        student=w.student, student_weights=weights_path(w.ds, w.student, w.sw),
        out=transform_path(w.ds, w.teacher, w.tw, w.student, w.sw, w.name)))


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
        "scale": SCALE,
    }


def ablation_tables():
    return list(ABLATIONS.get("tables", [])) if ABLATIONS else []


def ablation_setting():
    a = ABLATIONS
    return a["dataset"], a["teacher"], a["student"]


def ablation_plan(n):
    """The plan of ablation Table n (1-6): the ablation pair's runs for each row."""
    ds, teacher, student = ablation_setting()
    rows = []
    for r in ablation_rows(n, KCD_TRANSFORM, groups=ABLATIONS.get("groups", [0, 1]),
                           reinit_seeds=ABLATIONS.get("reinit_seeds", []),
                           teacher_seed=TSEED, seeds=config["seeds"]):
        tseed = TSEED if r.teacher_seed is None else r.teacher_seed
        seeds = list(r.seeds) if r.seeds is not None else config["seeds"]
        rows.append({"label": r.label, "method": r.method, "transform": r.transform,
                     "paper": [list(m) for m in r.paper],
                     "cells": {student: [run_result(ds, teacher, tseed, student, r.method,
                                                    r.transform, seed) for seed in seeds]}})
    return {
        "table": n, "title": ABLATION_TITLES[n], "dataset": ds, "teacher": teacher,
        "teacher_results": [f"{model_dir(ds, teacher, TSEED)}/result.json"],
        "columns": [student], "paper_value": "top1", "rows": rows, "metric": "top1",
        "scale": SCALE,
    }


def _view(ds, teacher, student, seed, transform):
    """A model of an analysis: its weights and, for a transformed teacher, the transform."""
    return {"transform": run_transform_path(ds, teacher, TSEED, student, seed, transform)}


def overlap_spec():
    """Table 10: S (seed s0), S2 (another seed), T and the transformed T(T)."""
    ds, teacher, student = ablation_setting()
    s0, s2 = config["seeds"][0], int(ABLATIONS.get("second_seed", 1))
    t_weights = f"{model_dir(ds, teacher, TSEED)}/final.pt"
    return {
        "data": to_dict(data_spec(config, ds)), "num_classes": num_classes(config, ds),
        "models": {
            "S": {"arch": student, "weights": f"{model_dir(ds, student, s0)}/final.pt"},
            "S2": {"arch": student, "weights": f"{model_dir(ds, student, s2)}/final.pt"},
            "T": {"arch": teacher, "weights": t_weights},
            "T(T)": {"arch": teacher, "weights": t_weights,
                     "transform": run_transform_path(ds, teacher, TSEED, student, s0,
                                                     KCD_TRANSFORM)},
        },
        "pairs": [["S vs T", "S", "T"], ["S1 vs S2", "S", "S2"], ["S vs T(T)", "S", "T(T)"]],
        "ks": ABLATIONS.get("overlap_k", [10, 20, 50, 100]),
        "out": analysis_path(ds, "overlap.json"),
    }


def consistency_spec():
    """Table 11: KL of outputs and feature L2 between the teacher and each row's student."""
    ds, teacher, student = ablation_setting()
    rows = []
    for r in FEATURE_CONSISTENCY_ROWS:
        transform = KCD_TRANSFORM if r.transform == KCD_PLACEHOLDER else r.transform
        view = KCD_TRANSFORM if r.view == KCD_PLACEHOLDER else r.view
        for seed in config["seeds"]:
            rows.append({
                "label": r.label, "seed": seed,
                "weights": run_result(ds, teacher, TSEED, student, r.method, transform, seed,
                                      file="final.pt"),
                "transform": run_transform_path(ds, teacher, TSEED, student, seed, view),
            })
    return {
        "data": to_dict(data_spec(config, ds)), "num_classes": num_classes(config, ds),
        "teacher": {"arch": teacher, "weights": f"{model_dir(ds, teacher, TSEED)}/final.pt"},
        "student": student, "rows": rows, "out": analysis_path(ds, "feature_consistency.json"),
    }


def figure1_spec():
    f = FIGURE1
    ds, teacher, student = f["dataset"], f["teacher"], f["student"]
    s1, s2 = f.get("seeds", [0, 1])
    t_weights = f"{model_dir(ds, teacher, TSEED)}/final.pt"
    return {
        "data": to_dict(data_spec(config, ds)), "num_classes": num_classes(config, ds),
        "class_": f["class"],
        "models": {
            "S1": {"arch": student, "weights": f"{model_dir(ds, student, s1)}/final.pt"},
            "S2": {"arch": student, "weights": f"{model_dir(ds, student, s2)}/final.pt"},
            "T": {"arch": teacher, "weights": t_weights},
            "T(T)": {"arch": teacher, "weights": t_weights,
                     "transform": run_transform_path(ds, teacher, TSEED, student, s1,
                                                     KCD_TRANSFORM)},
        },
        "out": f"{RESULTS}/figure1",
    }


def spec_inputs(spec):
    """Every file an analysis spec reads (weights, transforms, run results)."""
    paths = []
    for m in list(spec.get("models", {}).values()) + [spec.get("teacher") or {}] + spec.get("rows", []):
        paths += [m[k] for k in ("weights", "transform") if m.get(k)]
    return sorted(set(paths))


def overlap_plan(n=10):
    ds, teacher, student = ablation_setting()
    spec = overlap_spec()
    columns = [overlap_column(k) for k in spec["ks"]]
    rows = [{"label": label, "paper": [["models", label]],
             "cells": {c: [{"path": spec["out"], "keys": [label, c]}] for c in columns}}
            for label, _, _ in spec["pairs"]]
    return {"table": 10, "title": "channel overlap (%) of the top-k channels per class",
            "dataset": ds, "columns": columns, "rows": rows, "row_header": "Models",
            "scale": SCALE, "digits": 1,
            "description": f"{student} students (seeds {config['seeds'][0]} and "
                           f"{ABLATIONS.get('second_seed', 1)}), {teacher} teacher and the "
                           f"teacher after the {KCD_TRANSFORM} transform (T(T)); per class, "
                           "the top-k channels by class-averaged activation over the training "
                           "images, overlap averaged over classes, in percent."}


def consistency_plan(n=11):
    ds, teacher, student = ablation_setting()
    out = analysis_path(ds, "feature_consistency.json")
    rows = []
    for r in FEATURE_CONSISTENCY_ROWS:
        columns = ("kl_divergence", "l2_distance") if r.kl else ("l2_distance",)
        rows.append({"label": r.label, "paper": [["row", r.paper_row]], "note": r.note,
                     "cells": {c: [{"path": out, "keys": [r.label, f"s{seed}", c]}
                                   for seed in config["seeds"]]
                               for c in columns}})
    return {"table": 11, "title": "feature consistency between teacher and student",
            "dataset": ds, "columns": ["kl_divergence", "l2_distance"],
            "column_labels": {"kl_divergence": "KL", "l2_distance": "L2"}, "rows": rows,
            "row_header": "Models", "scale": SCALE,
            "description": f"{teacher} teacher vs {student} students on the evaluation split: "
                           "KL(teacher || student) of the softmax outputs and the L2 distance "
                           "between feature maps at the distilled layer, per image, averaged. "
                           "Rows with a transform compare the student with the transformed "
                           "teacher; rows without, with the teacher's leading channels."}


# --------------------------------------------------------------------------- detection


def detect_init_spec(w):
    return json.dumps(detection_init_args(config, w.arch, int(w.seed),
                                          theta0_path(w.ds, w.arch, w.seed)))


def detect_pretrain_spec(w):
    return to_dict(detection_spec(
        config, backbone=w.arch, seed=int(w.seed), theta0=theta0_path(w.ds, w.arch, w.seed),
        out_dir=model_dir(w.ds, w.arch, w.seed)))


def detect_distill_spec(w):
    return to_dict(detection_spec(
        config, backbone=w.student, seed=int(w.seed),
        theta0=theta0_path(w.ds, w.student, w.seed),
        out_dir=run_dir(w.ds, w.teacher, w.tseed, w.student, w.method, w.transform, w.seed),
        teacher=w.teacher, teacher_weights=f"{model_dir(w.ds, w.teacher, w.tseed)}/final.pt",
        transform=run_transform_path(w.ds, w.teacher, w.tseed, w.student, w.seed, w.transform),
        tags={"teacher": w.teacher, "teacher_seed": int(w.tseed), "transform": w.transform}))


def detect_stats_spec(w):
    return detection_statistics_args(
        config, teacher=w.teacher, teacher_weights=weights_path(w.ds, w.teacher, w.tw),
        student=w.student, student_weights=weights_path(w.ds, w.student, w.sw),
        out=stats_path(w.ds, w.teacher, w.tw, w.student, w.sw))


def detection_plan(n=9):
    """Table 9: AP of each student pre-trained, with L2 and with Ours, and of the teacher."""
    d = DETECTION
    ds, teacher = d["dataset"], d["teacher"]
    rows = []
    for label, method, transform in (("Student", "baseline", "none"), ("L2", "l2", "none"),
                                     ("Ours", "l2", KCD_TRANSFORM)):
        rows.append({"label": label, "paper": [["setting", label]],
                     "cells": {s: [run_result(ds, teacher, TSEED, s, method, transform, seed)
                                   for seed in config["seeds"]] for s in d["students"]}})
    return {
        "table": 9, "title": "object detection on COCO: Faster R-CNN + FPN, KCD on the backbone",
        "dataset": ds, "teacher": teacher, "metric": "AP",
        "teacher_results": [f"{model_dir(ds, teacher, TSEED)}/result.json"],
        "teacher_paper": {"match": [["setting", "Teacher"], ["backbone", teacher]],
                          "column": "AP"},
        "columns": list(d["students"]), "paper_column_key": "backbone", "paper_value": "AP",
        "rows": rows, "scale": SCALE,
        "description": f"COCO box AP (%) on the evaluation split; {teacher} teacher; students "
                       "by backbone. L2: feature L2 at the last backbone map before its ReLU "
                       "(through a 1x1 regressor when the student has fewer channels); Ours: "
                       f"L2 to the {KCD_TRANSFORM}-transformed teacher. Seeds per cell: "
                       f"{', '.join(map(str, config['seeds']))}.",
    }


TABLE_PLANS = {
    **{int(name.removeprefix("table")): (lambda n: comparison_plan(f"table{n}"))
       for name in config.get("tables", {})},
    **{n: ablation_plan for n in ablation_tables() if n <= 6},
    **({10: overlap_plan} if 10 in ablation_tables() else {}),
    **({11: consistency_plan} if 11 in ablation_tables() else {}),
    **({9: detection_plan} if DETECTION else {}),
}


def table_plan(n):
    n = int(n)
    if n not in TABLE_PLANS:
        raise WorkflowError(f"table {n} is not configured; configured: "
                            f"{', '.join(map(str, sorted(TABLE_PLANS)))}")
    return TABLE_PLANS[n](n)


def plan_inputs(plan):
    """The files a table reads: run results, and analysis jsons."""
    paths = list(plan.get("teacher_results", []))
    for row in plan["rows"]:
        for cell in row["cells"].values():
            paths += [c if isinstance(c, str) else c["path"] for c in cell]
    return sorted(set(paths))


def gathered_parts():
    """What results/tables.md gathers, in the paper's order: tables, then Figure 1."""
    parts = [f"{RESULTS}/table{n}.md" for n in sorted(TABLE_PLANS)]
    if FIGURE1:
        parts.append(f"{RESULTS}/figure1.png")
    return parts

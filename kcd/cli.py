"""The ``kcd`` command line: one subcommand per step of Algorithm 1.

Every subcommand reads and writes the files of the pipeline's layout (the Snakemake rules pass
the paths), prints a one-line summary, and on bad input prints one line starting with
``kcd: error:`` and exits with status 2, leaving nothing half-written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import re
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

from kcd.errors import KcdError



# --------------------------------------------------------------------------- helpers


def _config(args: argparse.Namespace) -> dict:
    from kcd.config import load_config

    return load_config(getattr(args, "config", None) or [], getattr(args, "set", None) or [])


def _tracker(args: argparse.Namespace, experiment: str, run_name: str, params: dict,
             tags: dict, out_dir: str | os.PathLike | None = None):
    """The job's MLflow run (one per job: rank 0 only; continued by a resumed job in the same
    ``out_dir``). ``tracking.required`` comes from ``KCD_TRACKING_REQUIRED`` when set, else
    from the config when one is read here (the workflow passes ``--tracking-uri`` alone)."""
    if args.no_track or int(os.environ.get("RANK", "0")) != 0:  # one MLflow run per job
        return nullcontext(None)
    from kcd.tracking import REQUIRED_ENV, MlflowTracker, spec_hash, tracking_uri

    cfg = _config(args) if not args.tracking_uri or getattr(args, "config", None) or getattr(
        args, "set", None) else {}
    uri = args.tracking_uri or tracking_uri(cfg.get("tracking", {}).get("uri"), cfg["results"])
    required = bool(cfg.get("tracking", {}).get("required", False))
    env = os.environ.get(REQUIRED_ENV, "").strip().lower()
    if env:
        required = env in ("1", "true", "yes", "on")
    return MlflowTracker(uri, experiment, run_name, params=params,
                         tags={**tags, **_tags_arg(args), "spec_hash": spec_hash(params)},
                         out_dir=out_dir,
                         required=required, source=f"kcd {args.command}")


def _tags_arg(args: argparse.Namespace) -> dict[str, str]:
    """``--tags``: MLflow tags as a URL query string (``table=7%2C8&row=KD``)."""
    from urllib.parse import parse_qsl

    text = getattr(args, "tags", None)
    if not text:
        return {}
    try:
        return dict(parse_qsl(text, keep_blank_values=True, strict_parsing=True))
    except ValueError:
        raise KcdError(f"--tags {text!r} is not KEY=VALUE&... (URL-encoded, as the workflow "
                       "passes it)") from None


def _summary(text: str) -> None:
    print(f"kcd: {text}", flush=True)


def _run_name(tags: dict) -> str:
    keys = ("dataset", "teacher", "student", "method", "transform")
    parts = [str(tags[k]) for k in keys if tags.get(k) not in (None, "")]
    return "/".join(parts) + f"/s{tags.get('seed', 0)}"


def _json_arg(value: str, flag: str) -> dict:
    """A JSON object given as text or as a file path (the workflow passes text)."""
    text = value
    if not value.lstrip().startswith(("{", "[")) and not _looks_like_json(value):
        path = Path(value)
        if not path.is_file():
            raise KcdError(f"{flag} {value} is neither a JSON object nor an existing file; "
                           "pass the JSON text or the path of a file that holds it")
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise KcdError(f"{flag} {value} is not a text file; pass a JSON file") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise KcdError(f"{flag} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise KcdError(f"{flag} must be a JSON object ({{...}}), got a "
                       f"{type(data).__name__}: {text.strip()[:60]}")
    return data


def _looks_like_json(value: str) -> bool:
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def _spec_arg(args: argparse.Namespace) -> dict:
    """``--spec`` as a dict, with the run-time fields of ``--runtime`` put back in."""
    from kcd.specs import merge_runtime, parse_runtime

    spec = _json_arg(args.spec, "--spec")
    runtime = getattr(args, "runtime", None)
    if runtime:
        if not isinstance(spec, dict):
            raise KcdError("--spec must be a JSON object")
        spec = merge_runtime(spec, parse_runtime(runtime))
    return spec


def _run_params(spec) -> tuple[dict, dict]:
    """(tags, params) of a training spec for its MLflow run."""
    from kcd.specs import to_dict

    tags = {k: str(v) for k, v in spec.tags.items()}
    params = {**spec.tags, "recipe": to_dict(spec.recipe),
              "distill": to_dict(spec.distill) if spec.distill else None}
    return tags, params


def _spec(args: argparse.Namespace, cls, resolve: Callable[[], Any]):
    """The job's spec: ``--spec`` (JSON text or file, as the workflow passes it) or resolved
    from the config and the command's flags."""
    from kcd.config import check_recipe
    from kcd.specs import from_dict, to_dict

    if args.spec:
        spec = from_dict(cls, _spec_arg(args))
        if getattr(spec, "recipe", None) is not None:
            check_recipe(to_dict(spec.recipe), "--spec key recipe")
        return spec
    return resolve()


def _train(args: argparse.Namespace, spec) -> None:
    from kcd.train import RESULT, train

    tags, params = _run_params(spec)
    with _tracker(args, f"kcd-{spec.tags.get('dataset', spec.data.name)}", _run_name(spec.tags),
                  params, tags, out_dir=spec.out_dir) as tracker:
        result = train(spec, tracker=tracker, progress=not args.quiet)
        if tracker is not None:
            tracker.log_artifact(Path(spec.out_dir) / RESULT)
            _log_run_files(tracker, args, spec,
                           [p for p in (spec.distill.transforms if spec.distill else []) if p])
    if result:
        extra = ""
        if result.get("teacher_kl") is not None:
            extra = f", teacher KL {result['teacher_kl']:.3f}"
        _summary(f"{_run_name(spec.tags)}: top-1 {result['top1']:.2f}% top-5 "
                 f"{result['top5']:.2f}%{extra} after {result['iterations']} iterations "
                 f"({result['train_seconds']:.0f} s) -> {spec.out_dir}")


def _log_run_files(tracker, args: argparse.Namespace, spec, transforms: list[str]) -> None:
    """Artifacts worth opening beside a run's result: its resolved spec, each transform as a
    table (the teacher channel each student channel receives) and, when the workflow names
    it, the job's log so far."""
    import csv
    import io
    import tempfile

    from kcd.specs import to_dict

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spec.json").write_text(json.dumps(to_dict(spec), indent=1, default=str))
        tracker.log_artifact(Path(tmp) / "spec.json")
        for i, path in enumerate(transforms):
            from kcd.analysis.heatmap import channel_map
            from kcd.transforms import load_transform

            index = channel_map(load_transform(path))
            if index is None:  # a learned transform: no channel map to list
                continue
            text = io.StringIO()
            writer = csv.writer(text, lineterminator="\n")
            writer.writerow(["student_channel", "teacher_channel"])
            writer.writerows(enumerate(index.tolist()))
            name = f"transform{i if len(transforms) > 1 else ''}.csv"
            (Path(tmp) / name).write_text(text.getvalue())
            tracker.log_artifact(Path(tmp) / name)
            tracker.log_artifact(path)
    if getattr(args, "job_log", None):
        tracker.log_artifact(args.job_log)


# --------------------------------------------------------------------------- commands


def cmd_demo_data(args: argparse.Namespace) -> None:
    from kcd.data.demo import DemoSizes, write_demo_data

    sizes = DemoSizes.tiny() if args.tiny else DemoSizes()
    t = time.time()
    write_demo_data(args.root, seed=args.seed, kinds=tuple(args.kinds), sizes=sizes,
                    progress=not args.quiet)
    _summary(f"demo data ({', '.join(args.kinds)}) in {args.root} ({time.time() - t:.1f} s)")


def _task(spec: dict) -> str:
    """The task of a job's spec, from its dataset's registry entry (kcd.data.DATASETS)."""
    from kcd.data import DATASETS

    data = spec.get("data")
    name = spec.get("dataset") or (data.get("name") if isinstance(data, dict) else None)
    return DATASETS.get(name).task if isinstance(name, str) and name in DATASETS \
        else "classification"


def cmd_init(args: argparse.Namespace) -> None:
    from kcd.config import num_classes
    from kcd.train import init_weights

    if args.spec:  # as the workflow passes it, for a classifier or a detector
        spec = _spec_arg(args)
        if _task(spec) == "detection":
            from kcd.detection import init_detector

            path = _job(args, lambda dataset=None, **kw: init_detector(**kw))
            _summary(f"detector theta0 -> {path}")
            return
        _check_keys(spec, ("dataset", "arch", "seed", "num_classes", "path"), "--spec")
        init_weights(spec["arch"], spec["seed"], spec["num_classes"], spec["path"])
        _summary(f"theta0 of {spec['arch']} seed {spec['seed']} -> {spec['path']}")
        return
    _need(args, "arch", "seed", "out")

    if args.num_classes is None and args.dataset is None:
        raise KcdError("kcd init needs --num-classes N or --dataset NAME (whose class count "
                       "the config gives)")
    classes = (args.num_classes if args.num_classes is not None
               else num_classes(_config(args), args.dataset))
    init_weights(args.arch, args.seed, classes, args.out)
    _summary(f"theta0 of {args.arch} seed {args.seed} ({classes} classes) -> {args.out}")


def _check_keys(spec: dict, keys: tuple[str, ...], flag: str) -> None:
    missing = [k for k in keys if k not in spec]
    unknown = sorted(set(spec) - set(keys))
    if missing or unknown:
        raise KcdError(f"{flag}: " + (f"missing key {missing[0]}" if missing else
                                      f"unknown key {unknown[0]}") + f"; keys: {', '.join(keys)}")


def _need(args: argparse.Namespace, *names: str) -> None:
    missing = [n for n in names if getattr(args, n) is None]
    if missing:
        raise KcdError("pass --spec, or " + ", ".join("--" + m.replace("_", "-") for m in missing))


def cmd_pretrain(args: argparse.Namespace) -> None:
    from kcd.config import train_spec
    from kcd.specs import TrainSpec

    def resolve():
        _need(args, "dataset", "arch", "seed", "theta0", "out")
        return train_spec(_config(args), dataset=args.dataset, arch=args.arch, seed=args.seed,
                          theta0=args.theta0, out_dir=args.out, save_anchors=args.save_anchors)

    if args.spec and _task(_spec_arg(args)) == "detection":
        return _train_detector(args)
    _train(args, _spec(args, TrainSpec, resolve))


def cmd_distill(args: argparse.Namespace) -> None:
    from kcd.config import train_spec
    from kcd.specs import TrainSpec

    def resolve():
        _need(args, "dataset", "student", "seed", "theta0", "out", "method")
        extra: dict[str, Any] = {}
        if args.dynamic_every:
            extra["dynamic_every"] = args.dynamic_every
        transform = args.transform_name or (Path(args.transform).stem if args.transform
                                            else "none")
        return train_spec(
            _config(args), dataset=args.dataset, arch=args.student, seed=args.seed,
            theta0=args.theta0, out_dir=args.out, method=args.method, teacher=args.teacher,
            teacher_weights=args.teacher_weights,
            transforms=[args.transform] if args.transform else None, anchors=args.anchor,
            tags={"teacher": args.teacher, "transform": transform}, **extra,
        )

    if args.spec and _task(_spec_arg(args)) == "detection":
        return _train_detector(args)
    _train(args, _spec(args, TrainSpec, resolve))


def _layers(args: argparse.Namespace) -> tuple[str, str]:
    from kcd.models import model_spec

    return (args.teacher_layer or model_spec(args.teacher).default_layer,
            args.student_layer or model_spec(args.student).default_layer)


def cmd_statistics(args: argparse.Namespace) -> None:
    from kcd.config import statistics_spec
    from kcd.specs import StatisticsSpec
    from kcd.statistics import compute_statistics

    def resolve():
        _need(args, "dataset", "teacher", "teacher_weights", "student", "student_weights", "out")
        return statistics_spec(
            _config(args), dataset=args.dataset, teacher=args.teacher,
            teacher_weights=args.teacher_weights, student=args.student,
            student_weights=args.student_weights, out=args.out, groups=args.groups,
            layers=(args.teacher_layer, args.student_layer), metrics=args.metrics)

    if args.spec and _task(_spec_arg(args)) == "detection":
        return _detector_statistics(args)
    spec = _spec(args, StatisticsSpec, resolve)
    info = compute_statistics(spec, progress=not args.quiet)
    _summary(f"statistics of {info['samples']} images, {info['c_t']}x{info['c_s']} channels "
             f"-> {spec.out}")


def cmd_decode(args: argparse.Namespace) -> None:
    from kcd.data.decoded import decode
    from kcd.specs import DecodeSpec, from_dict

    spec = from_dict(DecodeSpec, _json_arg(args.spec, "--spec"))
    out = decode(spec.data, spec.split, spec.out, progress=not args.quiet)
    _summary(f"decoded the {spec.split} split of {spec.data.name} in {spec.data.root} -> {out}")


def cmd_teacher_outputs(args: argparse.Namespace) -> None:
    from kcd.specs import TeacherOutputsSpec, from_dict
    from kcd.teacher_outputs import compute

    spec = from_dict(TeacherOutputsSpec, _spec_arg(args))
    out = compute(spec.teacher, spec.teacher_weights, spec.num_classes, spec.data, spec.split,
                  spec.layers, spec.out, batch_size=spec.batch_size, progress=not args.quiet)
    _summary(f"{spec.teacher} on the {spec.split} split of {spec.data.name} "
             f"(logits{''.join(', ' + layer for layer in spec.layers)}) -> {out}")


def cmd_transform(args: argparse.Namespace) -> None:
    from kcd.statistics import learn_transform, make_transform
    from kcd.transforms import LEARNED_KINDS

    if args.strategy in LEARNED_KINDS and args.spec:
        from kcd.specs import StatisticsSpec

        spec = _spec(args, StatisticsSpec, lambda: None)
        meta = learn_transform(
            strategy=args.strategy, metric=args.metric, teacher=spec.teacher,
            teacher_weights=spec.teacher_weights, student=spec.student,
            student_weights=spec.student_weights, layers=(spec.layers[0], spec.layers[1]),
            data=spec.data, num_classes=spec.num_classes, out=args.out, steps=args.steps,
            lr=args.lr, batch_size=args.batch_size, seed=args.seed, progress=not args.quiet,
        )
    elif args.strategy in LEARNED_KINDS:
        from kcd.config import data_spec, num_classes

        cfg = _config(args)
        missing = [f for f in ("teacher", "teacher_weights", "student", "student_weights",
                               "dataset") if not getattr(args, f)]
        if missing:
            raise KcdError(f"strategy {args.strategy} learns from features: pass "
                           + ", ".join("--" + m.replace("_", "-") for m in missing))
        meta = learn_transform(
            strategy=args.strategy, metric=args.metric, teacher=args.teacher,
            teacher_weights=args.teacher_weights, student=args.student,
            student_weights=args.student_weights, layers=_layers(args),
            data=data_spec(cfg, args.dataset), num_classes=num_classes(cfg, args.dataset),
            out=args.out, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
            seed=args.seed, progress=not args.quiet,
        )
    else:
        if not args.stats:
            raise KcdError(f"strategy {args.strategy} needs --stats (from `kcd statistics`)")
        meta = make_transform(args.stats, args.strategy, args.metric, args.out,
                              groups=args.groups, seed=args.seed)
    before = meta.get("gamma_before")
    _summary(f"{args.strategy}-{args.metric} transform: Γ "
             f"{'n/a' if before is None else f'{before:.4g}'} -> "
             f"{meta.get('gamma_after', float('nan')):.4g} -> {args.out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from kcd.checkpoint import atomic_write_json
    from kcd.config import data_spec, num_classes
    from kcd.data.streams import eval_batches
    from kcd.evaluate import evaluate
    from kcd.checkpoint import load_model
    from kcd.transforms import check_transform, load_transform

    from kcd.data.datasets import check_num_classes

    cfg = _config(args)
    classes = num_classes(cfg, args.dataset)
    check_num_classes(args.dataset, cfg["datasets"][args.dataset]["root"], classes)
    model = load_model(args.arch, args.weights, classes, "weights")
    teacher = layers = None
    transforms = []
    if args.teacher:
        if not args.teacher_weights:
            raise KcdError("--teacher needs --teacher-weights")
        teacher = load_model(args.teacher, args.teacher_weights, classes, "teacher weights").eval()
        args.student = args.arch
        layers = [_layers(args)]
        transforms = [load_transform(args.transform) if args.transform else None]
        if transforms[0] is not None:
            check_transform(transforms[0], args.transform, teacher=args.teacher,
                            student=args.arch)
    result = evaluate(model, eval_batches(data_spec(cfg, args.dataset), 256), teacher=teacher,
                      layers=layers or (), transforms=transforms, progress=not args.quiet)
    if args.out:
        atomic_write_json(result, args.out)
    _summary(json.dumps(result))


def _job(args: argparse.Namespace, run: Callable[..., Any], **extra: Any) -> Any:
    """Run an analysis job from its ``--spec`` (JSON text or file) as keyword arguments."""
    spec = _spec_arg(args)
    try:
        return run(**spec, **extra)
    except TypeError as e:
        if "argument" not in str(e):
            raise
        raise KcdError(f"--spec does not fit `kcd {args.command}`: {e}") from None


def cmd_overlap(args: argparse.Namespace) -> None:
    from kcd.analysis.overlap import overlap_job

    rows = _job(args, overlap_job, progress=not args.quiet)
    _summary("channel overlap: " + "; ".join(
        f"{r['models']} " + " ".join(f"{k} {v:.1f}" for k, v in r.items() if k != "models")
        for r in rows))


def cmd_feature_consistency(args: argparse.Namespace) -> None:
    from kcd.analysis.feature_consistency import feature_consistency_job

    result = _job(args, feature_consistency_job, progress=not args.quiet)
    _summary(f"feature consistency of {len(result)} rows")


def cmd_figure1(args: argparse.Namespace) -> None:
    from kcd.analysis.activation_maps import figure1_job

    png, pdf = _job(args, figure1_job)
    _summary(f"figure 1 -> {png}, {pdf}")


def cmd_heatmap(args: argparse.Namespace) -> None:
    """The consistency matrix of a pair with its transform's matches (a tracked run that
    logs the picture and the transform's table)."""
    from kcd.analysis.heatmap import consistency_heatmap

    tags = _tags_arg(args)
    name = Path(args.transform).with_suffix("").name
    run_name = f"{tags.get('dataset', '')}/{Path(args.stats).parent.name}/{name}".lstrip("/")
    params = {"stats": args.stats, "transform": args.transform, "metric": args.metric}
    with _tracker(args, f"kcd-{tags.get('dataset', 'transforms')}", run_name, params,
                  {"method": "transform", "transform": name}) as tracker:
        out = consistency_heatmap(args.stats, args.transform, args.metric, args.out,
                                  title=args.title)
        if tracker is not None:
            tracker.log_artifact(out["png"])
            tracker.log_artifact(out["csv"])
    _summary(f"consistency of {out['teacher']} -> {out['student']}: {out['png']}, {out['csv']}")


def _dry_run(rest: list[str]) -> tuple[list, dict | None]:
    """The jobs ``snakemake -n -p REST`` would run, and the config it resolved."""
    import subprocess
    import tempfile

    import yaml

    from kcd.dryrun import RESOLVED_CONFIG_ENV, parse_dry_run

    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "config.yaml"
        env = {**os.environ, RESOLVED_CONFIG_ENV: str(resolved)}
        run = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", *rest],
                             capture_output=True, text=True, env=env)
        if run.returncode != 0:
            lines = [line.strip() for line in (run.stdout + "\n" + run.stderr).splitlines()
                     if line.strip() and not line.startswith("Using ")]
            errors = [line for line in lines if "error" in line.lower()]
            raise KcdError("the dry run failed: " + ((errors or lines)[-1] if lines
                                                     else "no output"))
        cfg = yaml.safe_load(resolved.read_text()) if resolved.is_file() else None
    return parse_dry_run(run.stdout + run.stderr), cfg


def _own_flags(rest: list[str]) -> tuple[list[str], dict[str, Any]]:
    """kcd's own flags among Snakemake's (REMAINDER keeps them together)."""
    own: dict[str, Any] = {"jobs_only": False, "cost": False, "throughput": None}
    out, i = [], 0
    while i < len(rest):
        word = rest[i]
        if word in ("--jobs-only", "--cost"):
            own[word[2:].replace("-", "_")] = True
        elif word == "--throughput":
            if i + 1 >= len(rest):
                raise KcdError("--throughput needs a file: the table bench/bench_gpu.py --throughput "
                               "(or --json) wrote")
            own["throughput"], own["cost"] = rest[i + 1], True
            i += 1
        else:
            out.append(word)
        i += 1
    if out[:1] == ["--"]:
        out = out[1:]
    return out, own


def cmd_config(args: argparse.Namespace) -> None:
    """``kcd config show``: the resolved config and every job a dry run would start, with
    ``--cost`` its GPU-hours (:mod:`kcd.costs`)."""
    import pandas as pd
    import yaml

    from kcd.dryrun import summary

    rest, own = _own_flags(list(args.snakemake_args))
    _check_configfile_order(rest)
    jobs, cfg = _dry_run(rest)
    if cfg is not None and not own["jobs_only"]:
        print(f"# resolved config (scale {cfg.get('scale')})")
        print(yaml.safe_dump(cfg, sort_keys=False, width=100), end="")
        print()
    rows = summary(jobs)
    if not rows:
        _summary("nothing to be done (every target exists)")
        return
    table = pd.DataFrame(rows, dtype=object).fillna("")
    print(f"# {len(rows)} jobs, {sum(1 for r in rows if r['gpus'])} of them on GPUs")
    print(table.to_string(index=False))
    if own["cost"]:
        _print_costs(jobs, own["throughput"])


def _print_costs(jobs: list, throughput: str | None) -> None:
    """GPU-hours of each GPU job, their total, and the total of each table the target builds
    (a job shared by several tables counts in each)."""
    import pandas as pd

    from kcd.costs import cost_rows, read_throughput
    from kcd.dryrun import needed_by, summary

    measured = read_throughput(throughput)

    def costs(of: list) -> list[dict]:
        kcd_jobs = [j for j in of if j.command]
        return cost_rows([summary([j])[0] for j in kcd_jobs], [j.spec for j in kcd_jobs],
                         measured, [j.args for j in kcd_jobs])

    rows = costs(jobs)
    print()
    if not rows:
        print("# cost: no job of this target uses a GPU")
        return
    sources = sorted({r["source"] for r in rows})
    print(f"# cost: {sum(r['GPU-h'] for r in rows):.1f} GPU-hours for {len(rows)} GPU jobs "
          f"(throughput {' and '.join(sources)}; assumed: kcd.costs.ASSUMED, one A100-class "
          "GPU with bf16, not measurements)")
    print(pd.DataFrame(rows).sort_values(["rule", "dataset", "model"]).to_string(index=False))
    tables = [j for j in jobs if j.command == "table"]
    if tables:
        print("\n# GPU-hours per table (a job shared by several tables counts in each)")
        for job in sorted(tables, key=lambda j: int(re.sub(r"\D", "", Path(j.args["out"]).name))):
            hours = sum(r["GPU-h"] for r in costs(needed_by(jobs, job)))
            print(f"{Path(job.args['out']).name}: {hours:.1f}")


def _check_configfile_order(argv: list[str]) -> None:
    """Snakemake's ``--configfile`` takes every following word: a target after it is read as
    a config file. Say so in one line instead of Snakemake's traceback."""
    taking = False
    for word in argv:
        if word in ("--configfile", "--configfiles"):
            taking = True
        elif word.startswith("-"):
            taking = False
        elif taking and not Path(word).is_file():
            raise KcdError(f"config file {word} does not exist; if it is a target, put targets "
                           "before --configfile or end its list with --")


def _train_detector(args: argparse.Namespace) -> None:
    """``kcd pretrain``/``distill`` of a detection dataset: a Faster R-CNN + FPN detector."""
    from kcd.detection import train_detector
    from kcd.specs import DetectionSpec, from_dict

    spec = from_dict(DetectionSpec, _spec_arg(args))
    tags, params = _run_params(spec)
    with _tracker(args, f"kcd-{spec.tags.get('dataset', spec.data.name)}", _run_name(spec.tags),
                  params, tags, out_dir=spec.out_dir) as tracker:
        result = train_detector(spec, tracker=tracker, progress=not args.quiet)
        if tracker is not None:
            tracker.log_artifact(Path(spec.out_dir) / "result.json")
            _log_run_files(tracker, args, spec, [spec.distill.transform]
                           if spec.distill and spec.distill.transform else [])
    _summary(f"{_run_name(spec.tags)}: AP {result['AP']:.2f} AP50 {result['AP50']:.2f} -> "
             f"{spec.out_dir}")


def _detector_statistics(args: argparse.Namespace) -> None:
    """``kcd statistics`` of a detection dataset: the two detectors' backbones."""
    from kcd.detection import detection_statistics
    from kcd.specs import DataSpec, from_dict

    def run(*, data: dict, **kwargs: Any) -> dict:
        return detection_statistics(data=from_dict(DataSpec, data), progress=not args.quiet,
                                    **kwargs)

    info = _job(args, run)
    _summary(f"detection statistics: {json.dumps(info)}")


def cmd_table(args: argparse.Namespace) -> None:
    from kcd.tables import write_table

    plan = _json_arg(args.plan, "--plan")
    df = write_table(plan, args.out)
    _summary(f"table {plan['table']}: {len(df)} rows -> {args.out}.csv/.md/.tex")


def cmd_tables_md(args: argparse.Namespace) -> None:
    from kcd.tables import gather_markdown

    gather_markdown(args.parts, args.out)
    _summary(f"{len(args.parts)} parts -> {args.out}")


# --------------------------------------------------------------------------- parser


def _common(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument("--config", action="append", metavar="FILE",
                       help="config file(s), later ones win, over the scale's own file "
                            "config/<scale>.yaml (default scale: demo)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override one config key, e.g. recipes.cifar100.default.lr=0.05")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _runtime_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", metavar="SECTION.KEY=VALUE,...",
                   help="with --spec: the spec's run-time fields (logging and checkpoint "
                        "periods, evaluation batch, loader workers), which the workflow passes "
                        "apart from the spec, e.g. recipe.log_every=10,data.workers=4")


def _tracked(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", help="the whole job as JSON (text or file), as the workflow passes "
                                  "it; replaces the other flags")
    _runtime_flag(p)
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: config / environment)")
    p.add_argument("--job-log", help="the job's log file, logged to MLflow at the end (the "
                                     "workflow passes its log)")
    p.add_argument("--tags", help="more MLflow tags as a URL query string, e.g. "
                                  "table=7%%2C8&row=KD (the workflow passes the tables and rows "
                                  "a run fills)")


def _positive(kind: type) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` above 0 (argparse names the flag on error)."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} is not above 0")
        return value

    parse.__name__ = kind.__name__  # argparse's "invalid int value" for a non-number
    return parse


def build_parser() -> argparse.ArgumentParser:
    from kcd.data import demo as demo_kinds  # numpy and Pillow, no torch

    parser = argparse.ArgumentParser(
        prog="kcd", description="Knowledge Consistent Distillation: one subcommand per step "
                                "of Algorithm 1.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable, help: str, config: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        _common(p, config)
        return p

    p = add("demo-data", cmd_demo_data, "write the demo datasets in the real on-disk formats",
            config=False)
    p.add_argument("--root", default="resources/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", nargs="+", default=list(demo_kinds.KINDS),
                   choices=demo_kinds.ALL_KINDS)
    p.add_argument("--tiny", action="store_true", help="tiny sizes (for tests)")

    p = add("init", cmd_init, "write theta0, the initial weights of (architecture, seed) of a "
                              "classifier or a detector")
    p.add_argument("--spec", help="the job as JSON (text or file), as the workflow passes it: "
                                  "{dataset, arch, seed, num_classes, path} (a detector's "
                                  "dataset: {dataset, backbone, seed, num_classes, path, ...})")
    p.add_argument("--arch")
    p.add_argument("--seed", type=int)
    p.add_argument("--dataset", help="dataset whose class count to use")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--out")

    p = add("pretrain", cmd_pretrain, "train a model from its theta0 with cross-entropy "
                                      "(teachers, and the students of Algorithm 1 step 3)")
    p.add_argument("--dataset")
    p.add_argument("--arch")
    p.add_argument("--seed", type=int)
    p.add_argument("--theta0")
    p.add_argument("--out", help="run folder (final.pt, result.json, anchors/)")
    p.add_argument("--save-anchors", action="store_true",
                   help="also save RCO's anchor checkpoints (for a teacher)")
    _tracked(p)

    p = add("distill", cmd_distill, "distil a teacher into a student re-initialised from its "
                                    "theta0 (Algorithm 1 step 7)")
    p.add_argument("--dataset")
    p.add_argument("--student")
    p.add_argument("--theta0")
    p.add_argument("--teacher")
    p.add_argument("--teacher-weights")
    p.add_argument("--method", help="baseline, kd, fitnets, at, rkd, ab, rco, l2")
    p.add_argument("--transform", help="channel transform file (the KCD part)")
    p.add_argument("--transform-name", help="name of the transform for tracking/tables")
    p.add_argument("--anchor", action="append", help="RCO anchor weights, in route order")
    p.add_argument("--dynamic-every", type=int, default=0,
                   help="recompute the transform every E iterations (Table 5)")
    p.add_argument("--seed", type=int)
    p.add_argument("--out")
    _tracked(p)

    p = add("decode", cmd_decode, "decode one split of an image-folder dataset once into a "
                                  "tensor file", config=False)
    p.add_argument("--spec", required=True, help="the job as JSON (text or file): {data, "
                                                  "split, out}, as the workflow passes it")

    p = add("teacher-outputs", cmd_teacher_outputs, "a teacher's logits and features on one "
                                                    "split, computed once for all its runs",
            config=False)
    p.add_argument("--spec", required=True, help="the job as JSON (text or file), as the "
                                                  "workflow passes it")
    _runtime_flag(p)

    for name, fn, text in (
        ("statistics", cmd_statistics, "accumulate consistency statistics of a teacher/student "
                                       "pair over the training set (Algorithm 1 step 4)"),
        ("transform", cmd_transform, "compute a channel transform from statistics "
                                     "(Algorithm 1 step 5)"),
    ):
        p = add(name, fn, text)
        p.add_argument("--dataset")
        p.add_argument("--teacher")
        p.add_argument("--teacher-weights")
        p.add_argument("--student")
        p.add_argument("--student-weights")
        p.add_argument("--teacher-layer")
        p.add_argument("--student-layer")
        p.add_argument("--out", required=name != "statistics")
        if name == "statistics":
            p.add_argument("--spec", help="the whole job as JSON (text or file)")
            _runtime_flag(p)
            p.add_argument("--metrics", nargs="+")
            p.add_argument("--groups", type=int, nargs="+",
                           help="also per-class statistics for K groups of labels (Table 6)")
        else:
            p.add_argument("--stats")
            p.add_argument("--spec", help="learned strategies: the pair, its layers and data as "
                                          "a statistics spec (JSON), as the workflow passes it")
            _runtime_flag(p)
            p.add_argument("--lr", type=_positive(float), default=1e-3,
                           help="learned strategies: Adam lr")
            p.add_argument("--batch-size", type=_positive(int), default=128,
                           help="learned strategies: images per step")
            p.add_argument("--strategy", required=True)
            p.add_argument("--metric", default="correlation")
            p.add_argument("--groups", type=int, default=1)
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--steps", type=_positive(int), default=200,
                           help="learned strategies: steps")

    p = add("evaluate", cmd_evaluate, "evaluate a model (and its distance to a teacher)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--arch", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--teacher")
    p.add_argument("--teacher-weights")
    p.add_argument("--transform")
    p.add_argument("--teacher-layer")
    p.add_argument("--student-layer")
    p.add_argument("--out")

    for name, fn, text in (
        ("overlap", cmd_overlap, "Table 10: overlap of the top-k channels per class between "
                                 "models"),
        ("feature-consistency", cmd_feature_consistency,
         "Table 11: KL of outputs and feature L2 between a teacher and students"),
        ("figure1", cmd_figure1, "Figure 1: class-averaged activation maps and differences"),
    ):
        p = add(name, fn, text, config=False)
        p.add_argument("--spec", required=True, help="the job as JSON (text or file), as the "
                                                      "workflow writes it")
        _runtime_flag(p)


    p = add("heatmap", cmd_heatmap, "picture of a pair's consistency matrix with its "
                                    "transform's matches, and the transform as a table",
            config=False)
    p.add_argument("--stats", required=True, help="the pair's statistics file")
    p.add_argument("--transform", required=True, help="a transform made from them")
    p.add_argument("--metric", required=True, help="the transform's consistency metric")
    p.add_argument("--out", required=True, help="output prefix: <prefix>.png and <prefix>.csv")
    p.add_argument("--title")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: config / environment)")
    p.add_argument("--tags", help="MLflow tags as a URL query string (dataset=imagenet&...)")

    p = add("config", cmd_config, "show the resolved config and one line per job that "
                                  "`snakemake -n` would run (check before a cluster run)",
            config=False)
    p.add_argument("action", choices=["show"])
    p.add_argument("snakemake_args", nargs=argparse.REMAINDER, metavar="SNAKEMAKE ARGS",
                   help="what you would pass to snakemake: targets, --configfile, --profile, "
                        "--config, e.g. results/table8.csv --configfile config/paper.yaml "
                        "site.yaml; --jobs-only: print only the job table; --cost: GPU-hours "
                        "per job and per table; --throughput FILE: measured images/s "
                        "(bench/bench_gpu.py --json) instead of the assumed ones")

    p = add("table", cmd_table, "build one of the paper's tables from run results",
            config=False)
    p.add_argument("--plan", required=True, help="the table's plan as JSON (text or file)")
    p.add_argument("--out", required=True, help="output prefix, e.g. results/table7")

    p = add("tables-md", cmd_tables_md, "gather rendered tables and figures into one page",
            config=False)
    p.add_argument("--out", required=True)
    p.add_argument("parts", nargs="+")
    return parser


def _close_progress_bars() -> None:
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (KcdError, OSError) as e:
        _close_progress_bars()  # a bar closed later would redraw itself after the error
        print(f"kcd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kcd: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

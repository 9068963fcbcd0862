"""The pipeline's configuration: load, merge, validate, and resolve into run specs.

``config/config.yaml`` (demo scale) and ``config/paper.yaml`` (Section 4.1) are data. They are
checked against ``kcd/schemas/config.schema.yaml`` and against the registries (datasets,
models, methods), and every error names the offending key. The resolvers turn the config
into the :mod:`kcd.specs` a job runs; both the Snakemake rules and the CLI use them, so a run
started by hand and one started by the DAG are the same run.
"""
from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import jsonschema
import yaml

from kcd.errors import KcdError
from kcd.specs import DataSpec, Recipe, StatisticsSpec, TrainSpec, from_dict

_SCHEMA: dict | None = None


def schema() -> dict:
    """The JSON schema of the config (kept in the package so every entry point shares it)."""
    global _SCHEMA
    if _SCHEMA is None:
        text = resources.files("kcd").joinpath("schemas/config.schema.yaml").read_text()
        _SCHEMA = _with_registry_names(yaml.safe_load(text))
    return _SCHEMA


def _with_registry_names(s: dict) -> dict:
    """The schema's names come from the registries (:mod:`kcd.naming`, :mod:`kcd.data`):
    the KCD transform's strategies and metrics, the statistics' metrics."""
    from kcd.naming import MATCHED_STRATEGIES, METRIC_NAMES

    props = s["properties"]
    props["kcd_transform"]["pattern"] = (
        f"^({'|'.join(MATCHED_STRATEGIES)})-({'|'.join(METRIC_NAMES)})$")
    props["statistics"]["properties"]["metrics"]["items"] = {"enum": list(METRIC_NAMES)}
    from kcd.tables import ABLATIONS, ANALYSIS_TABLES

    props["ablations"]["properties"]["tables"]["items"] = {
        "enum": sorted({int(n) for n in ABLATIONS} | set(ANALYSIS_TABLES))}
    return s


def kcd_metric(cfg: dict) -> str:
    """The consistency metric of the configured KCD transform (``kcd_transform``)."""
    from kcd.naming import parse_transform_name

    return parse_transform_name(cfg.get("kcd_transform", "bipartite-correlation")).metric


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base``, mappings recursively, everything else replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(text: str) -> dict:
    """``a.b.c=value`` (value parsed as YAML) -> ``{"a": {"b": {"c": value}}}``. A model name
    with a dot stays one key: ``recipes.imagenet.mobilenetv2_0.5x.lr=0.1``."""
    if "=" not in text:
        raise KcdError(f"override '{text}' is not KEY=VALUE (e.g. recipes.cifar100.default.lr=0.05)")
    key, value = text.split("=", 1)
    out: Any = yaml.safe_load(value)
    for part in reversed(_key_parts(key.strip())):
        out = {part: out}
    return out


def _key_parts(key: str) -> list[str]:
    """``key`` split at its dots, except the dots inside a registered model name."""
    from kcd.models import model_names

    if not key or key.startswith(".") or key.endswith(".") or ".." in key:
        raise KcdError(f"override key '{key}' has an empty part; write KEY.SUBKEY=VALUE "
                       "(e.g. recipes.cifar100.default.lr=0.05)")
    names = [n for n in model_names() if "." in n]
    parts: list[str] = []
    rest = key
    while rest:
        name = next((n for n in names if rest == n or rest.startswith(n + ".")), None)
        head = name or rest.split(".", 1)[0]
        parts.append(head)
        rest = rest[len(head) + 1:]
    return parts


RESOURCE_RULES = ("init", "pretrain", "teacher_outputs", "anchor_outputs", "statistics",
                  "learned_transform", "distill", "analysis")
"""The heavy rules, whose jobs :meth:`kcd.plans.Plans.launch_args` starts through
``kcd.launch``: the names a ``resources`` entry may have besides ``default`` and the datasets
(``analysis``: the overlap, feature-consistency and Figure 1 jobs)."""

SCALES = ("demo", "paper")
"""The scales, each complete in its own file ``config/<scale>.yaml``: ``demo`` (the default,
generated data, CPU minutes) and ``paper`` (Section 4.1 as written)."""
DEFAULT_SCALE = "demo"
CONFIG_DIR = Path("config")  # the scale files, relative to the working directory
_REPO_CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"  # else the repository's


def scale_file(scale: str) -> Path:
    """``config/<scale>.yaml`` of the working directory, else of the repository."""
    if scale not in SCALES:
        raise KcdError(f"config key scale: '{scale}' is not a scale; known: {', '.join(SCALES)}")
    for folder in (CONFIG_DIR, _REPO_CONFIG_DIR):
        path = folder / f"{scale}.yaml"
        if path.is_file():
            return path
    raise KcdError(f"config file {CONFIG_DIR / f'{scale}.yaml'} (the {scale} scale's values) "
                   "does not exist; run from the repository root")


def read_config_file(path: str | Path) -> dict:
    """One YAML config file as a mapping; errors name the file (and line)."""
    p = Path(path)
    if not p.is_file():
        raise KcdError(f"config file {p} does not exist; check the path (targets go before "
                       "--configfile, or end its list with --)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise KcdError(f"config file {where} is not valid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise KcdError(f"config file {p} is not a text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KcdError(f"config file {p} must hold a mapping (key: value) at the top level")
    return data


def coerce_override(value: Any) -> Any:
    """A ``--config`` value as YAML would read it (Snakemake passes nested values as strings:
    ``seeds=[0,1]`` gives ``['0', '1']``, ``launcher={warm: false}`` gives ``'false'``)."""
    if isinstance(value, dict):
        return {k: coerce_override(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [coerce_override(v) for v in value]
    if isinstance(value, str):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        if parsed is None or isinstance(parsed, (bool, int, float)):
            return parsed
    return value


def resolve_config(files: Iterable[str | Path] = (), overrides: dict | None = None) -> dict:
    """The config of a run: one scale's values, then the user's layers, validated.

    ``files`` are config files in order (later ones win), ``overrides`` the command line's
    keys (``--config`` / ``--set``), which win over every file. The scale is the last one
    named (``scale:``), else ``demo``. A file that names its scale is complete for that scale
    (``config/paper.yaml``, or a test's own config); a file that does not is a layer (a site
    file: dataset roots, cluster keys). When no complete file is given, the scale's own file
    ``config/<scale>.yaml`` is the base. So a value of one scale never reaches another: a
    complete file of another scale is refused, and the demo's values are never read at paper
    scale.
    """
    layers = [(str(f), read_config_file(f)) for f in files]
    over = coerce_override(dict(overrides or {}))
    named = [(src, d["scale"]) for src, d in layers if d.get("scale") is not None]
    scale = over.get("scale") or (named[-1][1] if named else DEFAULT_SCALE)
    for src, s in named:
        if s != scale:
            raise KcdError(f"config file {src} holds the {s} scale's values but the scale is "
                           f"{scale}; a scale's values come from its own file only: use "
                           f"config/{scale}.yaml (or your copy of it) instead of {src}")
    cfg: dict = {}
    if not named:
        base = scale_file(scale)
        cfg = read_config_file(base)
        if cfg.get("scale") != scale:
            raise KcdError(f"config file {base}: its key scale must be {scale}")
    for _, data in layers:
        cfg = deep_merge(cfg, data)
    cfg = deep_merge(cfg, over)
    cfg["scale"] = scale
    return validate_config(cfg)


def workflow_config(files: Iterable[str | Path], overrides: dict | None) -> dict:
    """The workflow's config: :func:`resolve_config` of Snakemake's ``--configfile`` files and
    ``--config`` keys, refused if its results folder holds another scale; written where
    ``kcd config show`` asks for it (:data:`kcd.dryrun.RESOLVED_CONFIG_ENV`)."""
    import os

    from kcd.dryrun import RESOLVED_CONFIG_ENV

    cfg = resolve_config(files, overrides)
    check_results_scale(cfg["results"], cfg["scale"])
    if os.environ.get(RESOLVED_CONFIG_ENV):
        Path(os.environ[RESOLVED_CONFIG_ENV]).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


def load_config(paths: Iterable[str | Path] = (), overrides: Iterable[str] = ()) -> dict:
    """:func:`resolve_config` of config files and ``KEY=VALUE`` overrides (the CLI's
    ``--config`` and ``--set``)."""
    over: dict = {}
    for o in overrides:
        over = deep_merge(over, parse_override(o))
    return resolve_config(paths, over)


def _check_schema(value: Any, part: dict, where: str) -> None:
    """Raise the first error of ``value`` against the schema ``part`` as one line naming its
    key, prefixed with ``where`` (the shallowest error first)."""
    validator = jsonschema.Draft202012Validator(part)
    errors = sorted(validator.iter_errors(value),
                    key=lambda e: (len(e.absolute_path), str(e.path)))
    if errors:
        e = errors[0]
        key = ".".join([*([where] if where else []), *(str(p) for p in e.absolute_path)])
        raise KcdError(f"{key or '(top level)'}: {e.message}")


def check_recipe(recipe: dict, where: str) -> None:
    """Check a job's recipe (e.g. from a ``--spec``) against the config schema's ``recipe``,
    the ranges a config's recipes are held to; the error names ``where``'s key."""
    _check_schema(recipe, schema()["$defs"]["recipe"], where)


def validate_config(cfg: dict) -> dict:
    """Check ``cfg`` against the schema and the registries; the first error names its key."""
    try:
        _check_schema(cfg, schema(), "")
    except KcdError as e:
        raise KcdError(f"config key {e}") from None
    paths = {"results": cfg.get("results"), "tracking.uri": cfg.get("tracking", {}).get("uri"),
             "demo_data.root": cfg.get("demo_data", {}).get("root"),
             **{f"datasets.{n}.root": d.get("root") for n, d in cfg.get("datasets", {}).items()}}
    for key, value in paths.items():
        if isinstance(value, str) and ("\n" in value or "\0" in value or "\r" in value):
            raise KcdError(f"config key {key}: a path may not contain a newline or NUL "
                           f"character: {value!r}")
    from kcd.data import DATASETS
    from kcd.losses import LOSSES

    for name in cfg.get("datasets", {}):
        if name not in DATASETS:
            raise KcdError(f"config key datasets.{name}: unknown dataset; known: "
                           f"{', '.join(DATASETS.names())}")
    for name in cfg.get("resources", {}):
        if name != "default" and name not in DATASETS and name not in RESOURCE_RULES:
            raise KcdError(f"config key resources.{name}: not an entry; known: default, a "
                           f"dataset ({', '.join(DATASETS.names())}) or a heavy rule "
                           f"({', '.join(RESOURCE_RULES)})")
    for section in ("methods",):
        for name in cfg.get(section, {}):
            if name not in LOSSES:
                raise KcdError(f"config key {section}.{name}: unknown method; known: "
                               f"{', '.join(LOSSES.names())}")
    for ds, methods in cfg.get("method_overrides", {}).items():
        for name in methods:
            if name not in LOSSES:
                raise KcdError(f"config key method_overrides.{ds}.{name}: unknown method; "
                               f"known: {', '.join(LOSSES.names())}")
    from kcd.tables import COMPARISON_ROWS

    for name, m in cfg.get("methods", {}).items():
        accepted = LOSSES.get(name).options
        for opt in m.get("options", {}):
            if opt not in accepted:
                raise KcdError(f"config key methods.{name}.options.{opt}: unknown option; "
                               f"accepted: {', '.join(accepted) or 'none'}")
    metric = kcd_metric(cfg)
    metrics = cfg.get("statistics", {}).get("metrics", ["correlation"])
    if metric not in metrics:
        raise KcdError(f"config key kcd_transform: its metric '{metric}' is not among "
                       f"statistics.metrics ({', '.join(metrics)})")

    for name, table in cfg.get("tables", {}).items():
        if table.get("dataset") not in cfg.get("datasets", {}):
            raise KcdError(f"config key tables.{name}.dataset: '{table.get('dataset')}' is not "
                           f"under datasets; known: {', '.join(cfg.get('datasets', {}))}")
        for i, arch in enumerate([table.get("teacher"), *table.get("students", [])]):
            _known_model(arch, f"tables.{name}." + ("teacher" if i == 0 else "students"))
        for row in table.get("rows", []):
            if row not in COMPARISON_ROWS:
                raise KcdError(f"config key tables.{name}.rows: unknown row '{row}'; known: "
                               f"{', '.join(COMPARISON_ROWS.names())}")
    _validate_ablations(cfg)
    _validate_figure1(cfg)
    _validate_detection(cfg)
    for ds, recipes in cfg.get("recipes", {}).items():
        for arch, r in recipes.items():
            if arch != "default":
                _known_model(arch, f"recipes.{ds}.{arch}")
            ms = r.get("milestones", [])
            if ms != sorted(ms):
                raise KcdError(f"config key recipes.{ds}.{arch}.milestones: must be increasing")
    return cfg


SCALE_MARK = ".kcd-scale"  # in the results folder: the config scale whose results it holds


def check_results_scale(results: str | Path, scale: str) -> None:
    """Refuse to mix scales in one results folder (a demo run's files would otherwise sit, and
    be tracked in MLflow, beside the paper-scale runs that replace them one by one)."""
    mark = Path(results) / SCALE_MARK
    try:
        found = mark.read_text().strip()
    except OSError:
        return
    if found and found != scale:
        raise KcdError(
            f"config key results: {results}/ holds {found}-scale results and this config is "
            f"scale {scale}; set `results:` to another folder, or move {results}/ away")


def mark_results_scale(results: str | Path, scale: str) -> None:
    """Record the scale of the results folder (before its first job writes into it)."""
    from kcd.checkpoint import atomic_write_text

    mark = Path(results) / SCALE_MARK
    if not mark.exists():
        mark.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(scale + "\n", mark)


def _known_dataset(cfg: dict, name: str, key: str) -> None:
    if name not in cfg.get("datasets", {}):
        raise KcdError(f"config key {key}: '{name}' is not under datasets; known: "
                       f"{', '.join(cfg.get('datasets', {}))}")


def _known_setting(cfg: dict, section: str) -> int | None:
    """Check a section's dataset, teacher and student; return the dataset's class count."""
    d = cfg[section]
    _known_dataset(cfg, d["dataset"], f"{section}.dataset")
    _known_model(d["teacher"], f"{section}.teacher")
    _known_model(d["student"], f"{section}.student")
    return cfg["datasets"][d["dataset"]].get("num_classes")


def _validate_ablations(cfg: dict) -> None:
    """Tables 1-6, 10, 11: known models, K within the class count, k within the channels."""
    a = cfg.get("ablations")
    if not a:
        return
    classes = _known_setting(cfg, "ablations")
    for k in a.get("groups", []):
        if classes and k > classes:
            raise KcdError(f"config key ablations.groups: K={k} is larger than the "
                           f"{classes} classes of {a['dataset']}; use K <= {classes}")
    ks = a.get("overlap_k", [])
    for k in ks:
        if k >= 1 and k != int(k):
            raise KcdError(f"config key ablations.overlap_k: {k} is neither a channel count "
                           "(an integer) nor a fraction of the channels (between 0 and 1)")
    if any(k >= 1 for k in ks) and 10 in a.get("tables", [10]):
        channels = min(model_channels(a["student"]), model_channels(a["teacher"]))
        for k in ks:
            if k > channels:
                raise KcdError(f"config key ablations.overlap_k: top-{int(k)} is more than the "
                               f"{channels} channels of the distilled layer; use k <= {channels}")


def _validate_figure1(cfg: dict) -> None:
    f = cfg.get("figure1")
    if not f:
        return
    classes = _known_setting(cfg, "figure1")
    c = f["class"]
    if isinstance(c, int) and classes and not 0 <= c < classes:
        raise KcdError(f"config key figure1.class: class {c} does not exist; "
                       f"{f['dataset']} has classes 0..{classes - 1}")


def _validate_detection(cfg: dict) -> None:
    d = cfg.get("detection")
    if not d:
        return
    from kcd.models import DETECTOR_BACKBONES as BACKBONES

    _known_dataset(cfg, d["dataset"], "detection.dataset")
    for i, b in enumerate([d["teacher"], *d["students"]]):
        if b not in BACKBONES:
            key = "detection.teacher" if i == 0 else "detection.students"
            raise KcdError(f"config key {key}: unknown detector backbone '{b}'; known: "
                           f"{', '.join(BACKBONES)}")
    if d.get("min_size", 800) > d.get("max_size", 1333):
        raise KcdError("config key detection.min_size: larger than detection.max_size")


def _detection(cfg: dict) -> dict:
    d = cfg.get("detection")
    if not d:
        raise KcdError("config key detection is missing; add it to build Table 9")
    return d


def detection_init_args(cfg: dict, backbone: str, seed: int, path: str) -> dict:
    """The keyword arguments of :func:`kcd.detection.init_detector` (theta0 of a detector)."""
    d = _detection(cfg)
    return {"backbone": backbone, "num_classes": num_classes(cfg, d["dataset"]), "seed": seed,
            "path": path, "fpn_channels": int(d.get("fpn_channels", 256)),
            "representation_size": int(d.get("representation_size", 1024))}


def detection_spec(cfg: dict, *, backbone: str, seed: int, theta0: str, out_dir: str,
                   teacher: str | None = None, teacher_weights: str | None = None,
                   transform: str | None = None, tags: dict | None = None):
    """The :class:`kcd.detection.DetectionSpec` of a detector's pre-training or distillation."""
    from kcd.specs import ANCHOR_SIZES, DetectionSpec

    d = _detection(cfg)
    ds = d["dataset"]
    distill = None
    if teacher is not None:
        distill = {"teacher": teacher, "teacher_weights": teacher_weights, "method": "l2",
                   "weight": float(d.get("weight", 1e-4)), "transform": transform}
    return from_dict(DetectionSpec, {
        "backbone": backbone, "seed": seed, "num_classes": num_classes(cfg, ds),
        "theta0": theta0, "out_dir": out_dir, "data": data_spec(cfg, ds).__dict__,
        "recipe": recipe(cfg, ds, backbone).__dict__,
        "min_size": int(d.get("min_size", 800)), "max_size": int(d.get("max_size", 1333)),
        "anchor_sizes": list(d.get("anchor_sizes", ANCHOR_SIZES)),
        "options": dict(d.get("options", {})),
        "warmup_iterations": int(d.get("warmup_iterations", 0)), "distill": distill,
        "tags": {"dataset": ds, "student": backbone, "seed": seed,
                 "method": "l2" if teacher else "pretrain", **(tags or {})},
    })


def detection_statistics_args(cfg: dict, *, teacher: str, teacher_weights: str, student: str,
                              student_weights: str, out: str) -> dict:
    """The keyword arguments of :func:`kcd.detection.detection_statistics` (JSON-ready)."""
    d = _detection(cfg)
    metric = kcd_metric(cfg)
    return {"teacher": teacher, "teacher_weights": teacher_weights, "student": student,
            "student_weights": student_weights, "data": data_spec(cfg, d["dataset"]).__dict__,
            "num_classes": num_classes(cfg, d["dataset"]), "out": out,
            "min_size": int(d.get("min_size", 800)), "max_size": int(d.get("max_size", 1333)),
            "metrics": [metric], "batch_size": int(d.get("statistics_batch_size", 8))}


def model_channels(arch: str) -> int:
    """Channels of ``arch``'s distilled layer (its default layer), from the model registry."""
    from kcd.models import model_spec

    return model_spec(arch).channels


def _known_model(name: str, key: str) -> None:
    from kcd.models import MODELS

    if name not in MODELS:
        raise KcdError(f"config key {key}: unknown architecture '{name}'; known: "
                       f"{', '.join(MODELS.names())}")


def dataset_config(cfg: dict, dataset: str) -> dict:
    try:
        return cfg["datasets"][dataset]
    except KeyError:
        raise KcdError(f"config key datasets.{dataset} is missing; add its root") from None


def data_spec(cfg: dict, dataset: str) -> DataSpec:
    """The :class:`DataSpec` of ``dataset`` (root, image size, loader)."""
    d = {k: v for k, v in dataset_config(cfg, dataset).items() if k != "num_classes"}
    return from_dict(DataSpec, {"name": dataset, **d}, f"datasets.{dataset}")


def num_classes(cfg: dict, dataset: str) -> int:
    """``datasets.<dataset>.num_classes``, else counted from the dataset on disk."""
    d = dataset_config(cfg, dataset)
    if d.get("num_classes"):
        return int(d["num_classes"])
    from kcd.data.datasets import num_classes as count_classes

    return count_classes(dataset, d["root"])


def recipe(cfg: dict, dataset: str, arch: str) -> Recipe:
    """The recipe for ``arch`` on ``dataset``: ``recipes.<dataset>.default`` + arch overrides."""
    try:
        table = cfg["recipes"][dataset]
    except KeyError:
        raise KcdError(f"config key recipes.{dataset} is missing") from None
    merged = deep_merge(table["default"], table.get(arch, {}))
    return from_dict(Recipe, merged, f"recipes.{dataset}")


def method_config(cfg: dict, dataset: str, method: str) -> dict:
    """``methods.<method>`` with ``method_overrides.<dataset>.<method>`` merged over it."""
    from kcd.losses import BASELINE, LOSSES

    if method == BASELINE:
        return {}

    LOSSES.get(method)
    base = cfg.get("methods", {}).get(method, {})
    over = cfg.get("method_overrides", {}).get(dataset, {}).get(method, {})
    return deep_merge(base, over)


def anchor_iterations(cfg: dict, dataset: str, arch: str) -> list[int]:
    """Iterations at which pre-training saves RCO anchors (the final weights are the last one).

    ``methods.rco.anchors`` = n anchors on the route: n - 1 evenly spaced intermediate
    checkpoints plus the trained teacher itself.
    """
    n = int(cfg.get("methods", {}).get("rco", {}).get("anchors", 0))
    total = recipe(cfg, dataset, arch).iterations
    return sorted({max(1, round(total * k / n)) for k in range(1, n)} - {total}) if n > 1 else []


def train_spec(
    cfg: dict,
    *,
    dataset: str,
    arch: str,
    seed: int,
    theta0: str,
    out_dir: str,
    method: str | None = None,
    teacher: str | None = None,
    teacher_weights: str | None = None,
    transforms: list[str | None] | None = None,
    anchors: list[str] | None = None,
    save_anchors: bool = False,
    tags: dict | None = None,
    **distill_extra: Any,
) -> TrainSpec:
    """The :class:`TrainSpec` of a pre-training (``method`` None) or distillation run.

    ``save_anchors``: a teacher's pre-training also saves RCO's anchor checkpoints.
    """

    _known_model(arch, "arch")
    distill = None
    if method is not None:
        mc = method_config(cfg, dataset, method)
        if teacher is not None:
            _known_model(teacher, "teacher")
        distill = {
            "method": method,
            "teacher": teacher,
            "teacher_weights": teacher_weights,
            "weight": mc.get("weight"),
            "options": mc.get("options", {}),
            "pre_relu": mc.get("pre_relu", False),
            "init_iterations": mc.get("init_iterations", 0),
            "transforms": transforms or [],
            "anchors": anchors or [] if method == "rco" else [],
            **distill_extra,
        }
    spec = {
        "arch": arch,
        "seed": seed,
        "num_classes": num_classes(cfg, dataset),
        "theta0": theta0,
        "out_dir": out_dir,
        "data": data_spec(cfg, dataset).__dict__,
        "recipe": recipe(cfg, dataset, arch).__dict__,
        "distill": distill,
        "anchor_iterations": (anchor_iterations(cfg, dataset, arch)
                              if method is None and save_anchors else []),
        "tags": {"dataset": dataset, "student": arch, "seed": seed,
                 "method": method or "pretrain", **(tags or {})},
    }
    return from_dict(TrainSpec, spec)


def statistics_spec(
    cfg: dict,
    *,
    dataset: str,
    teacher: str,
    teacher_weights: str,
    student: str,
    student_weights: str,
    out: str,
    groups: list[int] | None = None,
    layers: tuple[str | None, str | None] = (None, None),
    metrics: list[str] | None = None,
) -> StatisticsSpec:
    """The :class:`StatisticsSpec` of a teacher/student pair at their distillation layers."""
    from kcd.models import model_spec

    _known_model(teacher, "teacher")
    _known_model(student, "student")
    st = cfg.get("statistics", {})
    return StatisticsSpec(
        teacher=teacher, teacher_weights=teacher_weights, student=student,
        student_weights=student_weights,
        layers=[layers[0] or model_spec(teacher).default_layer,
                layers[1] or model_spec(student).default_layer],
        data=data_spec(cfg, dataset), num_classes=num_classes(cfg, dataset), out=out,
        metrics=list(metrics or st.get("metrics", ["correlation"])), groups=list(groups or []),
        group_metrics=[kcd_metric(cfg)],
        batch_size=int(st.get("batch_size", 256)),
        max_images=st.get("max_images"),
    )

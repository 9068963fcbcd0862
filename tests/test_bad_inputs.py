"""Every bad input a user can give ends in one line that names the offender and says what to do.

Table-driven: each case is a ``kcd`` command line run in-process against a workspace that
already holds good outputs (tiny demo data, weights, statistics, a transform). Each case checks
the exit status, that the last line of stderr is one ``kcd...error`` line naming the offending
file or key, that no traceback is printed, and that nothing in the workspace was changed or
deleted (a hash of every file before and after). Config cases also go through Snakemake's parse
(one dry run each), where the same line must be the last one.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from kcd.cli import main

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    id: str
    argv: Callable[[Path], list[str]] | list[str]
    names: str  # what the last line must contain (the offending file, key or value)
    prepare: Callable[[Path], None] | None = None  # write the bad input into the workspace
    extra: list[str] = field(default_factory=list)  # also in the last line


# --------------------------------------------------------------------------- the workspace


def _tiny_config(ws: Path) -> dict:
    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg["results"] = str(ws / "results")
    cfg["demo_data"]["root"] = str(ws / "demo")
    cfg["datasets"]["cifar100"]["root"] = str(ws / "demo")
    cfg["datasets"]["imagenet"]["root"] = str(ws / "demo" / "imagenet")
    cfg["datasets"]["imagenet"]["num_classes"] = 3
    cfg["datasets"]["coco"]["root"] = str(ws / "demo" / "coco")
    cfg["datasets"]["coco"]["num_classes"] = 4
    cfg["ablations"]["groups"] = [0, 1, 3]  # the tiny ImageFolder has 3 classes
    return cfg


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Good outputs of every step that later steps read, made with the real commands."""
    ws = tmp_path_factory.mktemp("ws")
    (ws / "config.yaml").write_text(yaml.safe_dump(_tiny_config(ws)))
    cfg = ["--config", str(ws / "config.yaml")]
    assert main(["demo-data", "--root", str(ws / "demo"), "--tiny", "-q",
                 "--kinds", "cifar100", "imagenet", "coco"]) == 0
    assert main(["init", "--arch", "resnet20", "--seed", "0", "--num-classes", "100",
                 "--out", str(ws / "w" / "resnet20.pt"), "-q"]) == 0
    assert main(["init", "--arch", "resnet32", "--seed", "0", "--num-classes", "100",
                 "--out", str(ws / "w" / "resnet32.pt"), "-q"]) == 0
    assert main(["init", "--arch", "resnet18", "--seed", "0", "--num-classes", "3",
                 "--out", str(ws / "w" / "r18.pt"), "-q"]) == 0
    assert main(["init", "-q", "--spec", json.dumps({
        "dataset": "coco", "backbone": "resnet18", "num_classes": 4, "seed": 0,
        "path": str(ws / "w" / "det18.pt"), "fpn_channels": 16, "representation_size": 32})]) == 0
    assert main(["statistics", *cfg, "--dataset", "cifar100", "--teacher", "resnet20",
                 "--teacher-weights", str(ws / "w" / "resnet20.pt"), "--student", "resnet20",
                 "--student-weights", str(ws / "w" / "resnet20.pt"),
                 "--out", str(ws / "s" / "stats.pt"), "-q"]) == 0
    assert main(["transform", "--stats", str(ws / "s" / "stats.pt"), "--strategy", "bipartite",
                 "--metric", "correlation", "--out", str(ws / "s" / "t.pt"), "-q"]) == 0
    return ws


def _hash_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _bad(ws: Path, name: str) -> Path:
    path = ws / "bad" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _write(name: str, content: bytes | str) -> Callable[[Path], None]:
    def prepare(ws: Path) -> None:
        p = _bad(ws, name)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return prepare


def _config_with(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def prepare(ws: Path) -> None:
        cfg = yaml.safe_load((ws / "config.yaml").read_text())
        change(cfg)
        _bad(ws, name).write_text(yaml.safe_dump(cfg))
    return prepare


def _set(path: str, value) -> Callable[[dict], None]:
    def change(cfg: dict) -> None:
        *parents, last = path.split(".")
        d = cfg
        for p in parents:
            d = d[p]
        d[last] = value
    return change


def _copy_truncated(src: str, name: str, keep: float = 0.5) -> Callable[[Path], None]:
    def prepare(ws: Path) -> None:
        data = (ws / src).read_bytes()
        _bad(ws, name).write_bytes(data[:int(len(data) * keep)])
    return prepare


def _torch_file(name: str, make: Callable[[Path], object]) -> Callable[[Path], None]:
    def prepare(ws: Path) -> None:
        import torch

        torch.save(make(ws), _bad(ws, name))
    return prepare


def _changed(src: str, name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    """A copy of the workspace's file ``src`` (statistics or transform) with ``change`` made."""
    def make(ws: Path):
        import torch

        payload = torch.load(ws / src, weights_only=True)
        change(payload)
        return payload
    return _torch_file(name, make)


def _nan_first(payload: dict) -> None:
    import math

    def walk(d):
        for k, v in d.items():
            if hasattr(v, "dtype") and v.is_floating_point() and v.numel():
                v.view(-1)[0] = math.nan
                return True
            if isinstance(v, dict) and walk(v):
                return True
        return False

    assert walk(payload)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch evil-ran",))


def _cifar_meta(ws: Path, meta: object) -> None:
    """A copy of the tiny CIFAR-100 folder with a replaced meta file."""
    import shutil

    dst = ws / "bad" / "cifar" / "cifar-100-python"
    shutil.copytree(ws / "demo" / "cifar-100-python", dst, dirs_exist_ok=True)
    (dst / "meta").write_bytes(pickle.dumps(meta, protocol=2) if not isinstance(meta, bytes)
                               else meta)


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _imagefolder(ws: Path, layout: dict[str, dict[str, bytes]], name: str = "imagenet") -> None:
    root = ws / "bad" / name
    for split, files in layout.items():
        for rel, data in files.items():
            p = root / split / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)


def _coco(ws: Path, name: str, content: str | None) -> None:
    """A copy of the tiny COCO folder whose training annotations are ``content`` (None: no
    annotation file)."""
    import shutil

    dst = ws / "bad" / name
    shutil.copytree(ws / "demo" / "coco", dst, dirs_exist_ok=True)
    ann = dst / "annotations" / "instances_train2017.json"
    if content is None:
        ann.unlink()
    else:
        ann.write_text(content)


def _coco_with_bad_box(ws: Path) -> str:
    ann = json.loads((ws / "demo" / "coco" / "annotations" / "instances_train2017.json")
                     .read_text())
    ann["annotations"][0]["bbox"] = [0, 0, -5, 10]
    return json.dumps(ann)


def _detector_statistics(ws: Path, root: str) -> list[str]:
    det = str(ws / "w" / "det18.pt")
    return ["statistics", "-q", "--spec", json.dumps({
        "teacher": "resnet18", "teacher_weights": det, "student": "resnet18",
        "student_weights": det, "data": {"name": "coco", "root": str(ws / "bad" / root)},
        "num_classes": 4, "out": str(ws / "out" / "det-stats.pt"), "min_size": 64,
        "max_size": 64, "batch_size": 2})]


# --------------------------------------------------------------------------- the cases


def _cfg(ws: Path, name: str = "config.yaml") -> list[str]:
    return ["--config", str(ws / name if name == "config.yaml" else ws / "bad" / name)]


def _init(ws: Path, config: list[str]) -> list[str]:
    return ["init", *config, "--arch", "resnet20", "--seed", "0", "--dataset", "cifar100",
            "--out", str(ws / "out" / "x.pt")]


def _evaluate(ws: Path, *more: str, config: list[str] | None = None,
              weights: Path | None = None) -> list[str]:
    return ["evaluate", *(config or _cfg(ws)), "--dataset", "cifar100", "--arch", "resnet20",
            "--weights", str(weights or ws / "w" / "resnet20.pt"),
            "--out", str(ws / "out" / "e.json"), "-q", *more]


def _transform(ws: Path, stats: str, *more: str) -> list[str]:
    return ["transform", "--stats", stats, "--strategy", "bipartite", "--metric",
            "correlation", "--out", str(ws / "out" / "t.pt"), "-q", *more]


CONFIG_CASES = [
    Case("config-missing-file", lambda ws: _init(ws, ["--config", str(ws / "nope.yaml")]),
         "nope.yaml"),
    Case("config-yaml-syntax", lambda ws: _init(ws, _cfg(ws, "syntax.yaml")), "syntax.yaml:4",
         _write("syntax.yaml", "seeds: [0]\nresults: r\nrecipes: {cifar100: [\n")),
    Case("config-not-a-mapping", lambda ws: _init(ws, _cfg(ws, "list.yaml")), "list.yaml",
         _write("list.yaml", "- 1\n- 2\n")),
    Case("config-unknown-key", lambda ws: _init(ws, _cfg(ws, "unknown.yaml")), "seedz",
         _config_with("unknown.yaml", _set("seedz", [0]))),
    Case("config-mistyped-seeds", lambda ws: _init(ws, _cfg(ws, "seeds.yaml")), "seeds",
         _config_with("seeds.yaml", _set("seeds", "zero"))),
    Case("config-negative-lr", lambda ws: _init(ws, _cfg(ws, "lr.yaml")),
         "recipes.cifar100.default.lr", _config_with("lr.yaml", _set(
             "recipes.cifar100.default.lr", -1))),
    Case("config-milestones-unsorted", lambda ws: _init(ws, _cfg(ws, "ms.yaml")), "milestones",
         _config_with("ms.yaml", _set("recipes.cifar100.default.milestones", [20, 10]))),
    Case("config-unknown-model", lambda ws: _init(ws, _cfg(ws, "model.yaml")), "resnet21",
         _config_with("model.yaml", _set("tables.table7.teacher", "resnet21"))),
    Case("config-unknown-resources-entry", lambda ws: _init(ws, _cfg(ws, "res.yaml")),
         "resources.pretrian", _config_with("res.yaml", _set("resources.pretrian", {"gpus": 1}))),
    Case("config-unknown-method", lambda ws: _init(ws, _cfg(ws, "method.yaml")), "dkd",
         _config_with("method.yaml", _set("methods.dkd", {"weight": 1}))),
    Case("config-unknown-method-option", lambda ws: _init(ws, _cfg(ws, "opt.yaml")),
         "methods.kd.options.temprature",
         _config_with("opt.yaml", _set("methods.kd.options", {"temprature": 4}))),
    Case("config-unknown-strategy", lambda ws: _init(ws, _cfg(ws, "strategy.yaml")),
         "kcd_transform", _config_with("strategy.yaml", _set("kcd_transform",
                                                             "hungarian-correlation"))),
    Case("config-unknown-metric", lambda ws: _init(ws, _cfg(ws, "metric.yaml")),
         "statistics.metrics", _config_with("metric.yaml", _set("statistics.metrics",
                                                                ["correlation", "emd"]))),
    Case("config-kcd-metric-not-computed", lambda ws: _init(ws, _cfg(ws, "kcdm.yaml")),
         "kcd_transform", _config_with("kcdm.yaml", _set("statistics.metrics", ["l1"]))),
    Case("config-groups-above-classes", lambda ws: _init(ws, _cfg(ws, "k.yaml")),
         "ablations.groups", _config_with("k.yaml", _set("ablations.groups", [0, 1, 11]))),
    Case("config-topk-above-channels", lambda ws: _init(ws, _cfg(ws, "topk.yaml")),
         "ablations.overlap_k", _config_with("topk.yaml", _set("ablations.overlap_k",
                                                               [10, 5000]))),
    Case("config-unknown-table-row", lambda ws: _init(ws, _cfg(ws, "row.yaml")), "Ours + XYZ",
         _config_with("row.yaml", _set("tables.table7.rows", ["Baseline", "Ours + XYZ"]))),
    Case("config-unknown-dataset", lambda ws: _init(ws, _cfg(ws, "ds.yaml")), "svhn",
         _config_with("ds.yaml", _set("datasets.svhn", {"root": "x", "num_classes": 10}))),
    Case("config-figure1-class", lambda ws: _init(ws, _cfg(ws, "fig.yaml")), "figure1.class",
         _config_with("fig.yaml", _set("figure1.class", 100))),
    Case("config-other-scale", lambda ws: _init(ws, ["--config", str(REPO / "config" /
                                                                     "paper.yaml"),
                                                     "--set", "scale=demo"]), "scale"),
    Case("config-set-not-key-value", lambda ws: _init(ws, ["--set", "seeds"]), "seeds"),
    Case("config-path-with-newline", lambda ws: _init(ws, _cfg(ws, "nl.yaml")), "results",
         _config_with("nl.yaml", _set("results", "res\nults"))),
    Case("config-detection-sizes", lambda ws: _init(ws, _cfg(ws, "det.yaml")),
         "detection.min_size", _config_with("det.yaml", _set("detection.min_size", 5000))),
]

CLI_CASES = [
    Case("cli-unknown-subcommand", ["distil"], "distil"),
    Case("cli-unknown-flag", ["pretrain", "--epochs", "3"], "--epochs"),
    Case("cli-spec-not-json", ["pretrain", "--spec", "{not json"], "--spec"),
    Case("cli-spec-json-list", ["pretrain", "--spec", "[1, 2]"], "--spec"),
    Case("cli-spec-json-number", ["pretrain", "--spec", "12"], "--spec"),
    Case("cli-spec-missing-file", lambda ws: ["pretrain", "--spec", str(ws / "nope.json")],
         "nope.json"),
    Case("cli-spec-unknown-key", ["pretrain", "--spec", json.dumps({"arch": "resnet20",
                                                                   "epochs": 3})], "epochs"),
    Case("cli-spec-missing-key", ["pretrain", "--spec", json.dumps({"arch": "resnet20"})],
         "seed"),
    Case("cli-spec-wrong-type", lambda ws: ["pretrain", "--spec", json.dumps(_pretrain_spec(
        ws, recipe={"iterations": "ten"}))], "iterations"),
    Case("cli-spec-batch-size-zero", lambda ws: ["pretrain", "--spec", json.dumps(_pretrain_spec(
        ws, recipe={"iterations": 2, "batch_size": 0, "lr": 0.1}))],
         "--spec key recipe.batch_size: 0 is less than the minimum of 1"),
    Case("cli-spec-negative-lr", lambda ws: ["pretrain", "--spec", json.dumps(_pretrain_spec(
        ws, recipe={"iterations": 2, "batch_size": 2, "lr": -1.0}))], "recipe.lr"),
    Case("cli-spec-binary-file", lambda ws: ["pretrain", "--spec", str(ws / "w" / "resnet20.pt")],
         "is not a text file"),
    Case("cli-spec-wrong-type-nested", lambda ws: ["pretrain", "--spec", json.dumps(
        _pretrain_spec(ws, data="cifar100"))], "data"),
    Case("cli-runtime-not-key-value", lambda ws: ["pretrain", "--spec", json.dumps(
        _pretrain_spec(ws)), "--runtime", "log_every"], "--runtime"),
    Case("cli-runtime-unknown-field", lambda ws: ["pretrain", "--spec", json.dumps(
        _pretrain_spec(ws)), "--runtime", "recipe.lr=1"], "recipe.lr"),
    Case("cli-plan-not-json", ["table", "--plan", "{", "--out", "x"], "--plan"),
    Case("cli-plan-missing-rows", ["table", "--plan", json.dumps({"table": 7}), "--out", "x"],
         "rows"),
    Case("cli-init-unknown-arch", lambda ws: ["init", "--arch", "resnet21", "--seed", "0",
                                              "--num-classes", "10", "--out",
                                              str(ws / "out" / "x.pt")], "resnet21"),
    Case("cli-init-bad-classes", lambda ws: ["init", "--arch", "resnet20", "--seed", "0",
                                             "--num-classes", "0", "--out",
                                             str(ws / "out" / "x.pt")], "num_classes"),
    Case("cli-transform-negative-lr", lambda ws: [
        "transform", "--stats", str(ws / "s" / "stats.pt"), "--strategy", "subnet-fc",
        "--lr", "-1", "--out", str(ws / "out" / "t.pt")], "--lr: -1 is not above 0"),
    Case("cli-transform-unknown-strategy", lambda ws: [
        "transform", "--stats", str(ws / "s" / "stats.pt"), "--strategy", "hungarian",
        "--metric", "correlation", "--out", str(ws / "out" / "t.pt")], "hungarian"),
    Case("cli-transform-unknown-metric", lambda ws: [
        "transform", "--stats", str(ws / "s" / "stats.pt"), "--strategy", "bipartite",
        "--metric", "emd", "--out", str(ws / "out" / "t.pt")], "emd"),
    Case("cli-transform-groups-not-computed", lambda ws: _transform(
        ws, str(ws / "s" / "stats.pt"), "--groups", "4"), "stats.pt"),
    Case("cli-transform-learned-without-pair", lambda ws: [
        "transform", "--strategy", "subnet-fc", "--metric", "correlation", "--out",
        str(ws / "out" / "t.pt")], "--teacher-weights"),
]


def _pretrain_spec(ws: Path, **change) -> dict:
    spec = {"arch": "resnet20", "seed": 0, "num_classes": 100,
            "theta0": str(ws / "w" / "resnet20.pt"), "out_dir": str(ws / "out" / "run"),
            "data": {"name": "cifar100", "root": str(ws / "demo")},
            "recipe": {"iterations": 2, "batch_size": 4, "lr": 0.01}}
    for k, v in change.items():
        if isinstance(v, dict) and isinstance(spec.get(k), dict):
            spec[k] = {**spec[k], **v}
        else:
            spec[k] = v
    return spec


DATA_CASES = [
    Case("data-root-missing", lambda ws: _evaluate(ws, config=_cfg(ws) + [
        "--set", f"datasets.cifar100.root={ws / 'nowhere'}"]), "nowhere"),
    Case("data-cifar-not-a-root", lambda ws: _evaluate(ws, config=_cfg(ws) + [
        "--set", f"datasets.cifar100.root={ws / 'w'}"]), "cifar-100-python"),
    Case("data-cifar-truncated-meta", lambda ws: _evaluate(ws, config=_cfg(ws) + [
        "--set", f"datasets.cifar100.root={ws / 'bad' / 'cifar'}"]), "meta",
        lambda ws: _cifar_meta(ws, pickle.dumps({"fine_label_names": ["a"] * 100})[:20])),
    Case("data-cifar-code-in-meta", lambda ws: _evaluate(ws, config=_cfg(ws) + [
        "--set", f"datasets.cifar100.root={ws / 'bad' / 'cifar'}"]), "meta",
        lambda ws: _cifar_meta(ws, {"fine_label_names": _Evil()})),
    Case("data-cifar-foreign-meta", lambda ws: _evaluate(ws, config=_cfg(ws) + [
        "--set", f"datasets.cifar100.root={ws / 'bad' / 'cifar'}"]), "meta",
        lambda ws: _cifar_meta(ws, {"label_names": ["a"] * 10})),
    Case("data-cifar-class-count", lambda ws: _evaluate(ws, config=_cfg(ws) + [
        "--set", "datasets.cifar100.num_classes=50"]), "datasets.cifar100.num_classes"),
    Case("data-imagefolder-empty", lambda ws: [
        "evaluate", *_cfg(ws), "--set", f"datasets.imagenet.root={ws / 'bad' / 'empty'}",
        "--dataset", "imagenet", "--arch", "resnet18", "--weights", str(ws / "w" / "r18.pt"),
        "--out", str(ws / "out" / "e.json"), "-q"], "empty",
        lambda ws: (ws / "bad" / "empty" / "train").mkdir(parents=True, exist_ok=True)),
    Case("data-imagefolder-class-mismatch", lambda ws: [
        "evaluate", *_cfg(ws), "--set", f"datasets.imagenet.root={ws / 'bad' / 'imagenet'}",
        "--dataset", "imagenet", "--arch", "resnet18", "--weights", str(ws / "w" / "r18.pt"),
        "--out", str(ws / "out" / "e.json"), "-q"], "datasets.imagenet.num_classes",
        lambda ws: _imagefolder(ws, {s: {f"n{i}/a.png": _png() for i in range(2)}
                                     for s in ("train", "val")})),
    Case("data-imagefolder-unreadable-image", lambda ws: [
        "evaluate", *_cfg(ws), "--set", f"datasets.imagenet.root={ws / 'bad' / 'broken'}",
        "--dataset", "imagenet", "--arch", "resnet18", "--weights", str(ws / "w" / "r18.pt"),
        "--out", str(ws / "out" / "e.json"), "-q"], "broken.png",
        lambda ws: _imagefolder(ws, {"train": {f"n{i}/a.png": _png() for i in range(3)},
                                     "val": {**{f"n{i}/a.png": _png() for i in range(3)},
                                             "n1/broken.png": b"not a png"}}, "broken")),
    Case("data-coco-annotations-missing", lambda ws: _detector_statistics(ws, "c1"),
         "instances_train2017.json", lambda ws: _coco(ws, "c1", None)),
    Case("data-coco-json-syntax", lambda ws: _detector_statistics(ws, "c2"),
         "instances_train2017.json", lambda ws: _coco(ws, "c2", '{"images": [')),
    Case("data-coco-json-foreign", lambda ws: _detector_statistics(ws, "c3"),
         "instances_train2017.json", lambda ws: _coco(ws, "c3", '{"licenses": []}')),
    Case("data-coco-box-outside-image", lambda ws: _detector_statistics(ws, "c4"),
         "instances_train2017.json", lambda ws: _coco(ws, "c4", _coco_with_bad_box(ws))),
    Case("cli-detect-spec-missing-key", ["statistics", "--spec", json.dumps(
        {"data": {"name": "coco", "root": "x"}})], "teacher"),
]

FILE_CASES = [
    Case("file-weights-missing", lambda ws: _evaluate(ws, weights=ws / "nope.pt"), "nope.pt"),
    Case("file-weights-truncated", lambda ws: _evaluate(ws, weights=ws / "bad" / "trunc.pt"),
         "trunc.pt", _copy_truncated("w/resnet20.pt", "trunc.pt")),
    Case("file-weights-foreign", lambda ws: _evaluate(ws, weights=ws / "bad" / "foreign.pt"),
         "foreign.pt", _write("foreign.pt", b"PK\x03\x04 this is no checkpoint")),
    Case("file-weights-not-a-model", lambda ws: _evaluate(ws, weights=ws / "s" / "t.pt"),
         "t.pt"),
    Case("file-weights-other-arch", lambda ws: _evaluate(ws, weights=ws / "w" / "resnet32.pt"),
         "resnet32"),
    Case("file-weights-pickled-code", lambda ws: _evaluate(ws, weights=ws / "bad" / "evil.pt"),
         "evil.pt", _torch_file("evil.pt", lambda ws: {"arch": "resnet20", "x": _Evil()})),
    Case("file-stats-missing", lambda ws: _transform(ws, str(ws / "nope.pt")), "nope.pt"),
    Case("file-stats-truncated", lambda ws: _transform(ws, str(ws / "bad" / "st.pt")), "st.pt",
         _copy_truncated("s/stats.pt", "st.pt")),
    Case("file-stats-foreign", lambda ws: _transform(ws, str(ws / "w" / "resnet20.pt")),
         "resnet20.pt"),
    Case("file-stats-nan", lambda ws: _transform(ws, str(ws / "bad" / "nan.pt")), "nan.pt",
         _changed("s/stats.pt", "nan.pt", _nan_first)),
    Case("file-stats-wrong-shape", lambda ws: _transform(ws, str(ws / "bad" / "shape.pt")),
         "shape.pt", _changed("s/stats.pt", "shape.pt", lambda p: p["global"].update(
             c_t=p["global"]["c_t"] + 3))),
    Case("file-stats-missing-key", lambda ws: _transform(ws, str(ws / "bad" / "nokey.pt")),
         "nokey.pt lack global", _changed("s/stats.pt", "nokey.pt", lambda p: p.pop("global"))),
    Case("file-transform-truncated", lambda ws: _evaluate(
        ws, "--teacher", "resnet20", "--teacher-weights", str(ws / "w" / "resnet20.pt"),
        "--transform", str(ws / "bad" / "tt.pt")), "tt.pt", _copy_truncated("s/t.pt", "tt.pt")),
    Case("file-transform-foreign", lambda ws: _evaluate(
        ws, "--teacher", "resnet20", "--teacher-weights", str(ws / "w" / "resnet20.pt"),
        "--transform", str(ws / "s" / "stats.pt")), "stats.pt"),
    Case("file-transform-bad-index", lambda ws: _evaluate(
        ws, "--teacher", "resnet20", "--teacher-weights", str(ws / "w" / "resnet20.pt"),
        "--transform", str(ws / "bad" / "tidx.pt")), "tidx.pt",
        _changed("s/t.pt", "tidx.pt", lambda p: p["index"].add_(1000))),
    Case("file-transform-other-pair", lambda ws: _evaluate(
        ws, "--teacher", "resnet32", "--teacher-weights", str(ws / "w" / "resnet32.pt"),
        "--transform", str(ws / "s" / "t.pt")), "t.pt"),
]

NUMERIC_CASES = [
    Case("numeric-diverging-run", lambda ws: ["pretrain", "--spec", json.dumps(_pretrain_spec(
        ws, recipe={"lr": 1e12, "iterations": 4, "batch_size": 8})), "--no-track", "-q"],
        "learning rate", extra=["recipes.cifar100.default.lr"]),
]

CASES = CONFIG_CASES + CLI_CASES + DATA_CASES + FILE_CASES + NUMERIC_CASES


def test_there_are_at_least_sixty_cases():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_is_one_line_naming_it(case: Case, workspace: Path, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if case.prepare:
        case.prepare(workspace)
        capsys.readouterr()
    before = _hash_tree(workspace)
    argv = case.argv(workspace) if callable(case.argv) else case.argv
    code, err = _run(argv, capsys)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code != 0, err
    assert lines, "no error message"
    last = lines[-1]
    assert "error" in last and last.startswith("kcd"), err[-2000:]
    assert case.names in last, last
    for word in case.extra:
        assert word in last, last
    assert "Traceback" not in err
    after = _hash_tree(workspace)
    assert {k: v for k, v in before.items() if k in after} == {k: after[k] for k in before
                                                               if k in after}
    assert set(before) <= set(after), "a file was deleted"
    assert not (workspace / "evil-ran").exists()


# --------------------------------------------------------------------------- through Snakemake

WORKFLOW_CASES = [
    ("seeds", "zero", "config key seeds"),
    ("kcd_transform", "hungarian-correlation", "config key kcd_transform"),
    ("datasets.cifar100.root", "/no/such/cifar", "datasets.cifar100.root"),
]


@pytest.mark.parametrize("key,value,names", WORKFLOW_CASES, ids=[c[0] for c in WORKFLOW_CASES])
def test_a_bad_config_stops_snakemake_with_the_same_line(key, value, names, tmp_path):
    cfg = _tiny_config(tmp_path)
    _set(key, value)(cfg)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "demo.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s",
                          str(REPO / "workflow" / "Snakefile"), "-d", str(tmp_path), "-n",
                          f"{cfg['results']}/table7.csv"], cwd=tmp_path, capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("kcd: error:") and names in last, run.stderr[-2000:]
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("required", [True, False], ids=["required", "not-required"])
def test_an_unusable_tracking_store_at_the_start_is_one_line(required, tmp_path):
    """The workflow prepares the MLflow store before its first job: a server that does not
    answer stops it with one line when tracking is required, and is one warning otherwise
    (the jobs run, untracked), never a traceback after minutes of MLflow's retries."""
    import socket

    with socket.socket() as s:  # a port with no server behind it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _tiny_config(tmp_path)
    cfg["tracking"] = {"uri": f"http://127.0.0.1:{port}", "required": required}
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "demo.yaml").write_text(yaml.safe_dump(cfg))
    target = f"{cfg['results']}/cifar100/init/resnet20_0.5x-s0.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s",
                          str(REPO / "workflow" / "Snakefile"), "-d", str(tmp_path),
                          "--cores", "1", target], cwd=tmp_path, capture_output=True,
                         text=True, env=env, timeout=300)
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    problem = f"MLflow store http://127.0.0.1:{port} cannot be used (no answer from the server"
    if required:
        assert run.returncode == 1 and not (tmp_path / target).exists()
        last = run.stderr.strip().splitlines()[-1]
        assert last.startswith(f"kcd: error: {problem}") and "tracking.required" in last
    else:
        assert run.returncode == 0, run.stderr[-3000:]
        assert (tmp_path / target).exists()
        assert f"kcd: warning: {problem}" in run.stderr


@pytest.mark.parametrize("launcher", ["debug", "local"])
def test_a_launched_jobs_bad_input_ends_with_kcds_line(launcher, tmp_path):
    """Through kcd.launch in its own process (debug) or in a submitit job (local without the
    warm worker; SLURM takes the same path): kcd's one-line error is the last line, with no
    traceback after it, and the launcher fails."""
    from kcd.warm import ENV

    env = {k: v for k, v in os.environ.items() if k != ENV}
    run = subprocess.run([sys.executable, "-m", "kcd.launch", "--launcher", launcher,
                          "--log-dir", str(tmp_path / "jobs"), "--", "init", "--arch",
                          "resnet21", "--seed", "0", "--num-classes", "10", "--out",
                          str(tmp_path / "x.pt")], cwd=tmp_path, capture_output=True,
                         text=True, env=env, timeout=120)
    assert run.returncode != 0
    out = run.stdout + run.stderr
    assert "Traceback" not in out, out[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("kcd: error: unknown model 'resnet21'"), out[-3000:]
    assert not (tmp_path / "x.pt").exists()

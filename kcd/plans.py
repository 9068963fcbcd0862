"""The pipeline's plans: which jobs make which row of which table, and the spec of each job.

:class:`Plans` turns a resolved config and a :class:`~kcd.layout.Layout` into plain data: the
spec (a JSON-ready dict) each Snakemake rule hands its ``kcd`` subcommand, the files each job
reads, and each table's plan (which run results make each cell, which row of the paper's table
each row is compared with). The workflow's ``rules/common.smk`` only calls these, so the whole
DAG's content is testable without Snakemake (``tests/test_plans.py``).
"""
from __future__ import annotations

import functools
import json
from dataclasses import replace
from typing import Any, Callable

from kcd.config import (
    RESOURCE_RULES,
    anchor_iterations,
    data_spec,
    detection_init_args,
    detection_spec,
    detection_statistics_args,
    method_config,
    num_classes,
    statistics_spec,
    train_spec,
)
from kcd.data import DATASETS, EVAL_SPLIT, TRAIN_SPLIT, demo_folders
from kcd.errors import KcdError
from kcd.layout import Layout
from kcd.losses import BASELINE, LOSSES
from kcd.models import model_spec
from kcd.naming import NO_TRANSFORM, parse_transform_name
from kcd.specs import DecodeSpec, TeacherOutputsSpec, to_dict
from kcd.tables import (
    ABLATION_TITLES,
    ABLATIONS,
    FEATURE_CONSISTENCY_ROWS,
    KCD,
    ablation_rows,
    comparison_row,
    overlap_column,
    row_label,
)

COMPARISON_TITLES = {"table7": "comparison with other methods on CIFAR-100",
                     "table8": "comparison with other methods on ImageNet"}
DETECTION_ROWS = (("Student", BASELINE, NO_TRANSFORM), ("L2", "l2", NO_TRANSFORM),
                  ("Ours", "l2", KCD))
"""Table 9: each student pre-trained, with L2, and with L2 to the transformed teacher."""


class Plans:
    """The jobs and tables of one resolved config, on one results layout."""

    def __init__(self, cfg: dict, layout: Layout | None = None) -> None:
        self.layout = layout or Layout(cfg["results"])
        self.cfg = self._with_decoded(cfg)
        self.seeds: list[int] = list(cfg["seeds"])
        self.tseed = int(cfg.get("teacher_seed", 0))
        self.kcd = cfg.get("kcd_transform", "bipartite-correlation")
        self.ablations: dict = cfg.get("ablations") or {}
        self.figure1_cfg: dict = cfg.get("figure1") or {}
        self.detection: dict = cfg.get("detection") or {}

    # ------------------------------------------------------------------ data

    def _with_decoded(self, cfg: dict) -> dict:
        """``cfg`` with ``datasets.<ds>.decoded`` set where the workflow decodes the splits
        once (:meth:`decodes`), so that every spec built from it reads them."""
        datasets = {ds: ({**entry, "decoded": self.layout.decoded(ds)}
                         if self._decodes(ds, entry) else entry)
                    for ds, entry in cfg.get("datasets", {}).items()}
        return {**cfg, "datasets": datasets}

    @staticmethod
    def _decodes(ds: str, entry: dict) -> bool:
        spec = DATASETS.get(ds) if ds in DATASETS else None
        return bool(spec and spec.image_files and entry.get("fast_loader", True)
                    and not entry.get("augment", True))

    def decodes(self, ds: str) -> bool:
        """Whether ``ds``'s splits are decoded once (rule decode): image files, the fast
        loader on and no training augmentation."""
        return self._decodes(ds, self.cfg.get("datasets", {}).get(ds, {}))

    def decode_spec(self, ds: str, split: str) -> dict:
        """``kcd decode --spec``: one split of an image-folder dataset, decoded once."""
        data = replace(data_spec(self.cfg, ds), decoded=None)
        return to_dict(DecodeSpec(data=data, split=split,
                                  out=f"{self.layout.decoded(ds)}/{split}.pt"))

    DEMO_FOLDERS = demo_folders()  # each demo dataset's folder under the demo root

    @property
    def demo_root(self) -> str:
        return self.cfg.get("demo_data", {}).get("root", "resources/demo")

    def demo_args(self, folder: str) -> list[str]:
        """``kcd demo-data``'s arguments for the demo dataset in ``folder`` (demo_data.*)."""
        kind = next(k for k, f in self.DEMO_FOLDERS.items() if f == folder)
        demo = self.cfg.get("demo_data", {})
        return (["--root", self.demo_root, "--seed", str(demo.get("seed", 0)), "--kinds", kind]
                + (["--tiny"] if demo.get("size") == "tiny" else []))

    def data_input(self, ds: str, decoded: bool = True) -> list[str]:
        """What a job reading ``ds`` needs: the demo data's manifest (which makes the rule
        that writes the demo data run first) when ``ds`` lies in the demo folder, else nothing
        (a real dataset's root, checked to exist); and its decoded splits when it has them
        (``decoded`` false: not those, for the job that decodes them)."""
        from pathlib import Path

        entry = self.cfg.get("datasets", {}).get(ds)
        if entry is None:
            raise KcdError(f"dataset '{ds}' has no entry under datasets in the config; add "
                           f"datasets.{ds}.root")
        decoded = ([f"{self.layout.decoded(ds)}/{split}.pt" for split in (TRAIN_SPLIT, EVAL_SPLIT)]
                   if decoded and self.decodes(ds) else [])
        root, demo = Path(entry["root"]).resolve(), Path(self.demo_root).resolve()
        if root == demo or demo in root.parents:
            folder = DATASETS.get(ds).demo_folder
            if folder is None:
                raise KcdError(f"config key datasets.{ds}.root: {entry['root']} lies in the demo "
                               f"folder (demo_data.root), but the demo has no {ds} data; point "
                               f"it at your {ds} copy")
            return [f"{self.demo_root}/{folder}/.kcd-demo.json", *decoded]
        if not root.is_dir():
            raise KcdError(f"dataset root {entry['root']} (config key datasets.{ds}.root) "
                           f"does not exist; point it at your {ds} copy")
        return decoded

    # ------------------------------------------------------------------ training jobs

    def teachers(self, ds: str) -> set[str]:
        """The teachers of the comparison tables on ``ds`` (they save RCO's anchors)."""
        return {t["teacher"] for t in self.cfg.get("tables", {}).values() if t["dataset"] == ds}

    def anchors(self, ds: str, teacher: str, tseed: object) -> list[str]:
        """RCO's route: the teacher's intermediate checkpoints, then the teacher itself."""
        return [self.layout.anchor(ds, teacher, tseed, i)
                for i in anchor_iterations(self.cfg, ds, teacher)] + [
            self.layout.final(ds, teacher, tseed)]

    def task(self, ds: str) -> str:
        """The dataset's task (:data:`kcd.data.DATASETS`): which engine its jobs run."""
        return DATASETS.get(ds).task

    def init_spec(self, ds: str, arch: str, seed: object) -> dict:
        """``kcd init --spec``: theta0 of a classifier or of a detector."""
        if self.task(ds) == "detection":
            return {"dataset": ds, **self.detect_init_spec(ds, arch, seed)}
        return {"dataset": ds, "arch": arch, "seed": int(seed),
                "num_classes": num_classes(self.cfg, ds), "path": self.layout.theta0(ds, arch, seed)}

    def pretrain_spec(self, ds: str, arch: str, seed: object) -> dict:
        if self.task(ds) == "detection":
            return self.detect_pretrain_spec(ds, arch, seed)
        L = self.layout
        return to_dict(train_spec(
            self.cfg, dataset=ds, arch=arch, seed=int(seed), theta0=L.theta0(ds, arch, seed),
            out_dir=L.model_dir(ds, arch, seed), save_anchors=arch in self.teachers(ds)))

    def run_transforms(self, ds: str, teacher: str, tseed: object, student: str, seed: object,
                       transform: str) -> list[str]:
        """The transform file a run reads (none for ``none``)."""
        path = self.layout.run_transform(ds, teacher, tseed, student, seed, transform)
        return [path] if path else []

    def dynamic_options(self, transform: str) -> dict:
        """Table 5's Dynamic: recompute the transform every E iterations (``+dyn`` names)."""
        name = parse_transform_name(transform)
        if name is None or not name.dynamic:
            return {}
        return {"dynamic_every": int(self.ablations.get("dynamic_every", 20)),
                "dynamic_metric": name.metric, "dynamic_strategy": name.strategy}

    def distill_spec(self, ds: str, teacher: str, tseed: object, student: str, method: str,
                     transform: str, seed: object) -> dict:
        if self.task(ds) == "detection":
            return self.detect_distill_spec(ds, teacher, tseed, student, method, transform, seed)
        L = self.layout
        spec = to_dict(train_spec(
            self.cfg, dataset=ds, arch=student, seed=int(seed),
            theta0=L.theta0(ds, student, seed),
            out_dir=L.run_dir(ds, teacher, tseed, student, method, transform, seed),
            method=method, teacher=teacher, teacher_weights=L.final(ds, teacher, tseed),
            transforms=self.run_transforms(ds, teacher, tseed, student, seed, transform) or None,
            anchors=self.anchors(ds, teacher, tseed),
            tags={"teacher": teacher, "teacher_seed": int(tseed), "transform": transform,
                  "row": row_label(method, transform, self.kcd) or ""},
            **self.dynamic_options(transform),
        ))
        if method != BASELINE:
            spec["distill"].update(self.cached_teacher_outputs(
                ds, teacher, tseed, anchors=bool(spec["distill"]["anchors"])))
        return spec

    # ------------------------------------------------------------------ teacher outputs

    def caches_teacher_outputs(self, ds: str) -> bool:
        """``cache_teacher_outputs``: runs read their teacher's answers from files computed
        once (classification only)."""
        return bool(self.cfg.get("cache_teacher_outputs")) and self.task(ds) == "classification"

    def cached_teacher_outputs(self, ds: str, teacher: str, tseed: object,
                               anchors: bool = False) -> dict:
        """A run's ``distill.teacher_eval_outputs`` and, when the training images are not
        augmented, ``distill.teacher_outputs`` (for an RCO run with ``anchors``:
        ``distill.anchor_outputs``, one file per anchor of its route, the teacher's own
        last): the teacher's files (none when not cached). The evaluation is the final
        teacher's, which is also the last anchor."""
        if not self.caches_teacher_outputs(ds):
            return {}
        L = self.layout
        fields: dict = {"teacher_eval_outputs": L.teacher_outputs(ds, teacher, tseed, EVAL_SPLIT)}
        if not data_spec(self.cfg, ds).augment:
            final = L.teacher_outputs(ds, teacher, tseed, TRAIN_SPLIT)
            if anchors:
                fields["anchor_outputs"] = [
                    L.anchor_outputs(ds, teacher, tseed, i)
                    for i in anchor_iterations(self.cfg, ds, teacher)] + [final]
            else:
                fields["teacher_outputs"] = final
        return fields

    def run_teacher_outputs(self, ds: str, teacher: str, tseed: object, student: str,
                            method: str, transform: str, seed: object) -> list[str]:
        """The teacher-outputs files a run reads (its rule's inputs)."""
        if self.task(ds) == "detection":
            return []
        d = self.distill_spec(ds, teacher, tseed, student, method, transform, seed)["distill"]
        return [p for p in (d.get("teacher_outputs"), d.get("teacher_eval_outputs"),
                            *d.get("anchor_outputs", [])) if p]

    def teacher_layers(self, ds: str, teacher: str) -> list[str]:
        """Every teacher layer a run may distil: the teacher's distillation layer, and the
        same before its ReLU for the methods configured with ``pre_relu`` (AB)."""
        return sorted({self.method_layer(ds, teacher, name)
                       for name, method in LOSSES.items() if method.features})

    def method_layer(self, ds: str, teacher: str, method: str) -> str:
        """The teacher layer ``method`` distils: the teacher's distillation layer, before its
        ReLU when the method is configured with ``pre_relu``."""
        pre_relu = method_config(self.cfg, ds, method).get("pre_relu")
        return model_spec(teacher).default_layer + (":pre_relu" if pre_relu else "")

    def _outputs_spec(self, ds: str, teacher: str, weights: str, split: str,
                      layers: list[str], out: str) -> dict:
        return to_dict(TeacherOutputsSpec(
            teacher=teacher, teacher_weights=weights, num_classes=num_classes(self.cfg, ds),
            data=data_spec(self.cfg, ds), split=split, layers=layers, out=out,
            batch_size=int(self.cfg.get("statistics", {}).get("batch_size", 256))))

    def teacher_outputs_spec(self, ds: str, teacher: str, tseed: object, split: str) -> dict:
        """``kcd teacher-outputs --spec``: the teacher's answers on ``split``, computed once."""
        L = self.layout
        return self._outputs_spec(ds, teacher, L.final(ds, teacher, tseed), split,
                                  self.teacher_layers(ds, teacher),
                                  L.teacher_outputs(ds, teacher, tseed, split))

    def anchor_outputs_spec(self, ds: str, teacher: str, tseed: object, iteration: object
                            ) -> dict:
        """``kcd teacher-outputs --spec`` for an RCO anchor (the teacher at ``iteration`` of
        its pre-training): its answers on the training split at RCO's layer."""
        L, it = self.layout, int(iteration)
        return self._outputs_spec(ds, teacher, L.anchor(ds, teacher, tseed, it), TRAIN_SPLIT,
                                  [self.method_layer(ds, teacher, "rco")],
                                  L.anchor_outputs(ds, teacher, tseed, it))

    # ------------------------------------------------------------------ statistics, transforms

    def stats_groups(self, ds: str, teacher: str, tw: str, student: str, sw: str) -> list[int]:
        """Table 6's per-class statistics (K > 1), computed for the ablation pair's trained
        weights only: its K-group transforms are computed from them, never from theta0 (Tables
        3 and 4's theta0 pairs would otherwise carry a cross matrix per group they never read:
        at demo scale 316 MB of each 379 MB file)."""
        a = self.ablations
        if (ds, teacher, student) != (a.get("dataset"), a.get("teacher"), a.get("student")) \
                or 6 not in self.ablation_tables() \
                or self.layout.is_theta0(tw) or self.layout.is_theta0(sw):
            return []
        return sorted(k for k in a.get("groups", []) if k > 1)

    def stats_spec(self, ds: str, teacher: str, tw: str, student: str, sw: str) -> dict:
        if self.task(ds) == "detection":
            return self.detect_stats_spec(ds, teacher, tw, student, sw)
        L = self.layout
        return to_dict(statistics_spec(
            self.cfg, dataset=ds, teacher=teacher, teacher_weights=L.weights(ds, teacher, tw),
            student=student, student_weights=L.weights(ds, student, sw),
            out=L.stats(ds, teacher, tw, student, sw),
            groups=self.stats_groups(ds, teacher, tw, student, sw)))

    def learn_spec(self, ds: str, teacher: str, tw: str, student: str, sw: str,
                   name: str) -> dict:
        """A learned transform reads the pair's models and data: a statistics spec carries
        them."""
        L = self.layout
        return to_dict(statistics_spec(
            self.cfg, dataset=ds, teacher=teacher, teacher_weights=L.weights(ds, teacher, tw),
            student=student, student_weights=L.weights(ds, student, sw),
            out=L.transform(ds, teacher, tw, student, sw, name)))

    @staticmethod
    def transform_args(file_name: str) -> list[str]:
        """``kcd transform`` flags of a transform file name: strategy, metric and K groups."""
        name = parse_transform_name(file_name)
        return ["--strategy", name.strategy, "--metric", name.metric,
                "--groups", str(name.groups)]

    def learned_args(self) -> list[str]:
        learned = self.ablations.get("learned", {})
        return ["--steps", str(int(learned.get("steps", 200))),
                "--lr", str(float(learned.get("lr", 1e-3))),
                "--batch-size", str(int(learned.get("batch_size", 128)))]

    # ------------------------------------------------------------------ detection jobs

    def detect_init_spec(self, ds: str, arch: str, seed: object) -> dict:
        return detection_init_args(self.cfg, arch, int(seed), self.layout.theta0(ds, arch, seed))

    def detect_pretrain_spec(self, ds: str, arch: str, seed: object) -> dict:
        L = self.layout
        return to_dict(detection_spec(self.cfg, backbone=arch, seed=int(seed),
                                      theta0=L.theta0(ds, arch, seed),
                                      out_dir=L.model_dir(ds, arch, seed)))

    def detect_distill_spec(self, ds: str, teacher: str, tseed: object, student: str,
                            method: str, transform: str, seed: object) -> dict:
        L = self.layout
        return to_dict(detection_spec(
            self.cfg, backbone=student, seed=int(seed), theta0=L.theta0(ds, student, seed),
            out_dir=L.run_dir(ds, teacher, tseed, student, method, transform, seed),
            teacher=teacher, teacher_weights=L.final(ds, teacher, tseed),
            transform=L.run_transform(ds, teacher, tseed, student, seed, transform),
            tags={"teacher": teacher, "teacher_seed": int(tseed), "transform": transform}))

    def detect_stats_spec(self, ds: str, teacher: str, tw: str, student: str, sw: str) -> dict:
        L = self.layout
        return detection_statistics_args(
            self.cfg, teacher=teacher, teacher_weights=L.weights(ds, teacher, tw),
            student=student, student_weights=L.weights(ds, student, sw),
            out=L.stats(ds, teacher, tw, student, sw))

    # ------------------------------------------------------------------ analyses

    def ablation_tables(self) -> list[int]:
        return list(self.ablations.get("tables", [])) if self.ablations else []

    def ablation_setting(self) -> tuple[str, str, str]:
        a = self.ablations
        return a["dataset"], a["teacher"], a["student"]

    def _teacher_views(self, ds: str, teacher: str, student: str, seed: int) -> dict:
        """T (the teacher) and T(T) (the teacher through the KCD transform of its pair)."""
        weights = self.layout.final(ds, teacher, self.tseed)
        return {"T": {"arch": teacher, "weights": weights},
                "T(T)": {"arch": teacher, "weights": weights,
                         "transform": self.layout.run_transform(ds, teacher, self.tseed,
                                                                student, seed, self.kcd)}}

    def overlap_spec(self) -> dict:
        """Table 10: S (seed s0), S2 (another seed), T and the transformed T(T)."""
        ds, teacher, student = self.ablation_setting()
        s0, s2 = self.seeds[0], int(self.ablations.get("second_seed", 1))
        L = self.layout
        return {
            "data": to_dict(data_spec(self.cfg, ds)), "num_classes": num_classes(self.cfg, ds),
            "models": {"S": {"arch": student, "weights": L.final(ds, student, s0)},
                       "S2": {"arch": student, "weights": L.final(ds, student, s2)},
                       **self._teacher_views(ds, teacher, student, s0)},
            "pairs": [["S vs T", "S", "T"], ["S1 vs S2", "S", "S2"],
                      ["S vs T(T)", "S", "T(T)"]],
            "ks": self.ablations.get("overlap_k", [10, 20, 50, 100]),
            "out": L.analysis(ds, "overlap.json"),
        }

    def _kcd(self, name: str) -> str:
        return self.kcd if name == KCD else name

    def consistency_spec(self) -> dict:
        """Table 11: KL of outputs and feature L2 between the teacher and each row's student."""
        ds, teacher, student = self.ablation_setting()
        L = self.layout
        rows = []
        for r in FEATURE_CONSISTENCY_ROWS:
            for seed in self.seeds:
                rows.append({
                    "label": r.label, "seed": seed,
                    "weights": L.run_file(ds, teacher, self.tseed, student, r.method,
                                          self._kcd(r.transform), seed, file="final.pt"),
                    "transform": L.run_transform(ds, teacher, self.tseed, student, seed,
                                                 self._kcd(r.view)),
                })
        return {
            "data": to_dict(data_spec(self.cfg, ds)), "num_classes": num_classes(self.cfg, ds),
            "teacher": {"arch": teacher, "weights": L.final(ds, teacher, self.tseed)},
            "student": student, "rows": rows, "out": L.analysis(ds, "feature_consistency.json"),
        }

    def figure1_spec(self) -> dict:
        f = self.figure1_cfg
        ds, teacher, student = f["dataset"], f["teacher"], f["student"]
        s1, s2 = f.get("seeds", [0, 1])
        L = self.layout
        return {
            "data": to_dict(data_spec(self.cfg, ds)), "num_classes": num_classes(self.cfg, ds),
            "class_": f["class"],
            "models": {"S1": {"arch": student, "weights": L.final(ds, student, s1)},
                       "S2": {"arch": student, "weights": L.final(ds, student, s2)},
                       **self._teacher_views(ds, teacher, student, s1)},
            "out": L.figure1,
        }

    @staticmethod
    def spec_inputs(spec: dict) -> list[str]:
        """Every file an analysis spec reads (weights, transforms)."""
        paths = []
        models = list(spec.get("models", {}).values()) + [spec.get("teacher") or {}]
        for m in models + spec.get("rows", []):
            paths += [m[k] for k in ("weights", "transform") if m.get(k)]
        return sorted(set(paths))

    # ------------------------------------------------------------------ tables

    def comparison_plan(self, name: str) -> dict:
        """Table 7/8: which result.json makes each cell (all seeds)."""
        t = self.cfg["tables"][name]
        ds, teacher = t["dataset"], t["teacher"]
        L = self.layout
        rows = []
        for label in t["rows"]:
            row = comparison_row(label, self.kcd)
            cells = {s: [L.run_file(ds, teacher, self.tseed, s, row.method, row.transform, seed)
                         for seed in self.seeds] for s in t["students"]}
            rows.append({"label": label, "method": row.method, "transform": row.transform,
                         "cells": cells})
        return {"table": int(name.removeprefix("table")),
                "title": COMPARISON_TITLES.get(name, name), "dataset": ds, "teacher": teacher,
                "teacher_results": [L.model_file(ds, teacher, self.tseed)],
                "columns": list(t["students"]), "rows": rows, "metric": "top1",
                "scale": self.cfg["scale"]}

    def ablation_plan(self, n: int) -> dict:
        """Ablation Table n (1-6): the ablation pair's runs for each row."""
        ds, teacher, student = self.ablation_setting()
        L = self.layout
        rows = []
        for r in ablation_rows(n, self.kcd, groups=self.ablations.get("groups", [0, 1]),
                               reinit_seeds=self.ablations.get("reinit_seeds", []),
                               teacher_seed=self.tseed, seeds=self.seeds):
            tseed = self.tseed if r.teacher_seed is None else r.teacher_seed
            seeds = list(r.seeds) if r.seeds is not None else self.seeds
            rows.append({"label": r.label, "method": r.method, "transform": r.transform,
                         "paper": [list(m) for m in r.paper],
                         "cells": {student: [L.run_file(ds, teacher, tseed, student, r.method,
                                                        r.transform, seed) for seed in seeds]}})
        return {"table": n, "title": ABLATION_TITLES[n], "dataset": ds, "teacher": teacher,
                "teacher_results": [L.model_file(ds, teacher, self.tseed)],
                # the paper gives the ablations' teacher (ResNet-50 on ImageNet) in Table 8
                "teacher_paper": {"table": 8, "match": [["teacher", teacher]],
                                  "column": "teacher_top1"},
                "columns": [student], "paper_value": "top1", "rows": rows, "metric": "top1",
                "scale": self.cfg["scale"]}

    def overlap_plan(self, n: int = 10) -> dict:
        ds, teacher, student = self.ablation_setting()
        spec = self.overlap_spec()
        columns = [overlap_column(k) for k in spec["ks"]]
        rows = [{"label": label, "paper": [["models", label]],
                 "cells": {c: [{"path": spec["out"], "keys": [label, c]}] for c in columns}}
                for label, _, _ in spec["pairs"]]
        return {"table": 10, "title": "channel overlap (%) of the top-k channels per class",
                "dataset": ds, "columns": columns, "rows": rows, "row_header": "Models",
                "scale": self.cfg["scale"], "digits": 1,
                "description": f"{student} students (seeds {self.seeds[0]} and "
                               f"{self.ablations.get('second_seed', 1)}), {teacher} teacher and "
                               f"the teacher after the {self.kcd} transform (T(T)); per class, "
                               "the top-k channels by class-averaged activation over the "
                               "training images, overlap averaged over classes, in percent."}

    def consistency_plan(self, n: int = 11) -> dict:
        ds, teacher, student = self.ablation_setting()
        out = self.layout.analysis(ds, "feature_consistency.json")
        rows = []
        for r in FEATURE_CONSISTENCY_ROWS:
            columns = ("kl_divergence", "l2_distance") if r.kl else ("l2_distance",)
            rows.append({"label": r.label, "paper": [["row", r.paper_row]], "note": r.note,
                         "cells": {c: [{"path": out, "keys": [r.label, f"s{seed}", c]}
                                       for seed in self.seeds] for c in columns}})
        return {"table": 11, "title": "feature consistency between teacher and student",
                "dataset": ds, "columns": ["kl_divergence", "l2_distance"],
                "column_labels": {"kl_divergence": "KL", "l2_distance": "L2"}, "rows": rows,
                "row_header": "Models", "scale": self.cfg["scale"],
                "description": f"{teacher} teacher vs {student} students on the evaluation "
                               "split: KL(teacher || student) of the softmax outputs and the L2 "
                               "distance between feature maps at the distilled layer, per image, "
                               "averaged. Rows with a transform compare the student with the "
                               "transformed teacher; rows without, with the teacher's leading "
                               "channels."}

    def detection_plan(self, n: int = 9) -> dict:
        """Table 9: AP of each student pre-trained, with L2 and with Ours, and of the teacher."""
        d = self.detection
        ds, teacher = d["dataset"], d["teacher"]
        L = self.layout
        rows = []
        for label, method, transform in DETECTION_ROWS:
            rows.append({"label": label, "paper": [["setting", label]], "method": method,
                         "transform": self._kcd(transform),
                         "cells": {s: [L.run_file(ds, teacher, self.tseed, s, method,
                                                  self._kcd(transform), seed)
                                       for seed in self.seeds] for s in d["students"]}})
        return {
            "table": 9,
            "title": "object detection on COCO: Faster R-CNN + FPN, KCD on the backbone",
            "dataset": ds, "teacher": teacher, "metric": "AP",
            "teacher_results": [L.model_file(ds, teacher, self.tseed)],
            "teacher_paper": {"match": [["setting", "Teacher"], ["backbone", teacher]],
                              "column": "AP"},
            "columns": list(d["students"]), "paper_column_key": "backbone",
            "paper_value": "AP", "rows": rows, "scale": self.cfg["scale"],
            "description": f"COCO box AP (%) on the evaluation split; {teacher} teacher; "
                           "students by backbone. L2: feature L2 at the last backbone map "
                           "before its ReLU (through a 1x1 regressor when the student has "
                           f"fewer channels); Ours: L2 to the {self.kcd}-transformed teacher.",
        }

    def table_plans(self) -> dict[int, Callable[[int], dict]]:
        """The configured tables, by number."""
        plans: dict[int, Callable[[int], dict]] = {
            int(name.removeprefix("table")): (lambda n: self.comparison_plan(f"table{n}"))
            for name in self.cfg.get("tables", {})}
        ablations = self.ablation_tables()
        plans.update({n: self.ablation_plan for n in ablations if str(n) in ABLATIONS})
        if 10 in ablations:
            plans[10] = self.overlap_plan
        if 11 in ablations:
            plans[11] = self.consistency_plan
        if self.detection:
            plans[9] = self.detection_plan
        return plans

    def table_plan(self, n: object) -> dict:
        plans = self.table_plans()
        if int(n) not in plans:
            raise KcdError(f"table {n} is not configured; configured: "
                           f"{', '.join(map(str, sorted(plans)))}")
        return plans[int(n)](int(n))

    # ------------------------------------------------------------------ tracking tags

    @functools.cached_property
    def _rows_of_results(self) -> dict[str, dict[int, list[str]]]:
        """result.json of a run -> {table: [row labels]} over every configured table (the
        teacher's pre-training is the row ``Teacher``)."""
        index: dict[str, dict[int, list[str]]] = {}
        for n in self.table_plans():
            plan = self.table_plan(n)
            cells = [("Teacher", path) for path in plan.get("teacher_results", [])]
            cells += [(row["label"], c) for row in plan["rows"]
                      for cell in row["cells"].values() for c in cell if isinstance(c, str)]
            for label, path in cells:
                labels = index.setdefault(path, {}).setdefault(n, [])
                if label not in labels:
                    labels.append(label)
        return index

    def run_tags(self, result: str) -> dict[str, str]:
        """MLflow tags of the run whose result is ``result``: the scale, every table it fills
        (``table``: ``7,8``), its row in each (``table8``: ``FitNets``) and all its rows
        (``row``). Run-time data (the workflow passes them apart from the spec), so adding a
        table to the config tags runs without re-running them."""
        tables = self._rows_of_results.get(result, {})
        tags = {"scale": str(self.cfg["scale"])}
        if tables:
            tags["table"] = ",".join(str(n) for n in sorted(tables))
            tags["row"] = "; ".join(dict.fromkeys(label for n in sorted(tables)
                                                  for label in tables[n]))
            tags.update({f"table{n}": "; ".join(labels) for n, labels in tables.items()})
        return tags

    @staticmethod
    def plan_inputs(plan: dict) -> list[str]:
        """The files a table reads: run results, and analysis jsons."""
        paths = list(plan.get("teacher_results", []))
        for row in plan["rows"]:
            for cell in row["cells"].values():
                paths += [c if isinstance(c, str) else c["path"] for c in cell]
        return sorted(set(paths))

    def gathered_parts(self) -> list[str]:
        """What ``tables.md`` gathers, in the paper's order: tables, then Figure 1, then the
        consistency picture of each distilled pair."""
        parts = [self.layout.table(n, "md") for n in sorted(self.table_plans())]
        if self.figure1_cfg:
            parts.append(f"{self.layout.figure1}.png")
        parts += [self.layout.heatmap(*pair) + ".png" for pair in self.heatmap_pairs()]
        return parts

    def heatmap_pairs(self) -> list[tuple[str, str, str]]:
        """(dataset, teacher, student) of every classification pair a table distils."""
        pairs = [(t["dataset"], t["teacher"], s) for t in self.cfg.get("tables", {}).values()
                 for s in t["students"]]
        if self.ablations:
            pairs.append(self.ablation_setting())
        return list(dict.fromkeys(pairs))

    def heatmap_inputs(self, ds: str, teacher: str, student: str) -> dict[str, str]:
        """The statistics and the KCD transform of a pair's first run (teacher seed, first
        student seed, trained weights), and the transform's metric."""
        tw, sw = f"s{self.tseed}", f"s{self.seeds[0]}"
        name = parse_transform_name(self.kcd)
        return {"stats": self.layout.stats(ds, teacher, tw, student, sw),
                "transform": self.layout.transform(ds, teacher, tw, student, sw,
                                                   name.file_name),
                "metric": name.metric}

    # ------------------------------------------------------------------ resources

    def resources(self, rule: str, ds: str | None = None) -> dict[str, Any]:
        """A job's resources: ``default``, then the dataset's entry, then the rule's."""
        if rule not in RESOURCE_RULES:
            raise KcdError(f"'{rule}' is not a heavy rule with resources; known: "
                           f"{', '.join(RESOURCE_RULES)} (kcd.config.RESOURCE_RULES)")
        table = self.cfg.get("resources", {})
        res = dict(table.get("default", {}))
        res.update(table.get(ds, {}) if ds else {})
        res.update(table.get(rule, {}))
        return res

    def launch_args(self, rule: str, name: str, ds: str | None = None) -> list[str]:
        """The arguments of ``python -m kcd.launch ... --`` for a heavy rule's job."""
        res = self.resources(rule, ds)
        launcher = self.cfg.get("launcher", {})
        args = ["--launcher", launcher.get("kind", "local"), "--name", f"kcd-{name}",
                "--log-dir", f"{self.layout.logs}/jobs",
                "--cpus", str(res.get("cpus", 1)), "--gpus", str(res.get("gpus", 0)),
                "--tasks", str(res.get("tasks", 1)), "--nodes", str(res.get("nodes", 1)),
                "--mem-mb", str(res.get("mem_mb", 4000)),
                "--time-min", str(res.get("runtime", 120))]
        slurm = launcher.get("slurm", {}) or {}
        for key in ("partition", "account", "qos", "constraint"):
            if slurm.get(key):
                args += [f"--{key}", str(slurm[key])]
        if slurm.get("extra"):
            args += ["--slurm-extra", json.dumps(slurm["extra"])]
        return args

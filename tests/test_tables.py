"""The tables engine, the ablation rows, the transform names and the ablation config checks."""
from __future__ import annotations

import copy
import json
import re

import pandas as pd
import pytest
import yaml

from kcd.config import validate_config
from kcd.errors import KcdError
from kcd.naming import WILDCARD, parse_transform_name, source_pair
from kcd.tables import (
    FEATURE_CONSISTENCY_ROWS,
    ablation_rows,
    build_table,
    paper_table,
    render_markdown,
    write_table,
)
from tests.conftest import REPO

KCD = "bipartite-correlation"
PAPER_PARAMS = dict(groups=[0, 1, 10, 100, 1000], reinit_seeds=[1, 2, 3], teacher_seed=0,
                    seeds=[0])


# --------------------------------------------------------------------------- transform names


@pytest.mark.parametrize("name", [
    "bipartite-correlation", "random-l1", "subnet-res-correlation", "bipartite-kl-k10",
    "bipartite-correlation@t3", "bipartite-correlation@s0", "greedy-cosine@init-st",
    "bipartite-correlation+dyn",
])
def test_transform_names_round_trip_and_match_the_wildcard(name):
    parsed = parse_transform_name(name)
    assert str(parsed) == name
    assert re.fullmatch(WILDCARD, name)


@pytest.mark.parametrize("name", ["bipartite", "hungarian-correlation", "bipartite-correlation-k1",
                                  "bipartite-correlation@x1", "bipartite-correlation/../x"])
def test_bad_transform_names_fail_in_one_line(name):
    with pytest.raises(KcdError, match="transform"):
        parse_transform_name(name)
    assert not re.fullmatch(WILDCARD, name)


def test_transform_sources_name_the_pair_whose_statistics_make_it():
    assert parse_transform_name("none") is None
    p = parse_transform_name
    assert source_pair(p(KCD), 0, 2) == ("s0", "s2")
    assert source_pair(p(KCD + "@s0"), 0, 2) == ("s0", "s0")          # Table 3a
    assert source_pair(p(KCD + "@t0"), 3, 2) == ("s0", "s2")          # Table 3b
    assert source_pair(p(KCD + "@init-st"), 0, 2) == ("s0-init", "s2-init")
    assert source_pair(p(KCD + "@init-s"), 0, 2) == ("s0", "s2-init")
    assert source_pair(p(KCD + "@init-t"), 0, 2) == ("s0-init", "s2")
    assert p("bipartite-correlation-k10@s1+dyn").file_name == "bipartite-correlation-k10"


# --------------------------------------------------------------------------- ablation rows


@pytest.mark.parametrize("number", [1, 2, 3, 4, 5, 6])
def test_every_ablation_row_finds_its_number_in_the_paper(number):
    paper = paper_table(number)
    rows = ablation_rows(number, KCD, **PAPER_PARAMS)
    assert len(rows) == len(paper)
    for row in rows:
        sel = paper
        for key, value in row.paper:
            sel = sel[sel[key].astype(str) == str(value)]
        assert len(sel) == 1, row
        if row.transform != "none":
            parse_transform_name(row.transform)


def test_ablation_rows_encode_the_paper_settings():
    t1 = {r.label: r for r in ablation_rows(1, KCD, **PAPER_PARAMS)}
    # "standard training with distillation but without transformation" (Table 1's caption)
    assert (t1["Baseline"].method, t1["Baseline"].transform) == ("fitnets", "none")
    assert t1["Greedy"].transform == "greedy-correlation"
    assert t1["Sub-net-Res"].transform == "subnet-res-correlation"
    t2 = {r.label: r.transform for r in ablation_rows(2, KCD, **PAPER_PARAMS)}
    assert t2["KL Divergence"] == "bipartite-kl"
    t3 = {r.label: r for r in ablation_rows(3, KCD, **PAPER_PARAMS)}
    assert t3["a: S2 (theta2)"].seeds == (2,) and t3["a: S2 (theta2)"].transform == KCD + "@s0"
    assert t3["b: T3 (theta3)"].teacher_seed == 3
    assert t3["b: T3 (theta3)"].transform == KCD + "@t0"
    t4 = {r.label: r.transform for r in ablation_rows(4, KCD, **PAPER_PARAMS)}
    assert t4 == {"S0/T0": KCD + "@init-st", "S0/T": KCD + "@init-s", "S/T0": KCD + "@init-t",
                  "S/T": KCD}
    t5 = {r.label: (r.method, r.transform) for r in ablation_rows(5, KCD, **PAPER_PARAMS)}
    assert t5["Dynamic"] == ("l2", KCD + "+dyn") and t5["Baseline"] == ("fitnets", "none")
    t6 = {r.label: (r.method, r.transform) for r in ablation_rows(6, KCD, **PAPER_PARAMS)}
    # "K = 0 ... is the common knowledge distillation with L_2 loss" (Table 6's caption)
    assert t6["K=0"] == ("fitnets", "none") and t6["K=1"] == ("l2", KCD)
    assert t6["K=100"] == ("l2", KCD + "-k100")


def test_table11_rows_match_the_paper_and_mark_inferred_labels():
    paper = paper_table(11)
    assert [r.paper_row for r in FEATURE_CONSISTENCY_ROWS] == list(paper["row"])
    inferred = dict(zip(paper["row"], paper["row_label_status"] == "inferred"))
    for r in FEATURE_CONSISTENCY_ROWS:
        assert (r.note is not None) == inferred[r.paper_row]


# --------------------------------------------------------------------------- the engine


def _result(tmp_path, name, top1):
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps({"top1": top1}))
    return str(p)


def test_seed_mean_std_paper_values_and_the_spread_mark(tmp_path):
    r = lambda name, v: _result(tmp_path, name, v)  # noqa: E731
    plan = {
        "table": 3, "title": "t", "dataset": "imagenet", "columns": ["mobilenetv2_0.5x"],
        "paper_value": "top1", "metric": "top1", "scale": "demo",
        "rows": [
            {"label": "a: S (theta0)", "paper": [["part", "a (student re-initialized)"],
                                                 ["row", "S (theta0)"]],
             "cells": {"mobilenetv2_0.5x": [r("a", 10.0), r("b", 12.0)]}},
            {"label": "a: S1 (theta1)", "paper": [["part", "a (student re-initialized)"],
                                                  ["row", "S1 (theta1)"]],
             "cells": {"mobilenetv2_0.5x": [r("c", 11.0), r("d", 11.5)]}},
            {"label": "far", "paper": [["row", "nothing like it"]],
             "cells": {"mobilenetv2_0.5x": [r("e", 30.0), r("f", 31.0)]}},
        ],
    }
    df = build_table(plan)
    first = df.iloc[0]
    assert first["mobilenetv2_0.5x"] == pytest.approx(11.0)
    assert first["mobilenetv2_0.5x_std"] == pytest.approx(2 ** 0.5)
    assert first["mobilenetv2_0.5x_n"] == 2
    assert first["mobilenetv2_0.5x_paper"] == pytest.approx(68.35)
    assert df.iloc[1]["mobilenetv2_0.5x_paper"] == pytest.approx(67.55)
    assert df.iloc[2]["mobilenetv2_0.5x_paper"] is None or pd.isna(df.iloc[2]["mobilenetv2_0.5x_paper"])
    md = render_markdown(df, plan)
    lines = [line for line in md.splitlines() if line.startswith("| a: S1")]
    assert "≈" in lines[0]                                  # 11.25 vs 11.0, spread 1.41
    assert "≈" not in [line for line in md.splitlines() if line.startswith("| far")][0]


def test_cells_read_nested_analysis_values_and_notes(tmp_path):
    out = tmp_path / "overlap.json"
    out.write_text(json.dumps({"S vs T": {"top10": 20.0}, "S vs T(T)": {"top10": 70.0}}))
    plan = {"table": 10, "dataset": "imagenet", "columns": ["top10"], "digits": 1,
            "rows": [{"label": lab, "paper": [["models", lab]], "note": note,
                      "cells": {"top10": [{"path": str(out), "keys": [lab, "top10"]}]}}
                     for lab, note in (("S vs T", None), ("S vs T(T)", "inferred"))]}
    write_table(plan, tmp_path / "table10")
    df = pd.read_csv(tmp_path / "table10.csv")
    assert list(df["top10"]) == [20.0, 70.0]
    assert list(df["top10_paper"]) == [18.0, 74.0]
    md = (tmp_path / "table10.md").read_text()
    assert "| S vs T(T) † | 70.0 | 74.0 | -4.0 |" in md and "†: inferred" in md
    assert r"$^\dagger$" in (tmp_path / "table10.tex").read_text()


def test_a_missing_result_names_the_file(tmp_path):
    plan = {"table": 1, "dataset": "imagenet", "columns": ["x"],
            "rows": [{"label": "Baseline", "cells": {"x": [str(tmp_path / "nope.json")]}}]}
    with pytest.raises(KcdError, match="nope.json does not exist"):
        build_table(plan)


# --------------------------------------------------------------------------- config checks


@pytest.fixture(scope="module")
def demo_cfg():
    return yaml.safe_load((REPO / "config" / "demo.yaml").read_text())


@pytest.mark.parametrize("path, value, message", [
    (("ablations", "groups"), [0, 1, 11], r"ablations.groups: K=11 is larger than the 10 classes"),
    (("ablations", "overlap_k"), [10, 5000], r"ablations.overlap_k: top-5000 is more than"),
    (("ablations", "overlap_k"), [2.5], r"ablations.overlap_k"),
    (("ablations", "student"), "resnet9", r"ablations.student: unknown architecture"),
    (("figure1", "class"), 100, r"figure1.class: class 100 does not exist"),
    (("figure1", "dataset"), "svhn", r"figure1.dataset: 'svhn' is not under datasets"),
])
def test_bad_ablation_config_names_the_key(demo_cfg, path, value, message):
    cfg = copy.deepcopy(demo_cfg)
    cfg[path[0]][path[1]] = value
    with pytest.raises(KcdError, match=message):
        validate_config(cfg)


def test_the_shipped_configs_validate():
    from kcd.config import load_config

    for name in ("demo.yaml", "paper.yaml"):
        load_config([str(REPO / "config" / name)], [])


def test_figure1_class_names_resolve_or_fail_with_the_key():
    from kcd.analysis.activation_maps import resolve_class

    assert resolve_class("boy", ["apple", "boy"], 2) == 1
    assert resolve_class("1", None, 2) == 1
    with pytest.raises(KcdError, match="figure1.class: 'girl' is not a class"):
        resolve_class("girl", ["apple", "boy"], 2)
    with pytest.raises(KcdError, match="figure1.class: class 5 does not exist"):
        resolve_class(5, None, 3)


def test_csv_is_rounded_and_names_the_runs_of_each_cell(tmp_path):
    runs = []
    for seed, v in ((0, 10.1), (1, 10.2)):
        d = tmp_path / "runs" / f"s{seed}"
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps({"top1": v}))
        runs.append(str(d / "result.json"))
    plan = {"table": 8, "dataset": "imagenet", "teacher": "resnet50", "columns": ["resnet18"],
            "rows": [{"label": "KD", "cells": {"resnet18": runs}}], "scale": "demo"}
    write_table(plan, tmp_path / "table8")
    text = (tmp_path / "table8.csv").read_text()
    df = pd.read_csv(tmp_path / "table8.csv")
    assert df["resnet18"][0] == 10.15 and df["resnet18_diff"][0] == round(10.15 - 70.76, 4)
    assert "0000000" not in text                                  # no float noise
    assert df["resnet18_runs"][0].split() == [str(tmp_path / "runs" / "s0"),
                                              str(tmp_path / "runs" / "s1")]
    # the CSV's columns, in order (bench/bench_demo.py reads its cells by this grammar)
    assert list(df.columns) == [
        "table", "dataset", "teacher", "row", "method", "transform", "note", "teacher_top1",
        "teacher_top1_paper", "resnet18", "resnet18_std", "resnet18_n", "resnet18_paper",
        "resnet18_diff", "resnet18_runs"]


def test_latex_is_a_captioned_labelled_float_with_its_legend(tmp_path):
    out = tmp_path / "a.json"
    out.write_text(json.dumps({"r": {"top10": 1.0}}))
    plan = {"table": 10, "dataset": "imagenet", "columns": ["top10"], "title": "overlap",
            "rows": [{"label": "S vs T(T)", "paper": [["models", "S vs T(T)"]],
                      "note": "inferred 50% of_it", "cells": {"top10": [
                          {"path": str(out), "keys": ["r", "top10"]}]}}], "scale": "demo"}
    write_table(plan, tmp_path / "table10")
    tex = (tmp_path / "table10.tex").read_text()
    lines = tex.splitlines()
    assert lines[0].startswith(r"\begin{table}") and lines[-1] == r"\end{table}"
    assert r"\label{tab:kcd-table10}" in tex and r"\toprule" in tex and r"\bottomrule" in tex
    caption = next(line for line in lines if line.startswith(r"\caption{"))
    assert "Demo scale" in caption and "overlap" in caption and r"$\pm$" in caption
    assert r"$^\dagger$: inferred 50\% of\_it." in tex                # legend as text
    assert tex.count("{") == tex.count("}")


def test_ablation_tables_give_the_teachers_paper_accuracy_from_table8(tmp_path):
    t = tmp_path / "teacher.json"
    t.write_text(json.dumps({"top1": 40.0}))
    r = tmp_path / "r.json"
    r.write_text(json.dumps({"top1": 30.0}))
    plan = {"table": 1, "dataset": "imagenet", "teacher": "resnet50", "columns": ["x"],
            "teacher_results": [str(t)], "paper_value": "top1",
            "teacher_paper": {"table": 8, "match": [["teacher", "resnet50"]],
                              "column": "teacher_top1"},
            "rows": [{"label": "Baseline", "cells": {"x": [str(r)]}}]}
    df = build_table(plan)
    assert df["teacher_top1_paper"][0] == 75.49
    assert "paper 75.49" in render_markdown(df, plan)

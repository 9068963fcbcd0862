"""The paper's tables, regenerated from the pipeline's runs, beside the paper's own numbers.

A table is built from a *plan* (JSON): which run results make each cell. The Snakemake rules
write the plan from the config and the path layout (``workflow/rules/common.smk``); this module
only reads ``result.json`` files, aggregates seeds (mean, sample std, count) and renders
``.csv``, ``.md`` and ``.tex`` (booktabs). The paper's numbers come from the project's own copy
of the paper's tables (``kcd/paper/table<N>.csv``); they are printed beside ours, never used as
ours.

Tables 7 and 8 (comparison with other methods) have the rows below; a KCD row is a method plus
the configured KCD transform (``kcd_transform``, default ``bipartite-correlation``); "Ours"
alone is L2 against the transformed teacher (method ``l2``); "Baseline" is the independently
trained student, i.e. the pre-training run of Algorithm 1 step 3.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from io import StringIO
from pathlib import Path
from statistics import mean, stdev
from typing import Any, Sequence

import pandas as pd

from kcd.checkpoint import atomic_write_text
from kcd.errors import KcdError
from kcd.registry import Registry

KCD = "<kcd>"  # placeholder for the configured KCD transform in row definitions
NO_TRANSFORM = "none"


@dataclass(frozen=True)
class Row:
    """A table row: its label in the paper, and the run that makes it."""

    label: str
    method: str  # "baseline" = the independently trained student (pre-training run)
    transform: str = NO_TRANSFORM  # "none", a transform name, or KCD


COMPARISON_ROWS: Registry[Row] = Registry("table row")
for _row in (
    Row("Baseline", "baseline"),
    Row("KD", "kd"),
    Row("FitNets", "fitnets"),
    Row("AT", "at"),
    Row("RKD", "rkd"),
    Row("AB", "ab"),
    Row("RCO", "rco"),
    Row("Ours", "l2", KCD),
    Row("Ours + FitNets", "fitnets", KCD),
    Row("Ours + AB", "ab", KCD),
    Row("Ours + RKD", "rkd", KCD),
    Row("Ours + RCO", "rco", KCD),
):
    COMPARISON_ROWS.register(_row.label, _row)


def comparison_row(label: str, kcd_transform: str) -> Row:
    """The row ``label`` of Tables 7/8 with the KCD placeholder resolved."""
    row = COMPARISON_ROWS.get(label)
    return Row(row.label, row.method, kcd_transform if row.transform == KCD else row.transform)


def row_label(method: str, transform: str, kcd_transform: str) -> str | None:
    """The Table 7/8 row that a (method, transform) run fills, if any (for tracking)."""
    for label, row in COMPARISON_ROWS.items():
        t = kcd_transform if row.transform == KCD else row.transform
        if row.method == method and t == transform:
            return label
    return None


def paper_table(number: int) -> pd.DataFrame:
    """The paper's Table ``number`` from the project's copy."""
    path = resources.files("kcd").joinpath(f"paper/table{number}.csv")
    if not path.is_file():
        raise KcdError(f"no copy of the paper's table {number} in kcd/paper/")
    return pd.read_csv(StringIO(path.read_text()))


def _read_metric(path: str, metric: str) -> float:
    p = Path(path)
    if not p.is_file():
        raise KcdError(f"run result {p} does not exist; build it with snakemake first")
    try:
        value = json.loads(p.read_text())[metric]
    except (ValueError, KeyError):
        raise KcdError(f"run result {p} has no '{metric}'") from None
    return float(value)


def _aggregate(paths: Sequence[str], metric: str) -> tuple[float, float | None, int]:
    values = [_read_metric(p, metric) for p in paths]
    if not values:
        return math.nan, None, 0
    sd = stdev(values) if len(values) > 1 else None
    return mean(values), sd, len(values)


def _paper_value(paper: pd.DataFrame, row: str, column: str) -> float | None:
    if "row" not in paper or column not in paper:
        return None
    hit = paper.loc[paper["row"] == row, column]
    return float(hit.iloc[0]) if len(hit) else None


def build_table(plan: dict[str, Any]) -> pd.DataFrame:
    """Aggregate a plan's run results into a DataFrame (one line per row)."""
    number = int(plan["table"])
    metric = plan.get("metric", "top1")
    paper = paper_table(number)
    teacher_mean, teacher_sd, teacher_n = _aggregate(plan.get("teacher_results", []), metric)
    teacher_paper = (float(paper["teacher_top1"].iloc[0])
                     if "teacher_top1" in paper and len(paper) else None)
    lines = []
    for row in plan["rows"]:
        line: dict[str, Any] = {
            "table": number,
            "dataset": plan["dataset"],
            "teacher": plan.get("teacher"),
            "row": row["label"],
            "method": row.get("method"),
            "transform": row.get("transform"),
            "teacher_top1": teacher_mean,
            "teacher_top1_paper": teacher_paper,
        }
        for column in plan["columns"]:
            m, sd, n = _aggregate(row["cells"].get(column, []), metric)
            p = _paper_value(paper, row.get("paper_row", row["label"]), column)
            line[column] = m
            line[f"{column}_std"] = sd
            line[f"{column}_n"] = n
            line[f"{column}_paper"] = p
            line[f"{column}_diff"] = (m - p) if (p is not None and not math.isnan(m)) else None
        lines.append(line)
    return pd.DataFrame(lines)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _cell(df_line: pd.Series, column: str) -> str:
    m, sd = df_line[column], df_line[f"{column}_std"]
    text = _fmt(m)
    if sd is not None and not (isinstance(sd, float) and math.isnan(sd)):
        text += f" ± {_fmt(sd)}"
    return text


def render_markdown(df: pd.DataFrame, plan: dict[str, Any]) -> str:
    """A Markdown table: for each column, ours (mean ± std), the paper's, and the difference."""
    columns = plan["columns"]
    seeds = sorted({int(n) for c in columns for n in df[f"{c}_n"]})
    head = ["Method"] + [f"{c} {k}" for c in columns for k in ("ours", "paper", "Δ")]
    out = [f"### Table {plan['table']}: {plan.get('title', '')}".rstrip(), ""]
    if plan.get("teacher"):
        t = df.iloc[0]
        out.append(f"Teacher {plan['teacher']} top-1: ours {_fmt(t['teacher_top1'])}, "
                   f"paper {_fmt(t['teacher_top1_paper'])}.")
    out.append(f"Dataset {plan['dataset']} at {plan.get('scale', 'demo')} scale; "
               f"{metric_name(plan.get('metric', 'top1'))}; seeds per cell: "
               f"{', '.join(map(str, seeds))}; ours is the mean (± sample std over seeds) of the "
               "final iterate of each run.")
    if plan.get("scale", "demo") != "paper":
        out.append("Demo scale: generated data and short recipes, so our numbers are not "
                   "comparable with the paper's; with one seed, differences between methods "
                   "of a few points are seed noise.")
    out += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, line in df.iterrows():
        cells = [str(line["row"])]
        for c in columns:
            cells += [_cell(line, c), _fmt(line[f"{c}_paper"]), _fmt(line[f"{c}_diff"])]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def metric_name(metric: str) -> str:
    return {"top1": "top-1 accuracy (%)", "top5": "top-5 accuracy (%)"}.get(metric, metric)


def _tex_escape(text: str) -> str:
    return (str(text).replace("\\", r"\textbackslash{}").replace("&", r"\&")
            .replace("%", r"\%").replace("_", r"\_").replace("#", r"\#"))


def render_latex(df: pd.DataFrame, plan: dict[str, Any]) -> str:
    """A booktabs table with ours and the paper's number for each column."""
    columns = plan["columns"]
    spec = "l" + "rr" * len(columns)
    lines = [r"\begin{tabular}{" + spec + "}", r"\toprule"]
    lines.append("Method & " + " & ".join(
        r"\multicolumn{2}{c}{" + _tex_escape(c) + "}" for c in columns) + r" \\")
    lines.append("".join(rf"\cmidrule(lr){{{2 + 2 * i}-{3 + 2 * i}}}"
                         for i in range(len(columns))))
    lines.append(" & " + " & ".join("ours & paper" for _ in columns) + r" \\")
    lines.append(r"\midrule")
    for _, line in df.iterrows():
        cells = [_tex_escape(line["row"])]
        for c in columns:
            cells += [_cell(line, c).replace("±", r"$\pm$"), _fmt(line[f"{c}_paper"])]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    caption = (f"% Table {plan['table']} ({plan['dataset']}, {plan.get('scale', 'demo')} scale), "
               f"regenerated by kcd\n")
    return caption + "\n".join(lines) + "\n"


def write_table(plan: dict[str, Any], out_prefix: str | os.PathLike) -> pd.DataFrame:
    """Build a table and write ``<prefix>.csv``, ``.md`` and ``.tex``."""
    df = build_table(plan)
    prefix = Path(out_prefix)
    atomic_write_text(df.to_csv(index=False), prefix.with_suffix(".csv"))
    atomic_write_text(render_markdown(df, plan), prefix.with_suffix(".md"))
    atomic_write_text(render_latex(df, plan), prefix.with_suffix(".tex"))
    return df


def gather_markdown(parts: Sequence[str | os.PathLike], out: str | os.PathLike,
                    title: str = "kcd: the paper's tables, regenerated") -> None:
    """Concatenate rendered tables (and figures) into one Markdown file."""
    body = [f"# {title}", ""]
    for p in parts:
        p = Path(p)
        if p.suffix == ".md":
            body += [p.read_text().rstrip(), ""]
        else:
            rel = os.path.relpath(p, Path(out).parent)
            body += [f"![{p.stem}]({rel})", ""]
    atomic_write_text("\n".join(body), out)

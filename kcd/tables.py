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
from typing import TYPE_CHECKING, Any, Sequence

from kcd.checkpoint import atomic_write_text
from kcd.errors import KcdError
from kcd.losses import BASELINE
from kcd.naming import METRICS, NO_TRANSFORM, STRATEGIES, parse_transform_name
from kcd.registry import Registry

if TYPE_CHECKING:  # pandas is imported where tables are built, not when plans are read
    import pandas as pd

KCD = "<kcd>"  # placeholder for the configured KCD transform in row definitions

# A table CSV line: these labels; then the teacher's score and, per column, ours with its
# "_std" and "_n" (computed by the pipeline), and beside them these (the paper's number, the
# difference to it, the runs the cell came from). bench/bench_demo.py reads them this way.
LABEL_COLUMNS = ("table", "dataset", "teacher", "row", "method", "transform", "note")
BESIDE_OURS = ("_paper", "_diff", "_runs")


@dataclass(frozen=True)
class Row:
    """A table row: its label in the paper, and the run that makes it."""

    label: str
    method: str  # "baseline" = the independently trained student (pre-training run)
    transform: str = NO_TRANSFORM  # "none", a transform name, or KCD


COMPARISON_ROWS: Registry[Row] = Registry("table row")
"""The rows of Tables 7 and 8, derived from the method registry: ``Baseline`` (the student's
own pre-training), each method by its label (``KD``), and with the KCD transform ``Ours + <label>``
for each method that reads features (``Ours`` for "Ours" itself: L2 to the transformed
teacher). A config's ``tables.<name>.rows`` picks and orders them."""


def _comparison_rows() -> None:
    from kcd.losses import LOSSES

    COMPARISON_ROWS.register("Baseline", Row("Baseline", BASELINE))
    for name, method in LOSSES.items():
        COMPARISON_ROWS.register(method.label, Row(method.label, name))
    for name, method in LOSSES.items():
        if method.features:
            label = "Ours" if name == "l2" else f"Ours + {method.label}"
            COMPARISON_ROWS.register(label, Row(label, name, KCD))


_comparison_rows()


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


# --------------------------------------------------------------------------- ablations


@dataclass(frozen=True)
class AblationRow:
    """A row of Tables 1-6: its label, the runs that make it, and its row in the paper's csv.

    ``teacher_seed`` / ``seeds`` None mean the configured teacher seed / student seeds.
    ``transform`` is a run transform name (:mod:`kcd.naming`).
    """

    label: str
    method: str
    transform: str = NO_TRANSFORM
    paper: tuple[tuple[str, Any], ...] = ()  # (column, value) pairs selecting the paper's row
    teacher_seed: int | None = None
    seeds: tuple[int, ...] | None = None


ABLATIONS: Registry = Registry("ablation table")
"""The tables of the ablation pair (Tables 1-6): number -> rows function, with its title in
:data:`ABLATION_TITLES`. Registering one (:func:`ablation`) is all a new one needs besides the
paper's csv: the config accepts its number and the plans build it."""
ABLATION_TITLES: dict[int, str] = {}
ANALYSIS_TABLES = (10, 11)  # also on the ablation pair, from analyses (kcd.analysis)


def ablation(number: int, title: str):
    """Register the rows function of ablation Table ``number``."""
    def add(fn):
        ABLATION_TITLES[number] = title
        return ABLATIONS.register(str(number), fn)
    return add


def _split(kcd_transform: str) -> tuple[str, str]:
    name = parse_transform_name(kcd_transform)
    return name.strategy, name.metric


ABLATION_BASELINE = "fitnets"
"""The method of the ablations' "Baseline" (Tables 1, 5) and K = 0 (Table 6): "standard
training with distillation but without transformation" (Table 1's caption), "the common
knowledge distillation with L_2 loss" (Table 6's). The teacher has more channels than the
student (ResNet-50's 2048, MobileNetV2-0.5x's 1280), so the L2 goes through FitNets' 1x1
regressor, the standard way to distil L2 across unequal widths: the row is the FitNets run of
the ablation pair, which Table 8's FitNets row shares (the paper prints 67.52 here and 67.58
there, for what reads as the same setting)."""


def _baseline(label: str, paper: tuple[tuple[str, Any], ...]) -> AblationRow:
    return AblationRow(label, ABLATION_BASELINE, NO_TRANSFORM, paper=paper)


@ablation(1, "transform strategy (correlation metric)")
def _table1(kcd_transform: str, **_: Any) -> list[AblationRow]:
    _, metric = _split(kcd_transform)
    rows = [_baseline("Baseline", (("row", "Baseline"),))]
    for strategy in STRATEGIES.values():
        if strategy.name == "identity":  # needs equal channel counts; not a row of the paper
            continue
        rows.append(AblationRow(strategy.label, "l2", f"{strategy.name}-{metric}",
                                paper=(("row", strategy.label),)))
    return rows


@ablation(2, "consistency metric (bipartite matching)")
def _table2(kcd_transform: str, **_: Any) -> list[AblationRow]:
    strategy, _ = _split(kcd_transform)
    return [AblationRow(label, "l2", f"{strategy}-{metric}", paper=(("row", label),))
            for metric, label in METRICS.items()]


@ablation(3, "initialisation: the transform computed for theta0, used with re-initialised "
             "models")
def _table3(kcd_transform: str, *, reinit_seeds: Sequence[int], teacher_seed: int,
            seeds: Sequence[int], **_: Any) -> list[AblationRow]:
    """(a) students from other seeds, (b) teachers trained from other seeds, both distilled
    with the transform computed for the theta0 pair (seed ``seeds[0]`` / ``teacher_seed``)."""
    a, b = "a (student re-initialized)", "b (teacher re-initialized)"
    s0 = seeds[0]
    rows = [AblationRow("a: S (theta0)", "l2", kcd_transform,
                        paper=(("part", a), ("row", "S (theta0)")), seeds=(s0,))]
    rows += [AblationRow(f"a: S{r} (theta{r})", "l2", f"{kcd_transform}@s{s0}",
                         paper=(("part", a), ("row", f"S{r} (theta{r})")), seeds=(r,))
             for r in reinit_seeds]
    rows.append(AblationRow("b: T (theta0)", "l2", kcd_transform,
                            paper=(("part", b), ("row", "T (theta0)"))))
    rows += [AblationRow(f"b: T{r} (theta{r})", "l2", f"{kcd_transform}@t{teacher_seed}",
                         paper=(("part", b), ("row", f"T{r} (theta{r})")), teacher_seed=r)
             for r in reinit_seeds]
    return rows


@ablation(4, "transform computed from initial (S0, T0) or trained (S, T) weights")
def _table4(kcd_transform: str, **_: Any) -> list[AblationRow]:
    cells = (("S0/T0", "@init-st", "initial (S0)", "initial (T0)"),
             ("S0/T", "@init-s", "initial (S0)", "trained (T)"),
             ("S/T0", "@init-t", "trained (S)", "initial (T0)"),
             ("S/T", "", "trained (S)", "trained (T)"))
    return [AblationRow(label, "l2", kcd_transform + src,
                        paper=(("student_weights", sw), ("teacher_weights", tw)))
            for label, src, sw, tw in cells]


@ablation(5, "static vs dynamic transform")
def _table5(kcd_transform: str, **_: Any) -> list[AblationRow]:
    return [_baseline("Baseline", (("row", "Baseline"),)),
            AblationRow("Static", "l2", kcd_transform, paper=(("row", "Static"),)),
            AblationRow("Dynamic", "l2", kcd_transform + "+dyn", paper=(("row", "Dynamic"),))]


@ablation(6, "number K of per-class transforms")
def _table6(kcd_transform: str, *, groups: Sequence[int], **_: Any) -> list[AblationRow]:
    """K = 0 is L2 distillation without any transform: the ablations' baseline run
    (:data:`ABLATION_BASELINE`), as the paper's K = 0 equals its Table 1 Baseline (67.52)."""
    rows = []
    for k in groups:
        if k == 0:
            rows.append(_baseline("K=0", (("K", 0),)))
        else:
            name = kcd_transform if k == 1 else f"{kcd_transform}-k{k}"
            rows.append(AblationRow(f"K={k}", "l2", name, paper=(("K", k),)))
    return rows


@dataclass(frozen=True)
class ConsistencyRow:
    """A row of Table 11: whose student, and which view of the teacher it is compared with.

    ``method``/``transform`` pick the student's run (``baseline``: the independently trained
    student); ``view`` is the teacher's transform for the comparison (``none``: the raw
    teacher). The paper's labels after the first were lost in extraction; ours follow the
    surrounding text and are marked ``inferred``.
    """

    label: str
    method: str
    transform: str
    view: str
    paper_row: str
    note: str | None = "row label inferred (lost in the paper's text)"
    kl: bool = True  # False: the KL cell is not a measurement of its own (left empty)


FEATURE_CONSISTENCY_ROWS: tuple[ConsistencyRow, ...] = (
    ConsistencyRow("Baseline (T vs trained S)", BASELINE, NO_TRANSFORM, NO_TRANSFORM,
                   "Baseline (T vs trained S)", note=None),
    # A channel transform maps the teacher's features, not its logits: this row's KL would be
    # row 1's by construction (the paper prints 0.86 vs 0.89), so only its L2 is measured.
    ConsistencyRow("Transformed T vs trained S (before distillation)", BASELINE, NO_TRANSFORM,
                   KCD, "Transformed T vs trained S (before distillation)",
                   note="row label inferred (lost in the paper's text); KL not applicable: a "
                        "channel transform leaves the teacher's outputs, so its KL would repeat "
                        "row 1's", kl=False),
    ConsistencyRow("FitNets", "fitnets", NO_TRANSFORM, NO_TRANSFORM, "FitNets"),
    ConsistencyRow("Ours + FitNets", "fitnets", KCD, KCD, "Ours (+ FitNets)"),
    ConsistencyRow("AB", "ab", NO_TRANSFORM, NO_TRANSFORM, "AB"),
    ConsistencyRow("Ours + AB", "ab", KCD, KCD, "Ours + AB"),
    ConsistencyRow("RKD", "rkd", NO_TRANSFORM, NO_TRANSFORM, "RKD"),
    ConsistencyRow("Ours + RKD", "rkd", KCD, KCD, "Ours + RKD"),
    ConsistencyRow("RCO", "rco", NO_TRANSFORM, NO_TRANSFORM, "RCO"),
    ConsistencyRow("Ours + RCO", "rco", KCD, KCD, "Ours + RCO"),
)


def ablation_rows(number: int, kcd_transform: str, **params: Any) -> list[AblationRow]:
    """The rows of ablation Table ``number`` (1-6) for the configured KCD transform."""
    return ABLATIONS.get(str(number))(kcd_transform, **params)


def overlap_column(k: int | float) -> str:
    """Table 10's column of a top-``k``: ``top10`` for a count, ``top5%`` for the fraction
    0.05."""
    return f"top{k * 100:g}%" if isinstance(k, float) else f"top{k}"


def paper_table(number: int) -> pd.DataFrame:
    """The paper's Table ``number`` from the project's copy."""
    import pandas as pd

    path = resources.files("kcd").joinpath(f"paper/table{number}.csv")
    if not path.is_file():
        raise KcdError(f"no copy of the paper's table {number} in kcd/paper/")
    return pd.read_csv(StringIO(path.read_text()))


def _read_value(source: str | dict, metric: str) -> float | None:
    """One number of a cell: ``source`` is a run's result.json path (its ``metric``) or
    ``{"path": ..., "keys": [...]}`` (a nested value of an analysis json)."""
    path, keys = (source, [metric]) if isinstance(source, str) else (source["path"], source["keys"])
    p = Path(path)
    if not p.is_file():
        raise KcdError(f"result {p} does not exist; build it with snakemake first")
    try:
        value: Any = json.loads(p.read_text())
        for k in keys:
            value = value[k]
    except (ValueError, KeyError, TypeError):
        raise KcdError(f"result {p} has no '{'.'.join(map(str, keys))}'") from None
    return None if value is None else float(value)


def _aggregate(sources: Sequence[str | dict], metric: str) -> tuple[float, float | None, int]:
    values = [v for v in (_read_value(s, metric) for s in sources) if v is not None]
    if not values:
        return math.nan, None, 0
    sd = stdev(values) if len(values) > 1 else None
    return mean(values), sd, len(values)


def _paper_value(paper: pd.DataFrame, match: Sequence[Sequence[Any]], column: str,
                 plan: dict[str, Any]) -> float | None:
    """The paper's number for (row ``match``, our ``column``); None where the paper has none.

    ``match`` holds (paper column, value) pairs that select the paper's row. A plan whose
    columns are not columns of the paper's csv names the csv column with the values
    (``paper_value``) and, when the paper lists our columns as rows, the csv column that
    holds our column names (``paper_column_key``).
    """
    import pandas as pd

    sel = paper
    for key, value in match:
        if key not in sel:
            return None
        sel = sel[sel[key].astype(str) == str(value)]
    value_column = plan.get("paper_value") or column
    if plan.get("paper_column_key"):
        sel = sel[sel[plan["paper_column_key"]].astype(str) == str(column)]
    if value_column not in sel or not len(sel):
        return None
    v = sel[value_column].iloc[0]
    return None if pd.isna(v) else float(v)


def _row_match(row: dict[str, Any]) -> list:
    return row.get("paper") or [["row", row.get("paper_row", row["label"])]]


PLAN_KEYS = ("table", "dataset", "columns", "rows")  # what every table plan holds


def check_plan(plan: Any) -> dict[str, Any]:
    """Refuse a plan without the keys every table needs (kcd.plans writes them)."""
    missing = [k for k in PLAN_KEYS if not isinstance(plan, dict) or k not in plan]
    if missing:
        raise KcdError(f"--plan: a table plan needs the keys {', '.join(PLAN_KEYS)}; missing "
                       f"{', '.join(missing)} (the workflow writes plans with kcd.plans)")
    rows = plan["rows"]
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "label" in r
                                             and isinstance(r.get("cells"), dict) for r in rows):
        raise KcdError("--plan: rows must be a list of {label, cells: {column: [results]}}")
    return plan


def build_table(plan: dict[str, Any]) -> pd.DataFrame:
    """Aggregate a plan's results into a DataFrame (one line per row)."""
    import pandas as pd

    check_plan(plan)
    number = int(plan["table"])
    metric = plan.get("metric", "top1")
    paper = paper_table(number)
    teacher_mean, _, _ = _aggregate(plan.get("teacher_results", []), metric)
    tp = plan.get("teacher_paper")
    if tp:  # the paper may give the teacher in another table (the ablations': Table 8's)
        teacher_source = paper_table(int(tp["table"])) if tp.get("table") else paper
        teacher_paper = _paper_value(teacher_source, tp["match"], tp["column"], {})
    else:
        teacher_paper = (float(paper["teacher_top1"].iloc[0])
                         if "teacher_top1" in paper and len(paper) else None)
    lines = []
    for row in plan["rows"]:
        line: dict[str, Any] = dict(zip(LABEL_COLUMNS, (
            number, plan["dataset"], plan.get("teacher"), row["label"], row.get("method"),
            row.get("transform"), row.get("note"))))
        line |= {
            f"teacher_{metric}": teacher_mean,
            f"teacher_{metric}_paper": teacher_paper,
        }
        for column in plan["columns"]:
            m, sd, n = _aggregate(row["cells"].get(column, []), metric)
            p = _paper_value(paper, _row_match(row), column, plan)
            line[column] = m
            line[f"{column}_std"] = sd
            line[f"{column}_n"] = n
            paper_col, diff_col, runs_col = (column + suffix for suffix in BESIDE_OURS)
            line[paper_col] = p
            line[diff_col] = (m - p) if (p is not None and not math.isnan(m)) else None
            line[runs_col] = " ".join(_source_of(c) for c in row["cells"].get(column, []))
        lines.append(line)
    return pd.DataFrame(lines)


def _source_of(cell: str | dict) -> str:
    """Where a cell's number comes from: a run's folder, or an analysis json and its keys."""
    if isinstance(cell, str):
        return str(Path(cell).parent)
    return f"{cell['path']}#{'/'.join(map(str, cell['keys']))}"


def tidy_csv(df: pd.DataFrame, plan: dict[str, Any]) -> str:
    """The table as CSV to paste: numbers rounded (two more digits than the rendered table),
    and per cell a ``_runs`` column naming the run folders (or analysis json and keys) it
    was computed from."""
    digits = int(plan.get("digits", 2)) + 2
    out = df.copy()
    for column in out.columns:
        if out[column].dtype.kind == "f":
            out[column] = out[column].round(digits)
    return out.to_csv(index=False)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt(value: Any, digits: int = 2) -> str:
    return "–" if _missing(value) else f"{value:.{digits}f}"


def _cell(df_line: pd.Series, column: str, digits: int = 2) -> str:
    m, sd = df_line[column], df_line[f"{column}_std"]
    text = _fmt(m, digits)
    if not _missing(sd):
        text += f" ± {_fmt(sd, digits)}"
    return text


def within_spread(df: pd.DataFrame, column: str) -> list[bool]:
    """For each row: does it differ from the first (reference) row by less than the larger
    sample std of the two? Only rows and a reference with at least two seeds can be marked."""
    ref = df.iloc[0]
    marks = []
    for i, (_, line) in enumerate(df.iterrows()):
        sds = [line[f"{column}_std"], ref[f"{column}_std"]]
        if i == 0 or any(_missing(s) for s in sds) or _missing(line[column]):
            marks.append(False)
        else:
            marks.append(abs(line[column] - ref[column]) < max(sds))
    return marks


def _parts(df: pd.DataFrame, plan: dict[str, Any]) -> tuple[str, list[str], list[str],
                                                             list[list[str]]]:
    """What every rendering of a table shows: title, paragraphs, header, rows of cells."""
    columns = plan["columns"]
    labels = plan.get("column_labels", {})
    digits = int(plan.get("digits", 2))
    metric = plan.get("metric", "top1")
    seeds = sorted({int(n) for c in columns for n in df[f"{c}_n"]})
    head = [plan.get("row_header", "Method")] + [
        f"{labels.get(c, c)} {k}" for c in columns for k in ("ours", "paper", "Δ")]
    title = f"Table {plan['table']}: {plan.get('title', '')}".rstrip()
    text = []
    if plan.get("teacher") and plan.get("teacher_results"):
        t = df.iloc[0]
        text.append(f"Teacher {plan['teacher']} {metric_name(metric)}: ours "
                    f"{_fmt(t[f'teacher_{metric}'])}, paper {_fmt(t[f'teacher_{metric}_paper'])}.")
    if plan.get("description"):
        text.append(f"{plan['description']} Seeds per cell: {', '.join(map(str, seeds))}.")
    else:
        text.append(f"Dataset {plan['dataset']} at {plan.get('scale', 'demo')} scale; "
                    f"{metric_name(metric)}; seeds per cell: {', '.join(map(str, seeds))}; "
                    "ours is the mean (± sample std over seeds) of the final iterate of each run.")
    caveat = scale_caveat(plan)
    if caveat:
        text.append(caveat)
    marks = {c: within_spread(df, c) for c in columns}
    if any(any(m) for m in marks.values()):
        text.append("≈: differs from the first row by less than the spread (sample std) of "
                    "its seeds.")
    text += legend(df, plan)
    rows = []
    for i, (_, line) in enumerate(df.iterrows()):
        cells = [str(line["row"]) + (" †" if isinstance(line["note"], str) else "")]
        for c in columns:
            cells += [_cell(line, c, digits) + (" ≈" if marks[c][i] else ""),
                      _fmt(line[f"{c}_paper"], digits), _fmt(line[f"{c}_diff"], digits)]
        rows.append(cells)
    return title, text, head, rows


def render_markdown(df: pd.DataFrame, plan: dict[str, Any]) -> str:
    """A Markdown table: for each column, ours (mean ± std), the paper's, and the difference."""
    title, text, head, rows = _parts(df, plan)
    out = [f"### {title}", "", *text]
    out += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(out) + "\n"


def render_html(df: pd.DataFrame, plan: dict[str, Any]) -> str:
    """The Markdown table's content as an HTML page (for ``snakemake --report``)."""
    from html import escape

    title, text, head, rows = _parts(df, plan)
    out = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8">',
           f"<title>{escape(title)}</title>",
           "<style>table{border-collapse:collapse}td,th{border:1px solid #ccc;"
           "padding:2px 8px;text-align:right}td:first-child{text-align:left}</style>",
           "</head><body>", f"<h3>{escape(title)}</h3>"]
    out += [f"<p>{escape(t)}</p>" for t in text]
    out.append("<table><thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head)
               + "</tr></thead><tbody>")
    out += ["<tr>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>" for cells in rows]
    out += ["</tbody></table>", "</body></html>"]
    return "\n".join(out) + "\n"


def scale_caveat(plan: dict[str, Any]) -> str | None:
    if plan.get("scale", "demo") == "paper":
        return None
    return ("Demo scale: generated data and short recipes, so our numbers are not comparable "
            "with the paper's; with one seed, differences between rows of a few points are "
            "seed noise.")


def legend(df: pd.DataFrame, plan: dict[str, Any]) -> list[str]:
    """The † notes of a table's rows and the plan's own legend lines."""
    lines = []
    if df["note"].notna().any():
        lines.append("†: " + "; ".join(sorted({str(n) for n in df["note"].dropna()})) + ".")
    return lines + list(plan.get("legend", []))


def metric_name(metric: str) -> str:
    return {"top1": "top-1 accuracy (%)", "top5": "top-5 accuracy (%)",
            "AP": "COCO box AP (%)"}.get(metric, metric)


def _tex_escape(text: str) -> str:
    return (str(text).replace("\\", r"\textbackslash{}").replace("&", r"\&")
            .replace("%", r"\%").replace("_", r"\_").replace("#", r"\#"))


def render_latex(df: pd.DataFrame, plan: dict[str, Any]) -> str:
    """A booktabs ``table`` float: ours and the paper's number for each column, a caption with
    the table's title, scale and caveat, a label ``tab:kcd-table<N>``, and the † legend."""
    columns = plan["columns"]
    labels = plan.get("column_labels", {})
    digits = int(plan.get("digits", 2))
    spec = "l" + "rr" * len(columns)
    caption = (f"Table {plan['table']} regenerated by kcd: {plan.get('title', '')} "
               f"({plan['dataset']}, {plan.get('scale', 'demo')} scale). Ours is the mean "
               "($\\pm$ sample std over seeds); paper: the paper's number.")
    caveat = scale_caveat(plan)
    if caveat:
        caption += " " + caveat
    lines = [r"\begin{table}[t]", r"\centering",
             r"\caption{" + _tex_escape(caption).replace(r"\textbackslash{}pm", r"\pm") + "}",
             rf"\label{{tab:kcd-table{plan['table']}}}",
             r"\begin{tabular}{" + spec + "}", r"\toprule"]
    lines.append(_tex_escape(plan.get("row_header", "Method")) + " & " + " & ".join(
        r"\multicolumn{2}{c}{" + _tex_escape(labels.get(c, c)) + "}" for c in columns) + r" \\")
    lines.append("".join(rf"\cmidrule(lr){{{2 + 2 * i}-{3 + 2 * i}}}"
                         for i in range(len(columns))))
    lines.append(" & " + " & ".join("ours & paper" for _ in columns) + r" \\")
    lines.append(r"\midrule")
    for _, line in df.iterrows():
        cells = [_tex_escape(line["row"]) + (r"$^\dagger$" if isinstance(line["note"], str) else "")]
        for c in columns:
            cells += [_cell(line, c, digits).replace("±", r"$\pm$"),
                      _fmt(line[f"{c}_paper"], digits)]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    notes = [_tex_escape(n).replace("†", r"$^\dagger$", 1) for n in legend(df, plan)]
    if notes:
        lines += [r"\par\smallskip", r"\footnotesize " + r" \\ ".join(notes)]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def write_table(plan: dict[str, Any], out_prefix: str | os.PathLike) -> pd.DataFrame:
    """Build a table and write ``<prefix>.csv``, ``.md``, ``.tex`` and ``.html``."""
    df = build_table(plan)
    prefix = Path(out_prefix)
    atomic_write_text(tidy_csv(df, plan), prefix.with_suffix(".csv"))
    atomic_write_text(render_markdown(df, plan), prefix.with_suffix(".md"))
    atomic_write_text(render_latex(df, plan), prefix.with_suffix(".tex"))
    atomic_write_text(render_html(df, plan), prefix.with_suffix(".html"))
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

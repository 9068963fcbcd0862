"""bench/bench_demo.py on a synthetic Snakemake log: per-rule times, wall, efficiency, phases."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_bench


# four jobs of two rules: pretrain 40 s and 60 s, distill 30 s and 40 s; wall 1:40
LOG = """\
Building DAG of jobs...
Job stats:
job         count
--------  -------
distill         2
pretrain        2
total           4

Select jobs to execute...
Execute 2 jobs...
[Wed Dec  2 05:00:00 2026]
localrule pretrain:
    input: results/init/a.pt
    output: results/models/a/final.pt, results/models/a/result.json
    log: results/logs/a.log
    jobid: 1
    reason: Missing output files: results/models/a/final.pt
    wildcards: arch=a
[Wed Dec  2 05:00:00 2026]
rule pretrain:
    output: results/models/b/final.pt, results/models/b/result.json
    jobid: 2
    resources: tmpdir=/tmp
[Wed Dec  2 05:00:40 2026]
Finished jobid: 1 (Rule: pretrain)
1 of 4 steps (25%) done
Execute 1 jobs...
[Wed Dec  2 05:00:40 2026]
localrule distill:
    output: results/runs/c/final.pt
    jobid: 3
[Wed Dec  2 05:01:00 2026]
Finished jobid: 2
2 of 4 steps (50%) done
[Wed Dec  2 05:01:00 2026]
localrule distill:
    output: results/runs/d/final.pt
    jobid: 4
[Wed Dec  2 05:01:10 2026]
Finished jobid: 3 (Rule: distill)
3 of 4 steps (75%) done
[Wed Dec  2 05:01:40 2026]
Finished jobid: 4 (Rule: distill)
4 of 4 steps (100%) done
Complete log(s): .snakemake/log/2026-12-02T050000.000000.snakemake.log
"""


bench_demo = load_bench("bench_demo")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    _write(tmp_path / ".snakemake" / "log" / "2026-12-01T010000.000000.snakemake.log",
           "an older run\n")
    _write(tmp_path / ".snakemake" / "log" / "2026-12-02T050000.000000.snakemake.log", LOG)
    results = tmp_path / "results"
    _write(results / "models" / "a" / "result.json",
           json.dumps({"acc": 0.5, "phases": {"setup": 5, "train": 30.0, "evaluate": 2}}))
    _write(results / "models" / "b" / "result.json", json.dumps({"phases": ["train"]}))  # odd
    _write(results / "runs" / "c" / "result.json", json.dumps({"phases": {"setup": 4,
                                                                          "train": 20}}))
    _write(results / "runs" / "d" / "result.json", "{not json")
    return tmp_path


def test_rules_wall_efficiency_and_phases(run_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_demo.main([str(run_dir), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    rep = json.loads(out.read_text())

    assert rep["log"].endswith("2026-12-02T050000.000000.snakemake.log")  # the newest
    assert rep["wall_s"] == 100 and rep["jobs"] == 4 and rep["job_s"] == 170
    assert rep["complete"] is True and rep["unfinished"] == 0
    assert rep["efficiency"] == pytest.approx(170 / (100 * 2))
    assert [(r["rule"], r["jobs"], r["total_s"], r["mean_s"], r["max_s"]) for r in rep["rules"]] \
        == [("pretrain", 2, 100, 50, 60), ("distill", 2, 70, 35, 40)]
    assert rep["rules"][0]["share"] == pytest.approx(100 / 170)

    # only jobs 1 (pretrain, 40 s) and 3 (distill, 30 s) have usable phases; top costs first
    phases = [(r["rule"], r["phase"], r["jobs"], r["total_s"]) for r in rep["phases"]]
    assert phases == [("pretrain", "train", 1, 30), ("distill", "train", 1, 20),
                      ("distill", "other", 1, 6), ("pretrain", "setup", 1, 5),
                      ("distill", "setup", 1, 4), ("pretrain", "other", 1, 3),
                      ("pretrain", "evaluate", 1, 2)]
    assert rep["phases"][0]["share"] == pytest.approx(30 / 40)

    assert "wall 1:40" in text and "parallel efficiency 0.85" in text and "4 jobs" in text
    rule_lines = [line.split() for line in text.splitlines()
                  if line.split()[:1] in (["pretrain"], ["distill"])]
    assert rule_lines[0][:3] == ["pretrain", "2", "100"]
    assert rule_lines[1][:3] == ["distill", "2", "70"]
    assert ["distill", "other", "1", "6.0"] in [line[:4] for line in rule_lines]


def test_log_option_cores_and_an_incomplete_run(run_dir, capsys):
    log = run_dir / "partial.log"
    log.write_text(LOG.split("[Wed Dec  2 05:01:40 2026]")[0])  # job 4 never finishes
    assert bench_demo.main([str(run_dir), "--log", str(log), "--cores", "1"]) == 0
    text = capsys.readouterr().out
    assert "3 jobs finished, 1 started but not finished" in text and "NOT complete" in text
    assert "wall 1:10" in text and "parallel efficiency 1.86" in text  # 130 s / (70 s x 1)


@pytest.mark.parametrize("where", ["workdir", "log"])
def test_a_missing_log_is_one_line_and_status_2(tmp_path, capsys, where):
    missing = tmp_path / "nowhere"
    argv = [str(missing)] if where == "workdir" else ["--log", str(missing)]
    assert bench_demo.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench_demo: error: ")
    assert str(missing) in lines[0] and "make demo" in lines[0] and "--log" in lines[0]


def test_run_arguments():
    args = bench_demo.parse_args(["--run", "--cores", "3", "--target", "results/table7.csv",
                                  "--config-arg", "seeds=[0,1,2]", "--config-arg", "x=1"])
    assert args.run and args.cores == 3 and args.target == "results/table7.csv"
    assert args.config_arg == ["seeds=[0,1,2]", "x=1"]
    assert bench_demo.parse_args([]).target == "results/tables.md"
    with pytest.raises(SystemExit) as exit_:
        bench_demo.parse_args(["--run", "somewhere"])
    assert exit_.value.code == 2


def test_the_reference_step_is_timed_and_converts_the_wall_time(run_dir, tmp_path, capsys,
                                                                monkeypatch):
    import torch

    threads, state = torch.get_num_threads(), torch.random.get_rng_state()
    assert 0 < bench_demo.reference_step_ms(batch=2, steps=1, repeats=1) < 60_000
    assert torch.get_num_threads() == threads  # one thread while timing, then restored
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG untouched

    calls = []
    monkeypatch.setattr(bench_demo, "reference_step_ms", lambda: calls.append(1) or 125.0)
    out = tmp_path / "bench.json"
    assert bench_demo.main([str(run_dir), "--json", str(out)]) == 0  # not asked for: not timed
    assert calls == [] and "reference step" not in capsys.readouterr().out
    assert "reference_ms" not in json.loads(out.read_text())

    assert bench_demo.main([str(run_dir), "--reference", "--json", str(out)]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert calls == [1] and json.loads(out.read_text())["reference_ms"] == [125.0]
    assert line.startswith("reference step (ResNet-20, batch 32, 1 thread): 125 ms;")
    assert line.endswith("the wall time is 800 of those steps")  # 100 s / 0.125 s


def test_run_times_the_reference_step_before_and_after(tmp_path, run_dir, capsys, monkeypatch):
    times = iter([100.0, 150.0])
    order = []
    monkeypatch.setattr(bench_demo, "reference_step_ms",
                        lambda: order.append("reference") or next(times))
    monkeypatch.setattr(bench_demo, "run_demo",
                        lambda cores, target, config: order.append("demo") or (run_dir, 101.0))
    assert bench_demo.main(["--run"]) == 0
    assert order == ["reference", "demo", "reference"]
    text = capsys.readouterr().out
    assert ("100 ms before the run, 150 ms after; the wall time is 800 of those steps"  # /0.125
            in text)


SNAKEFILE = """\
rule pretrain:
    output: "results/models/{m}/final.pt", "results/models/{m}/result.json"
    shell: "touch {output}"

rule distill:
    input: lambda w: {"c": "results/models/a/final.pt", "d": "results/models/b/final.pt"}[w.r]
    output: "results/runs/{r}/final.pt"
    shell: "touch {output}"
"""


def test_targets_are_priced_by_the_jobs_their_dry_run_plans(run_dir, tmp_path, capsys):
    (run_dir / "Snakefile").write_text(SNAKEFILE)
    out = tmp_path / "bench.json"
    assert bench_demo.main([str(run_dir), "--json", str(out), "--targets",
                            "results/runs/c/final.pt", "results/runs/d/final.pt"]) == 0
    rows = json.loads(out.read_text())["targets"]
    # c: distill c (30 s) + pretrain a (40 s); d: distill d (40 s) + pretrain b (60 s)
    assert [(r["targets"], r["jobs"], r["job_s"]) for r in rows] == [
        (["results/runs/c/final.pt"], 2, 70), (["results/runs/d/final.pt"], 2, 100),
        (["results/runs/c/final.pt", "results/runs/d/final.pt"], 4, 170)]
    assert rows[0]["share"] == pytest.approx(70 / 170)
    text = capsys.readouterr().out
    assert text.splitlines()[-1].split() == ["all", "of", "the", "above", "4", "170", "100.0%"]


def test_a_target_snakemake_cannot_plan_is_one_line_and_status_2(run_dir, capsys):
    (run_dir / "Snakefile").write_text(SNAKEFILE)
    profile = run_dir / "workflow" / "profiles" / "default"  # as in the project: its notice
    profile.mkdir(parents=True)                               # goes to stderr, the error not
    (profile / "config.yaml").write_text("cores: 1\n")
    assert bench_demo.main([str(run_dir), "--targets", "results/nothing.csv"]) == 2
    captured = capsys.readouterr()
    assert "pretrain" in captured.out  # the report of the run is kept
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("bench_demo: error: snakemake -n --forceall results/nothing.csv "
                               f"failed in {run_dir}: ")
    assert "results/nothing.csv" in lines[0].split("failed in", 1)[1], lines[0]


def test_targets_use_the_config_args_and_warn_when_the_log_lacks_planned_jobs(
        run_dir, tmp_path, capsys):
    # the run's log holds c and d; with extra=e the dry run also plans distill e (pretrain a)
    (run_dir / "Snakefile").write_text(SNAKEFILE.replace(
        '{"c": "results/models/a/final.pt",',
        '{"e": "results/models/a/final.pt", "c": "results/models/a/final.pt",') + """
rule all:
    input: ["results/runs/c/final.pt"] + [f"results/runs/{r}/final.pt" for r in config.get("extra", [])]
""")
    out = tmp_path / "bench.json"
    assert bench_demo.main([str(run_dir), "--json", str(out), "--targets", "all"]) == 0
    # jobs with outputs: distill c and pretrain a, both in the log
    assert [(r["planned"], r["jobs"]) for r in json.loads(out.read_text())["targets"]] == [(2, 2)]
    assert "warning" not in capsys.readouterr().out
    assert bench_demo.main([str(run_dir), "--json", str(out), "--targets", "all",
                            "--config-arg", "extra=[e]"]) == 0
    row = json.loads(out.read_text())["targets"][0]
    assert (row["planned"], row["jobs"], row["job_s"]) == (3, 2, 70)  # + distill e, not run
    assert ("warning: all: the dry run plans 3 jobs, this run's log has 2 of them"
            in capsys.readouterr().out)


def test_output_lines_split_as_snakemake_prints_them():
    assert bench_demo.split_outputs("a/b.pt, c d/e,f.json") == ["a/b.pt", "c d/e,f.json"]


TABLE7 = """\
table,dataset,teacher,row,method,transform,note,teacher_top1,teacher_top1_paper,r20,r20_std,r20_n,r20_paper,r20_diff,r20_runs
7,cifar100,resnet56,Baseline,baseline,none,,63.6,71.21,31.0,,1,67.96,-36.96,results/x
7,cifar100,resnet56,KD,kd,none,a note,63.6,71.21,42.4,1.5,3,68.88,-26.48,results/y
7,cifar100,resnet56,KD,kd,none,,63.6,71.21,–,,1,,,results/z
"""


def test_table_cells_are_the_pipelines_numbers_and_compare_names_each_change(
        run_dir, tmp_path, capsys):
    _write(run_dir / "results" / "table7.csv", TABLE7)
    out = tmp_path / "bench.json"
    assert bench_demo.main([str(run_dir), "--json", str(out)]) == 0
    cells = json.loads(out.read_text())["cells"]
    # ours, std, seed count and the teacher's score; never the paper's numbers or differences;
    # a repeated row label keeps both rows; a word ("–") is not a cell
    assert cells == {
        "table7/Baseline/teacher_top1": 63.6, "table7/Baseline/r20": 31.0,
        "table7/Baseline/r20_n": 1.0,
        "table7/KD/teacher_top1": 63.6, "table7/KD/r20": 42.4, "table7/KD/r20_std": 1.5,
        "table7/KD/r20_n": 3.0, "table7/KD#2/teacher_top1": 63.6, "table7/KD#2/r20_n": 1.0}
    capsys.readouterr()

    assert bench_demo.main([str(run_dir), "--compare", str(out)]) == 0  # the same run
    assert "9 here, 9 there, 0 differ" in capsys.readouterr().out

    old = {**cells, "table7/KD/r20": 40.0, "table8/Baseline/r18": 78.0}
    del old["table7/Baseline/r20_n"]
    (tmp_path / "old.json").write_text(json.dumps({"cells": old}))
    assert bench_demo.main([str(run_dir), "--compare", str(tmp_path / "old.json"),
                            "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert "9 here, 9 there, 3 differ" in text
    assert "  table7/Baseline/r20_n: (none) -> 1.0" in text
    assert "  table7/KD/r20: 40.0 -> 42.4" in text
    assert "  table8/Baseline/r18: 78.0 -> (none)" in text
    assert json.loads(out.read_text())["compared"]["differ"] == 3


@pytest.mark.parametrize("content", [None, "{not json", '{"cells": {}}', '["a list"]'])
def test_a_compare_file_without_cells_is_one_line_and_status_2(run_dir, tmp_path, capsys,
                                                              content):
    path = tmp_path / "old.json"
    if content is not None:
        path.write_text(content)
    assert bench_demo.main([str(run_dir), "--compare", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "--json" in lines[0]


@pytest.mark.parametrize("name, seeds", [("demo_cells.json", 1), ("demo_cells_seeds.json", 3)])
def test_the_recorded_demo_cells_cover_every_table(name, seeds):
    path = Path(bench_demo.REPO) / "bench" / name
    recorded = json.loads(path.read_text())
    cells = bench_demo.read_cells(path)
    assert recorded["commit"] and recorded["measured"]
    assert {key.split("/")[0] for key in cells} == {f"table{n}" for n in range(1, 12)}
    assert not any(key.endswith(bench_demo.BESIDE_OURS) for key in cells)
    # every computed cell of Table 7 (both students) is over this many seeds
    counts = {v for k, v in cells.items() if k.startswith("table7/") and k.endswith("_n")}
    assert counts == {seeds}

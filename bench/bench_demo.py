"""Benchmark: where a demo pipeline run's time went, per rule and per phase of the jobs' work.

Reads a finished Snakemake run, the newest ``.snakemake/log/*.snakemake.log`` of WORKDIR (or
``--log FILE``), and prints

* the run: its wall time (first to last timestamp of the log), the number of finished jobs, the
  sum of their times and the parallel efficiency, job time / (wall x ``--cores``); whether the
  log reached "N of N steps (100%) done";
* per rule, sorted by total time: jobs, total, mean and max seconds, share of all job time;
* per rule and phase, top costs first: the seconds that the jobs' own ``result.json`` (in the
  folder of each job's first output, or one of its outputs) lists under ``"phases"`` (setup,
  train, evaluate, ...), summed over the rule's jobs, and "other", the rest of those jobs' time
  (process start, imports, tracking, Snakemake). Jobs without phases are left out of this table.

A job's time is its finish timestamp minus its start timestamp in the log; the log counts whole
seconds, so each job's time (and its "other") is within a second or so.

``--run`` first runs the demo: it extracts the checkout's HEAD (``git archive``) into a fresh
temporary folder, runs ``python -m snakemake --cores N results/tables.md`` there (``--target``,
``--config-arg KEY=VALUE`` for Snakemake's ``--config``), times it and reports on that folder,
which it keeps and prints.

The machine's speed that hour: this project's CPU machines are shared, and the same commit's
demo has taken 16 and 24 minutes an hour apart. ``--run`` therefore also times a reference step
before and after the demo (one ResNet-20 training step of the demo's shape: batch 32 of 32 px
CIFAR-format images, one thread, PyTorch's own convolution gradients and unfused momentum SGD,
as in ``bench/bench_small_conv.py``'s PyTorch column; the median of 5 means of 8 steps: the
load varies from minute to minute, and the median follows it where a best time would hide it)
and prints the wall time in those steps, a figure two runs on differently loaded hours can be
compared by roughly. ``--reference`` times it once for a report on an earlier run.

The table cells: every number the run's ``results/table*.csv`` computed (the "ours" columns,
their std and seed counts, the teacher's score; not the paper's numbers or the differences), as
``"table7/FitNets/resnet20": 48.4``, go into ``--json``'s ``cells``. ``--compare FILE`` reads
an earlier ``--json`` file (say ``bench/demo_cells.json``, the cells of a recorded run) and prints
each cell that is new, gone or different; the exit status is then 1 when any is. The demo is
deterministic on one machine type as long as no computation changes, so a change meant to leave
the numbers alone is checked by ``--run --compare bench/demo_cells.json``.

``--targets T [T ...]`` prices parts of the DAG from that run: for each target (say
``results/table7.csv``) and, given more than one, for all of them together, the jobs
``snakemake -n --forceall`` lists for it (with the ``--config-arg`` values, which should be the
run's) and the job time they took in the run, so a person can see what building only some tables
would save; a warning names a target whose planned jobs the run's log lacks.

    python bench/bench_demo.py [WORKDIR] [--log FILE] [--cores 2] [--json FILE] [--reference]
                               [--targets results/table7.csv results/table8.csv ...]
    python bench/bench_demo.py --run [--cores 2] [--target results/tables.md]
                               [--compare bench/demo_cells.json]
                               [--config-arg 'seeds=[0,1,2]' ...]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from kcd.tables import BESIDE_OURS, LABEL_COLUMNS  # the CSV's grammar (no torch, no pandas)

REPO = Path(__file__).resolve().parents[1]

TIMESTAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
RULE = re.compile(r"^(?:local)?(?:rule|checkpoint) (\S+):$")
FIELD = re.compile(r"^    (\w+): (.*)$")
FINISHED = re.compile(r"^Finished jobid: (\d+)\b")
COMPLETE = re.compile(r"^(\d+) of \1 steps \(100%\) done$")


class BenchError(Exception):
    """An expected failure, reported as one line on stderr."""


@dataclass
class Job:
    rule: str
    start: datetime
    outputs: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Run:
    log: Path
    jobs: list[Job]  # finished ones
    unfinished: int
    wall_s: float
    complete: bool


def split_outputs(text: str) -> list[str]:
    """The paths of an ``output:`` line, as Snakemake prints them in logs and dry runs."""
    return [path.strip() for path in text.split(", ")]


def find_log(workdir: Path) -> Path:
    logs = sorted((workdir / ".snakemake" / "log").glob("*.snakemake.log"))
    if not logs:
        raise BenchError(f"no Snakemake log in {workdir / '.snakemake' / 'log'}; run `make demo` "
                         "there first (or use --run), or pass --log FILE")
    return logs[-1]  # the names start with the run's ISO start time


def _timestamp(text: str) -> datetime:
    return datetime.strptime(" ".join(text.split()), "%a %b %d %H:%M:%S %Y")


def parse_log(path: Path) -> Run:
    """The finished jobs of a Snakemake 9 log, their rules, outputs and times."""
    if not path.is_file():
        raise BenchError(f"{path} does not exist; run `make demo` first, or pass --log FILE")
    stamps: list[datetime] = []
    started: dict[int, Job] = {}
    finished: list[Job] = []
    block: Job | None = None  # the job whose indented fields are being read
    complete = False
    for line in path.read_text(errors="replace").splitlines():
        if m := TIMESTAMP.match(line):
            stamps.append(_timestamp(m[1]))
        elif (m := RULE.match(line)) and stamps:
            block = Job(rule=m[1], start=stamps[-1])
            continue
        elif block and (m := FIELD.match(line)):
            if m[1] == "output":
                block.outputs = split_outputs(m[2])
            elif m[1] == "jobid":
                started[int(m[2])] = block
            continue
        elif (m := FINISHED.match(line)) and int(m[1]) in started:
            job = started.pop(int(m[1]))
            job.seconds = (stamps[-1] - job.start).total_seconds()
            finished.append(job)
        elif COMPLETE.match(line):
            complete = True
        block = None
    if not finished:
        raise BenchError(f"{path} has no finished jobs; is it the log of a Snakemake run that "
                         "did something?")
    return Run(log=path, jobs=finished, unfinished=len(started),
               wall_s=(stamps[-1] - stamps[0]).total_seconds(), complete=complete)


def _result_file(workdir: Path, outputs: list[str]) -> Path:
    named = [o for o in outputs if Path(o).name == "result.json"]
    return workdir / (named[0] if named else Path(outputs[0]).parent / "result.json")


def read_phases(workdir: Path, job: Job) -> dict[str, float] | None:
    """The job's ``result.json`` phases (name -> seconds), or None if it has none readable."""
    if not job.outputs:
        return None
    try:
        phases = json.loads(_result_file(workdir, job.outputs).read_text()).get("phases")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(phases, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in phases.values()):
        return None
    return {str(k): float(v) for k, v in phases.items()}


def rule_rows(jobs: list[Job]) -> list[dict]:
    total = sum(j.seconds for j in jobs)
    by_rule: dict[str, list[float]] = {}
    for job in jobs:
        by_rule.setdefault(job.rule, []).append(job.seconds)
    rows = [{"rule": rule, "jobs": len(times), "total_s": sum(times),
             "mean_s": sum(times) / len(times), "max_s": max(times),
             "share": sum(times) / total if total else 0.0}
            for rule, times in by_rule.items()]
    return sorted(rows, key=lambda r: (-r["total_s"], r["rule"]))


def phase_rows(workdir: Path, jobs: list[Job]) -> list[dict]:
    """Per rule and phase: seconds summed over the rule's jobs with phases, and "other"."""
    sums: dict[tuple[str, str], float] = {}
    timed: dict[str, list[float]] = {}  # rule -> times of its jobs with phases
    for job in jobs:
        phases = read_phases(workdir, job)
        if phases is None:
            continue
        timed.setdefault(job.rule, []).append(job.seconds)
        for name, seconds in {**phases, "other": job.seconds - sum(phases.values())}.items():
            sums[job.rule, name] = sums.get((job.rule, name), 0.0) + seconds
    rows = [{"rule": rule, "phase": name, "jobs": len(timed[rule]), "total_s": seconds,
             "mean_s": seconds / len(timed[rule]),
             "share": seconds / sum(timed[rule]) if sum(timed[rule]) else 0.0}
            for (rule, name), seconds in sums.items()]
    return sorted(rows, key=lambda r: (-r["total_s"], r["rule"], r["phase"]))


def table_cells(results: Path) -> dict[str, float]:
    """Every number the pipeline computed in ``results/table*.csv``, by
    ``table<N>/<row>/<column>`` (the paper's numbers and the differences left out)."""
    cells: dict[str, float] = {}
    for path in sorted(results.glob("table*.csv")):
        try:
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        except (OSError, csv.Error, UnicodeDecodeError) as e:
            raise BenchError(f"cannot read {path}: {e}; rebuild it with `snakemake --cores 2 "
                             f"{path.relative_to(results.parent)}`") from e
        for row in rows:
            label = row.get("row") or ""
            for column, text in row.items():
                if column in LABEL_COLUMNS or column is None or column.endswith(BESIDE_OURS) \
                        or text in (None, ""):
                    continue
                try:
                    value = float(text)
                except ValueError:
                    continue  # a word, not a number (e.g. "–" for a cell the paper lacks)
                key, n = f"{path.stem}/{label}/{column}", 2
                while key in cells:  # a row label used twice: keep both, in file order
                    key, n = f"{path.stem}/{label}#{n}/{column}", n + 1
                cells[key] = value
    return cells


def compare_cells(old: dict[str, float], new: dict[str, float]) -> list[tuple[str, object, object]]:
    """(cell, old, new) of each cell that differs, appeared (old None) or went (new None)."""
    return [(key, old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key)]


def read_cells(path: Path) -> dict[str, float]:
    """The ``cells`` of an earlier ``--json`` file."""
    try:
        cells = json.loads(path.read_text()).get("cells")
    except (OSError, ValueError, AttributeError) as e:
        raise BenchError(f"cannot read the cells of {path}: {e}; give a file written by "
                         "`bench/bench_demo.py --json`") from e
    if not isinstance(cells, dict) or not cells:
        raise BenchError(f"{path} has no table cells; give a file written by "
                         "`bench/bench_demo.py --json` for a finished demo")
    return cells


def format_comparison(path: Path, old: dict, new: dict, changed: list) -> str:
    lines = ["", f"table cells against {path}: {len(new)} here, {len(old)} there, "
             f"{len(changed)} differ"]
    for key, was, now in changed:
        lines.append(f"  {key}: {'(none)' if was is None else was} -> "
                     f"{'(none)' if now is None else now}")
    return "\n".join(lines)


def _mss(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def report(run: Run, workdir: Path, cores: int) -> dict:
    job_s = sum(j.seconds for j in run.jobs)
    return {
        "log": str(run.log), "wall_s": run.wall_s, "cores": cores, "jobs": len(run.jobs),
        "unfinished": run.unfinished, "complete": run.complete, "job_s": job_s,
        "efficiency": job_s / (run.wall_s * cores) if run.wall_s else None,
        "rules": rule_rows(run.jobs), "phases": phase_rows(workdir, run.jobs),
        "cells": table_cells(workdir / "results"),
    }


def format_report(rep: dict) -> str:
    efficiency = "n/a" if rep["efficiency"] is None else f"{rep['efficiency']:.2f}"
    state = "complete" if rep["complete"] else "NOT complete (no 'N of N steps (100%) done')"
    unfinished = f", {rep['unfinished']} started but not finished" if rep["unfinished"] else ""
    lines = [
        f"log: {rep['log']}",
        f"wall {_mss(rep['wall_s'])} (first to last timestamp), {rep['jobs']} jobs finished"
        f"{unfinished}, run {state}",
        f"job time {rep['job_s']:.0f} s summed; parallel efficiency {efficiency} "
        f"(job time / (wall x {rep['cores']} cores))",
        "",
        f"{'rule':<22} {'jobs':>5} {'total s':>9} {'mean s':>8} {'max s':>7} {'share':>7}",
    ]
    lines += [f"{r['rule']:<22} {r['jobs']:>5} {r['total_s']:>9.0f} {r['mean_s']:>8.1f} "
              f"{r['max_s']:>7.0f} {r['share']:>6.1%}" for r in rep["rules"]]
    if rep["phases"]:
        lines += ["", "phases from the jobs' result.json (share: of those jobs' time; other: "
                  "the rest of it)",
                  f"{'rule':<22} {'phase':<12} {'jobs':>5} {'total s':>9} {'mean s':>8} "
                  f"{'share':>7}"]
        lines += [f"{r['rule']:<22} {r['phase']:<12} {r['jobs']:>5} {r['total_s']:>9.1f} "
                  f"{r['mean_s']:>8.2f} {r['share']:>6.1%}" for r in rep["phases"]]
    return "\n".join(lines)


def dry_run_outputs(workdir: Path, targets: list[str], config_args: list[str]) -> list[list[str]]:
    """The outputs of each job ``snakemake -n --forceall TARGETS [--config ...]`` plans in
    ``workdir``."""
    cmd = [sys.executable, "-m", "snakemake", "-n", "--forceall", *targets]
    if config_args:
        cmd += ["--config", *config_args]
    proc = subprocess.run(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env={**os.environ, "PYTHONPATH": str(workdir)})
    if proc.returncode:
        lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
        raise BenchError(f"snakemake -n --forceall {' '.join(targets)} failed in {workdir}: "
                         f"{lines[-1] if lines else 'no output'}")
    return [split_outputs(FIELD.match(line)[2]) for line in proc.stdout.splitlines()
            if line.startswith("    output: ")]


def target_rows(workdir: Path, run: Run, targets: list[str],
                config_args: list[str] = ()) -> list[dict]:
    """Per target, then all ``targets`` together (when more than one): the run's jobs that
    produce an output the target's dry run plans, their count, job time and share, and how
    many jobs the dry run planned (more than were found: the log lacks some of them)."""
    total = sum(j.seconds for j in run.jobs) or 1.0
    groups = [[t] for t in targets] + ([targets] if len(targets) > 1 else [])
    rows = []
    for group in groups:
        planned = dry_run_outputs(workdir, group, list(config_args))
        wanted = {path for outputs in planned for path in outputs}
        jobs = [j for j in run.jobs if wanted.intersection(j.outputs)]
        seconds = sum(j.seconds for j in jobs)
        rows.append({"targets": group, "planned": len(planned), "jobs": len(jobs),
                     "job_s": seconds, "share": seconds / total})
    return rows


def format_targets(rows: list[dict]) -> str:
    lines = ["", "job time by target (the run's jobs that `snakemake -n --forceall TARGET` "
             "plans)", f"{'target':<40} {'jobs':>5} {'job s':>8} {'share':>7}"]
    for row in rows:
        name = row["targets"][0] if len(row["targets"]) == 1 else "all of the above"
        lines.append(f"{name:<40} {row['jobs']:>5} {row['job_s']:>8.0f} {row['share']:>6.1%}")
    missing = [row for row in rows if row["planned"] != row["jobs"]]
    for row in missing:
        lines.append(f"warning: {' '.join(row['targets'])}: the dry run plans {row['planned']} "
                     f"jobs, this run's log has {row['jobs']} of them (a partial or resumed "
                     f"run, or other --config-arg values than the run's)")
    return "\n".join(lines)


def reference_step_ms(batch: int = 32, steps: int = 8, repeats: int = 5) -> float:
    """Milliseconds of one demo-shaped ResNet-20 training step on one thread (the median of
    ``repeats`` means of ``steps`` steps, after two warm-up steps)."""
    import importlib.util

    import torch  # only here: the log report needs no torch

    from kcd.models import build_model

    spec = importlib.util.spec_from_file_location("bench_small_conv",
                                                  REPO / "bench" / "bench_small_conv.py")
    small_conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(small_conv)  # its step_ms: the same timed step as that benchmark

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = build_model("resnet20", 100).to(memory_format=torch.channels_last)
            x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 100, (batch,))
        small_conv.step_ms(model, x, y, 2)  # warm-up: oneDNN primitives, allocator
        return statistics.median(small_conv.step_ms(model, x, y, steps) for _ in range(repeats))
    finally:
        torch.set_num_threads(threads)


def format_reference(rep: dict) -> str:
    """The reference-step line of a report holding ``reference_ms`` (a list of 1-2 times)."""
    times = rep["reference_ms"]
    when = (f"{times[0]:.0f} ms before the run, {times[1]:.0f} ms after" if len(times) == 2
            else f"{times[0]:.0f} ms")
    mean = sum(times) / len(times)
    return (f"reference step (ResNet-20, batch 32, 1 thread): {when}; the wall time is "
            f"{rep['wall_s'] * 1000 / mean:,.0f} of those steps")


def run_demo(cores: int, target: str, config_args: list[str]) -> tuple[Path, float]:
    """Run the demo in a fresh folder holding this checkout's HEAD; the folder and its wall s."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "HEAD"],
                             capture_output=True)
    if archive.returncode:
        raise BenchError(f"git archive HEAD in {REPO} failed: "
                         f"{archive.stderr.decode(errors='replace').strip()}")
    workdir = Path(tempfile.mkdtemp(prefix="kcd-bench-demo-"))
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(workdir, filter="data")
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(cores), target]
    if config_args:
        cmd += ["--config", *config_args]
    out = workdir / "snakemake.out"
    print(f"running `{' '.join(cmd)}` in {workdir} (Snakemake's output: {out})", flush=True)
    start = time.perf_counter()
    with out.open("w") as stream:
        proc = subprocess.run(cmd, cwd=workdir, env={**os.environ, "PYTHONPATH": str(workdir)},
                              stdout=stream, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        raise BenchError(f"snakemake exited with status {proc.returncode} after {_mss(elapsed)}; "
                         f"its output is in {out}")
    return workdir, elapsed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir", nargs="?", type=Path, default=Path("."),
                        help="the folder Snakemake ran in (default: the current one)")
    parser.add_argument("--log", type=Path, help="the Snakemake log (default: WORKDIR's newest)")
    parser.add_argument("--cores", type=int, default=2,
                        help="the run's cores, for the efficiency (and --run's Snakemake)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    parser.add_argument("--run", action="store_true",
                        help="run the demo from this checkout's HEAD in a fresh folder first")
    parser.add_argument("--target", default="results/tables.md", help="--run's target")
    parser.add_argument("--config-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to Snakemake's --config by --run and by --targets' dry "
                        "runs (repeatable): give the run's own values")
    parser.add_argument("--targets", nargs="+", default=[], metavar="TARGET",
                        help="also price these targets: the job time of the jobs each needs")
    parser.add_argument("--compare", type=Path, metavar="FILE",
                        help="compare the table cells with an earlier --json file (exit status "
                        "1 when any differs)")
    parser.add_argument("--reference", action="store_true",
                        help="time the reference step now (--run: always, before and after)")
    args = parser.parse_args(argv)
    if args.run and (args.log or args.workdir != Path(".")):
        parser.error("--run makes its own folder; it takes no WORKDIR or --log")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reference = []
    try:
        old_cells = read_cells(args.compare) if args.compare else None  # before a long run
        if args.run:
            reference.append(reference_step_ms())
            workdir, measured = run_demo(args.cores, args.target, args.config_arg)
            reference.append(reference_step_ms())
        else:
            workdir, measured = args.workdir, None
        run = parse_log(args.log or find_log(workdir))
        rep = report(run, workdir, args.cores)
    except BenchError as e:
        print(f"bench_demo: error: {e}", file=sys.stderr)
        return 2
    if args.reference and not args.run:
        reference.append(reference_step_ms())
    print(format_report(rep))
    error = None
    if args.targets:
        try:  # after the report: a target that cannot be planned keeps a long run's numbers
            rep["targets"] = target_rows(workdir, run, args.targets, args.config_arg)
            print(format_targets(rep["targets"]))
        except BenchError as e:
            error = e
    if reference:
        rep["reference_ms"] = reference
        print(format_reference(rep))
    if measured is not None:
        rep.update(run_dir=str(workdir), measured_wall_s=measured)
        print(f"\nrun folder: {workdir} (Snakemake took {_mss(measured)})")
    changed = None
    if old_cells is not None:
        changed = compare_cells(old_cells, rep["cells"])
        rep["compared"] = {"file": str(args.compare), "differ": len(changed)}
        print(format_comparison(args.compare, old_cells, rep["cells"], changed))
    if args.json:
        args.json.write_text(json.dumps(rep, indent=2) + "\n")
    if error:
        print(f"bench_demo: error: {error}", file=sys.stderr, flush=True)
        return 2
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: the fixed cost of one local job, fresh process against a fork of the warm worker.

A short job (``kcd init`` of a small model: a theta0 file, well under a second of work) is run
``--repeats`` times each way, side by side in one run:

``fresh (submitit)``
    ``python -m kcd.launch --launcher local -- init ...`` without a warm worker: the launcher
    starts a submitit local job, a new interpreter that imports torch, torchvision and the
    engines (what every demo job paid before the warm worker).
``warm fork``
    the same command with ``KCD_WARM_SOCKET`` set: the launcher asks the warm worker
    (:mod:`kcd.warm`) for a fork.
``in-process``
    ``python -m kcd.warm run -- init ...`` with a warm worker: what the light rules (transforms,
    tables) do.
``direct``
    ``python -m kcd.cli init ...``: a fresh interpreter without any launcher (the floor of a new
    process).

Wall and CPU seconds are per job, CPU counting the launcher and everything it waits for
(children of this process, the forks' time read from the worker's own counters). The worker's
one-off start (importing everything once) is printed beside the table.

Target (stated under the table): a warm fork at most a quarter of the fresh job's wall time.

    python bench/bench_launch.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kcd import warm  # noqa: E402

TARGET = 0.25


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _worker_cpu(pid: int) -> float:
    """CPU seconds of the worker and its reaped forks (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(v) for v in fields[11:15]) / ticks  # utime, stime, cutime, cstime


def _time(cmd: list[str], env: dict, cwd: Path, repeats: int, worker_pid: int | None):
    walls, cpus = [], []
    for i in range(repeats):
        out = cwd / f"theta0-{i}.pt"
        before_c = _children_cpu()
        before_w = _worker_cpu(worker_pid) if worker_pid else 0.0
        start = time.perf_counter()
        run = subprocess.run([*cmd, "--out", str(out)], cwd=cwd, env=env, capture_output=True,
                             text=True)
        walls.append(time.perf_counter() - start)
        if run.returncode != 0 or not out.is_file():
            raise SystemExit(f"bench: {' '.join(cmd[:4])} failed:\n{run.stdout}\n{run.stderr}")
        out.unlink()
        cpus.append(_children_cpu() - before_c
                    + ((_worker_cpu(worker_pid) - before_w) if worker_pid else 0.0))
    return sum(walls) / repeats, sum(cpus) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    init = ["init", "--arch", "resnet20_0.5x", "--seed", "0", "--num-classes", "100", "-q"]
    base_env = {**os.environ, "PYTHONPATH": str(REPO)}
    base_env.pop(warm.ENV, None)
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="kcd-bench-launch-") as tmp:
        cwd = Path(tmp)
        start = time.perf_counter()
        worker = warm.start()
        if worker is None:
            raise SystemExit("bench: the warm worker did not start")
        worker_start = time.perf_counter() - start
        try:
            warm_env = {**base_env, warm.ENV: worker.path}
            launch = [py, "-m", "kcd.launch", "--launcher", "local", "--log-dir",
                      str(cwd / "jobs"), "--"]
            rows = [
                ("fresh (submitit)", _time([*launch, *init], base_env, cwd, args.repeats, None)),
                ("warm fork", _time([*launch, *init], warm_env, cwd, args.repeats,
                                    worker.process.pid)),
                ("in-process", _time([py, "-m", "kcd.warm", "run", "--", *init], warm_env, cwd,
                                     args.repeats, worker.process.pid)),
                ("direct", _time([py, "-m", "kcd.cli", *init], base_env, cwd, args.repeats,
                                 None)),
            ]
        finally:
            worker.stop()
    fresh_wall = rows[0][1][0]
    print(f"one short job (kcd init resnet20_0.5x), mean of {args.repeats}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'way':<18} {'wall s':>8} {'cpu s':>8} {'wall vs fresh':>14}")
    for name, (wall, cpu) in rows:
        print(f"{name:<18} {wall:8.2f} {cpu:8.2f} {wall / fresh_wall:13.2f}x")
    print(f"warm worker start (once per Snakemake run): {worker_start:.2f} s")
    ratio = rows[1][1][0] / fresh_wall
    verdict = "met" if ratio <= TARGET else "MISSED"
    print(f"target: warm fork <= {TARGET:.2f}x the fresh job's wall time: {ratio:.2f}x, {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run one ``kcd`` step as a submitit job: a local process, or a SLURM job.

Every heavy Snakemake rule calls::

    python -m kcd.launch --launcher local|slurm|debug --name NAME --log-dir DIR \
        [--cpus N --gpus G --mem-mb M --time-min T --tasks T --nodes N] \
        [--partition P --account A --qos Q --constraint C --slurm-extra JSON] -- <kcd args>

and waits for the job. ``local`` (the default) runs the step in a child process through
submitit's local executor, so a laptop exercises the same code path as the cluster; ``slurm``
submits it with sbatch (GPUs, tasks, CPUs, memory, time and the cluster settings mapped to
submitit parameters); ``debug`` runs it in this process. The job's own log is copied to this
process's output, so the rule's log holds it; a failed job fails the rule with the tail of
that log. SIGINT/SIGTERM cancel the job (``scancel`` on SLURM), leaving no orphans. On SLURM the
job's state is checked at least every ``KCD_POLL_SECONDS`` (default 30) seconds.

Jobs are :class:`submitit.helpers.Checkpointable`: when SLURM preempts one or it reaches its
time limit, submitit requeues it and the step resumes from its own checkpoint file.
Multi-task jobs (``--tasks`` > 1, one per GPU) export the torch.distributed environment so the
training engine runs DistributedDataParallel.

This module imports neither torch nor the engines, so the launcher process starts quickly.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import submitit
from submitit.helpers import Checkpointable

TAIL_LINES = 40
POLL_SECONDS = float(os.environ.get("KCD_POLL_SECONDS", "30"))


class KcdJob(Checkpointable):
    """The function a job runs: ``kcd.cli.main(argv)`` in the job's process."""

    def __call__(self, argv: list[str], threads: int) -> int:
        try:
            tasks = submitit.JobEnvironment().num_tasks
        except RuntimeError:  # the debug launcher runs in this process, outside any job
            tasks = 1
        if tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        import torch

        torch.set_num_threads(threads)
        from kcd.cli import main

        code = main(argv)
        if code:
            raise RuntimeError(f"kcd {argv[0] if argv else ''} exited with status {code}")
        return code


def build_executor(args: argparse.Namespace) -> submitit.Executor:
    folder = Path(args.log_dir) / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster=args.launcher)
    params = {
        "name": args.name,
        "timeout_min": args.time_min,
        "mem_gb": max(1, -(-args.mem_mb // 1024)),
        "cpus_per_task": args.cpus,
        "gpus_per_node": args.gpus,
        "tasks_per_node": args.tasks,
        "nodes": args.nodes,
        "stderr_to_stdout": True,
    }
    if args.launcher == "slurm":
        for key in ("partition", "account", "qos", "constraint"):
            value = getattr(args, key)
            if value:
                params[f"slurm_{key}"] = value
        if args.slurm_extra:
            try:
                params["slurm_additional_parameters"] = json.loads(args.slurm_extra)
            except ValueError:
                raise SystemExit(f"kcd.launch: error: --slurm-extra is not JSON: {args.slurm_extra}")
    executor.update_parameters(**params)
    return executor


def _wait(job: submitit.Job, launcher: str) -> None:
    """Wait for ``job``. On SLURM, ask the scheduler at least every ``POLL_SECONDS``: submitit
    alone backs off to minutes between status checks, so a cancelled or killed job would keep
    its rule waiting long after it died."""
    last = time.monotonic()
    while not job.done():
        if launcher == "slurm" and time.monotonic() - last >= POLL_SECONDS:
            job.watcher.update()
            last = time.monotonic()
        time.sleep(1.0)


def _tail(text: str, n: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def _job_log(job: submitit.Job) -> str:
    """The job's log (rank 0's for a multi-task job)."""
    try:
        return (job.task(0).stdout() if job.num_tasks > 1 else job.stdout()) or ""
    except Exception:  # log not written (job never started)
        return ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("kcd.launch: error: give the kcd arguments after --", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m kcd.launch")
    parser.add_argument("--launcher", default="local", choices=["local", "slurm", "debug"])
    parser.add_argument("--name", default="kcd")
    parser.add_argument("--log-dir", default="logs/jobs")
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--gpus", type=int, default=0)
    parser.add_argument("--tasks", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--mem-mb", type=int, default=4096)
    parser.add_argument("--time-min", type=int, default=60)
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--constraint")
    parser.add_argument("--slurm-extra", help="JSON object of extra sbatch options")
    args = parser.parse_args(argv[:split])
    kcd_argv = argv[split + 1:]

    if args.launcher == "debug":
        return KcdJob()(kcd_argv, args.cpus) or 0
    executor = build_executor(args)
    job = executor.submit(KcdJob(), kcd_argv, args.cpus)
    print(f"kcd.launch: {args.launcher} job {job.job_id} ({args.name}); job log in "
          f"{Path(args.log_dir) / str(job.job_id)}", flush=True)

    def cancel(signum, frame):  # Ctrl-C / SIGTERM from snakemake: no orphan jobs
        print(f"kcd.launch: signal {signum}, cancelling job {job.job_id}", flush=True)
        try:
            job.cancel(check=False)
        finally:
            os._exit(128 + signum)

    signal.signal(signal.SIGINT, cancel)
    signal.signal(signal.SIGTERM, cancel)
    try:
        _wait(job, args.launcher)
        if args.tasks * args.nodes > 1:
            job.results()  # one result per task
        else:
            job.result()
    except submitit.core.utils.UncompletedJobError as e:
        log = _job_log(job)
        print(log, flush=True)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"kcd.launch: job {job.job_id} ({args.name}) did not complete: {reason}\n"
              f"--- last lines of its log ---\n{_tail(log)}", file=sys.stderr, flush=True)
        return 1
    print(_job_log(job), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

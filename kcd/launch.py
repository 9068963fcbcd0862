"""Run one ``kcd`` step as a submitit job: a local process, or a SLURM job.

Every heavy Snakemake rule calls::

    python -m kcd.launch --launcher local|slurm|debug --name NAME --log-dir DIR \
        [--cpus N --gpus G --mem-mb M --time-min T --tasks T --nodes N] \
        [--partition P --account A --qos Q --constraint C --slurm-extra JSON] -- <kcd args>

and waits for the job. ``local`` (the default) runs the step in a child process through
submitit's local executor, so a laptop exercises the same code path as the cluster (or, when
Snakemake started a warm worker, in a fork of it: :mod:`kcd.warm`, the same step without a
fresh interpreter's imports); ``slurm``
submits it with sbatch (GPUs, tasks, CPUs, memory, time and the cluster settings mapped to
submitit parameters); ``debug`` runs it in this process. The job's own log is copied to this
process's output, so the rule's log holds it; a failed job fails the rule with the tail of
that log. On SLURM the job's state is checked at least every ``KCD_POLL_SECONDS`` (default 30)
seconds.

No orphan jobs: SIGINT (Ctrl-C reaches the whole foreground process group), SIGTERM and SIGHUP
cancel the job (``scancel`` on SLURM) and end the launcher; a watchdog thread does the same when
the Snakemake process that started the launcher is gone (killed with SIGKILL, say). SIGTERM to
Snakemake alone reaches no job: Snakemake 9 answers it by waiting for its running jobs to
finish. :func:`cancel_jobs_on_sigterm`, called in the Snakefile's ``onstart:``, makes Snakemake
pass it on to its launchers first.

Jobs are :class:`submitit.helpers.Checkpointable`: when SLURM preempts one or it reaches its
time limit, submitit requeues it and the step resumes from its own checkpoint file.
Multi-task jobs (``--tasks`` > 1, one per GPU) export the torch.distributed environment so the
training engine runs DistributedDataParallel.

The job itself (:class:`kcd.jobs.KcdJob`) and the /proc reader live in :mod:`kcd.jobs`, which
the warm worker shares. This module imports neither torch nor the engines, so the launcher
process starts quickly.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import submitit

from kcd import warm
from kcd.jobs import KcdJob, proc_stat

TAIL_LINES = 40
POLL_SECONDS = float(os.environ.get("KCD_POLL_SECONDS", "30"))
WATCH_SECONDS = 2.0  # how often the watchdog looks for the Snakemake process


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


# --------------------------------------------------------------------------- no orphan jobs


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _snakemake_ancestor() -> tuple[int, str] | None:
    """(pid, start time) of the nearest ancestor process that runs Snakemake, or None (not under
    Snakemake, or no /proc)."""
    pid = os.getppid()
    while pid > 1:
        stat = proc_stat(pid)
        if stat is None:
            return None
        if any(os.path.basename(arg) == b"snakemake" for arg in _cmdline(pid)[:3]):
            return pid, stat[2]
        pid = stat[1]
    return None


def _is_launcher(pid: int) -> bool:
    argv = _cmdline(pid)
    return any(a == b"-m" and b == b"kcd.launch" for a, b in zip(argv, argv[1:]))


def _launchers_below(root: int) -> list[int]:
    """The ``python -m kcd.launch`` processes among the descendants of ``root`` (Linux)."""
    children: dict[int, list[int]] = {}
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []
    for pid in pids:
        stat = proc_stat(pid)
        if stat is not None:
            children.setdefault(stat[1], []).append(pid)
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if _is_launcher(pid):
            found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def cancel_jobs_on_sigterm() -> None:
    """Make SIGTERM to Snakemake cancel the jobs of the launchers it runs; call it from the
    Snakefile's ``onstart:`` (in Snakemake's main thread, after its scheduler set its handler).

    Snakemake 9's own SIGTERM handler only stops scheduling and waits for the running jobs, which
    on a cluster may take hours. The handler installed here first sends SIGTERM to every
    ``kcd.launch`` process below Snakemake (each cancels its job, exits 143 and so fails its rule),
    then calls Snakemake's handler, so Snakemake exits (non-zero) once those rules have failed.
    Light rules that run in Snakemake's own shell are left to finish."""
    previous = signal.getsignal(signal.SIGTERM)

    def forward(signum, frame):
        for pid in _launchers_below(os.getpid()):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:  # the default action: terminate
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    try:
        signal.signal(signal.SIGTERM, forward)
    except ValueError:  # not the main thread: leave Snakemake's handler alone
        pass


class _Canceller:
    """Cancels the job and ends the launcher, once, on a signal or when Snakemake is gone."""

    def __init__(self):
        self.job: submitit.Job | None = None
        self.pending: int | None = None  # a signal that came while the job was being submitted
        self._lock = threading.Lock()

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            # an ignored SIGINT/SIGHUP (a background job, nohup) stays ignored
            if signum == signal.SIGTERM or signal.getsignal(signum) != signal.SIG_IGN:
                signal.signal(signum, self.on_signal)

    def on_signal(self, signum, frame=None) -> None:
        if self.job is None:
            self.pending = signum  # main() cancels as soon as the job has an id
            return
        self.cancel_and_exit(f"signal {signum}", 128 + signum)

    def cancel_and_exit(self, why: str, code: int) -> None:
        if not self._lock.acquire(blocking=False):
            return  # another signal or the watchdog is already cancelling; it exits
        print(f"kcd.launch: {why}, cancelling job {self.job.job_id}", flush=True)
        try:
            self.job.cancel(check=False)
        finally:
            os._exit(code)

    def attach(self, job) -> None:
        """Cancel ``job`` from now on: at once for a signal that came while it was being
        submitted, on any later signal, and when the Snakemake process above is gone."""
        self.job = job
        if self.pending is not None:
            self.on_signal(self.pending)
        snakemake = _snakemake_ancestor()
        if snakemake is not None:
            self.watch(snakemake)

    def watch(self, snakemake: tuple[int, str]) -> None:
        """In a daemon thread: cancel when the Snakemake process ``(pid, start time)`` has
        exited (gone, a zombie, or its pid reused by another process)."""
        pid, started = snakemake

        def loop():
            while True:
                time.sleep(WATCH_SECONDS)
                stat = proc_stat(pid)
                if stat is None or stat[0] in ("Z", "X") or stat[2] != started:
                    self.cancel_and_exit(f"Snakemake (PID {pid}) is gone", 1)
                    return

        threading.Thread(target=loop, name="kcd-launch-watchdog", daemon=True).start()


def _run_warm(args: argparse.Namespace, kcd_argv: list[str], canceller: _Canceller) -> int | None:
    """Run the step in a fork of the warm worker (:mod:`kcd.warm`), its output going straight
    to this process's; None when the worker does not answer."""
    job = warm.submit(kcd_argv, args.cpus, args.gpus)
    if job is None:
        if canceller.pending is not None:  # stopped while asking: start nothing
            print(f"kcd.launch: signal {canceller.pending} before the job started", flush=True)
            return 128 + canceller.pending
        print("kcd.launch: the warm worker did not answer; starting a new process", flush=True)
        return None
    print(f"kcd.launch: local job {job.job_id} ({args.name}) in a fork of the warm worker",
          flush=True)
    canceller.attach(job)
    try:
        status = job.wait(timeout_s=60.0 * args.time_min)
    except TimeoutError:
        canceller.cancel_and_exit(f"time limit of {args.time_min} min reached", 1)
        return 1  # the watchdog or a signal is already cancelling; it exits
    except ConnectionError as e:
        print(f"kcd.launch: job {job.job_id} ({args.name}) did not complete: {e}",
              file=sys.stderr, flush=True)
        return 1
    if status < 0:
        print(f"kcd.launch: job {job.job_id} ({args.name}) killed by signal {-status}",
              file=sys.stderr, flush=True)
    # A job that exits with an error has printed it as its last line (kcd's one-line error):
    # nothing is added after it, so it stays the last line of the log and of the terminal.
    return 1 if status else 0


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

    if args.launcher == "debug":  # in this process: kcd's exit status, its error the last line
        return KcdJob.run(kcd_argv, args.cpus)
    canceller = _Canceller()
    canceller.install()  # before sbatch: a signal during the submission cancels right after it
    if args.launcher == "local" and args.tasks * args.nodes == 1 and os.environ.get(warm.ENV):
        code = _run_warm(args, kcd_argv, canceller)
        if code is not None:
            return code
    executor = build_executor(args)
    job = executor.submit(KcdJob(), kcd_argv, args.cpus)
    print(f"kcd.launch: {args.launcher} job {job.job_id} ({args.name}); job log in "
          f"{Path(args.log_dir) / str(job.job_id)}", flush=True)
    canceller.attach(job)
    try:
        _wait(job, args.launcher)
        if args.tasks * args.nodes > 1:
            job.results()  # one result per task
        else:
            job.result()
    except submitit.core.utils.UncompletedJobError as e:
        log = _job_log(job)
        print(log, flush=True)
        # submitit's message: the job and its result file, what went wrong, then its output
        reason = " ".join("\n".join(str(e).strip().splitlines()[:2]).split()) or type(e).__name__
        print(f"kcd.launch: job {job.job_id} ({args.name}) did not complete: {reason}\n"
              f"--- last lines of its log ---\n{_tail(log)}", file=sys.stderr, flush=True)
        return 1
    print(_job_log(job), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

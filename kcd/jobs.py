"""What both ways of running a local step share: the job object and the /proc reader.

:class:`KcdJob` is the function a job runs (``kcd.cli.main(argv)`` on the job's CPU threads):
:mod:`kcd.launch` submits it through submitit (a local process or a SLURM job) or calls it in
its own process, and a fork of the warm worker (:mod:`kcd.warm`) calls :meth:`KcdJob.run`.
:func:`proc_stat` reads a process's state, parent and start time from Linux's /proc: the
launcher's watchdog and the warm worker use it to notice that Snakemake is gone.

This module imports neither torch nor the engines (the job does, when it runs), nor
:mod:`kcd.launch` or :mod:`kcd.warm`, so both can import it.
"""
from __future__ import annotations

import os
from pathlib import Path

import submitit
from submitit.helpers import Checkpointable


class KcdJob(Checkpointable):
    """The function a job runs: ``kcd.cli.main(argv)`` in the job's process."""

    def __call__(self, argv: list[str], threads: int) -> int:
        try:
            tasks = submitit.JobEnvironment().num_tasks
        except RuntimeError:  # the debug launcher runs in this process, outside any job
            tasks = 1
        if tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        code = self.run(argv, threads)
        if code:
            # the job fails with kcd's status, and kcd's one-line error stays the last line of
            # its log: submitit would log a traceback after an exception (SystemExit passes by)
            raise SystemExit(code)
        return code

    @staticmethod
    def run(argv: list[str], threads: int) -> int:
        """``kcd argv`` on ``threads`` CPU threads in this process; its exit status."""
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        import torch

        torch.set_num_threads(threads)
        from kcd.cli import main

        return main(argv)


def proc_stat(pid: int) -> tuple[str, int, str] | None:
    """(state, parent pid, start time) of a process from Linux's /proc; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 (state) onwards
    return fields[0], int(fields[1]), fields[19]

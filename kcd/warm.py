"""The warm worker: local ``kcd`` steps run in forks of one process that imported torch once.

At demo scale most jobs train for seconds, and each fresh process spends about five more
importing torch, torchvision, MLflow and the engines: over a hundred jobs, a third of the demo's
CPU time. When Snakemake runs with the local launcher, the Snakefile's ``onstart`` starts one
warm worker (:func:`start`); it imports all of that once and waits on a Unix socket. Each
``python -m kcd.launch --launcher local`` then asks it for a fork (:func:`submit`) instead of
starting a new interpreter. The fork:

- takes the launcher's working directory, environment (``CUDA_VISIBLE_DEVICES`` set to the
  job's GPUs, as submitit's local executor does) and umask, and writes to the launcher's own
  stdout and stderr (passed over the socket), so the rule's log holds the step's output as it
  happens;
- is its own process group, with default signal handlers (Python's for SIGINT), and runs
  ``kcd.cli.main`` with the job's torch thread count, then what an interpreter runs at exit;
- is cancelled by the launcher on Ctrl-C, SIGTERM, a time limit or a vanished Snakemake (the
  launcher signals its process group), killed by the worker when its launcher disconnects, and
  by the kernel when the worker dies.

What a fork shares with the worker rather than with a fresh process: the interpreter's start-up
settings (``sys.path``, ``PYTHONHASHSEED``, warning filters), resource limits and CPU affinity,
numpy's BLAS pool (one thread, sized at the worker's start) and the code as it was when the
worker started. The worker starts no CUDA context, no torch thread pool and no MLflow store
before it forks; the engines seed every random stream themselves, so a fork computes what a
fresh process computes (``tests/test_slurm.py`` compares the two run for run). The worker exits
when Snakemake's ``onsuccess``/``onerror`` stops it, or by itself when the Snakemake process is
gone. A request it cannot serve costs only that request: the launcher then falls back to
submitit's local executor, so warm workers change only the speed. ``launcher.warm: false`` in
the config switches them off.

Light rules (transforms, tables) run ``python -m kcd.warm run -- ARGS`` (:func:`run`): a fork of
the worker when one runs, else ``kcd ARGS`` in that process, on this machine either way.
"""
from __future__ import annotations

import importlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ENV = "KCD_WARM_SOCKET"  # where the launchers find the worker
PRELOAD = ("torch", "torchvision", "mlflow", "pandas", "kcd.jobs", "kcd.cli", "kcd.train",
           "kcd.evaluate", "kcd.statistics", "kcd.transforms", "kcd.tracking", "kcd.detection",
           "kcd.analysis", "kcd.analysis.overlap", "kcd.analysis.feature_consistency",
           "kcd.analysis.activation_maps", "kcd.analysis.heatmap", "kcd.teacher_outputs",
           "kcd.data.decoded",
           # what each tracked job would otherwise import (about 1.3 s): MLflow's client and
           # its sqlite store (no connection is made at import)
           "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store")
MAX_MESSAGE = 1 << 20
MAX_FD = 1 << 16  # the forks close every descriptor above 2 up to this
READY_SECONDS = 120.0


# --------------------------------------------------------------------------- the worker


def _preload() -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional engine's dependency is missing: its jobs import it
            pass


def _child(request: dict, fds: list[int]) -> None:
    """In the fork: become the job and exit with its status. Never returns."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own process group (the worker sets it too, whoever runs first)
        _die_with_parent(request["worker"])
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's: KeyboardInterrupt
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        os.closerange(3, MAX_FD)  # the worker's socket, its connections, the selector
        os.chdir(request["cwd"])
        os.umask(int(request.get("umask", 0o022)))
        os.environ.clear()
        os.environ.update(request["env"])
        tempfile.tempdir = None  # from this job's TMPDIR, not the worker's
        sys.argv = ["kcd", *request["argv"]]
        from kcd.jobs import KcdJob  # here: the light rules' `kcd.warm run` never needs submitit

        try:
            code = KcdJob().run(request["argv"], int(request["threads"]))
        except SystemExit as e:
            if isinstance(e.code, int) or e.code is None:
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        # what a normal interpreter exit runs: wait for non-daemon threads, then exit handlers
        import atexit
        import threading

        shutdown = getattr(threading, "_shutdown", None)
        if shutdown is not None:
            shutdown()
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _kill_group(pid: int, signum: int) -> None:
    """Signal the job ``pid`` and its process group (its own from the fork on)."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signum)
            return
        except (ProcessLookupError, PermissionError):
            continue


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this fork when the worker dies (a killed Snakemake process group must
    not leave jobs running). Elsewhere the launcher's and the worker's watchdogs still cancel."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the worker died before the call
        os._exit(1)


def _send(conn: socket.socket, message: dict) -> None:
    try:
        conn.sendall(json.dumps(message).encode())
    except OSError:  # the launcher is gone; the job is killed when its hang-up is seen
        pass


def serve(path: str, parent: int | None = None) -> int:
    """Run the worker on the Unix socket ``path`` until SIGTERM, or until the process
    ``parent`` (Snakemake) is gone. Prints ``ready`` once it accepts jobs."""
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the launchers; they cancel
    # numpy's BLAS pool is sized at import, here, for every fork: one thread, as a local job
    # started with the default one CPU (OMP_NUM_THREADS=1) would have; torch's threads are set
    # per job in the fork
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    _preload()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path)
    server.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    jobs: dict[int, socket.socket] = {}  # pid of a fork -> its launcher's connection
    print("ready", flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # whoever started the worker has stopped reading its output
    os.close(devnull)
    try:
        while not stopping:
            for key, _ in selector.select(timeout=0.2):
                if key.fileobj is server:
                    _accept(server, selector, jobs)
                else:  # a launcher hung up before its job ended: kill the job
                    _kill_group(key.data, signal.SIGKILL)
                    selector.unregister(key.fileobj)
            while jobs:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                conn = jobs.pop(pid, None)
                if conn is not None:
                    _send(conn, {"exit": os.waitstatus_to_exitcode(status)})
                    try:
                        selector.unregister(conn)
                    except (KeyError, ValueError):
                        pass
                    conn.close()
            if parent is not None and not _alive(parent):
                break
    finally:
        for pid in jobs:
            _kill_group(pid, signal.SIGKILL)
        server.close()
        for remove in (os.unlink, os.rmdir):  # the socket, then its folder if left empty
            try:
                remove(path if remove is os.unlink else os.path.dirname(path))
            except OSError:
                pass
    return 0


def _accept(server: socket.socket, selector: selectors.BaseSelector,
            jobs: dict[int, socket.socket]) -> None:
    """Take one request and fork its job. A bad request, or a fork that fails, costs only that
    request: its launcher gets no pid and starts the job the usual way."""
    try:
        conn, _ = server.accept()
    except OSError:
        return
    fds: list[int] = []
    try:
        conn.settimeout(10.0)
        data, fds, flags, _ = socket.recv_fds(conn, MAX_MESSAGE, 2)
        if flags & getattr(socket, "MSG_TRUNC", 0) or len(fds) != 2:
            raise ValueError("truncated request")
        request = json.loads(data)
        if not isinstance(request, dict):
            raise ValueError("not a request")
        request["worker"] = os.getpid()
        sys.stderr.flush()
        pid = os.fork()
    except (OSError, ValueError, TypeError):
        for fd in fds:
            os.close(fd)
        conn.close()
        return
    if pid == 0:  # the fork closes these descriptors itself; their objects must not, later
        for sock in (server, conn, *jobs.values()):
            sock.detach()
        _child(request, fds)
    try:
        os.setpgid(pid, pid)
    except OSError:  # the fork already did it, or has exited
        pass
    for fd in fds:
        os.close(fd)
    jobs[pid] = conn
    _send(conn, {"pid": pid})
    selector.register(conn, selectors.EVENT_READ, pid)


def _alive(pid: int) -> bool:
    from kcd.jobs import proc_stat  # here: the light rules' `kcd.warm run` never needs submitit

    stat = proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


# --------------------------------------------------------------------------- the launcher's side


class WarmJob:
    """A job running in a fork of the warm worker; the launcher's handle on it."""

    def __init__(self, conn: socket.socket, pid: int):
        self.conn = conn
        self.pid = pid
        self.job_id = f"warm-{pid}"

    def cancel(self, check: bool = False) -> None:
        _kill_group(self.pid, signal.SIGTERM)

    def wait(self, timeout_s: float | None = None) -> int:
        """The job's exit status: its code, -N when killed by signal N."""
        self.conn.settimeout(timeout_s)
        data = b""
        try:
            data = self.conn.recv(MAX_MESSAGE)
        except socket.timeout:
            raise TimeoutError from None
        finally:
            self.conn.settimeout(None)
        if not data:
            raise ConnectionError("the warm worker stopped before the job ended")
        return int(json.loads(data)["exit"])


def submit(argv: list[str], threads: int, gpus: int = 0, path: str | None = None) -> WarmJob | None:
    """Start ``kcd argv`` in a fork of the warm worker at ``path`` (default: ``$KCD_WARM_SOCKET``),
    writing to this process's stdout and stderr; None when no worker answers."""
    path = path or os.environ.get(ENV)
    if not path:
        return None
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.pop(ENV, None)
    umask = os.umask(0)
    os.umask(umask)
    request = {"argv": argv, "threads": threads, "cwd": os.getcwd(), "env": env, "umask": umask}
    sys.stdout.flush()
    sys.stderr.flush()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.settimeout(10.0)
        conn.connect(path)
        socket.send_fds(conn, [json.dumps(request).encode()], [1, 2])
        data = conn.recv(MAX_MESSAGE)
        pid = int(json.loads(data)["pid"])
    except (OSError, ValueError, KeyError):
        conn.close()
        return None
    conn.settimeout(None)
    return WarmJob(conn, pid)


# --------------------------------------------------------------------------- start and stop


class Worker:
    """A started warm worker: its process and socket (see :func:`start`)."""

    def __init__(self, process: subprocess.Popen, folder: str):
        self.process = process
        self.folder = folder
        self.path = str(Path(folder) / "sock")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def start(timeout_s: float = READY_SECONDS) -> Worker | None:
    """Start a warm worker for this process (Snakemake) and wait until it accepts jobs; None,
    with a line on stderr, when it does not come up (the launchers then start fresh processes)."""
    folder = tempfile.mkdtemp(prefix="kcd-warm-")  # short: Unix socket paths are limited to 108
    path = str(Path(folder) / "sock")
    process = subprocess.Popen(
        [sys.executable, "-m", "kcd.warm", "serve", "--socket", path, "--parent", str(os.getpid())],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        start_new_session=True)  # outlives a killed Snakemake process group to clean up
    worker = Worker(process, folder)
    deadline = time.monotonic() + timeout_s
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    while time.monotonic() < deadline:
        if selector.select(timeout=deadline - time.monotonic()):
            line = process.stdout.readline()
            if line.strip() == "ready":
                process.stdout.close()
                return worker
            if not line:  # exited
                break
    print("kcd: the warm worker did not start; each job starts its own process",
          file=sys.stderr)
    worker.stop()
    return None


_STARTED: list[Worker] = []


def start_for_workflow(launcher: dict) -> None:
    """The workflow's onstart: with the local launcher (and ``launcher.warm``, the default),
    start one warm worker and point this process's environment, which the launchers inherit,
    at it."""
    if launcher.get("kind", "local") == "local" and launcher.get("warm", True):
        worker = start()
        if worker is not None:
            _STARTED.append(worker)
            os.environ[ENV] = worker.path


def stop_for_workflow() -> None:
    """The workflow's onsuccess/onerror: stop the worker :func:`start_for_workflow` started."""
    os.environ.pop(ENV, None)
    while _STARTED:
        _STARTED.pop().stop()


def run(argv: list[str]) -> int:
    """``kcd argv`` for a light rule (a transform, a table): in a fork of the warm worker when
    one runs, else in this process. Its exit status."""
    job = submit(argv, threads=1)
    if job is None:
        from kcd.cli import main

        return main(argv)

    def cancel(signum, frame):
        job.cancel()
        os._exit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, cancel)
    try:
        status = job.wait()
    except ConnectionError as e:
        print(f"kcd: error: {e}", file=sys.stderr)
        return 1
    return status if status >= 0 else 128 - status


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:  # python -m kcd.warm run [--] KCD ARGS
        rest = argv[1:]
        return run(rest[1:] if rest[:1] == ["--"] else rest)
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m kcd.warm",
        description="serve: the warm worker (started by the Snakefile); "
                    "run -- ARGS: `kcd ARGS` through the warm worker when one runs")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="run the warm worker on a Unix socket")
    serve_p.add_argument("--socket", required=True, help="the Unix socket to listen on")
    serve_p.add_argument("--parent", type=int, help="exit when this process is gone")
    sub.add_parser("run", help="run `kcd ARGS` through the warm worker when one runs")
    args = parser.parse_args(argv)
    return serve(args.socket, args.parent)


if __name__ == "__main__":
    sys.exit(main())

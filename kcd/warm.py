"""The warm worker: local ``kcd`` steps run in forks of one process that imported torch once.

At demo scale most jobs train for seconds, and each fresh process spends about five more
importing torch, torchvision, MLflow and the engines: over a hundred jobs, a third of the demo's
CPU time. When Snakemake runs with the local launcher, the Snakefile's ``onstart`` starts one
warm worker (:func:`start`); it imports all of that once and waits on a Unix socket. Each
``python -m kcd.launch --launcher local`` then asks it for a fork (:func:`run`) instead of
starting a new interpreter. The fork:

- takes the launcher's working directory and environment (``CUDA_VISIBLE_DEVICES`` set to the
  job's GPUs, as submitit's local executor does) and writes to the launcher's own stdout and
  stderr (passed over the socket), so the rule's log holds the step's output as it happens;
- starts a new session, with default signal handlers, and runs ``kcd.cli.main`` exactly as a
  fresh job process would (the same torch thread count), then the exit handlers;
- is cancelled by the launcher on Ctrl-C, SIGTERM, a time limit or a vanished Snakemake (the
  launcher signals its process group), and killed by the worker when its launcher disconnects.

The worker has initialised no thread pool, no CUDA and no MLflow store before it forks, so
each fork starts as clean as a new process. It exits when Snakemake's ``onsuccess``/``onerror``
stops it, or by itself when the Snakemake process is gone. If it cannot be reached the launcher
falls back to submitit's local executor, so warm workers change only the speed:
``launcher.warm: false`` in the config switches them off.

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
PRELOAD = ("torch", "torchvision", "mlflow", "pandas", "kcd.cli", "kcd.train", "kcd.evaluate",
           "kcd.statistics", "kcd.transforms", "kcd.tracking", "kcd.detection", "kcd.analysis",
           "kcd.analysis.overlap", "kcd.analysis.feature_consistency")
MAX_MESSAGE = 1 << 20
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
        _die_with_parent(request["worker"])
        os.setsid()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        for fd in (devnull, *fds):
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["kcd", *request["argv"]]
        from kcd.launch import KcdJob

        try:
            code = KcdJob().run(request["argv"], int(request["threads"]))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        import atexit

        atexit._run_exitfuncs()  # what a normal interpreter exit runs (MLflow, tqdm, ...)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


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
    _preload()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path)
    server.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    jobs: dict[int, socket.socket] = {}  # pid of a fork -> its launcher's connection
    print("ready", flush=True)
    try:
        while not stopping:
            for key, _ in selector.select(timeout=0.2):
                if key.fileobj is server:
                    conn, _ = server.accept()
                    conn.settimeout(10.0)
                    try:
                        data, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 2)
                        request = json.loads(data)
                    except (OSError, ValueError):
                        conn.close()
                        continue
                    if len(fds) != 2:
                        for fd in fds:
                            os.close(fd)
                        conn.close()
                        continue
                    sys.stdout.flush()
                    sys.stderr.flush()
                    request["worker"] = os.getpid()
                    pid = os.fork()
                    if pid == 0:
                        server.close()
                        for other in jobs.values():
                            other.close()
                        conn.close()
                        _child(request, fds)
                    for fd in fds:
                        os.close(fd)
                    jobs[pid] = conn
                    _send(conn, {"pid": pid})
                    selector.register(conn, selectors.EVENT_READ, pid)
                else:  # a launcher hung up before its job ended: kill the job
                    pid = key.data
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
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
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        server.close()
        for remove in (os.unlink, os.rmdir):  # the socket, then its folder if left empty
            try:
                remove(path if remove is os.unlink else os.path.dirname(path))
            except OSError:
                pass
    return 0


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state not in ("Z", "X")


# --------------------------------------------------------------------------- the launcher's side


class WarmJob:
    """A job running in a fork of the warm worker; the launcher's handle on it."""

    def __init__(self, conn: socket.socket, pid: int):
        self.conn = conn
        self.pid = pid
        self.job_id = f"warm-{pid}"

    def cancel(self, check: bool = False) -> None:
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

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
    request = {"argv": argv, "threads": threads, "cwd": os.getcwd(), "env": env}
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

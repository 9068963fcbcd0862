"""The warm worker (kcd/warm.py): local jobs run in forks of one process that imported torch."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kcd import warm
from kcd.jobs import proc_stat

REPO = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "kcd.launch", "--launcher", "local"]


@pytest.fixture(scope="module")
def worker():
    w = warm.start()
    assert w is not None, "the warm worker did not start"
    yield w
    w.stop()


def _env(socket_path: str | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(warm.ENV, None)
    if socket_path:
        env[warm.ENV] = socket_path
    return env


def _alive(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def test_launcher_runs_the_step_in_a_fork_with_its_output_and_status(worker, tmp_path):
    ok = subprocess.run([*LAUNCH, "--log-dir", str(tmp_path / "jobs"), "--", "--help"],
                        cwd=tmp_path, env=_env(worker.path), capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "usage: kcd" in ok.stdout
    assert "in a fork of the warm worker" in ok.stdout
    assert not (tmp_path / "jobs").exists()  # no submitit job: the fork ran it
    bad = subprocess.run([*LAUNCH, "--log-dir", str(tmp_path / "jobs"), "--", "nonsense"],
                         cwd=tmp_path, env=_env(worker.path), capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 1
    assert "invalid choice: 'nonsense'" in bad.stderr.strip().splitlines()[-1]  # still last


def test_fork_takes_the_launchers_working_directory(worker, tmp_path):
    run = subprocess.run([*LAUNCH, "--", "demo-data", "--root", "rel", "--kinds", "cifar100",
                          "--tiny", "-q"],
                         cwd=tmp_path, env=_env(worker.path), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "rel" / "cifar-100-python" / "train").is_file()
    assert not (REPO / "rel").exists()


def test_light_rule_runner_uses_the_worker_or_runs_in_process(worker, tmp_path):
    for path in (worker.path, None):
        run = subprocess.run([sys.executable, "-m", "kcd.warm", "run", "--", "init", "--arch",
                              "resnet20_0.5x", "--seed", "0", "--num-classes", "10", "--out",
                              "theta0.pt", "-q"],
                             cwd=tmp_path, env=_env(path), capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        assert (tmp_path / "theta0.pt").is_file()
        (tmp_path / "theta0.pt").unlink()
    bad = subprocess.run([sys.executable, "-m", "kcd.warm", "run", "--", "transform", "--stats",
                          "missing.pt", "--strategy", "bipartite", "--metric", "correlation",
                          "--out", "t.pt"],
                         cwd=tmp_path, env=_env(worker.path), capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "kcd: error:" in bad.stderr
    assert not (tmp_path / "t.pt").exists()


def test_launcher_falls_back_to_submitit_without_a_worker(tmp_path):
    run = subprocess.run([*LAUNCH, "--log-dir", str(tmp_path / "jobs"), "--", "init", "--arch",
                          "resnet20_0.5x", "--seed", "0", "--num-classes", "10", "--out",
                          "theta0.pt", "-q"],
                         cwd=tmp_path, env=_env(str(tmp_path / "no-such-socket")),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "did not answer" in run.stdout
    assert (tmp_path / "theta0.pt").is_file()
    assert any((tmp_path / "jobs").iterdir())  # a submitit local job ran it


def _long_pretrain(worker, tmp_path) -> subprocess.Popen:
    from kcd.data.demo import DemoSizes, write_demo_data

    write_demo_data(tmp_path / "demo", kinds=("cifar100",), sizes=DemoSizes.tiny(), progress=False)
    sets = [f"datasets.cifar100.root={tmp_path / 'demo'}",
            "recipes.cifar100.default.iterations=100000", "recipes.cifar100.default.milestones=[]",
            f"results={tmp_path / 'results'}"]
    args = ["init", "--arch", "resnet20_0.5x", "--seed", "0", "--num-classes", "100", "--out",
            "theta0.pt", "-q"]
    assert subprocess.run([*LAUNCH, "--", *args], cwd=tmp_path, env=_env(worker.path),
                          timeout=120).returncode == 0
    cmd = [*LAUNCH, "--", "pretrain", "--config", str(REPO / "config" / "demo.yaml"),
           "--dataset", "cifar100", "--arch", "resnet20_0.5x", "--seed", "0", "--theta0",
           "theta0.pt", "--out", "run", "--no-track"]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.Popen(cmd, cwd=tmp_path, env=_env(worker.path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (Linux /proc)."""
    stats = {int(n): proc_stat(int(n)) for n in os.listdir("/proc") if n.isdigit()}
    return {child for child, stat in stats.items()
            if stat is not None and stat[1] == pid and stat[0] not in ("Z", "X")}


def _fork_pid(worker) -> int:
    """The pid of the worker's fork that runs a job (a child of the worker)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = _children(worker.process.pid)
        if children:
            return next(iter(children))
        time.sleep(0.2)
    raise AssertionError("no fork of the warm worker is running the job")


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_stopping_the_launcher_stops_its_job(worker, tmp_path, how):
    proc = _long_pretrain(worker, tmp_path)
    try:
        pid = _fork_pid(worker)
        assert _alive(pid)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        code = proc.wait(timeout=30)
        assert code != 0
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), f"the job's fork {pid} outlived its launcher ({how})"
        assert not (tmp_path / "run" / "final.pt").exists()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_worker_exits_and_cleans_up_when_its_parent_is_gone(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    path = str(tmp_path / "sock")
    server = subprocess.Popen([sys.executable, "-m", "kcd.warm", "serve", "--socket", path,
                               "--parent", str(parent.pid)], env=_env(None),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        assert Path(path).exists()
        parent.kill()
        parent.wait()
        assert server.wait(timeout=15) == 0
        assert not Path(path).exists()
    finally:
        for p in (parent, server):
            if p.poll() is None:
                p.kill()


@pytest.mark.parametrize("payload, with_fds", [(b"not json", True), (b"[1, 2]", True),
                                               (b'{"argv": []}', False)])
def test_a_bad_request_costs_only_itself(worker, tmp_path, payload, with_fds):
    import socket

    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.settimeout(15)
    conn.connect(worker.path)
    fds = [os.open(os.devnull, os.O_WRONLY) for _ in range(2)] if with_fds else []
    try:
        socket.send_fds(conn, [payload], fds)
        assert conn.recv(1024) == b""  # closed without a job
    finally:
        for fd in fds:
            os.close(fd)
        conn.close()
    assert worker.process.poll() is None
    ok = subprocess.run([*LAUNCH, "--", "--help"], cwd=tmp_path, env=_env(worker.path),
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "in a fork of the warm worker" in ok.stdout


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_stopping_snakemake_stops_its_warm_jobs_and_worker(tmp_path, how):
    """The local launcher's jobs run in forks of the warm worker: Ctrl-C (SIGINT to Snakemake's
    process group), SIGTERM to Snakemake alone or SIGKILL to it, while a long pre-training
    runs, leaves no process of the run (launchers, forks, worker), no socket, no final.pt."""
    import yaml

    from tests.conftest import as_at_a_terminal
    from tests.test_workflow import SNAKEMAKE, _config

    cfg = _config()
    cfg["recipes"]["cifar100"]["default"].update(iterations=1_000_000, milestones=[500_000],
                                                 checkpoint_every=100_000, log_every=100_000)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "demo.yaml").write_text(yaml.safe_dump(cfg))
    target = "results/cifar100/models/resnet20-s0/final.pt"
    env = _env(None)
    env.pop("MLFLOW_TRACKING_URI", None)
    before = {p.name for p in Path(tempfile.gettempdir()).glob("kcd-warm-*")}
    with open(tmp_path / "snakemake.out", "w") as out:
        proc = subprocess.Popen([*SNAKEMAKE, "-d", str(tmp_path), "--cores", "1", target],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True,  # its group is what Ctrl-C reaches
                                preexec_fn=as_at_a_terminal)
    try:
        deadline = time.monotonic() + 180
        log = tmp_path / "results/logs/cifar100/pretrain/resnet20-s0.log"
        while not (log.exists() and "in a fork of the warm worker" in log.read_text()):
            assert proc.poll() is None, (tmp_path / "snakemake.out").read_text()[-3000:]
            assert time.monotonic() < deadline, "the pre-training never started"
            time.sleep(0.3)
        worker_pid = _descendant(proc.pid, "kcd.warm")
        fork = next(iter(_children(worker_pid)))
        time.sleep(1.0)
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        code = proc.wait(timeout=60)
        if how != "sigkill":
            assert code != 0
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in (worker_pid, fork)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(fork), f"the job's fork outlived Snakemake ({how})"
        assert not _alive(worker_pid), f"the warm worker outlived Snakemake ({how})"
        left = subprocess.run(["pgrep", "-f", "kcd.launch.*resnet20-s0"], capture_output=True,
                              text=True).stdout.split()
        assert not [p for p in left if _alive(int(p))], "a launcher outlived Snakemake"
        assert not (tmp_path / target).exists()
        after = {p.name for p in Path(tempfile.gettempdir()).glob("kcd-warm-*")}
        assert after <= before, f"socket folders left: {after - before}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _descendant(root: int, marker: str) -> int:
    """The first process below ``root`` whose command line contains ``marker``."""
    todo = [root]
    while todo:
        pid = todo.pop()
        for child in _children(pid):
            try:
                cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmd:
                return child
            todo.append(child)
    raise AssertionError(f"no {marker} process below {root}")

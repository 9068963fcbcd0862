"""The SLURM path against a live single-node cluster on localhost (scripts/slurm-cluster.sh).

Uses the cluster that ``SLURM_CONF`` points at when it is set (with the ``sacct`` wrapper of
``scripts/slurm-cluster.sh env`` first on PATH), as .ci/run does, and fails when that cluster does
not answer; otherwise starts one in a temporary folder with ``scripts/slurm-cluster.sh start``
(root needed) and stops it at the end. Skipped only when SLURM cannot be installed or started
here (the script's exit status 3: not root, no apt-get, the install fails, another slurmd runs);
any other failure of the script fails the tests.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm-cluster.sh"
LAUNCH = [sys.executable, "-m", "kcd.launch", "--launcher", "slurm"]
def _heavy_rules() -> set[str]:
    """The rules whose command goes through kcd.launch (read from the rule files)."""
    rules = set()
    for path in (REPO / "workflow" / "rules").glob("*.smk"):
        for block in re.split(r"^rule ", path.read_text(), flags=re.M)[1:]:
            if "{resources.launch}" in block:
                rules.add(block.split(":", 1)[0].strip())
    return rules


HEAVY_RULES = _heavy_rules()
JOB_LINE = re.compile(r"kcd\.launch: slurm job (\d+)")
UNAVAILABLE = 3  # scripts/slurm-cluster.sh: SLURM cannot be installed or started here

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


# --------------------------------------------------------------------------- the cluster


class Cluster:
    def __init__(self, conf: Path, env: dict[str, str], owned: bool):
        self.conf = conf
        self.env = env
        self.owned = owned  # started by this session: no other user's jobs in its queue
        text = conf.read_text()
        m = re.search(r"^\s*JobCompLoc\s*=\s*(\S+)", text, re.M | re.I)
        self.jobcomp = Path(m.group(1)) if m else None

    def run(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def squeue(self, job_id: str | None = None) -> list[str]:
        """States of the queued/running jobs (of one job when given)."""
        args = ["squeue", "-h", "-o", "%i %T"] + (["-j", job_id] if job_id else [])
        out = self.run(*args).stdout
        return [line.split()[1] for line in out.splitlines() if len(line.split()) == 2]

    def completed(self, job_id: str, timeout: float = 15) -> str:
        """The job's record in the jobcomp log (waits for it to appear)."""
        assert self.jobcomp is not None, f"no JobCompLoc in {self.conf}"
        deadline = time.monotonic() + timeout
        while True:
            text = self.jobcomp.read_text() if self.jobcomp.exists() else ""
            for line in text.splitlines():
                if re.search(rf"\bJobId={job_id}\b", line):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not in {self.jobcomp}:\n{text[-2000:]}")
            time.sleep(0.5)

    def jobs_in(self, folder: Path) -> list[str]:
        """'id state' of the queued/running jobs submitted from ``folder`` or below."""
        out = self.run("squeue", "-h", "-o", "%i %T %Z").stdout
        root = str(folder.resolve())
        return [" ".join(f[:2]) for f in (line.split(maxsplit=2) for line in out.splitlines())
                if len(f) == 3 and (f[2] == root or f[2].startswith(root + os.sep))]

    def jobcomp_ids(self) -> set[str]:
        if self.jobcomp is None or not self.jobcomp.exists():
            return set()
        return set(re.findall(r"\bJobId=(\d+)", self.jobcomp.read_text()))


@pytest.fixture(scope="session")
def cluster():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    folder = None
    if os.environ.get("SLURM_CONF"):  # a running cluster (.ci/run starts one): it must work
        conf = Path(os.environ["SLURM_CONF"])
        if not conf.is_file():
            pytest.fail(f"SLURM_CONF={conf} is set but there is no such file")
        try:
            sinfo = subprocess.run(["sinfo", "-h"], env=env, capture_output=True, text=True,
                                   timeout=30)
            why = sinfo.stderr.strip() if sinfo.returncode else ""
        except (OSError, subprocess.TimeoutExpired) as e:
            why = str(e)
        if why:
            pytest.fail(f"SLURM_CONF={conf} is set but its cluster does not answer: {why}")
    else:
        if shutil.which("bash") is None:
            pytest.skip("no bash to run scripts/slurm-cluster.sh")
        # under /tmp, not pytest's 0700 folder: the munge user must reach its socket
        folder = Path(tempfile.mkdtemp(prefix="kcd-slurm-", dir="/tmp"))
        try:
            start = subprocess.run(["bash", str(SCRIPT), "start", str(folder)],
                                   capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            start = None
        if start is None or start.returncode != 0:
            subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], capture_output=True,
                           timeout=60)
            shutil.rmtree(folder, ignore_errors=True)
            why = "timed out" if start is None else (start.stderr.strip() or start.stdout.strip())
            why = f"scripts/slurm-cluster.sh start failed: {why[-800:]}"
            if start is not None and start.returncode == UNAVAILABLE:
                pytest.skip(f"no SLURM cluster: {why}")
            pytest.fail(why)
        conf = folder / "etc" / "slurm.conf"
        env["SLURM_CONF"] = str(conf)
        env["PATH"] = f"{folder / 'bin'}{os.pathsep}{env['PATH']}"
    c = Cluster(conf, env, owned=folder is not None)
    sacct = c.run("sacct", "-o", "JobID,State", "--parsable2")
    if sacct.returncode != 0:
        pytest.fail(f"sacct fails on this cluster ({sacct.stderr.strip()}); put the wrapper of "
                    "`scripts/slurm-cluster.sh env DIR` first on PATH")
    # submitit and the launcher subprocesses read these from the environment
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", env["SLURM_CONF"])
        mp.setenv("PATH", env["PATH"])
        yield c
    if folder is not None:
        c.run("scancel", "-u", str(os.getuid()))
        subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], capture_output=True,
                       timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_data(tmp_path_factory):
    """(tiny cifar100 demo root, tiny config path, theta0 of resnet20 seed 0)."""
    from kcd.data.demo import DemoSizes, write_demo_data
    from tests.conftest import tiny_config

    root = tmp_path_factory.mktemp("slurm-data")
    demo = root / "demo"
    write_demo_data(demo, kinds=("cifar100",), sizes=DemoSizes.tiny(), progress=False)
    cfg = tiny_config(demo, root / "results")
    cfg.pop("ablations", None)  # ImageNet's, invalid with its 3 tiny classes; cifar100 only here
    cfg.pop("figure1", None)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    theta0 = root / "theta0.pt"
    run = subprocess.run([sys.executable, "-m", "kcd.cli", "init", "--config", str(config),
                          "--arch", "resnet20", "--seed", "0", "--dataset", "cifar100",
                          "--out", str(theta0)], capture_output=True, text=True, timeout=120,
                         cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    return demo, config, theta0


# --------------------------------------------------------------------------- helpers


class Launch:
    """A ``python -m kcd.launch --launcher slurm`` process, its output collected by threads."""

    def __init__(self, cluster: Cluster, cwd: Path, launch_args: list[str], kcd_args: list[str],
                 env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([*LAUNCH, *launch_args, "--", *kcd_args], cwd=cwd,
                                     env={**cluster.env, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._pump, args=(s, b), daemon=True)
                         for s, b in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, buf):
        for line in stream:
            buf.append(line)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def job_id(self, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = JOB_LINE.search(self.stdout)
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"no job id from kcd.launch:\n{self.stdout[-2000:]}\n{self.stderr[-2000:]}")

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"kcd.launch still running after {timeout} s:\n"
                                 f"{self.stdout[-2000:]}\n{self.stderr[-2000:]}")
        for t in self._threads:
            t.join(timeout=5)
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def wait_running(cluster: Cluster, job_id: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    states: list[str] = []
    while time.monotonic() < deadline:
        states = cluster.squeue(job_id)
        if states == ["RUNNING"]:
            return
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} not RUNNING after {timeout} s: {states}")


def long_pretrain(cluster: Cluster, tmp_path: Path, slurm_data, name: str) -> Launch:
    """A pretraining of a million iterations: runs until cancelled."""
    _, config, theta0 = slurm_data
    return Launch(cluster, tmp_path,
                  ["--name", name, "--log-dir", str(tmp_path / "jobs"), "--cpus", "1",
                   "--mem-mb", "2000", "--time-min", "10"],
                  ["pretrain", "--config", str(config), "--dataset", "cifar100", "--arch",
                   "resnet20", "--seed", "0", "--theta0", str(theta0), "--out",
                   str(tmp_path / "run"), "--no-track",
                   "--set", "recipes.cifar100.default.iterations=1000000"])


# --------------------------------------------------------------------------- tests


def test_gpu_job_sees_cuda_visible_devices(cluster, tmp_path):
    import submitit

    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(name="kcd-gpu-env", timeout_min=5, mem_gb=1, cpus_per_task=1,
                               gpus_per_node=1)
    job = executor.submit(functools.partial(os.getenv, "CUDA_VISIBLE_DEVICES", "unset"))
    assert job.result() == "0"  # one of the two fake GPUs
    assert "COMPLETED" in cluster.completed(job.job_id)


def test_launch_runs_init_through_sbatch(cluster, tmp_path, slurm_data):
    _, config, _ = slurm_data
    out = tmp_path / "theta0.pt"
    start = time.monotonic()
    launch = Launch(cluster, tmp_path,
                    ["--name", "kcd-init-test", "--log-dir", str(tmp_path / "jobs"), "--cpus",
                     "1", "--gpus", "1", "--mem-mb", "1000", "--time-min", "5"],
                    ["init", "--config", str(config), "--arch", "resnet20", "--seed", "1",
                     "--dataset", "cifar100", "--out", str(out)])
    job_id = launch.job_id()
    code = launch.wait(timeout=180)
    assert code == 0, launch.stdout[-3000:] + launch.stderr[-3000:]
    assert out.is_file()
    record = cluster.completed(job_id)
    assert "JobState=COMPLETED" in record and "Name=kcd-init-test" in record
    assert (tmp_path / "jobs" / job_id).is_dir()
    print(f"kcd.launch init through sbatch: {time.monotonic() - start:.1f} s")


def test_cancelled_job_fails_the_launcher_with_the_log_tail(cluster, tmp_path, slurm_data):
    launch = long_pretrain(cluster, tmp_path, slurm_data, "kcd-cancel-test")
    job_id = launch.job_id()
    try:
        wait_running(cluster, job_id)
        time.sleep(2)  # let the job write some of its log
        assert cluster.run("scancel", job_id).returncode == 0
        start = time.monotonic()
        code = launch.wait(timeout=60)
    finally:
        launch.kill()
        cluster.run("scancel", job_id)
    print(f"kcd.launch noticed the cancelled job after {time.monotonic() - start:.1f} s")
    assert code != 0
    assert "did not complete" in launch.stderr, launch.stderr[-3000:]
    assert "--- last lines of its log ---" in launch.stderr
    assert "CANCELLED" in cluster.completed(job_id)


def test_sigterm_to_the_launcher_cancels_its_job(cluster, tmp_path, slurm_data):
    launch = long_pretrain(cluster, tmp_path, slurm_data, "kcd-sigterm-test")
    job_id = launch.job_id()
    try:
        wait_running(cluster, job_id)
        launch.proc.send_signal(signal.SIGTERM)
        code = launch.wait(timeout=30)
        assert code == 128 + signal.SIGTERM, launch.stdout[-2000:] + launch.stderr[-2000:]
        deadline = time.monotonic() + 30
        while cluster.squeue(job_id) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert cluster.squeue(job_id) == [], f"job {job_id} left behind"
        if cluster.owned:
            assert cluster.squeue() == []
    finally:
        launch.kill()
        cluster.run("scancel", job_id)
    assert "cancelling job" in launch.stdout


def _dag_config(kind: str, **recipe) -> dict:
    """tests/test_workflow.py's tiny Table 7 config with the given launcher, 1-CPU jobs."""
    from tests.test_workflow import _config

    cfg = _config()
    cfg["launcher"] = {"kind": kind}
    cfg["resources"] = {"default": {"cpus": 1, "gpus": 0, "tasks": 1, "nodes": 1,
                                    "mem_mb": 2000, "runtime": 30}}
    cfg["recipes"]["cifar100"]["default"].update(recipe)
    return cfg


def _workdir(folder: Path, cfg: dict) -> Path:
    (folder / "config").mkdir(parents=True)
    (folder / "config" / "demo.yaml").write_text(yaml.safe_dump(cfg))
    return folder


def _start_snakemake(cluster: Cluster, workdir: Path, *args: str) -> subprocess.Popen:
    """Snakemake in the background in its own session (so its process group is the one a
    terminal's Ctrl-C would reach, with SIGINT's default action as there), its output in
    workdir/snakemake.out."""
    from tests.conftest import as_at_a_terminal
    from tests.test_workflow import SNAKEMAKE

    env = {**cluster.env}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(workdir / "snakemake.out", "w") as out:
        return subprocess.Popen([*SNAKEMAKE, "-d", str(workdir), "--cores", "2", *args],
                                cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=as_at_a_terminal)


def _wait_snakemake(proc: subprocess.Popen, workdir: Path, timeout: float) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"snakemake still running after {timeout} s:\n"
                             + (workdir / "snakemake.out").read_text()[-3000:])
    return code, (workdir / "snakemake.out").read_text()


def _session_processes(sid: int) -> list[str]:
    """The processes still alive in session ``sid`` (Linux /proc)."""
    left = []
    for name in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except (OSError, ValueError):
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if name.isdigit() and int(fields[3]) == sid and fields[0] not in "ZX":
            cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ")
            left.append(f"{name}: {cmd.decode(errors='replace')[:200]}")
    return left


def _results(results: Path) -> dict[str, dict]:
    """Every result.json below ``results`` by relative path, less its timings."""
    import json

    from kcd.run import TIMINGS

    return {str(p.relative_to(results)): {k: v for k, v in json.loads(p.read_text()).items()
                                         if k not in TIMINGS}
            for p in sorted(results.rglob("result.json"))
            if "mlartifacts" not in p.parts}  # MLflow's copies, under each run's own id


def test_workflow_table7_through_sbatch_equals_the_local_launcher(cluster, tmp_path):
    """The tiny Table 7 DAG with ``launcher: {kind: slurm}``: every heavy rule is one sbatch job
    that completes; the same config with the local launcher (built at the same time, in another
    folder) gives the same table and the same numbers in every run's result.json."""
    from tests.test_workflow import _snakemake

    work = _workdir(tmp_path / "slurm", _dag_config("slurm"))
    local = _workdir(tmp_path / "local", _dag_config("local"))
    before = cluster.jobcomp_ids()
    start = time.monotonic()
    # the SLURM build spends much of its time waiting on the scheduler: overlap the two builds
    local_run = _start_snakemake(cluster, local, "results/table7.csv")
    try:
        run = _snakemake(work, "results/table7.csv", timeout=900)
        slurm_s = time.monotonic() - start
        local_code, local_out = _wait_snakemake(local_run, local, timeout=600)
    finally:
        if local_run.poll() is None:
            os.killpg(local_run.pid, signal.SIGKILL)
            local_run.wait()
    elapsed = time.monotonic() - start
    assert run.returncode == 0, run.stderr[-4000:]
    assert local_code == 0, local_out[-4000:]
    assert (work / "results" / "table7.csv").is_file()
    logs = "".join(p.read_text() for p in (work / "results" / "logs").rglob("*.log"))
    launched = re.findall(r"kcd\.launch: slurm job (\d+)", logs)
    out = run.stdout + run.stderr
    stats = dict(line.split()[:2] for line in out.split("Job stats:")[1].splitlines()[3:]
                 if len(line.split()) == 2 and line.split()[1].isdigit())
    heavy = sum(int(stats.get(rule, 0)) for rule in HEAVY_RULES)
    assert heavy > 0 and len(launched) == heavy, (stats, launched)
    assert len(set(launched)) == len(launched)
    # each went through sbatch and completed there
    for job_id in launched:
        assert "JobState=COMPLETED" in cluster.completed(job_id)
    assert set(launched) <= cluster.jobcomp_ids() - before
    local_logs = "".join(p.read_text() for p in (local / "results" / "logs").rglob("*.log"))
    assert len(re.findall(r"kcd\.launch: local job (?:warm-)?\d+", local_logs)) == heavy
    # same seeds, same numbers: the table and every run's result
    pd.testing.assert_frame_equal(pd.read_csv(work / "results" / "table7.csv"),
                                  pd.read_csv(local / "results" / "table7.csv"))
    via_slurm, via_local = _results(work / "results"), _results(local / "results")
    assert len(via_slurm) >= 5 and via_slurm.keys() == via_local.keys()
    for path, result in via_slurm.items():
        assert "top1" in result, path
        assert result == via_local[path], path
    print(f"table7 DAG through sbatch: {heavy} jobs in {slurm_s:.0f} s; with the local "
          f"launcher alongside, both done in {elapsed:.0f} s")


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_stopping_snakemake_cancels_its_slurm_jobs(cluster, tmp_path, slurm_data, how):
    """Ctrl-C (SIGINT to Snakemake's process group), SIGTERM to the Snakemake process alone
    (passed on to the launchers by kcd.launch.cancel_jobs_on_sigterm in the Snakefile's onstart)
    or SIGKILL to it (the launcher's watchdog notices), while a long pretraining runs as a SLURM
    job: the job is cancelled, no job of this run stays in the queue, no process of the run is
    left, and Snakemake exits non-zero."""
    _, _, theta0 = slurm_data
    cfg = _dag_config("slurm", iterations=1_000_000, milestones=[500_000],
                      checkpoint_every=100_000, log_every=100_000)
    work = _workdir(tmp_path / "work", cfg)
    init = work / "results" / "cifar100" / "init" / "resnet20-s0.pt"
    init.parent.mkdir(parents=True)
    shutil.copy(theta0, init)  # no init job: straight to the pretraining
    proc = _start_snakemake(cluster, work, "results/cifar100/models/resnet20-s0/final.pt")
    try:
        deadline = time.monotonic() + 120
        while "RUNNING" not in " ".join(cluster.jobs_in(work)):
            assert proc.poll() is None, (work / "snakemake.out").read_text()[-3000:]
            assert time.monotonic() < deadline, (f"no running job after 120 s: "
                                                 f"{cluster.jobs_in(work)}")
            time.sleep(0.5)
        (job,) = cluster.jobs_in(work)
        job_id = job.split()[0]
        time.sleep(2)  # the job's Python is up
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        stopped = time.monotonic()
        deadline = stopped + 60
        while cluster.jobs_in(work):
            assert time.monotonic() < deadline, f"left in the queue: {cluster.jobs_in(work)}"
            time.sleep(0.5)
        gone = time.monotonic() - stopped
        code, out = _wait_snakemake(proc, work, timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for job in cluster.jobs_in(work):
            cluster.run("scancel", job.split()[0])
    assert code != 0, out[-3000:]
    assert "CANCELLED" in cluster.completed(job_id)
    deadline = time.monotonic() + 10
    while _session_processes(proc.pid):  # the launcher and its shell are gone too
        assert time.monotonic() < deadline, _session_processes(proc.pid)
        time.sleep(0.5)
    assert not (work / "results" / "cifar100" / "models" / "resnet20-s0" / "final.pt").exists()
    print(f"{how}: job {job_id} out of the queue {gone:.1f} s after the signal")


def _local_kcd(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m kcd.cli ARGS`` in a plain local process with one thread (as a 1-CPU job)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    run = subprocess.run([sys.executable, "-m", "kcd.cli", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_requeued_job_resumes_from_its_checkpoint(cluster, tmp_path, slurm_data):
    """``scontrol requeue`` of a running pretraining: the launcher keeps waiting, the job comes
    back, resumes from its checkpoint and ends with the weights of an uninterrupted run."""
    import torch

    from kcd.checkpoint import load_file
    from kcd.train import CHECKPOINT, FINAL

    _, config, theta0 = slurm_data
    args = ["pretrain", "--config", str(config), "--dataset", "cifar100", "--arch", "resnet20",
            "--seed", "0", "--theta0", str(theta0), "--no-track", "-q",
            "--set", "recipes.cifar100.default.iterations=300",
            "--set", "recipes.cifar100.default.checkpoint_every=10"]
    run = tmp_path / "run"
    start = time.monotonic()
    launch = Launch(cluster, tmp_path,
                    ["--name", "kcd-requeue-test", "--log-dir", str(tmp_path / "jobs"), "--cpus",
                     "1", "--mem-mb", "2000", "--time-min", "10"],
                    [*args, "--out", str(run)], env={"KCD_POLL_SECONDS": "2"})
    job_id = launch.job_id()
    try:
        wait_running(cluster, job_id)
        deadline = time.monotonic() + 120
        while not (run / CHECKPOINT).exists():
            assert time.monotonic() < deadline, f"no {CHECKPOINT} after 120 s"
            assert launch.proc.poll() is None, launch.stdout[-2000:] + launch.stderr[-2000:]
            time.sleep(0.2)
        assert not (run / FINAL).exists(), "the job finished before the requeue; make it longer"
        step = load_file(run / CHECKPOINT)["step"]
        requeue = cluster.run("scontrol", "requeue", job_id)
        assert requeue.returncode == 0, requeue.stderr
        requeued = time.monotonic()
        time.sleep(3)
        assert launch.proc.poll() is None, ("the launcher stopped on the requeue:\n"
                                           + launch.stdout[-2000:] + launch.stderr[-2000:])
        code = launch.wait(timeout=400)
    except BaseException:
        launch.kill()
        cluster.run("scancel", job_id)
        raise
    elapsed, after = time.monotonic() - start, time.monotonic() - requeued
    assert code == 0, launch.stdout[-3000:] + launch.stderr[-3000:]
    show = cluster.run("scontrol", "show", "job", job_id).stdout
    assert re.search(r"\bRestarts=1\b", show), show
    # the jobcomp log has one record per run of the job: the requeued one, then the last one
    assert "JobState=PENDING" in cluster.completed(job_id)
    deadline = time.monotonic() + 15
    while not re.search(rf"\bJobId={job_id}\b.*JobState=COMPLETED",
                        cluster.jobcomp.read_text()):
        assert time.monotonic() < deadline, cluster.jobcomp.read_text()[-2000:]
        time.sleep(0.5)
    assert re.search(r"resuming .* from its checkpoint at step \d+", launch.stdout), \
        launch.stdout[-3000:]
    resumed = int(re.search(r"from its checkpoint at step (\d+)", launch.stdout).group(1))
    assert resumed >= step
    _local_kcd([*args, "--out", str(tmp_path / "straight")])
    a = load_file(tmp_path / "straight" / FINAL)["state_dict"]
    b = load_file(run / FINAL)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    print(f"requeued job: checkpoint at step {step}, resumed at step {resumed}; "
          f"{elapsed:.1f} s in all, {after:.1f} s of it after the requeue")


def test_two_task_job_trains_with_ddp_like_one_process(cluster, tmp_path, slurm_data):
    """A 2-task SLURM job (one DDP process per task, gloo) ends with the parameters of one local
    process that splits the same global batch into 2 strided micro-batches."""
    import torch

    from kcd.checkpoint import load_file
    from kcd.train import FINAL

    _, config, theta0 = slurm_data
    args = ["pretrain", "--config", str(config), "--dataset", "cifar100", "--arch", "resnet20",
            "--seed", "0", "--theta0", str(theta0), "--no-track", "-q",
            "--set", "recipes.cifar100.default.iterations=5",
            "--set", "recipes.cifar100.default.batch_size=32"]
    launch = Launch(cluster, tmp_path, ["--name", "kcd-ddp", "--log-dir", str(tmp_path / "jobs"),
                                        "--tasks", "2", "--cpus", "1", "--gpus", "0",
                                        "--mem-mb", "1500", "--time-min", "10"],
                    [*args, "--out", str(tmp_path / "two")], env={"KCD_POLL_SECONDS": "2"})
    code = launch.wait(timeout=300)
    assert code == 0, launch.stdout[-3000:] + launch.stderr[-3000:]
    _local_kcd([*args, "--out", str(tmp_path / "one"),
                "--set", "recipes.cifar100.default.micro_batches=2"])
    a = load_file(tmp_path / "one" / FINAL)["state_dict"]
    b = load_file(tmp_path / "two" / FINAL)["state_dict"]
    start = load_file(theta0)["state_dict"]
    params = [k for k in a if "running" not in k and "num_batches" not in k]
    assert any(not torch.equal(a[k], start[k]) for k in params)
    for k in params:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k

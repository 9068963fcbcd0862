"""The SLURM path against a live single-node cluster on localhost (scripts/slurm-cluster.sh).

Uses the cluster that ``SLURM_CONF`` points at when it is set (with the ``sacct`` wrapper of
``scripts/slurm-cluster.sh env`` first on PATH); otherwise starts one in a temporary folder
with ``scripts/slurm-cluster.sh start`` (root and apt-get needed) and stops it at the end.
Skipped when no cluster can be had.
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

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm-cluster.sh"
LAUNCH = [sys.executable, "-m", "kcd.launch", "--launcher", "slurm"]
HEAVY_RULES = ("init", "pretrain", "statistics", "distill")  # rules that call kcd.launch
JOB_LINE = re.compile(r"kcd\.launch: slurm job (\d+)")

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

    def jobcomp_ids(self) -> set[str]:
        if self.jobcomp is None or not self.jobcomp.exists():
            return set()
        return set(re.findall(r"\bJobId=(\d+)", self.jobcomp.read_text()))


@pytest.fixture(scope="session")
def cluster():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    folder = None
    if os.environ.get("SLURM_CONF"):
        conf = Path(os.environ["SLURM_CONF"])
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
            pytest.skip(f"no SLURM cluster: scripts/slurm-cluster.sh start failed: {why[-800:]}")
        conf = folder / "etc" / "slurm.conf"
        env["SLURM_CONF"] = str(conf)
        env["PATH"] = f"{folder / 'bin'}{os.pathsep}{env['PATH']}"
    c = Cluster(conf, env, owned=folder is not None)
    sacct = c.run("sacct", "-o", "JobID,State", "--parsable2")
    if sacct.returncode != 0:
        pytest.skip(f"sacct fails on this cluster ({sacct.stderr.strip()}); put the wrapper of "
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


def test_workflow_table7_through_sbatch(cluster, tmp_path):
    from tests.test_workflow import _config, _snakemake

    cfg = _config()
    cfg["launcher"] = {"kind": "slurm"}
    cfg["resources"] = {"default": {"cpus": 1, "gpus": 0, "tasks": 1, "nodes": 1,
                                    "mem_mb": 2000, "runtime": 30}}
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = cluster.jobcomp_ids()
    start = time.monotonic()
    run = _snakemake(tmp_path, "results/table7.csv", timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    elapsed = time.monotonic() - start
    assert (tmp_path / "results" / "table7.csv").is_file()
    logs = "".join(p.read_text() for p in (tmp_path / "results" / "logs").rglob("*.log"))
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
    print(f"table7 DAG through sbatch: {heavy} jobs in {elapsed:.0f} s")


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

"""The CLI's tracker with the real training engine: a job stopped by SIGTERM part-way and then
resumed is one MLflow run (KILLED, then FINISHED), each logged step once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_job_stopped_by_sigterm_and_resumed_is_one_run(demo_root, tmp_path):
    import yaml
    from mlflow.tracking import MlflowClient

    from kcd.cli import main
    from kcd.tracking import RUN_ID_FILE
    from kcd.train import CHECKPOINT, init_weights
    from tests.conftest import tiny_config

    cfg = tiny_config(demo_root, tmp_path / "results", iterations=40, checkpoint_every=3,
                      log_every=1, batch_size=32)
    cfgp = tmp_path / "c.yaml"
    cfgp.write_text(yaml.safe_dump(cfg))
    theta0 = tmp_path / "theta0.pt"
    init_weights("resnet20_0.5x", 0, 100, theta0)
    uri = f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    out = tmp_path / "run"
    args = ["pretrain", "--config", str(cfgp), "--dataset", "cifar100", "--arch",
            "resnet20_0.5x", "--seed", "0", "--theta0", str(theta0), "--out", str(out),
            "--tracking-uri", uri, "-q"]
    proc = subprocess.Popen([sys.executable, "-m", "kcd.cli", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 240
    while time.time() < deadline and not (out / CHECKPOINT).exists():
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("kcd-cifar100").experiment_id])
    assert run.info.status == "KILLED"
    assert (out / RUN_ID_FILE).read_text().strip() == run.info.run_id
    assert run.data.tags["mlflow.source.name"] == "kcd pretrain"

    assert main(args) == 0  # the rerun resumes from the checkpoint, into the same run
    (run,) = client.search_runs([run.info.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["kcd.attempt"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train.ce")]
    assert sorted(steps) == sorted(set(steps)) and max(steps) >= 39

"""The tiny DAG tracked by a real MLflow server, checked through the server's REST API."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.test_workflow import ROWS, _config, _snakemake

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 and a free port, stopped after the module."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        cwd=root, env=env, stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("mlflow server did not start: "
                            + (root / "server.log").read_text()[-2000:])
            time.sleep(0.5)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_every_row_of_the_tiny_tables_is_found_on_the_server(server, tmp_path):
    cfg = _config()
    cfg["tracking"] = {"uri": server, "required": True}
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "demo.yaml").write_text(yaml.safe_dump(cfg))
    run = _snakemake(tmp_path, "results/tables.md")
    assert run.returncode == 0, run.stderr[-4000:]
    assert not (tmp_path / "results" / "mlflow.db").exists()  # everything went to the server

    exp = _get(f"{server}/api/2.0/mlflow/experiments/get-by-name?experiment_name=kcd-cifar100")
    exp_id = exp["experiment"]["experiment_id"]
    found = _post(f"{server}/api/2.0/mlflow/runs/search",
                  {"experiment_ids": [exp_id], "filter": "tags.table7 != ''",
                   "max_results": 100})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in found]
    assert sorted(t["table7"] for t in tags) == sorted(ROWS + ["Teacher"])
    for r, t in zip(found, tags):
        assert r["info"]["status"] == "FINISHED", t["mlflow.runName"]
        metrics = {m["key"] for m in r["data"].get("metrics", [])}
        assert {"eval.top1", "eval.top5"} <= metrics and any(m.startswith("train.")
                                                            for m in metrics)
        assert t["scale"] == "demo" and t["table"] == "7" and t.get("mlflow.source.git.commit")
        files = _get(f"{server}/api/2.0/mlflow/artifacts/list?run_id={r['info']['run_id']}")
        assert "result.json" in {f["path"] for f in files.get("files", [])}
    everything = _post(f"{server}/api/2.0/mlflow/runs/search",
                       {"experiment_ids": [exp_id], "max_results": 100})["runs"]
    assert all(r["info"]["status"] != "RUNNING" for r in everything)

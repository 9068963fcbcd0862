"""Many jobs starting at once on a fresh sqlite store: the first creates the schema under the
store's lock, the others wait and then log; no run and no metric is lost."""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kcd.tracking import MlflowTracker, store_lock

STEPS = 20
KEYS = ("train.ce", "train.lr", "train.top1")


def _job(uri: str, out_dir: str, index: int, go) -> None:
    """One job: waits for the others, then opens its run and logs STEPS x KEYS values."""
    go.wait(60)
    with MlflowTracker(uri, "kcd-parallel", f"job{index}", params={"index": index},
                       tags={"job": str(index)}, out_dir=out_dir, source="kcd test") as t:
        for step in range(STEPS):
            t.log_metrics({k.replace(".", "/"): index + step / 100 for k in KEYS}, step)
        if t._failed or t.run_id is None:
            os._exit(3)  # tracking switched itself off: the run would be lost


def _check_store(uri: str, n: int) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("kcd-parallel")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert sorted(r.data.tags["job"] for r in runs) == sorted(str(i) for i in range(n))
    assert {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        for key in KEYS:
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == list(range(STEPS)), (run.info.run_name, key)


def _start_together(tmp_path: Path, n: int) -> str:
    """``n`` forked jobs (as the warm worker starts them: mlflow already imported) released
    at the same moment on a store that does not exist yet."""
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (the children inherit it)

    uri = f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    ctx = multiprocessing.get_context("fork")
    go = ctx.Event()
    jobs = [ctx.Process(target=_job, args=(uri, str(tmp_path / f"job{i}"), i, go))
            for i in range(n)]
    for p in jobs:
        p.start()
    go.set()
    for p in jobs:
        p.join(120)
    assert [p.exitcode for p in jobs] == [0] * n
    return uri


@pytest.mark.parametrize("n", [8, 32])
def test_jobs_starting_together_on_a_fresh_store_lose_nothing(tmp_path, n):
    uri = _start_together(tmp_path, n)
    _check_store(uri, n)
    assert (tmp_path / "results" / "mlflow.db.lock").exists()
    # every job keeps its run id for a resume
    ids = {(tmp_path / f"job{i}" / "mlflow_run_id").read_text().strip() for i in range(n)}
    assert len(ids) == n


SCRIPT = """
import sys
from kcd.tracking import MlflowTracker
uri, out, i = sys.argv[1], sys.argv[2], int(sys.argv[3])
with MlflowTracker(uri, "kcd-parallel", f"job{i}", params={"index": i}, tags={"job": str(i)},
                   out_dir=out) as t:
    for step in range(%d):
        t.log_metrics({k.replace(".", "/"): i + step / 100 for k in %r}, step)
sys.exit(3 if t._failed or t.run_id is None else 0)
""" % (STEPS, KEYS)


@pytest.mark.slow
def test_fresh_interpreters_started_together_lose_nothing(tmp_path):
    """The same with new Python processes (jobs started by hand or by SLURM): each imports
    MLflow itself, so they reach the store at scattered moments."""
    n = 8
    uri = f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, uri, str(tmp_path / f"job{i}"),
                               str(i)], env=env, stderr=subprocess.PIPE, text=True)
             for i in range(n)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * n, errors
    assert not any("tracking disabled" in e for e in errors), errors
    _check_store(uri, n)


def test_store_lock_waits_for_the_holder(tmp_path):
    import fcntl

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with store_lock(uri):
        assert (tmp_path / "mlflow.db.lock").exists()
    # held by another open file (another process): a short wait runs out
    fd = os.open(tmp_path / "mlflow.db.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(TimeoutError, match="mlflow.db.lock"):
            with store_lock(uri, timeout=0.2):
                pass
    finally:
        os.close(fd)
    with store_lock(uri, timeout=0.2):  # released
        pass
    with store_lock("http://127.0.0.1:5000"):  # a server: no lock, no file
        pass


def _old_store(uri: str) -> None:
    import alembic.command
    import mlflow.store.db.utils as db_utils

    from kcd.tracking import ensure_store

    ensure_store(uri)
    alembic.command.downgrade(db_utils._get_alembic_config(uri), "-2")


def test_jobs_starting_together_on_an_old_store_upgrade_it_once(tmp_path):
    """A store of an older MLflow schema: MLflow upgrades it when it opens it; the jobs that
    start together do that one at a time (concurrent upgrades fail half-way)."""
    import mlflow.store.db.utils as db_utils
    import sqlalchemy

    uri = f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    ctx = multiprocessing.get_context("fork")
    setup = ctx.Process(target=_old_store, args=(uri,))  # this process keeps no open store
    setup.start()
    setup.join(120)
    assert setup.exitcode == 0
    head = db_utils._get_latest_schema_revision()

    def version() -> str:
        engine = sqlalchemy.create_engine(uri)
        try:
            return db_utils._get_schema_version(engine)
        finally:
            engine.dispose()

    assert version() != head
    go = ctx.Event()
    jobs = [ctx.Process(target=_job, args=(uri, str(tmp_path / f"job{i}"), i, go))
            for i in range(8)]
    for p in jobs:
        p.start()
    go.set()
    for p in jobs:
        p.join(120)
    assert [p.exitcode for p in jobs] == [0] * 8
    _check_store(uri, 8)
    assert version() == head

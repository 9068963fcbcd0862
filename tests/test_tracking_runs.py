"""One MLflow run per job: standard tags, artifacts beside the store, time-based flushes,
resumes into the same run, end states (FINISHED, FAILED, KILLED on SIGTERM) and
``tracking.required``."""
from __future__ import annotations

import argparse
import getpass
import multiprocessing
import os
import shutil
import signal
import socket
import time

import pytest

import kcd.tracking as tracking
from kcd.errors import KcdError
from kcd.tracking import FLUSH_SECONDS, RUN_ID_FILE, MlflowTracker, ensure_store

EXP = "kcd-test"


@pytest.fixture(scope="module")
def template_db(tmp_path_factory):
    """A store whose schema exists (creating one takes seconds): each test gets a copy."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    ensure_store(f"sqlite:///{path}")
    return path


@pytest.fixture
def uri(template_db, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(template_db, results / "mlflow.db")
    return f"sqlite:///{results / 'mlflow.db'}"


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _runs(uri):
    client = _client(uri)
    exp = client.get_experiment_by_name(EXP)
    return client.search_runs([exp.experiment_id]) if exp else []


def _steps(uri, run_id, key="train.ce"):
    return sorted(m.step for m in _client(uri).get_metric_history(run_id, key))


def _tracker(uri, out_dir, **kw):
    return MlflowTracker(uri, EXP, "cifar100/resnet56/resnet20/kd/none/s0",
                         params={"dataset": "cifar100", "seed": 0}, tags={"method": "kd"},
                         out_dir=out_dir, source="kcd test", **kw)


# ------------------------------------------------------------------ tags and artifacts


def test_standard_tags_and_artifacts_beside_the_store(uri, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    artifact = tmp_path / "result.json"
    artifact.write_text("{}")
    with _tracker(uri, tmp_path / "job") as t:
        t.log_metrics({"train/ce": 1.0}, 0)
        t.log_artifact(artifact)
    (run,) = _runs(uri)
    tags = run.data.tags
    assert tags["mlflow.runName"] == "cifar100/resnet56/resnet20/kd/none/s0"
    assert tags["mlflow.source.name"] == "kcd test"
    assert tags["mlflow.source.type"] == "LOCAL"
    assert len(tags["mlflow.source.git.commit"]) == 40 and "git_commit" not in tags
    assert tags["kcd.git_dirty"] in ("true", "false")
    assert tags["mlflow.user"] == getpass.getuser() == run.info.user_id
    assert tags["method"] == "kd" and run.data.params["seed"] == "0"
    exp = _client(uri).get_experiment_by_name(EXP)
    store = tmp_path / "results"
    assert exp.artifact_location == (store / "mlartifacts" / EXP).as_uri()
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert (store / "mlartifacts" / EXP / run.info.run_id / "artifacts" / "result.json").exists()
    assert not (cwd / "mlruns").exists()


def test_user_name_failure_is_tolerated(uri, tmp_path, monkeypatch):
    def no_user():
        raise KeyError("getpwuid(): uid not found: 12345")

    monkeypatch.setattr(getpass, "getuser", no_user)
    with _tracker(uri, tmp_path / "job") as t:
        t.log_metrics({"train/ce": 1.0}, 0)
    (run,) = _runs(uri)
    assert run.info.status == "FINISHED" and "mlflow.user" not in run.data.tags


# ------------------------------------------------------------------ flushing


def test_metrics_reach_the_store_after_flush_seconds(uri, tmp_path, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(tracking, "_clock", lambda: now[0])
    with _tracker(uri, tmp_path / "job") as t:
        t.log_metrics({"train/ce": 1.0}, 0)
        assert _steps(uri, t.run_id) == []  # buffered
        now[0] += FLUSH_SECONDS - 1
        t.log_metrics({"train/ce": 0.9}, 1)
        assert _steps(uri, t.run_id) == []
        now[0] += 1
        t.log_metrics({"train/ce": 0.8}, 2)
        assert _steps(uri, t.run_id) == [0, 1, 2]  # 30 s since the start: sent
        t.log_metrics({"train/ce": 0.7}, 3)
        assert _steps(uri, t.run_id) == [0, 1, 2]  # the clock starts again
        now[0] += FLUSH_SECONDS
        t.log_metrics({"train/ce": 0.6}, 4)
        assert _steps(uri, t.run_id) == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------ end states and resumes


def _log_then_wait(uri, out_dir, ready, hard_kill):
    """A job in a child process: logs steps 0-4, then dies hard or waits for SIGTERM."""
    with _tracker(uri, out_dir) as t:
        for step in range(5):
            t.log_metrics({"train/ce": 1.0 / (step + 1)}, step)
        if hard_kill:
            t.flush()
            os._exit(9)  # like SIGKILL: no Python code runs
        ready.set()
        time.sleep(60)


def _child(uri, out_dir, hard_kill):
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    p = ctx.Process(target=_log_then_wait, args=(uri, out_dir, ready, hard_kill))
    p.start()
    if not hard_kill:
        assert ready.wait(60)
        os.kill(p.pid, signal.SIGTERM)
    p.join(60)
    return p.exitcode


def test_sigterm_marks_the_run_killed(uri, tmp_path):
    assert _child(uri, tmp_path / "job", hard_kill=False) == 128 + signal.SIGTERM
    (run,) = _runs(uri)
    assert run.info.status == "KILLED"
    assert _steps(uri, run.info.run_id) == [0, 1, 2, 3, 4]  # buffered values were flushed


@pytest.mark.parametrize("hard_kill", [True, False], ids=["killed-hard", "sigterm"])
def test_a_resumed_job_continues_its_run(uri, tmp_path, hard_kill):
    job = tmp_path / "job"
    _child(uri, job, hard_kill)
    (run,) = _runs(uri)
    assert run.info.status == ("RUNNING" if hard_kill else "KILLED")
    assert (job / RUN_ID_FILE).read_text().strip() == run.info.run_id
    with _tracker(uri, job) as t:
        assert t.resumed and t.run_id == run.info.run_id
        assert _client(uri).get_run(t.run_id).info.status == "RUNNING"
        for step in range(3, 10):  # resumed from a checkpoint at step 3: 3 and 4 come again
            t.log_metrics({"train/ce": 1.0 / (step + 1)}, step)
    (run,) = _runs(uri)
    assert run.info.status == "FINISHED"
    assert _steps(uri, run.info.run_id) == list(range(10))  # each step once
    assert run.data.tags["kcd.attempt"] == "2"


def test_a_finished_job_run_again_gets_a_new_run(uri, tmp_path):
    job = tmp_path / "job"
    with _tracker(uri, job) as first:
        first.log_metrics({"train/ce": 1.0}, 0)
    with _tracker(uri, job) as second:
        second.log_metrics({"train/ce": 1.0}, 0)
    assert not second.resumed and second.run_id != first.run_id
    assert (job / RUN_ID_FILE).read_text().strip() == second.run_id
    assert {r.info.status for r in _runs(uri)} == {"FINISHED"}


def test_run_id_of_another_store_starts_a_new_run(uri, tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / RUN_ID_FILE).write_text("0123456789abcdef0123456789abcdef\n")
    with _tracker(uri, job) as t:
        t.log_metrics({"train/ce": 1.0}, 0)
    assert not t.resumed and len(_runs(uri)) == 1


@pytest.mark.parametrize("exc, status", [(RuntimeError("boom"), "FAILED"),
                                         (KeyboardInterrupt(), "KILLED"),
                                         (SystemExit(0), "FINISHED"),
                                         (SystemExit(1), "KILLED")])
def test_end_status_follows_how_the_job_ends(uri, tmp_path, exc, status):
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(type(exc)):
        with _tracker(uri, tmp_path / "job") as t:
            assert signal.getsignal(signal.SIGTERM) == t._on_sigterm
            t.log_metrics({"train/ce": 1.0}, 0)
            raise exc
    assert signal.getsignal(signal.SIGTERM) == previous  # restored
    (run,) = _runs(uri)
    assert run.info.status == status and _steps(uri, run.info.run_id) == [0]


def test_an_open_run_is_ended_at_interpreter_exit(uri, tmp_path):
    t = _tracker(uri, tmp_path / "job").__enter__()
    t.log_metrics({"train/ce": 1.0}, 0)
    tracking._end_open_runs()  # what atexit runs
    t._restore_sigterm()
    (run,) = _runs(uri)
    assert run.info.status == "KILLED" and _steps(uri, run.info.run_id) == [0]


# ------------------------------------------------------------------ tracking.required


def _closed_port_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://user:secret@127.0.0.1:{port}"


def test_required_tracking_on_an_unreachable_store_fails_the_job(tmp_path):
    bad = _closed_port_uri()
    previous = signal.getsignal(signal.SIGTERM)
    ran = []
    t0 = time.monotonic()
    with pytest.raises(KcdError) as err:
        with _tracker(bad, tmp_path / "job", required=True):
            ran.append(True)
    assert time.monotonic() - t0 < 15 and not ran
    msg = str(err.value)
    assert "\n" not in msg and "127.0.0.1" in msg and "secret" not in msg
    assert "tracking.required: false" in msg
    assert signal.getsignal(signal.SIGTERM) == previous


def test_tracking_failure_is_one_line_and_the_job_goes_on(tmp_path, capsys):
    artifact = tmp_path / "result.json"
    artifact.write_text("{}")
    ran = []
    with _tracker(_closed_port_uri(), tmp_path / "job") as t:
        for step in range(500):
            t.log_metrics({"train/ce": 1.0}, step)
        t.log_artifact(artifact)
        ran.append(True)
    assert ran and t.run_id is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MLflow tracking disabled" in err[0] and "secret" not in err[0]


def test_required_tracking_failing_mid_run_fails_the_job(uri, tmp_path, monkeypatch):
    with pytest.raises(KcdError, match="log_batch"):
        with _tracker(uri, tmp_path / "job", required=True) as t:
            def broken(*a, **k):
                raise OSError("disk I/O error")

            monkeypatch.setattr(t._client, "log_batch", broken)
            t.log_metrics({"train/ce": 1.0}, 0)
            t.flush()
    monkeypatch.undo()
    (run,) = _runs(uri)
    assert run.info.status == "FAILED"


def test_required_end_failure_fails_the_job(uri, tmp_path, monkeypatch):
    with pytest.raises(KcdError, match="log_batch"):
        with _tracker(uri, tmp_path / "job", required=True) as t:
            t.log_metrics({"train/ce": 1.0}, 0)
            monkeypatch.setattr(t._client, "log_batch",
                                lambda *a, **k: (_ for _ in ()).throw(OSError("gone")))
    monkeypatch.undo()
    (run,) = _runs(uri)
    assert run.info.status == "FAILED"


# ------------------------------------------------------------------ the CLI's tracker


def _args(**kw):
    base = dict(no_track=False, tracking_uri=None, config=None, set=None, command="pretrain")
    return argparse.Namespace(**{**base, **kw})


def test_cli_tracker_takes_required_from_the_config_or_environment(tmp_path, monkeypatch):
    import kcd.cli as cli

    monkeypatch.delenv("KCD_TRACKING_REQUIRED", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    t = cli._tracker(_args(set=["tracking.required=true", f"results={tmp_path}"]), EXP, "r",
                     {}, {}, out_dir=tmp_path / "job")
    assert t.required and t.uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert t.out_dir == tmp_path / "job" and t.source == "kcd pretrain"

    # the workflow's way: --tracking-uri alone, no config read
    monkeypatch.setattr(cli, "_config", lambda args: pytest.fail("config read"))
    t = cli._tracker(_args(tracking_uri="sqlite:///x.db"), EXP, "r", {}, {})
    assert not t.required and t.uri == "sqlite:///x.db"
    monkeypatch.setenv("KCD_TRACKING_REQUIRED", "1")
    assert cli._tracker(_args(tracking_uri="sqlite:///x.db"), EXP, "r", {}, {}).required
    assert cli._tracker(_args(no_track=True), EXP, "r", {}, {}).__enter__() is None


def _sleep():
    time.sleep(60)


def test_a_fork_of_the_job_stops_on_sigterm_as_before(uri, tmp_path):
    """Data loader workers are forks of the job: SIGTERM ends them as it did without the
    tracker, and leaves the job's run alone."""
    with _tracker(uri, tmp_path / "job") as t:
        p = multiprocessing.get_context("fork").Process(target=_sleep)
        p.start()
        time.sleep(0.2)
        os.kill(p.pid, signal.SIGTERM)
        p.join(30)
        assert p.exitcode == -signal.SIGTERM
        t.log_metrics({"train/ce": 1.0}, 0)
        assert _client(uri).get_run(t.run_id).info.status == "RUNNING"
    (run,) = _runs(uri)
    assert run.info.status == "FINISHED"


def test_result_fields_as_params_and_a_resume_keeps_the_first_values(uri, tmp_path):
    job = tmp_path / "job"
    t = _tracker(uri, job).__enter__()
    t.log_params({"iterations": 40, "train_seconds": 12.5})
    t._client.set_terminated(t.run_id, "KILLED")  # a job stopped after logging them
    t._ended = True
    t._restore_sigterm()
    tracking._OPEN.discard(t)
    with _tracker(uri, job) as again:
        assert again.resumed
        again.log_params({"iterations": 40, "train_seconds": 30.0, "eval_seed": 0})
    (run,) = _runs(uri)
    assert run.info.status == "FINISHED"
    assert run.data.params["train_seconds"] == "12.5" and run.data.params["eval_seed"] == "0"


def test_a_server_is_checked_at_its_health_address(tmp_path):
    import http.server
    import threading

    from kcd.tracking import check_reachable

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            self.send_response(200 if self.path == "/mlflow/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        check_reachable(f"http://user:secret@127.0.0.1:{port}/mlflow/")
        check_reachable(f"http://127.0.0.1:{port}")  # 404: it answered
    finally:
        server.shutdown()
        server.server_close()
    assert seen == ["/mlflow/health", "/health"]

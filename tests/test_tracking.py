"""MLflow tracking: one run per job with params, batched metrics and artifacts; a tracking
failure never costs the run its own files."""
from __future__ import annotations

import json

from kcd.config import train_spec
from kcd.tracking import FLUSH_EVERY, MlflowTracker, ensure_store
from kcd.train import RESULT, init_weights, train


def test_run_holds_params_metrics_and_artifacts(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ensure_store(uri)
    calls = []
    artifact = tmp_path / "result.json"
    artifact.write_text(json.dumps({"top1": 12.5}))
    with MlflowTracker(uri, "kcd-test", "cifar100/resnet56/resnet20/fitnets/none/s0",
                       params={"dataset": "cifar100", "method": "fitnets", "seed": 0,
                               "recipe": {"lr": 0.1, "milestones": [2, 4]}},
                       tags={"method": "fitnets"}) as tracker:
        original = tracker._client.log_batch
        monkeypatch.setattr(tracker._client, "log_batch",
                            lambda *a, **k: (calls.append(len(k.get("metrics", []))),
                                             original(*a, **k))[1])
        for step in range(1, FLUSH_EVERY + 1):
            tracker.log_metrics({"train/ce": 1.0 / step, "train/lr": 0.1}, step)
        tracker.log_artifact(artifact)
    run = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("kcd-test").experiment_id])[0]
    assert run.data.params["method"] == "fitnets"
    assert run.data.params["recipe.milestones"] == "[2, 4]"
    assert run.data.tags["method"] == "fitnets"
    assert run.info.status == "FINISHED"
    history = MlflowClient(uri).get_metric_history(run.info.run_id, "train.ce")
    assert len(history) == FLUSH_EVERY
    # metrics went in batches, not one call per value
    metric_calls = [c for c in calls if c]
    assert sum(metric_calls) == 2 * FLUSH_EVERY and len(metric_calls) <= 3
    arts = [a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id)]
    assert "result.json" in arts


def test_tracking_failure_keeps_the_run_files(tiny_cfg, tmp_path, capsys):
    cfg, _ = tiny_cfg
    theta0 = tmp_path / "t.pt"
    init_weights("resnet20_0.5x", 0, 100, theta0)
    spec = train_spec(cfg, dataset="cifar100", arch="resnet20_0.5x", seed=0, theta0=str(theta0),
                      out_dir=str(tmp_path / "run"))
    with MlflowTracker("bogus-scheme://nowhere", "kcd-test", "x") as tracker:
        result = train(spec, tracker=tracker, progress=False)
    assert (tmp_path / "run" / RESULT).exists() and result["top1"] >= 0
    assert "MLflow tracking disabled" in capsys.readouterr().err


def test_experiment_created_by_a_parallel_job_meanwhile_is_used(tmp_path, monkeypatch, capsys):
    """Two jobs starting together both find the experiment absent; the second one's create
    fails (unique name) and it must log into the first one's experiment, not switch off."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ensure_store(uri)
    other = MlflowClient(uri).create_experiment("kcd-race")  # the parallel job's
    real_get = MlflowClient.get_experiment_by_name
    seen = []

    def stale_first_lookup(self, name):
        seen.append(name)
        return None if len(seen) == 1 else real_get(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", stale_first_lookup)
    with MlflowTracker(uri, "kcd-race", "run", params={"seed": 0}, tags={}) as tracker:
        tracker.log_metrics({"train/ce": 1.0}, 1)
    assert "tracking disabled" not in capsys.readouterr().err
    assert len(seen) == 2
    runs = MlflowClient(uri).search_runs([other])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"

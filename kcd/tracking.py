"""MLflow tracking for the engines: one MLflow run per job.

- Params use the run's identity names (dataset, teacher, student, method, transform, seed) and
  the recipe, so a table row can be found in the MLflow UI by the same words.
- Metrics are buffered and sent with ``log_batch`` (one call per flush, not one per scalar).
- Tags: the git commit of the code and a hash of the run's spec.
- The tracking URI comes from ``MLFLOW_TRACKING_URI``, else the config's ``tracking.uri``, else
  ``sqlite:///<results>/mlflow.db``. :func:`ensure_store` creates the store's schema once,
  before parallel writers start (several processes creating a sqlite schema at once crash).
- Tracking never costs a run its results: any MLflow failure is reported once on stderr and
  tracking is switched off for the rest of the job, while the job's own files are written as
  usual.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FLUSH_EVERY = 200  # buffered metric values per log_batch call (MLflow accepts up to 1000)


def tracking_uri(config_uri: str | None, results: str | os.PathLike) -> str:
    """The URI to use: environment, then config, then a sqlite file under ``results``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if config_uri:
        return config_uri
    return f"sqlite:///{Path(results).resolve() / 'mlflow.db'}"


def ensure_store(uri: str) -> None:
    """Create the tracking store's schema (call once before parallel jobs log to it)."""
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def git_commit() -> str | None:
    """The commit of the checkout this code runs from, if it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def spec_hash(spec: Any) -> str:
    """A short stable hash of a JSON-able spec."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


class MlflowTracker:
    """One MLflow run for one job; use as a context manager."""

    def __init__(self, uri: str, experiment: str, run_name: str,
                 params: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> None:
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.params = _flatten(params or {})
        self.tags = dict(tags or {})
        self.run_id: str | None = None
        self._client = None
        self._buffer: list = []
        self._failed = False

    def _guard(self, what: str, fn, *args, **kwargs):
        if self._failed:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # never let tracking lose a run
            self._failed = True
            print(f"kcd: MLflow tracking disabled for this job ({what} failed: "
                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__})", file=sys.stderr)
            return None

    def __enter__(self) -> "MlflowTracker":
        self._guard("start", self._start)
        return self

    def _start(self) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)
        exp_id = self._experiment_id()
        commit = git_commit()
        tags = dict(self.tags)
        if commit:
            tags["git_commit"] = commit
        run = self._client.create_run(exp_id, run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in self.params.items()]
        for i in range(0, len(params), 100):
            self._client.log_batch(self.run_id, params=params[i:i + 100],
                                   tags=[RunTag("mlflow.runName", self.run_name)] if i == 0 else [])

    def _experiment_id(self) -> str:
        """The experiment's id, created if absent. Parallel jobs starting together may both
        find it absent: the one whose create fails uses the other's."""
        exp = self._client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return self._client.create_experiment(self.experiment)
        except Exception:
            exp = self._client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer ``metrics`` at ``step``; flushed in batches."""
        if self._failed or self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k.replace("/", "."), float(v), now, step)
                            for k, v in metrics.items() if v is not None)
        if len(self._buffer) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if self._buffer and self.run_id is not None:
            buf, self._buffer = self._buffer, []
            for i in range(0, len(buf), 1000):
                self._guard("log_batch", self._client.log_batch, self.run_id,
                            metrics=buf[i:i + 1000])

    def log_artifact(self, path: str | os.PathLike) -> None:
        if self.run_id is not None and Path(path).exists():
            self._guard("log_artifact", self._client.log_artifact, self.run_id, str(path))

    def __exit__(self, exc_type, exc, tb) -> None:
        self.flush()
        if self.run_id is not None:
            status = "FINISHED" if exc_type is None else "FAILED"
            self._guard("end", self._client.set_terminated, self.run_id, status)

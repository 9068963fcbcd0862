"""MLflow tracking for the engines: one MLflow run per job, across resumes.

- Params use the run's identity names (dataset, teacher, student, method, transform, seed) and
  the recipe, so a table row can be found in the MLflow UI by the same words.
- Metrics are buffered and sent with ``log_batch``: every :data:`FLUSH_EVERY` values and at
  least every :data:`FLUSH_SECONDS` (checked when metrics are logged), so a long job's curves
  reach the store while it runs.
- Tags: MLflow's standard ones (``mlflow.runName``, ``mlflow.source.name``/``type``,
  ``mlflow.source.git.commit``, ``mlflow.user``), ``kcd.git_dirty`` and a hash of the spec.
- The tracking URI comes from ``MLFLOW_TRACKING_URI``, else the config's ``tracking.uri``, else
  ``sqlite:///<results>/mlflow.db``. Creating or upgrading a sqlite store's schema is done by one
  process at a time under a file lock beside the database (``mlflow.db.lock``): MLflow's schema
  creation is not safe when several jobs start together on a fresh store. Experiments the
  tracker creates in a sqlite store keep their artifacts beside it
  (``<store folder>/mlartifacts/<experiment>``), so the results folder is self-contained.
- One run per job: the run's id is kept in ``<out_dir>/mlflow_run_id``; a job that resumes in
  the same folder continues its unfinished run (metrics go on at their steps; steps the store
  already holds are not logged twice). A run ends FINISHED, FAILED on an exception, KILLED on
  SIGTERM (Snakemake and SLURM stop jobs that way) or Ctrl-C.
- ``required=False`` (the config's ``tracking.required``, default): a tracking failure is one
  line on stderr, tracking is switched off for the rest of the job and the job's own files are
  written as usual. ``required=True``: the failure fails the job with a :class:`KcdError`.
"""
from __future__ import annotations

import atexit
import fcntl
import getpass
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from kcd.errors import KcdError

FLUSH_EVERY = 200  # buffered metric values per log_batch call (MLflow accepts up to 1000)
FLUSH_SECONDS = 30.0  # buffered metrics reach the store at least this often
RUN_ID_FILE = "mlflow_run_id"  # in the job's output folder: the run a resumed job continues
LOCK_SECONDS = 600.0  # the longest wait for another process creating the store's schema
HEALTH_SECONDS = 10.0  # an http(s) server must answer /health within this at the start
# Read by MLflow 3's UI: an experiment of this kind opens on its runs table (not on traces).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

_clock = time.monotonic  # the flush clock (tests replace it)


def tracking_uri(config_uri: str | None, results: str | os.PathLike) -> str:
    """The URI to use: environment, then config, then a sqlite file under ``results``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if config_uri:
        return config_uri
    return f"sqlite:///{Path(results).resolve() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:`` URI (None for other stores or in-memory sqlite)."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


@contextmanager
def store_lock(uri: str, timeout: float = LOCK_SECONDS) -> Iterator[None]:
    """Hold the store's file lock (``<db>.lock`` beside a sqlite database; nothing for other
    stores). The folder of the database is created if absent."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has held {path.name}.lock for over "
                                       f"{timeout:.0f} s") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def _import_store(uri: str) -> None:
    """Import the client (and the sqlite store's modules) before taking the lock, so that the
    lock is held for the database work only."""
    from mlflow.tracking import MlflowClient  # noqa: F401

    if sqlite_path(uri) is not None:
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


REQUIRED_ENV = "KCD_TRACKING_REQUIRED"
"""``1``: a tracking failure fails the job (``tracking.required``); set by the workflow for the
jobs it starts, which inherit its environment."""


def require_for_jobs(tracking: dict) -> None:
    """Pass the config's ``tracking.required`` to the jobs this process starts."""
    os.environ[REQUIRED_ENV] = "1" if tracking.get("required") else "0"


def ensure_store(uri: str) -> None:
    """Create or upgrade the tracking store's schema, once, under the store's lock (the
    workflow calls it before its jobs start; every tracker does the same at its start)."""
    _import_store(uri)
    from mlflow.tracking import MlflowClient

    with store_lock(uri):
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def check_reachable(uri: str) -> None:
    """An http(s) tracking server must answer at once (MLflow's own retries take minutes);
    ``ConnectionError`` if it does not. Other stores are not checked here."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]  # /health needs no credentials
    health = urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/") + "/health",
                                      "", ""))
    try:
        with urllib.request.urlopen(health, timeout=HEALTH_SECONDS):
            pass
    except urllib.error.HTTPError:
        pass  # it answered (a proxy may not route /health)
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(f"no answer from the server: {reason}") from None


def prepare_store(uri: str, required: bool) -> None:
    """The workflow's start: :func:`ensure_store`, after :func:`check_reachable`. A store that
    cannot be prepared stops the workflow with one line when tracking is ``required``;
    otherwise it is one warning, and each job then runs without tracking and says so."""
    try:
        check_reachable(uri)
        ensure_store(uri)
    except Exception as e:  # MLflow and its drivers raise many kinds
        problem = f"MLflow store {_shown_uri(uri)} cannot be used ({_one_line(e)})"
        if required:
            raise KcdError(f"{problem}; start or fix it (tracking.uri or MLFLOW_TRACKING_URI), "
                           "or set tracking.required: false to run without it") from None
        print(f"kcd: warning: {problem}; the jobs run without MLflow tracking "
              "(tracking.required: false)", file=sys.stderr, flush=True)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit() -> str | None:
    """The commit of the checkout this code runs from, if it is a git checkout."""
    out = _git("rev-parse", "HEAD")
    return out.strip() or None if out else None


def git_dirty() -> bool | None:
    """Whether tracked files of the checkout differ from its commit (None: not known)."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    return None if out is None else bool(out.strip())


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


def _shown_uri(uri: str) -> str:
    """The URI without a password (``user:secret@host`` -> ``user:***@host``)."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", uri)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0].strip() if text else type(e).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # no name for this uid (containers), no USER variable
        return None


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"


class Terminated(SystemExit):
    """Raised in the main thread by the tracker's SIGTERM handler: the job unwinds, its run is
    marked KILLED, and the process exits with status 143 (128 + SIGTERM)."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


_OPEN: "weakref.WeakSet[MlflowTracker]" = weakref.WeakSet()


@atexit.register
def _end_open_runs() -> None:
    """An interpreter exit with a run still open (no ``__exit__``): end it as KILLED."""
    for tracker in list(_OPEN):
        if tracker._pid == os.getpid():  # not a run of the process this one was forked from
            tracker._end("KILLED", raise_errors=False)


class MlflowTracker:
    """One MLflow run for one job; use as a context manager.

    ``out_dir``: the job's output folder; the run id is kept there and a resumed job continues
    its run. ``required``: a tracking failure fails the job (:class:`KcdError`) instead of
    being reported in one line. ``source``: ``mlflow.source.name`` (e.g. ``kcd pretrain``).
    """

    def __init__(self, uri: str, experiment: str, run_name: str,
                 params: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
                 out_dir: str | os.PathLike | None = None, required: bool = False,
                 source: str | None = None) -> None:
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.params = _flatten(params or {})
        self.tags = {k: str(v) for k, v in (tags or {}).items()}
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.required = required
        self.source = source or f"kcd {Path(sys.argv[0]).name}"
        self.run_id: str | None = None
        self.resumed = False
        self._client = None
        self._buffer: list = []
        self._last_step: dict[str, int] = {}  # a resumed run: the last step stored per metric
        self._last_flush = _clock()
        self._failed = False
        self._ended = False
        self._terminated = False
        self._previous_sigterm: Any = None
        self._handler_installed = False
        self._stored_params: set[str] = set()  # a resumed run's params (immutable in MLflow)
        self._pid = os.getpid()  # forks (data loader workers) inherit the tracker, not the run

    # ------------------------------------------------------------------ failures

    def _fail(self, what: str, e: BaseException, raise_errors: bool = True) -> None:
        already = self._failed
        self._failed = True
        if already:
            return
        where = _shown_uri(self.uri)
        if self.required:
            if raise_errors:
                raise KcdError(
                    f"MLflow tracking at {where} failed ({what}: {_one_line(e)}); start or fix "
                    "the tracking store (tracking.uri, --tracking-uri or MLFLOW_TRACKING_URI), "
                    "or set tracking.required: false to run without it") from None
            return  # the job is failing already: its own error is the one to report
        print(f"kcd: MLflow tracking disabled for this job ({what} at {where} failed: "
              f"{_one_line(e)})", file=sys.stderr, flush=True)

    def _guard(self, what: str, fn, *args, raise_errors: bool = True, **kwargs):
        if self._failed:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # never let tracking lose a run unless it is required
            self._fail(what, e, raise_errors)
            return None

    # ------------------------------------------------------------------ start

    def __enter__(self) -> "MlflowTracker":
        self._install_sigterm()
        try:
            self._guard("start", self._start)
        except BaseException:  # a required start failed, or SIGTERM came during the start
            self._end("KILLED" if self._terminated else "FAILED", raise_errors=False)
            self._restore_sigterm()
            raise
        if self.run_id is not None:
            _OPEN.add(self)
        return self

    def _start(self) -> None:
        _import_store(self.uri)
        from mlflow.tracking import MlflowClient

        check_reachable(self.uri)
        with store_lock(self.uri):  # the first job on a fresh store creates its schema
            self._client = MlflowClient(tracking_uri=self.uri)
            exp_id = self._experiment_id()
        run = self._previous_run(exp_id)
        if run is not None:
            self._resume(run)
        else:
            self._create(exp_id)
        self._last_flush = _clock()

    def _experiment_id(self) -> str:
        """The experiment's id, created if absent (under the store's lock for sqlite; for a
        server, a parallel job's create may win: then its experiment is used)."""
        exp = self._client.get_experiment_by_name(self.experiment)
        if exp is not None:
            if EXPERIMENT_KIND_TAG not in exp.tags:
                self._client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG,
                                                EXPERIMENT_KIND)
            return exp.experiment_id
        try:
            return self._client.create_experiment(
                self.experiment, artifact_location=self._artifact_location(),
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:
            exp = self._client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def _artifact_location(self) -> str | None:
        """``<store folder>/mlartifacts/<experiment>`` for a sqlite store (a server decides
        its own)."""
        db = sqlite_path(self.uri)
        if db is None:
            return None
        return (db.resolve().parent / "mlartifacts" / _safe_name(self.experiment)).as_uri()

    def _standard_tags(self) -> dict[str, str]:
        tags = dict(self.tags)
        tags["mlflow.runName"] = self.run_name
        tags["mlflow.source.name"] = self.source
        tags["mlflow.source.type"] = "LOCAL"
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
            dirty = git_dirty()
            if dirty is not None:
                tags["kcd.git_dirty"] = str(dirty).lower()
        user = _user()
        if user:
            tags["mlflow.user"] = user
        return tags

    def _previous_run(self, exp_id: str):
        """The run this job started before and did not finish, if its id file names one that
        is still in the store (a finished run is not continued: a job reruns from scratch
        only after it finished, and then gets a new run)."""
        if self.out_dir is None:
            return None
        path = self.out_dir / RUN_ID_FILE
        try:
            run_id = path.read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not re.fullmatch(r"[0-9A-Za-z_-]{1,64}", run_id):
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        if (run.info.experiment_id != exp_id or run.info.lifecycle_stage != "active"
                or run.info.status == "FINISHED"):
            return None
        return run

    def _create(self, exp_id: str) -> None:
        from mlflow.entities import Param, RunTag

        tags = self._standard_tags()
        tags["kcd.attempt"] = "1"
        run = self._client.create_run(exp_id, run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        self._write_run_id()
        params = [Param(k, v[:6000]) for k, v in self.params.items()]
        for i in range(0, len(params), 100):
            self._client.log_batch(self.run_id, params=params[i:i + 100],
                                   tags=[RunTag("mlflow.runName", self.run_name)] if i == 0 else [])

    def _resume(self, run) -> None:
        from mlflow.entities import Param, RunTag

        self.run_id = run.info.run_id
        self.resumed = True
        self._stored_params = set(run.data.params)
        self._client.update_run(self.run_id, status="RUNNING")
        for m in getattr(run.data, "_metric_objs", []):  # the latest value of each metric
            self._last_step[m.key] = max(m.step, self._last_step.get(m.key, m.step))
        tags = self._standard_tags()
        try:
            tags["kcd.attempt"] = str(int(run.data.tags.get("kcd.attempt", "1")) + 1)
        except ValueError:
            tags["kcd.attempt"] = "2"
        if "mlflow.user" in run.data.tags:  # who started the run stays its user
            del tags["mlflow.user"]
        # params are immutable in MLflow: only ones the run lacks are added
        params = [Param(k, v[:6000]) for k, v in self.params.items() if k not in run.data.params]
        tag_list = [RunTag(k, v[:5000]) for k, v in tags.items()]
        for i in range(0, max(len(params), len(tag_list)), 100):
            self._client.log_batch(self.run_id, params=params[i:i + 100],
                                   tags=tag_list[i:i + 100])
        self._write_run_id()

    def _write_run_id(self) -> None:
        if self.out_dir is None or self.run_id is None:
            return
        from kcd.checkpoint import atomic_write_text

        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / RUN_ID_FILE
        try:
            if path.read_text().strip() == self.run_id:
                return
        except OSError:
            pass
        atomic_write_text(self.run_id + "\n", path)

    # ------------------------------------------------------------------ SIGTERM

    def _on_sigterm(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a fork of the job (a data loader worker): as before
            previous = self._previous_sigterm if self._previous_sigterm is not None \
                else signal.SIG_DFL
            signal.signal(signal.SIGTERM, previous)
            if callable(previous):
                previous(signum, frame)
            else:
                os.kill(os.getpid(), signal.SIGTERM)
            return
        if self._terminated:
            return  # already unwinding: let the run end
        self._terminated = True
        raise Terminated()

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._pid = os.getpid()
        previous = signal.getsignal(signal.SIGTERM)
        if previous == signal.SIG_IGN:
            return  # the process ignores SIGTERM on purpose
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self._previous_sigterm = previous
        self._handler_installed = True

    def _restore_sigterm(self) -> None:
        if not self._handler_installed:
            return
        self._handler_installed = False
        previous = self._previous_sigterm if self._previous_sigterm is not None \
            else signal.SIG_DFL
        signal.signal(signal.SIGTERM, previous)
        if self._terminated and callable(previous):
            previous(signal.SIGTERM, None)  # a handler that was there before ours still runs

    # ------------------------------------------------------------------ logging

    @property
    def active(self) -> bool:
        return self.run_id is not None and not self._failed and not self._ended

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer ``metrics`` at ``step``; sent every :data:`FLUSH_EVERY` values or
        :data:`FLUSH_SECONDS` seconds. A resumed run skips steps its store already holds."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for k, v in metrics.items():
            if v is None:
                continue
            key = k.replace("/", ".")
            last = self._last_step.get(key)
            if last is not None and step <= last:
                continue
            self._buffer.append(Metric(key, float(v), now, int(step)))
        if len(self._buffer) >= FLUSH_EVERY or _clock() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def log_params(self, params: dict[str, Any]) -> None:
        """Log more params (e.g. a result's ``iterations`` and ``train_seconds``); a key the
        run already has keeps its first value."""
        if not self.active:
            return
        from mlflow.entities import Param

        new = {k: v for k, v in _flatten(params).items()
               if k not in self.params and k not in self._stored_params}
        self.params.update(new)
        items = [Param(k, v[:6000]) for k, v in new.items()]
        for i in range(0, len(items), 100):
            self._guard("log_params", self._client.log_batch, self.run_id,
                        params=items[i:i + 100])

    def flush(self, raise_errors: bool = True) -> None:
        self._last_flush = _clock()
        if not self._buffer or self.run_id is None or self._failed:
            return
        while self._buffer:  # a chunk leaves the buffer once the store has it
            chunk = self._buffer[:1000]
            self._guard("log_batch", self._client.log_batch, self.run_id, metrics=chunk,
                        raise_errors=raise_errors)
            if self._failed:
                return
            del self._buffer[:len(chunk)]

    def log_artifact(self, path: str | os.PathLike) -> None:
        if self.active and Path(path).exists():
            self._guard("log_artifact", self._client.log_artifact, self.run_id, str(path))

    # ------------------------------------------------------------------ end

    def _end(self, status: str, raise_errors: bool) -> None:
        if self._ended:
            return
        self._ended = True
        _OPEN.discard(self)
        error = None
        try:
            self.flush(raise_errors=raise_errors)
        except KcdError as e:  # required tracking failed: the run still gets an end status
            error, status = e, "FAILED"
        if self.run_id is not None and self._client is not None:
            if not self._failed:
                self._guard("end", self._client.set_terminated, self.run_id, status,
                            raise_errors=raise_errors)
            elif sqlite_path(self.uri) is not None:
                # tracking failed after the run was created: still try not to leave it
                # RUNNING (a local file only: a failed server would be retried for minutes)
                try:
                    self._client.set_terminated(self.run_id, status)
                except Exception:
                    pass
        if error is not None:
            raise error

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or (issubclass(exc_type, SystemExit) and not self._terminated
                                and exc.code in (None, 0)):
            status = "FINISHED"
        elif self._terminated or issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
            status = "KILLED"
        else:
            status = "FAILED"
        try:
            self._end(status, raise_errors=exc_type is None)
        finally:
            self._restore_sigterm()

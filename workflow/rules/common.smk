# Glue between Snakemake and kcd: the resolved config, wildcards, and the input functions that
# call kcd/layout.py (every path) and kcd/plans.py (every spec and table plan).
import json
import re
import shlex
import sys
from urllib.parse import urlencode

from kcd.config import workflow_config
from kcd.data import DATASETS, EVAL_SPLIT, TRAIN_SPLIT
from kcd.errors import KcdError
from kcd.layout import Layout
from kcd.losses import BASELINE, LOSSES
from kcd.naming import LEARNED_FILE_WILDCARD, STATS_FILE_WILDCARD, WILDCARD as TRANSFORM_NAMES
from kcd.plans import Plans
from kcd.specs import runtime_text, split_runtime
from kcd.tracking import require_for_jobs, tracking_uri


def fail(message):
    """Stop Snakemake with kcd's one-line error as its last line (an exception raised here
    would end in Snakemake's InputFunctionException or WorkflowError and a traceback)."""
    print(f"kcd: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


# One scale's values plus the user's layers (kcd.config.resolve_config): the Snakefile names
# no configfile, so Snakemake's config holds only what the command line gave.
try:
    _resolved = workflow_config(workflow.config_settings.configfiles,
                                workflow.config_settings.config)
except KcdError as e:
    fail(f"invalid config: {e}")
config.clear()
config.update(_resolved)

RESULTS = config["results"]
SCALE = config["scale"]
PY = sys.executable
KCD = f"{shlex.quote(PY)} -m kcd.warm run --"  # light rules: `kcd ...`, warm when it can
TRACKING_URI = tracking_uri(config.get("tracking", {}).get("uri"), RESULTS)
require_for_jobs(config.get("tracking", {}))  # tracking.required, for the jobs started here
L = Layout(RESULTS)  # every path (kcd/layout.py)
P = Plans(config, L)  # every job's spec and every table's plan (kcd/plans.py)
# a distillation run's files: {ds}, {teacher}... stay wildcards, {file} is filled per output
RUN_FILE = L.run_file("{{ds}}", "{{teacher}}", "{{tseed}}", "{{student}}", "{{method}}",
                      "{{transform}}", "{{seed}}", "{file}")
log_path = L.log

# No wildcard may carry a path separator or a shell metacharacter.
wildcard_constraints:
    ds="|".join(map(re.escape, DATASETS.names())),
    arch=r"[A-Za-z0-9_.]+",
    teacher=r"[A-Za-z0-9_.]+",
    student=r"[A-Za-z0-9_.]+",
    seed=r"\d+",
    tseed=r"\d+",
    method="|".join(map(re.escape, [BASELINE, *LOSSES.names()])),
    transform=TRANSFORM_NAMES,
    tw=r"s\d+(-init)?",
    sw=r"s\d+(-init)?",
    folder="|".join(P.DEMO_FOLDERS.values()),
    n=r"\d+",
    split="|".join((TRAIN_SPLIT, EVAL_SPLIT)),


def table_plan(n):
    try:
        return P.table_plan(n)
    except KcdError as e:
        fail(str(e))


def data_input(ds, decoded=True):
    """The demo data's manifest (which triggers its generation), or a check of a real root;
    and the dataset's decoded splits when it has them (not for the job that decodes them)."""
    try:
        return P.data_input(ds, decoded)
    except KcdError as e:
        fail(str(e))


def launch(rule_name, name, ds=None):
    """The `python -m kcd.launch ... --` prefix of a heavy rule's command."""
    return shlex.join([PY, "-m", "kcd.launch", *P.launch_args(rule_name, name, ds)]) + " --"


def gpus(rule_name):
    return lambda w: P.resources(rule_name, w.ds).get("gpus", 0)


def result_fields(spec_fn):
    """params: the job's spec (``spec_fn(w)``, a dict) without its run-time fields, as JSON
    (Snakemake re-runs a job whose params changed; logging or checkpoint periods must not)."""
    return lambda w: json.dumps(split_runtime(spec_fn(w))[0], sort_keys=True)


def runtime_fields(spec_fn):
    """resources: the spec's run-time fields, passed as `--runtime` (not a rerun trigger)."""
    return lambda w: runtime_text(split_runtime(spec_fn(w))[1])


def run_tags(result_fn):
    """resources: the MLflow tags of a run (its tables and rows), passed as `--tags`."""
    return lambda w: urlencode(P.run_tags(result_fn(w)))


def run_wildcards(w):
    """A run's wildcards as Plans' arguments."""
    return w.ds, w.teacher, w.tseed, w.student, w.method, w.transform, w.seed


def pair_wildcards(w):
    return w.ds, w.teacher, w.tw, w.student, w.sw

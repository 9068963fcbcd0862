"""End to end: the real Snakemake DAG at the smallest scale, in a temporary directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile")]
ROWS = ["Baseline", "KD", "FitNets", "Ours", "Ours + FitNets"]

pytestmark = pytest.mark.slow


def _config() -> dict:
    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg["demo_data"]["size"] = "tiny"
    cfg["datasets"] = {"cifar100": cfg["datasets"]["cifar100"]}
    r = {"iterations": 4, "batch_size": 16, "lr": 0.05, "milestones": [3], "checkpoint_every": 2,
         "log_every": 2, "eval_batch_size": 200}
    cfg["recipes"] = {"cifar100": {"default": r}}
    cfg["methods"]["rco"]["anchors"] = 2
    cfg["tables"] = {"table7": {"dataset": "cifar100", "teacher": "resnet20",
                                "students": ["resnet20_0.5x"], "rows": ROWS}}
    cfg.pop("ablations")  # tests/test_workflow_ablations.py builds those
    cfg.pop("figure1")
    cfg.pop("detection")
    return cfg


def _snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([*SNAKEMAKE, "-d", str(workdir), "--cores", "2", *args], cwd=workdir,
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    work = tmp_path_factory.mktemp("dag")
    (work / "config").mkdir()
    (work / "config" / "demo.yaml").write_text(yaml.safe_dump(_config()))
    run = _snakemake(work, "results/tables.md")
    assert run.returncode == 0, run.stderr[-4000:]
    return work


def test_table7_rows_columns_and_provenance(built):
    df = pd.read_csv(built / "results" / "table7.csv")
    assert list(df["row"]) == ROWS
    for col in ("resnet20_0.5x", "resnet20_0.5x_paper", "resnet20_0.5x_diff", "resnet20_0.5x_n",
                "teacher_top1", "teacher_top1_paper"):
        assert col in df.columns
    # every number traces to a run's result.json at the layout's path
    res = built / "results" / "cifar100"
    expected = {
        "Baseline": res / "models/resnet20_0.5x-s0/result.json",
        "KD": res / "runs/resnet20-s0__resnet20_0.5x/kd/none/s0/result.json",
        "FitNets": res / "runs/resnet20-s0__resnet20_0.5x/fitnets/none/s0/result.json",
        "Ours": res / "runs/resnet20-s0__resnet20_0.5x/l2/bipartite-correlation/s0/result.json",
        "Ours + FitNets": res / "runs/resnet20-s0__resnet20_0.5x/fitnets/bipartite-correlation/s0/result.json",
    }
    for _, line in df.iterrows():
        result = json.loads(expected[line["row"]].read_text())
        assert line["resnet20_0.5x"] == pytest.approx(result["top1"])
        assert line["resnet20_0.5x_n"] == 1
        assert line["resnet20_0.5x_runs"] == str(expected[line["row"]].parent.relative_to(built))
    paper = pd.read_csv(REPO / "kcd" / "paper" / "table7.csv").set_index("row")
    for _, line in df.iterrows():
        assert line["resnet20_0.5x_paper"] == paper.loc[line["row"], "resnet20_0.5x"]
    teacher = json.loads((res / "models/resnet20-s0/result.json").read_text())
    assert df["teacher_top1"].iloc[0] == pytest.approx(teacher["top1"])
    assert teacher["threads"] == _config()["resources"]["default"]["cpus"]  # the job's, not all
    md = (built / "results" / "tables.md").read_text()
    assert "Table 7" in md and "Ours + FitNets" in md
    assert (built / "results" / "table7.tex").read_text().count(r"\midrule") == 1


def test_every_run_is_in_mlflow(built):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{built / 'results' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kcd-cifar100")
    runs = client.search_runs([exp.experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    fit = by_name["cifar100/resnet20/resnet20_0.5x/fitnets/bipartite-correlation/s0"]
    assert fit.data.params["method"] == "fitnets"
    assert fit.data.params["transform"] == "bipartite-correlation"
    assert fit.data.params["row"] == "Ours + FitNets"
    assert "eval.top1" in fit.data.metrics and "train.ce" in fit.data.metrics
    assert fit.info.status == "FINISHED"
    files = {a.path for a in client.list_artifacts(fit.info.run_id)}
    assert {"result.json", "spec.json", "transform.csv", "bipartite-correlation.pt",
            "s0.log"} <= files, files
    table = client.download_artifacts(fit.info.run_id, "transform.csv", str(built / "dl"))
    assert open(table).readline().strip() == "student_channel,teacher_channel"
    # 2 pretrainings + 4 distillations (Baseline is the student's pre-training), and the
    # pair's consistency picture with its transform as a table
    training = [r for r in runs if r.data.tags.get("method") != "transform"]
    assert len(training) == 6
    heatmap, = [r for r in runs if r.data.tags.get("method") == "transform"]
    files = {a.path for a in client.list_artifacts(heatmap.info.run_id)}
    assert files == {"consistency-resnet20__resnet20_0.5x.png",
                     "consistency-resnet20__resnet20_0.5x.csv"}


def test_second_call_does_nothing_and_weight_change_reruns_only_that_method(built):
    again = _snakemake(built, "results/tables.md", "-n")
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr
    cfg = yaml.safe_load((built / "config" / "demo.yaml").read_text())
    cfg["methods"]["fitnets"]["weight"] = 50
    changed = built / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    dry = _snakemake(built, "results/tables.md", "-n", "--configfile", str(changed))
    assert dry.returncode == 0, dry.stderr[-3000:]
    out = dry.stdout + dry.stderr
    counts = dict(line.split()[:2] for line in out.split("Job stats:")[1].splitlines()[3:]
                  if len(line.split()) == 2 and line.split()[1].isdigit())
    assert counts.get("distill") == "2"  # fitnets with and without the transform
    assert counts.get("table") == "1" and "pretrain" not in counts


def test_run_time_fields_rerun_nothing_and_still_reach_the_job(built):
    cfg = yaml.safe_load((built / "config" / "demo.yaml").read_text())
    cfg["recipes"]["cifar100"]["default"].update(log_every=1, checkpoint_every=3,
                                                 eval_batch_size=64)
    cfg["datasets"]["cifar100"]["workers"] = 1
    changed = built / "runtime.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    dry = _snakemake(built, "results/tables.md", "-n", "--configfile", str(changed))
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "Nothing to be done" in dry.stdout + dry.stderr
    # the job still receives them: its spec is the params plus --runtime
    ran = _config()  # the config the runs were built with
    result = json.loads(next((built / "results/cifar100/runs").rglob("result.json")).read_text())
    for key in ("log_every", "checkpoint_every", "eval_batch_size"):
        assert result["spec"]["recipe"][key] == ran["recipes"]["cifar100"]["default"][key]
    assert result["spec"]["data"]["workers"] == ran["datasets"]["cifar100"].get("workers", 0)


def test_warm_worker_can_be_switched_off_from_the_command_line(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "demo.yaml").write_text(yaml.safe_dump(_config()))
    run = _snakemake(tmp_path, "results/tables.md", "-n", "--config",
                     "launcher={kind: local, warm: false}")
    assert run.returncode == 0, run.stderr[-3000:]


def test_bad_config_fails_before_any_job(tmp_path):
    cfg = _config()
    cfg["recipes"]["cifar100"]["default"]["lr"] = -1
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "demo.yaml").write_text(yaml.safe_dump(cfg))
    run = _snakemake(tmp_path, "results/tables.md", "-n")
    assert run.returncode != 0
    assert "config key recipes.cifar100.default.lr" in run.stdout + run.stderr
    assert not (tmp_path / "results" / "cifar100").exists()


def test_results_folder_keeps_one_scale(built, tmp_path):
    assert (built / "results" / ".kcd-scale").read_text() == "demo\n"
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "demo.yaml").write_text(yaml.safe_dump(_config()))
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / ".kcd-scale").write_text("paper\n")
    run = _snakemake(tmp_path, "results/tables.md", "-n")
    assert run.returncode != 0
    assert "results/ holds paper-scale results and this config is scale demo" in (
        run.stdout + run.stderr)
    assert list((tmp_path / "results").iterdir()) == [tmp_path / "results" / ".kcd-scale"]


def test_killed_run_resumes_from_its_checkpoint_after_rerun_incomplete(tmp_path):
    import signal
    import time

    cfg = _config()
    cfg["recipes"]["cifar100"]["default"].update(iterations=60, checkpoint_every=4)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "demo.yaml").write_text(yaml.safe_dump(cfg))
    target = "results/cifar100/models/resnet20_0.5x-s0/result.json"
    run_dir = tmp_path / "results/cifar100/models/resnet20_0.5x-s0"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([*SNAKEMAKE, "-d", str(tmp_path), "--cores", "1", target],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not (run_dir / "checkpoint.pt").exists():
        time.sleep(0.2)
    assert (run_dir / "checkpoint.pt").exists()
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole pipeline dies, as on a crashed node
    proc.wait()
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    for pid in leftovers.stdout.split():
        os.kill(int(pid), signal.SIGKILL)
    assert not (run_dir / "result.json").exists()
    # a killed snakemake leaves its lock: unlock, then rerun the incomplete job
    assert _snakemake(tmp_path, target, "--unlock").returncode == 0
    again = _snakemake(tmp_path, target, "--rerun-incomplete")
    assert again.returncode == 0, again.stderr[-3000:]
    log = (tmp_path / "results/logs/cifar100/pretrain/resnet20_0.5x-s0.log").read_text()
    assert "resuming" in log and "from its checkpoint at step" in log
    assert json.loads((run_dir / "result.json").read_text())["iterations"] == 60


def test_paths_with_spaces_and_shell_metacharacters_run_end_to_end(tmp_path):
    """A results folder and a dataset root with spaces, quotes and $(...): every path reaches
    its job as one word and nothing in it is run by the shell."""
    cfg = _config()
    weird = "dir with space's $(touch PWNED) `touch PWNED2`"
    cfg["results"] = f"out {weird}"
    cfg["demo_data"]["root"] = f"data {weird}"
    cfg["datasets"]["cifar100"]["root"] = f"data {weird}"
    cfg["tables"]["table7"]["rows"] = ["Baseline", "KD"]
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "demo.yaml").write_text(yaml.safe_dump(cfg))
    run = _snakemake(tmp_path, f"{cfg['results']}/table7.csv")
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    df = pd.read_csv(tmp_path / cfg["results"] / "table7.csv")
    assert list(df["row"]) == ["Baseline", "KD"] and df["resnet20_0.5x"].notna().all()
    assert (tmp_path / cfg["demo_data"]["root"] / "cifar-100-python" / "meta").is_file()
    assert not list(tmp_path.rglob("PWNED*")) and not (Path.cwd() / "PWNED").exists()


def test_the_report_holds_every_table(built):
    """`snakemake --report` (the README's command) renders each table with its title."""
    import base64
    import re

    run = _snakemake(built, "results/tables.md", "--report", "report.html")
    assert run.returncode == 0, run.stderr[-3000:]
    html = (built / "report.html").read_text()
    assert "Table 7" in html  # the category
    embedded = [base64.b64decode(b).decode("utf-8", "replace")
                for b in re.findall(r"data:text/html;[^,]*base64,([A-Za-z0-9+/=]+)", html)]
    assert any("Table 7: comparison" in page or "<h3>Table 7" in page for page in embedded)
    assert "Consistency" in html  # the pair's consistency picture
    assert "resnet20 -&gt; resnet20_0.5x" in html or "resnet20 -> resnet20_0.5x" in html


def test_a_failed_job_ends_with_kcds_error_line_on_the_terminal(tmp_path):
    """A diverging recipe: the job's log is shown after Snakemake's error block, its last line
    kcd's one-line error, so the reason is on the terminal and not only in the log file."""
    cfg = _config()
    cfg["recipes"]["cifar100"]["default"]["lr"] = 1e12
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "demo.yaml").write_text(yaml.safe_dump(cfg))
    run = _snakemake(tmp_path, "results/cifar100/models/resnet20-s0/final.pt")
    assert run.returncode != 0
    lines = run.stderr.splitlines()
    rule = max(i for i, line in enumerate(lines) if line.startswith("Logfile "))
    block = lines[rule + 2:]
    end = next(i for i, line in enumerate(block) if line and set(line) == {"="})
    last = [line for line in block[:end] if line.strip()][-1]
    assert last.startswith("kcd: error:") and "learning rate" in last, run.stderr[-3000:]
    assert "Traceback" not in "\n".join(block)


def test_the_readmes_mlflow_filters_find_every_row(built):
    """The README's two search-box filters, on the tiny DAG's Table 7 (for Table 8's): every
    run of the table, Baseline and Teacher included; FitNets beside Ours + FitNets."""
    import re

    from mlflow.tracking import MlflowClient

    text = (REPO / "README.md").read_text()
    block = text[text.index("<!-- mlflow-filters"):]
    filters = re.search(r"```text\n(.*?)```", block, re.S)[1].strip().splitlines()
    assert len(filters) == 2
    client = MlflowClient(tracking_uri=f"sqlite:///{built / 'results' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kcd-cifar100")

    def search(f: str):
        f = f.replace("table8", "table7").replace("resnet18", "resnet20_0.5x")
        return client.search_runs([exp.experiment_id], filter_string=f)

    every = search(filters[0])
    assert sorted(r.data.tags["table7"] for r in every) == sorted(ROWS + ["Teacher"])
    assert all(r.data.tags["scale"] == "demo" and r.data.tags["table"] == "7" for r in every)
    fitnets = search(filters[1])
    assert sorted(r.data.tags["table7"] for r in fitnets) == ["FitNets", "Ours + FitNets"]
    assert all(r.info.status == "FINISHED" for r in every)

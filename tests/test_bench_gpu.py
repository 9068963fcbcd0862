"""bench/bench_gpu.py --tiny on the CPU: every row runs and the throughput table is complete."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PRETRAIN = ("cifar100/resnet56", "cifar100/resnet20", "imagenet/resnet50", "imagenet/resnet18",
            "imagenet/mobilenetv2_0.5x")
PAIRS = ("cifar100/resnet20<-resnet56", "imagenet/resnet18<-resnet50",
         "imagenet/mobilenetv2_0.5x<-resnet50")
METHODS = ("fitnets", "ours", "kd")
STEPS = ("pretrain", "teacher-fwd", "distill", "loader")


def test_tiny_cpu_run_has_every_row_and_the_throughput_keys(tmp_path):
    out = tmp_path / "out.json"
    throughput = tmp_path / "throughput.yaml"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--device", "cpu", "--tiny",
         "--json", str(out), "--throughput", str(throughput)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the printed table: step, setting, method, batch, images/s, x student, x T+S, peak GiB
    table = [line.split() for line in proc.stdout.splitlines()
             if line.split() and line.split()[0] in STEPS]
    printed = {(r[0], r[1], r[2]) for r in table}
    for row in table:
        assert float(row[4]) > 0, row
        assert int(row[3]) == 4, row  # --tiny: batch 4 everywhere
    for setting in PRETRAIN:
        assert ("pretrain", setting, "-") in printed
    assert ("teacher-fwd", "cifar100/resnet56", "-") in printed
    assert ("teacher-fwd", "imagenet/resnet50", "-") in printed
    distill = {r[1]: r for r in table if r[0] == "distill"}
    for pair in PAIRS:
        for method in METHODS:
            assert ("distill", pair, method) in printed
        assert float(distill[pair][5]) > 0 and float(distill[pair][6]) > 0  # both ratios
    assert ("loader", "imagenet/jpeg-500x375", "workers=1") in printed
    assert "device:" in proc.stdout and "torch" in proc.stdout and "amp none" in proc.stdout

    data = json.loads(out.read_text())
    assert len(data["rows"]) == len(table)
    assert all(r["images_per_s"] > 0 for r in data["rows"])
    tp = data["throughput"]
    assert tp["format"] == "kcd-throughput/1"
    assert set(tp["throughput"]) == set(PRETRAIN) | set(PAIRS)
    assert all(v > 0 for v in tp["throughput"].values())
    for pair in PAIRS:
        assert set(tp["methods"][pair]) == set(METHODS)
        assert tp["throughput"][pair] == min(tp["methods"][pair].values())
    assert tp["loader_per_worker"]["imagenet"] > 0
    assert data["meta"]["tiny"] is True and data["meta"]["device_type"] == "cpu"

    import yaml

    assert yaml.safe_load(throughput.read_text()) == tp

    # what `kcd config show --cost --throughput FILE` reads: either file gives the same rates
    from kcd.costs import read_throughput

    assert read_throughput(out) == read_throughput(throughput) == tp["throughput"]

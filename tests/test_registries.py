"""The registries: each name defined once, light enough for the workflow's parse, and each
light entry agreeing with the implementation it points at."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest

from kcd.errors import KcdError
from kcd.losses import LOSSES, MethodSpec
from kcd.naming import (
    LEARNED_STRATEGIES,
    METRICS,
    STRATEGIES,
    WILDCARD,
    check_implemented,
    parse_transform_name,
)

HEAVY = ("torch", "torchvision", "pandas", "mlflow", "scipy", "numpy")

# What the Snakefile's parse does: resolve and validate the config, and build every job's
# spec and every table plan of the demo and of the paper scale.
PARSE = """
import json, sys
from kcd.config import load_config
from kcd.plans import Plans
for scale in ("demo", "paper"):
    cfg = load_config([], [f"scale={scale}", "results=res"])
    P = Plans(cfg)
    for t in P.table_plans():
        P.table_plan(t)
    P.pretrain_spec("cifar100", "resnet56", 0)
    P.stats_spec("imagenet", "resnet50", "s0", "mobilenetv2_0.5x", "s0")
    P.detect_pretrain_spec("coco", "resnet18", 0)
    P.detect_distill_spec("coco", "resnet152", 0, "resnet18", "l2", "none", 0)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)))
"""


def test_the_workflow_parse_imports_no_engine_library():
    """Config validation and the plans need names, channel counts and specs only: no torch,
    torchvision, pandas or MLflow (`snakemake -n` on a finished demo would pay seconds and a
    gigabyte for them)."""
    code = f"HEAVY = {HEAVY!r}\n" + PARSE
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == []


def test_method_registry_options_are_the_loss_class_options():
    for name, spec in LOSSES.items():
        cls = spec.cls  # refuses an entry whose options disagree with the class
        assert cls.method == name
        keyword_only = [p.name for p in inspect.signature(cls.__init__).parameters.values()
                        if p.kind is inspect.Parameter.KEYWORD_ONLY]
        assert list(spec.options) == keyword_only


def test_a_method_entry_that_disagrees_with_its_class_is_refused():
    bad = MethodSpec("kd", "kcd.losses.kd:KDLoss", 16.0, "KD", options=("temperature",))
    with pytest.raises(KcdError, match="declares options"):
        bad.cls


def test_strategies_named_once_and_implemented():
    from kcd.transforms import LEARNED_KINDS
    from kcd.transforms import STRATEGIES as IMPLEMENTED

    check_implemented("strategy", STRATEGIES, IMPLEMENTED.names(), "kcd/transforms.py")
    assert tuple(LEARNED_KINDS) == LEARNED_STRATEGIES


def test_check_implemented_names_the_difference():
    with pytest.raises(KcdError, match="register each metric in both"):
        check_implemented("metric", METRICS, [*METRICS, "emd"], "kcd/consistency.py")


def test_grammar_and_wildcards_follow_the_registries():
    import re

    for strategy in STRATEGIES:
        for metric in METRICS:
            name = f"{strategy}-{metric}"
            assert parse_transform_name(name).metric == metric
            assert re.fullmatch(WILDCARD, name)


def test_table_labels_come_from_the_registries():
    from kcd.tables import ABLATIONS

    table2 = ABLATIONS.get("2")("bipartite-correlation")
    assert [r.label for r in table2] == list(METRICS.values())
    table1 = ABLATIONS.get("1")("bipartite-correlation")
    assert [r.label for r in table1[1:]] == [s.label for s in STRATEGIES.values()
                                            if s.name != "identity"]


def test_table_rows_come_from_the_method_registry():
    """A method needs no table code: its label is a row, and with the KCD transform
    "Ours + <label>" when it reads features (KD reads logits only)."""
    from kcd.tables import COMPARISON_ROWS, comparison_row

    for name, method in LOSSES.items():
        assert COMPARISON_ROWS.get(method.label).method == name
        ours = "Ours" if name == "l2" else f"Ours + {method.label}"
        assert (ours in COMPARISON_ROWS) == method.features
    assert "Ours + KD" not in COMPARISON_ROWS
    row = comparison_row("Ours + FitNets", "greedy-l1")
    assert (row.method, row.transform) == ("fitnets", "greedy-l1")

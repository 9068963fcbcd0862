"""What a Snakemake dry run would run, as resolved job specs: a check before GPU hours are spent.

``snakemake -n -p TARGETS [options]`` prints every job's shell command. Each heavy rule's
command is ``python -m kcd.launch <resources> -- <kcd subcommand> <args>`` and each light
rule's ``python -m kcd.warm run -- <kcd subcommand> <args>``; the job's spec travels as
``--spec JSON`` (with its run-time fields apart, ``--runtime``). :func:`parse_dry_run` turns
that text back into :class:`Job` records, so what is checked is what would really run, not
what the config file says. :func:`summary` makes one line per job (``kcd config show``), and
the workflow writes the config it resolved where :data:`RESOLVED_CONFIG_ENV` says.
"""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from kcd.specs import merge_runtime, parse_runtime

RESOLVED_CONFIG_ENV = "KCD_RESOLVED_CONFIG"
"""When set, the workflow writes the config it resolved to this path (``kcd config show``)."""

_RULE = re.compile(r"^(?:local)?rule (?P<rule>[\w-]+):\s*$")
_SHELL = "Shell command: "


@dataclass
class Job:
    """One job of a dry run: its rule, the kcd subcommand and arguments, and its resources."""

    rule: str
    command: str  # the kcd subcommand (pretrain, distill, ...), "" when not a kcd command
    args: dict[str, Any] = field(default_factory=dict)  # --flag value (repeated: a list)
    resources: dict[str, str] = field(default_factory=dict)  # kcd.launch's --gpus, --nodes, ...
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    @property
    def spec(self) -> dict | None:
        """The job's ``--spec`` with its ``--runtime`` fields put back, or None."""
        text = self.args.get("spec")
        if text is None:
            return None
        spec = json.loads(text)
        runtime = self.args.get("runtime")
        return merge_runtime(spec, parse_runtime(runtime)) if runtime else spec

    @property
    def gpus(self) -> int:
        """GPUs of the whole job: per node times nodes (0 for light rules)."""
        return int(self.resources.get("gpus", 0)) * int(self.resources.get("nodes", 1))


def _flags(tokens: list[str]) -> dict[str, Any]:
    """``--key value`` pairs (``--flag`` alone: True; repeated keys: a list)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--"):
            key = tok[2:].replace("-", "_")
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value: Any = tokens[i + 1]
                i += 2
            else:
                value, i = True, i + 1
            if key in out:
                out[key] = (out[key] if isinstance(out[key], list) else [out[key]]) + [value]
            else:
                out[key] = value
        else:
            i += 1
    return out


def parse_command(rule: str, command: str) -> Job:
    """A job from its rule name and shell command."""
    tokens = shlex.split(command)
    if ">" in tokens:  # the log redirection
        tokens = tokens[:tokens.index(">")]
    if "--" not in tokens or not any(t in ("kcd.launch", "kcd.warm") for t in tokens):
        return Job(rule, "", {}, {})
    cut = tokens.index("--")
    prefix, rest = tokens[:cut], tokens[cut + 1:]
    resources = {k: v for k, v in _flags(prefix).items() if isinstance(v, str)}
    return Job(rule, rest[0] if rest else "", _flags(rest[1:]), resources)


def parse_dry_run(text: str) -> list[Job]:
    """The jobs of ``snakemake -n -p`` output, in the order printed, with their files."""
    jobs: list[Job] = []
    rule = None
    files: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = _RULE.match(line)
        if m:
            rule, files = m["rule"], {}
        elif rule is not None and line.startswith(("    input: ", "    output: ")):
            key, _, value = line.strip().partition(": ")
            files[key] = [f for f in value.split(", ") if f]
        elif line.startswith(_SHELL) and rule is not None:
            job = parse_command(rule, line[len(_SHELL):])
            job.inputs, job.outputs = files.get("input", []), files.get("output", [])
            jobs.append(job)
            rule = None
    return jobs


def needed_by(jobs: list[Job], target: Job) -> list[Job]:
    """``target`` and every job of the dry run whose outputs it needs, directly or not."""
    producer = {out: job for job in jobs for out in job.outputs}
    seen: dict[int, Job] = {}
    todo = [target]
    while todo:
        job = todo.pop()
        if id(job) in seen:
            continue
        seen[id(job)] = job
        todo += [producer[f] for f in job.inputs if f in producer]
    return [j for j in jobs if id(j) in seen]


def _recipe_cells(spec: dict) -> dict:
    r = spec.get("recipe") or {}
    return {"iterations": r.get("iterations"), "batch": r.get("batch_size"), "lr": r.get("lr"),
            "wd": r.get("weight_decay"), "milestones": r.get("milestones")}


# Algorithm 1's order, for the summary (rules not listed come after, in dry-run order).
_RULE_ORDER = ("demo_data", "decode", "init", "pretrain", "teacher_outputs", "anchor_outputs",
               "statistics", "transform", "learned_transform",
               "distill", "overlap", "feature_consistency", "figure1", "consistency_heatmap",
               "table", "tables_md")


def _limits(spec: dict) -> str:
    """Settings that shrink a job below the paper's (demo scale only): clipping, image caps,
    training without augmentation."""
    data = spec.get("data") or {}
    found = {"grad_clip": (spec.get("recipe") or {}).get("grad_clip"),
             "eval_limit": data.get("eval_limit"),
             "max_images": spec.get("max_images"),
             "augment": False if data.get("augment") is False else None}
    return " ".join(f"{k}={v}" for k, v in found.items() if v is not None)


def _arch(model: Any) -> str | None:
    """An architecture name, or an analysis spec's model entry ``{"arch": ...}``'s."""
    return model.get("arch") if isinstance(model, dict) else model


def summary(jobs: list[Job]) -> list[dict]:
    """One row per kcd job: what it trains or computes, with which recipe, on how many GPUs,
    and any demo-only limit (``limits``), in Algorithm 1's order."""
    rows = []
    for job in jobs:
        if not job.command:
            continue
        spec = job.spec or {}
        tags = spec.get("tags") or {}
        distill = spec.get("distill") or {}
        data = spec.get("data") or {}
        transform = tags.get("transform")
        if job.command == "transform":
            transform = f"{job.args.get('strategy')}-{job.args.get('metric')}"
        row = {"rule": job.rule, "dataset": tags.get("dataset") or data.get("name")
               or job.args.get("dataset") or "",
               "model": spec.get("arch") or spec.get("backbone") or spec.get("student")
               or job.args.get("arch") or "",
               "teacher": distill.get("teacher") or _arch(spec.get("teacher")) or "",
               "method": tags.get("method") or "", "transform": transform or "",
               **_recipe_cells(spec), "weight": distill.get("weight"), "gpus": job.gpus,
               "limits": _limits(spec)}
        if job.command == "statistics":
            row["iterations"] = spec.get("max_images") or "all images"
            row["batch"] = spec.get("batch_size")
        rows.append(row)
    rank = {r: i for i, r in enumerate(_RULE_ORDER)}
    return sorted(rows, key=lambda r: (rank.get(r["rule"], len(rank)), r["dataset"], r["model"],
                                       r["method"], r["transform"]))

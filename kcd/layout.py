"""The results tree: every path a job of the pipeline reads or writes, built in one place.

::

    <results>/<ds>/init/<arch>-s<seed>.pt                          theta0
    <results>/<ds>/models/<arch>-s<seed>/{final.pt,result.json}    pre-training (teachers, Baselines)
    <results>/<ds>/models/<arch>-s<seed>/anchors/iter-<i>.pt       RCO's teacher anchors
    <results>/<ds>/data/<split>.pt                                 a split decoded once (image folders)
    <results>/<ds>/teachers/<T>-s<seed>/<split>.pt                a teacher's outputs on a split
    <results>/<ds>/teachers/<T>-s<seed>/anchors/iter-<i>.pt       an RCO anchor's, on train
    <results>/<ds>/stats/<T>-<tw>__<S>-<sw>.pt                     statistics of a pair
    <results>/<ds>/transforms/<T>-<tw>__<S>-<sw>/<name>.pt         its transforms
    <results>/<ds>/runs/<T>-s<tseed>__<S>/<method>/<transform>/s<seed>/   distillation runs
    <results>/<ds>/analysis/<name>.json                            Tables 10 and 11
    <results>/table<n>.{csv,md,tex}, tables.md, figure1.{png,pdf}  tables and the figure
    <results>/logs/...                                             one log per job

A pair names each side's weights by a tag: ``s<seed>`` (trained) or ``s<seed>-init`` (theta0,
Table 4). A run's ``<transform>`` is a name of :mod:`kcd.naming`. The Snakemake rules' output
patterns are these paths with wildcards (``Layout("results").run_dir("{ds}", ...)``).
"""
from __future__ import annotations

from dataclasses import dataclass

from kcd.losses import BASELINE
from kcd.naming import THETA0_TAG_SUFFIX, parse_transform_name, source_pair


@dataclass(frozen=True)
class Layout:
    """The paths of one results folder."""

    results: str

    @property
    def logs(self) -> str:
        return f"{self.results}/logs"

    def log(self, *parts: object) -> str:
        return f"{self.logs}/" + "/".join(str(p) for p in parts) + ".log"

    def theta0(self, ds: str, arch: str, seed: object) -> str:
        return f"{self.results}/{ds}/init/{arch}-s{seed}.pt"

    def model_dir(self, ds: str, arch: str, seed: object) -> str:
        return f"{self.results}/{ds}/models/{arch}-s{seed}"

    def model_file(self, ds: str, arch: str, seed: object, file: str = "result.json") -> str:
        """A file of (arch, seed)'s pre-training: ``result.json``, ``final.pt``."""
        return f"{self.model_dir(ds, arch, seed)}/{file}"

    def final(self, ds: str, arch: str, seed: object) -> str:
        """The trained weights of (arch, seed)'s pre-training."""
        return self.model_file(ds, arch, seed, "final.pt")

    def anchor(self, ds: str, arch: str, seed: object, iteration: int) -> str:
        return f"{self.model_dir(ds, arch, seed)}/anchors/iter-{iteration}.pt"

    @staticmethod
    def pair_name(teacher: str, tw: str, student: str, sw: str) -> str:
        """A (teacher, student) pair by weight tags."""
        return f"{teacher}-{tw}__{student}-{sw}"

    @staticmethod
    def is_theta0(tag: str) -> bool:
        """Whether a weight tag names initial weights (``s<seed>-init``), not a trained model."""
        return tag.endswith(THETA0_TAG_SUFFIX)

    @staticmethod
    def tag_seed(tag: str) -> str:
        """The seed of a weight tag (``s<seed>`` or ``s<seed>-init``)."""
        return tag[1:].removesuffix(THETA0_TAG_SUFFIX)

    def weights(self, ds: str, arch: str, tag: str) -> str:
        """The weights a tag names: the trained model, or theta0 for ``s<seed>-init``."""
        seed = self.tag_seed(tag)
        return self.theta0(ds, arch, seed) if self.is_theta0(tag) else self.final(ds, arch, seed)

    def decoded(self, ds: str) -> str:
        """The folder of a dataset's decoded splits (``<split>.pt``)."""
        return f"{self.results}/{ds}/data"

    def teacher_outputs(self, ds: str, teacher: str, seed: object, split: str) -> str:
        """A teacher's logits and features on a split, computed once for all its runs."""
        return f"{self.results}/{ds}/teachers/{teacher}-s{seed}/{split}.pt"

    def anchor_outputs(self, ds: str, teacher: str, seed: object, iteration: int) -> str:
        """An RCO anchor's logits and features on the training split, computed once."""
        return f"{self.results}/{ds}/teachers/{teacher}-s{seed}/anchors/iter-{iteration}.pt"

    def stats(self, ds: str, teacher: str, tw: str, student: str, sw: str) -> str:
        return f"{self.results}/{ds}/stats/{self.pair_name(teacher, tw, student, sw)}.pt"

    def transform(self, ds: str, teacher: str, tw: str, student: str, sw: str,
                  file_name: str) -> str:
        pair = self.pair_name(teacher, tw, student, sw)
        return f"{self.results}/{ds}/transforms/{pair}/{file_name}.pt"

    def run_transform(self, ds: str, teacher: str, tseed: object, student: str, seed: object,
                      transform: str) -> str | None:
        """The transform file a run named ``transform`` uses, or None for ``none``."""
        name = parse_transform_name(transform)
        if name is None:
            return None
        tw, sw = source_pair(name, int(tseed), int(seed))
        return self.transform(ds, teacher, tw, student, sw, name.file_name)

    def run_dir(self, ds: str, teacher: str, tseed: object, student: str, method: str,
                transform: str, seed: object) -> str:
        return (f"{self.results}/{ds}/runs/{teacher}-s{tseed}__{student}/{method}/{transform}"
                f"/s{seed}")

    def run_file(self, ds: str, teacher: str, tseed: object, student: str, method: str,
                 transform: str, seed: object, file: str = "result.json") -> str:
        """A file of a table cell's run (its result, or ``final.pt``): ``baseline`` is the
        student's own pre-training."""
        if method == BASELINE:
            return self.model_file(ds, student, seed, file)
        return f"{self.run_dir(ds, teacher, tseed, student, method, transform, seed)}/{file}"

    def analysis(self, ds: str, name: str) -> str:
        return f"{self.results}/{ds}/analysis/{name}"

    def heatmap(self, ds: str, teacher: str, student: str) -> str:
        """The prefix of a pair's consistency picture and transform table (``.png``, ``.csv``)."""
        return self.analysis(ds, f"consistency-{teacher}__{student}")

    def table(self, n: object, suffix: str) -> str:
        return f"{self.results}/table{n}.{suffix}"

    @property
    def figure1(self) -> str:
        """The prefix of Figure 1's files (``.png``, ``.pdf``)."""
        return f"{self.results}/figure1"

"""Are two results folders the same runs? For a refactoring that must not change any number.

    python scripts/compare_results.py OLD/results NEW/results

Compares every run's ``result.json`` (timing fields excluded) and ``final.pt`` (every tensor of
its weights, exactly) that both folders hold, ignoring MLflow's copies under ``mlartifacts/``.
Exits 1 when anything differs or a run is missing on one side. To check a change of the code,
run the same config with the old and the new checkout (``git worktree add``), e.g. the tiny
end-to-end config of ``tests/test_workflow.py``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

TIMING = {"train_seconds", "phases"}  # kcd.run.TIMINGS (not imported: this reads files only)


def _strip(o):
    if isinstance(o, dict):
        return {k: _strip(v) for k, v in o.items() if k not in TIMING}
    if isinstance(o, list):
        return [_strip(v) for v in o]
    return o


def _files(root: Path, name: str) -> dict[Path, Path]:
    return {p.relative_to(root): p for p in root.rglob(name) if "mlartifacts" not in p.parts}


def main(old: Path, new: Path) -> int:
    import torch

    bad = 0
    for name in ("result.json", "final.pt"):
        a, b = _files(old, name), _files(new, name)
        for side, missing in (("old", set(b) - set(a)), ("new", set(a) - set(b))):
            for rel in sorted(missing):
                print(f"only in the {'new' if side == 'old' else 'old'} folder: {rel}")
                bad += 1
        same = 0
        for rel in sorted(set(a) & set(b)):
            if name == "result.json":
                x, y = (_strip(json.loads(p.read_text())) for p in (a[rel], b[rel]))
                differ = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
            else:
                x, y = (torch.load(p, weights_only=True)["state_dict"] for p in (a[rel], b[rel]))
                differ = sorted(k for k in set(x) | set(y) if k not in x or k not in y
                                or not torch.equal(x[k], y[k]))
            if differ:
                print(f"{rel}: differs in {', '.join(differ[:5])}")
                bad += 1
            else:
                same += 1
        print(f"{name}: {same} identical of {len(set(a) & set(b))}")
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))

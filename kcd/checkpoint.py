"""Checkpoint files: atomic writes, safe loads, and the RNG state of a process.

Every file the pipeline writes goes through :func:`atomic_save` (temp file in the same folder,
then ``os.replace``), so a killed job never leaves a half-written file behind. Every load goes
through :func:`load_file` with ``torch.load(weights_only=True)`` and turns unreadable or
truncated files into a one-line :class:`~kcd.errors.KcdError` naming the file.
"""
from __future__ import annotations

import glob
import json
import os
import random
from pathlib import Path
from typing import Any

from kcd.errors import KcdError

# torch and numpy are imported where they are used: the atomic text/JSON writers serve light
# callers (the workflow's parse, the tables) that must not pay for importing torch.


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Remove ``.<name>.<pid>.tmp`` files left by a writer of ``path`` that was killed
    mid-write (its process is gone), so interrupted writes never accumulate."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:-len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _atomic_write(path: str | os.PathLike, write) -> Path:
    """Write through ``.<name>.<pid>.tmp`` in the same folder, then rename it to ``path``.

    The file gets the permissions the umask gives (as ``open`` would), not mkstemp's 0600, so
    a results folder shared by a group stays readable to it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_with(path: str | os.PathLike, write) -> Path:
    """Call ``write(binary_file)`` on a temporary file, then rename it to ``path``."""
    return _atomic_write(path, write)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically."""
    import torch

    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    data = (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode()
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return _atomic_write(path, lambda f: f.write(text.encode()))


def _json_default(o: Any):
    if type(o).__module__ == "numpy" and hasattr(o, "item") and getattr(o, "ndim", 1) == 0:
        return o.item()  # numpy scalars
    if type(o).__name__ == "Tensor" and type(o).__module__.startswith("torch") and o.numel() == 1:
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_file(path: str | os.PathLike, what: str = "checkpoint", mmap: bool = False) -> Any:
    """Load a file written by :func:`atomic_save` (weights only), with clear errors.
    ``mmap``: map the tensors' storage from the file instead of reading it all (the pages a
    job touches are read when it touches them)."""
    path = Path(path)
    if not path.is_file():
        raise KcdError(f"{what} {path} does not exist; run the step that writes it first")
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, wrong format, pickled code objects...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KcdError(
            f"{what} {path} is unreadable or truncated ({first}); delete it and rerun the step"
        ) from None


def load_format(path: str | os.PathLike, file_format: str) -> dict:
    """Load a plain dictionary whose ``"format"`` entry must be ``file_format``."""
    payload = load_file(path, f"{file_format} file")
    found = payload.get("format") if isinstance(payload, dict) else None
    if found != file_format:
        raise KcdError(f"{path} is not a {file_format} file (format: {found!r})")
    return payload


def load_model_weights(path: str | os.PathLike, arch: str, what: str = "weights") -> dict:
    """Load a ``{"arch", "state_dict", ...}`` model file and check its architecture."""
    obj = load_file(path, what)
    if not isinstance(obj, dict) or "state_dict" not in obj or "arch" not in obj:
        raise KcdError(f"{what} {path} is not a kcd model file (no 'arch'/'state_dict')")
    if obj["arch"] != arch:
        raise KcdError(
            f"{what} {path} holds a {obj['arch']} but a {arch} was asked for; "
            "check the architecture names in the config"
        )
    return obj


def load_model(arch: str, path: str | os.PathLike, num_classes: int, what: str):
    """Build ``arch`` and load a kcd model file into it, checking architecture and classes."""
    from kcd.models import build_model

    obj = load_model_weights(path, arch, what)
    if obj.get("num_classes", num_classes) != num_classes:
        raise KcdError(
            f"{what} {path} has {obj['num_classes']} classes but the dataset has {num_classes}"
        )
    model = build_model(arch, num_classes)
    model.load_state_dict(obj["state_dict"])
    return model


def rng_state() -> dict:
    """Every RNG state a training process uses (torch CPU/CUDA, numpy, python)."""
    import numpy as np
    import torch

    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_tensors(np.random.get_state()),
        "python": _python_state_to_tensors(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state_from_tensors(state["numpy"]))
    random.setstate(_python_state_from_tensors(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# numpy/python RNG states hold tuples of ints and arrays; store them as tensors so that the
# checkpoint stays loadable with weights_only=True.
def _numpy_state_to_tensors(st) -> dict:
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = st
    return {
        "name": name,
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _numpy_state_from_tensors(d: dict):
    import numpy as np

    keys = d["keys"].numpy().astype(np.uint32)
    return (d["name"], keys, d["pos"], d["has_gauss"], d["cached"])


def _python_state_to_tensors(st) -> dict:
    import torch

    version, internal, gauss = st
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_state_from_tensors(d: dict):
    return (d["version"], tuple(int(v) for v in d["internal"].tolist()), d["gauss"])

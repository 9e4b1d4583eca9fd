"""Atomic checkpoints and the random-number state a resumed run needs.

A checkpoint is one ``torch.save`` file. :func:`save_checkpoint` writes it to a temporary file
beside the target, flushes and fsyncs it, then renames it over the target with ``os.replace``
(atomic on POSIX and Windows) and fsyncs the folder. A process killed at any moment therefore
leaves either the previous checkpoint or the new one at ``path``, never a partial file; a
leftover temporary file is removed by the next save.

:func:`load_checkpoint` reads with ``weights_only=True`` (no arbitrary code from the file), so
everything in a checkpoint is tensors, numbers, strings, lists and dicts: :func:`rng_state`
stores NumPy's generator state as a tensor for that reason.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state", "CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or that does not belong to the run resuming from it."""


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (see the module docstring); returns the path.

    The folder is created if needed. Stale temporary files of earlier interrupted saves to the
    same ``path`` are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(_tmp_prefix(path) + "*"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f"{_tmp_prefix(path)}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # the rename itself must reach the disk, or a power cut could bring back the old entry
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some platforms; the rename is still atomic
        return path
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises ``FileNotFoundError`` naming the path when it does not exist, and
    :class:`CheckpointError` when the file is not a readable checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass the checkpoint file (e.g. {path / 'checkpoint.pt'})")
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a damaged file
        raise CheckpointError(f"{path} is not a readable divebatch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def rng_state() -> dict:
    """The state of every generator a training step may draw from: Python's ``random``,
    NumPy's global generator, torch's CPU generator and (when present) every CUDA device's."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

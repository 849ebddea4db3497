"""Training checkpoints: atomic writes, full training state, and readable with ``weights_only=True``.

``last.pt`` holds everything a resumed run needs (model, optimizer, scheduler, grad scaler,
iteration, RNG states, resolved config) and is also a valid inference checkpoint for
:func:`msad_deploy.models.build.load_model`. ``prev.pt`` is the ``last.pt`` before it (kept so
a divergence cannot leave only a bad checkpoint). ``best.pt`` holds only what inference needs.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msad_deploy.models.build import atomic_save, load_model_checkpoint

__all__ = [
    "CHECKPOINT_NAMES",
    "atomic_save",
    "capture_rng_state",
    "load_training_checkpoint",
    "remove_stale_temporaries",
    "restore_rng_state",
    "saved_iteration",
]

# Files a run writes through atomic_save; a killed run can leave NAME.tmp next to them.
CHECKPOINT_NAMES = ("last.pt", "prev.pt", "best.pt")


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states as tensors and plain types."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_training_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read ``last.pt`` for resuming; errors name the file and what is missing."""
    payload = load_model_checkpoint(path, map_location)
    missing = [key for key in ("optimizer", "scheduler", "iteration", "rng") if key not in payload]
    if missing:
        raise ValueError(
            f"{path} is an inference checkpoint without training state ({missing}); cannot resume from it"
        )
    return payload


def saved_iteration(path: str | Path) -> int | None:
    """The ``iteration`` stored in a training checkpoint, or None when it is missing or unreadable
    (memory-mapped where the file system allows it: the tensors are not read)."""
    if not Path(path).is_file():
        return None
    for mmap in (True, False):
        try:
            return int(torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)["iteration"])
        except Exception:  # no mmap here, or a partial or foreign file: no usable iteration
            continue
    return None


def remove_stale_temporaries(out_dir: str | Path, names: Iterable[str] = CHECKPOINT_NAMES) -> list[Path]:
    """Delete ``NAME.tmp`` files that a run killed in the middle of a checkpoint write left behind
    (the finished files are intact); returns the paths removed."""
    removed = []
    for name in names:
        tmp = Path(out_dir) / f"{name}.tmp"
        if tmp.is_file():
            tmp.unlink()
            removed.append(tmp)
    return removed

"""Resumable training state in `RUN_DIR/checkpoint/`, written atomically.

`state.pt` (written by the main process): trainable tensors, optimizer and scheduler state, position,
evaluation history and best record. `rng-<rank>.pt` (one per process): that process's RNG states, since
each rank draws its own dropout masks. A checkpoint is complete when `state.pt` exists; it is deleted
when training finishes.
"""

from __future__ import annotations

import io
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..fileformat import atomic_write_bytes

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "remove_checkpoint", "checkpoint_dir", "rng_state",
           "set_rng_state"]

_FORMAT = "verakit.checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    step: int  # optimizer steps completed
    tensors: dict[str, torch.Tensor]  # trainable parameter name -> value
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]  # this rank's RNG states (torch, python, numpy, cuda)
    history: list[dict[str, Any]]
    best: dict[str, Any]
    seconds: float  # training wall time so far
    window: tuple[float, float]  # (loss sum, units) of the steps since the last evaluation
    losses: list[float]  # per-step mean losses so far (for the report's curve)


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, python, numpy, and cuda when present), for Checkpoint.rng."""
    import numpy as np

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoint"


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_checkpoint(run_dir: str | Path, rank: int, ckpt: Checkpoint, *, write_shared: bool) -> None:
    """Write this rank's RNG file, and (main process) the shared state last, so its presence means complete."""
    folder = checkpoint_dir(run_dir)
    atomic_write_bytes(folder / f"rng-{rank}.pt", _to_bytes(ckpt.rng))
    if write_shared:
        shared = {
            "format": _FORMAT, "step": ckpt.step, "tensors": ckpt.tensors, "optimizer": ckpt.optimizer,
            "scheduler": ckpt.scheduler, "history": ckpt.history, "best": ckpt.best, "seconds": ckpt.seconds,
            "window": list(ckpt.window), "losses": ckpt.losses,
        }
        atomic_write_bytes(folder / "state.pt", _to_bytes(shared))


def load_checkpoint(run_dir: str | Path, rank: int) -> Checkpoint | None:
    """The checkpoint in run_dir for this rank, or None when there is none."""
    folder = checkpoint_dir(run_dir)
    state_path, rng_path = folder / "state.pt", folder / f"rng-{rank}.pt"
    if not state_path.is_file():
        return None
    if not rng_path.is_file():
        raise ValueError(f"{rng_path}: missing; the checkpoint was written by fewer processes than this run has")
    # weights_only=False: the file holds RNG states (numpy tuples) and was written by us into RUN_DIR.
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"{state_path}: not a verakit checkpoint (format {_FORMAT})")
    rng = torch.load(rng_path, map_location="cpu", weights_only=False)
    return Checkpoint(
        state["step"], state["tensors"], state["optimizer"], state["scheduler"], rng,
        state["history"], state["best"], state["seconds"], tuple(state["window"]), state["losses"],
    )


def remove_checkpoint(run_dir: str | Path) -> None:
    shutil.rmtree(checkpoint_dir(run_dir), ignore_errors=True)

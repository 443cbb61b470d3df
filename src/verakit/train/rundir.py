"""RUN_DIR, as every training recipe (classify, vision, causal, grouped) uses it: the checks before a
run starts, `config.json` and `metrics.json` written atomically, and the entries of metrics.json that
every recipe measures the same way.

Under torchrun every process checks RUN_DIR before any process writes to it; only the main one writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from .artifacts import artifact_bytes
from .loop import LoopResult
from .methods import Prepared

__all__ = [
    "ProcessState",
    "artifact_metrics",
    "check_run_dir",
    "check_same_args",
    "data_fingerprint",
    "environment",
    "field_defaults",
    "jsonable",
    "loop_metrics",
    "start_run",
    "write_json",
]


class ProcessState(Protocol):
    """What `start_run` needs of accelerate's `PartialState`."""

    is_main_process: bool

    def wait_for_everyone(self) -> None: ...


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse a run that would mix two runs' files: without `resume`, RUN_DIR must be absent or empty;
    with it, RUN_DIR/checkpoint/state.pt (written on Ctrl-C) must exist."""
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"{run_dir}: --out is a file, not a run folder; choose another --out")
    if resume:
        if not (run_dir / "checkpoint" / "state.pt").is_file():
            raise FileNotFoundError(f"{run_dir}: no checkpoint to resume (checkpoint/state.pt is missing)")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"{run_dir}: run folder exists and is not empty; pass --resume or choose another --out")


# What a run made before an option existed did, where that is not the option's default now: such a run
# had uniformly random batches, so resuming it with grouped ones (the default since) is another run.
BEFORE_OPTION: Mapping[str, Any] = {"group_by_length": False}


def check_same_args(run_dir: Path, args: dict[str, Any], defaults: Mapping[str, Any] | None = None) -> None:
    """Refuse --resume with other settings than RUN_DIR/config.json's ("resume" and "quiet" aside): they
    would not continue the same run. A setting missing from an older config.json (an option added since)
    counts as its value in BEFORE_OPTION, else in `defaults`: the run was made with what is now that
    option's default."""
    saved = original = json.loads((run_dir / "config.json").read_text())["args"]
    older = {**(defaults or {}), **BEFORE_OPTION}
    saved = {**{k: v for k, v in older.items() if k not in saved}, **saved}
    ignore = {"resume", "quiet"}
    diff = sorted(k for k in args if k not in ignore and saved.get(k) != args[k])
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {args[k]!r}" for k in diff)
        hint = ("; it was started before --group-by-length became the default: add --no-group-by-length"
                if "group_by_length" in diff and "group_by_length" not in original else "")
        raise ValueError(f"{run_dir / 'config.json'}: --resume with different settings ({shown}); "
                         f"repeat the interrupted command with --resume{hint}")


def data_fingerprint(*splits: Sequence[Any]) -> str:
    """sha256 of the examples a run trains and selects on (each split's length, then every example's repr, in
    order): config.json keeps it so that a --resume over other data (a file edited or replaced since) is
    refused instead of continuing the run on it."""
    h = hashlib.sha256()
    for split in splits:
        h.update(f"{len(split)}\n".encode())
        for example in split:
            h.update(repr(example).encode() + b"\n")
    return h.hexdigest()


def _check_same_data(run_dir: Path, data: str | None) -> None:
    saved = json.loads((run_dir / "config.json").read_text()).get("data")
    if data is not None and saved is not None and saved != data:  # None: a run from before the fingerprint
        raise ValueError(f"{run_dir / 'config.json'}: --resume over other data than the interrupted run's (examples' "
                         f"sha256 {saved[:12]} -> {data[:12]}): the training or dev files changed since it started; "
                         "restore them, or start a new run with another --out")


def field_defaults(cls: type) -> dict[str, Any]:
    """{field: default} of a dataclass's fields that have a plain default (for `start_run`'s `defaults`)."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """`d` with tuple values as lists, as they read back from JSON (so that saved and new args compare)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def write_json(path: Path, obj: Any) -> None:
    """`obj` as indented JSON (str() for what JSON lacks, e.g. paths), written atomically."""
    from ..fileformat import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def start_run(run_dir: Path, config: dict[str, Any], *, resume: bool, state: ProcessState,
              defaults: Mapping[str, Any] | None = None) -> None:
    """Refuse a --resume with other settings (`check_same_args`, with `defaults` for settings an older
    config.json lacks) or over other data (`config["data"]`, a `data_fingerprint`, when both runs have one), then, once every process got this far, create RUN_DIR and write `config` to
    RUN_DIR/config.json from the main process."""
    if resume:
        check_same_args(run_dir, config["args"], defaults)
        _check_same_data(run_dir, config.get("data"))
    state.wait_for_everyone()
    if state.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", config)


def artifact_metrics(prepared: Prepared, artifact: Path) -> dict[str, Any]:
    """metrics.json's sizes: trainable adapter and head parameters, the artifact's bytes on disk and the
    adapter's own fp32 tensor bytes (no head), and the artifact's name in RUN_DIR."""
    return {
        "trainable_params": prepared.adapter_numel,
        "head_params": prepared.head_numel,
        "adapter_bytes": artifact_bytes(artifact),
        "adapter_tensor_bytes": 4 * prepared.adapter_numel,
        "artifact": artifact.name,
    }


def loop_metrics(result: LoopResult) -> dict[str, Any]:
    """metrics.json's entries from the loop: the cost of training (wall seconds summed over resumed
    sessions, steps, processes), the trivial baseline's dev metrics (None when the recipe has none), and
    under FSDP (only) "fsdp": the element counts the main process held (`fsdp.shard_stats`)."""
    return {
        "train_seconds": round(result.train_seconds, 2),
        "total_steps": result.total_steps,
        "world_size": result.world_size,
        "baseline": result.baseline,
        **({"fsdp": result.fsdp} if result.fsdp is not None else {}),
    }


def environment() -> dict[str, Any]:
    """metrics.json's "environment": the torch version and threads, and the Python version."""
    import platform

    import torch

    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}

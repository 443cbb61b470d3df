"""`VeraCallback`: verakit adapter files from a plain `transformers.Trainer` run.

`attach(model, config)` leaves a model that `transformers.Trainer` trains as is: only d, b and the
modules to save require grad, so the optimizer sees only them. This callback adds what the Trainer
does not know about: a small verakit adapter file in every checkpoint directory, and one at the end.
Importing this module imports transformers (the callback subclasses `TrainerCallback`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..fileformat import save_adapter
from ..inject import AttachError

__all__ = ["VeraCallback", "ADAPTER_FILE"]

ADAPTER_FILE = "adapter.safetensors"


class VeraCallback(TrainerCallback):
    """Write `<checkpoint-N>/adapter.safetensors` on every Trainer save, and `<output_dir>/adapter.safetensors`
    when training ends.

    filename: the adapter file name in each directory. dtype: stored dtype (None = float32).
    extra: JSON-serialisable metadata stored in each file (e.g. {"task": "sst2"}).
    """

    def __init__(self, filename: str = ADAPTER_FILE, dtype: torch.dtype | None = None, extra: dict[str, Any] | None = None):
        self.filename, self.dtype, self.extra = filename, dtype, dict(extra or {})
        self.written: list[Path] = []  # files written so far, in order

    def _write(self, model: nn.Module | None, directory: Path, state: TrainerState) -> None:
        if not state.is_world_process_zero:
            return  # one writer per run; every rank holds the same vectors
        if model is None:
            raise AttachError("VeraCallback got no model from the Trainer")
        # Unwrap DataParallel / DistributedDataParallel-style wrappers to reach the attached model.
        while getattr(model, "verakit_state", None) is None and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        path = directory / self.filename
        save_adapter(model, path, dtype=self.dtype, extra={**self.extra, "global_step": state.global_step})
        self.written.append(path)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        # The directory the Trainer has just written this checkpoint to.
        self._write(kwargs.get("model"), Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", state)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._write(kwargs.get("model"), Path(args.output_dir), state)

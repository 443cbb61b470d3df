"""Per-task default hyperparameters for GLUE, and where they come from (see docs/training.md).

VeRA rows: the VeRA paper's appendix table for RoBERTa-base (Kopiczko et al., 2024): r = 1024,
d_initial = 0.1, batch 64, AdamW, linear schedule, warmup ratio 0.06, separate head learning rate.
LoRA rows: the LoRA paper's appendix table for RoBERTa-base (Hu et al., 2022): r = 8, alpha = 8,
batch 16, same schedule. Full fine-tuning: 2e-5, the RoBERTa/BERT GLUE recipe's usual value.
The paper budgets (25-160 epochs over full GLUE training sets, length 512) are GPU budgets; the CPU
experiments in docs/results.md override epochs and sample counts explicitly on the command line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["TaskDefaults", "METHOD_RANK", "TASK_DEFAULTS", "task_defaults"]

# Rank when --r is not given: VeRA's shared-projection rank, LoRA's per-layer rank.
METHOD_RANK: Mapping[str, int] = MappingProxyType({"vera": 1024, "lora": 8})
FULL_LR = 2e-5


@dataclass(frozen=True)
class TaskDefaults:
    epochs: int  # VeRA paper's epochs (LoRA's table uses the same, except RTE 80 and STS-B 40)
    vera_lr: float  # learning rate of d and b
    head_lr: float  # learning rate of the classification head (every method)
    lora_lr: float  # LoRA paper's learning rate
    lora_epochs: int


TASK_DEFAULTS: Mapping[str, TaskDefaults] = MappingProxyType(
    {
        "sst2": TaskDefaults(epochs=60, vera_lr=4e-3, head_lr=4e-3, lora_lr=5e-4, lora_epochs=60),
        "mrpc": TaskDefaults(epochs=30, vera_lr=1e-2, head_lr=4e-3, lora_lr=4e-4, lora_epochs=30),
        "cola": TaskDefaults(epochs=80, vera_lr=1e-2, head_lr=1e-2, lora_lr=4e-4, lora_epochs=80),
        "qnli": TaskDefaults(epochs=25, vera_lr=1e-2, head_lr=4e-3, lora_lr=4e-4, lora_epochs=25),
        "rte": TaskDefaults(epochs=160, vera_lr=4e-3, head_lr=1e-2, lora_lr=5e-4, lora_epochs=80),
        "stsb": TaskDefaults(epochs=80, vera_lr=1e-2, head_lr=1e-2, lora_lr=4e-4, lora_epochs=40),
        # A user's own data: no paper row; SST-2's VeRA values with a CPU-sized epoch count.
        "csv": TaskDefaults(epochs=10, vera_lr=4e-3, head_lr=4e-3, lora_lr=5e-4, lora_epochs=10),
    }
)


def task_defaults(task: str, method: str) -> tuple[int, float, float]:
    """(epochs, lr of the adapted/body parameters, head lr) for `task` and `method`.

    For "head" the first learning rate is unused (nothing but the head trains).
    """
    d = TASK_DEFAULTS[task]
    if method == "vera":
        return d.epochs, d.vera_lr, d.head_lr
    if method == "lora":
        return d.lora_epochs, d.lora_lr, d.head_lr
    if method == "full":
        return d.epochs, FULL_LR, d.head_lr
    return d.epochs, d.head_lr, d.head_lr

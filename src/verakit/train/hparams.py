"""Every recipe's default hyperparameters, in one shape: `Defaults`, which `defaults(recipe, task,
method, budget)` returns and `fill` applies to a recipe's arguments (each None field takes its default).
Classification's per-task budgets and learning rates, and where they come from (docs/training.md,
"Per-task defaults and their source"); causal LMs' per-task budgets; images' per-method defaults.

Two presets, chosen with `--budget`:

* ``cpu`` (the default): sized for the model verakit ships as default (all-MiniLM-L6-v2) on a laptop
  CPU: a seeded subset of the training set and few epochs, so that `verakit train --task sst2 ...`
  finishes in minutes. The learning rates come from the SST-2 sweep of experiments/default_sweep.py
  (VeRA: best of 4e-3..1e-1, LoRA: best of 1e-3..1e-2, scored on 1,000 rows carved from the training set,
  never on dev); MRPC, CoLA, STS-B and QNLI take the GLUE grid's VeRA rate (experiments/glue_grid.py), the
  other tasks borrow SST-2's (docs/training.md says so per row).
* ``paper``: the VeRA paper's RoBERTa-base table (Kopiczko et al., 2024: r = 1024, d_initial = 0.1,
  AdamW, linear schedule, warmup 0.06, separate head learning rate) and the LoRA paper's (Hu et al.,
  2022: r = 8, alpha = 8) over the whole training set: GPU budgets of tens of epochs.

Full fine-tuning: 2e-5 for the body in both presets (the usual BERT/RoBERTa GLUE value).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Any, TypeVar

__all__ = [
    "BUDGETS", "Budget", "CAUSAL_BUDGETS", "CAUSAL_LR", "CAUSAL_RANK", "CausalBudget", "Defaults", "IMAGE_DEFAULTS",
    "METHOD_RANK", "RECIPES", "TASK_BUDGETS", "causal_budget", "defaults", "fill", "task_defaults",
]

RECIPES = ("classify", "causal", "images")  # the recipes `defaults` knows
BATCH_SIZE = 32  # global batch of classification and images when --batch-size is not given (both budgets)
_Args = TypeVar("_Args")


@dataclass(frozen=True)
class Defaults:
    """A run's defaults for the settings left None; a field a recipe's arguments lack is not used by it."""

    epochs: int
    lr: float  # adapter (full: body) learning rate
    head_lr: float | None  # None: the recipe has no task head (causal LMs)
    r: int  # VeRA's projection rank or LoRA's rank (0 where unused)
    batch_size: int  # global batch, in examples
    max_train_samples: int | None  # None: every training row
    max_eval_samples: int | None = None  # None: every evaluation row
    gen_eval_samples: int | None = None  # causal LMs: held-out examples generated at each evaluation
    # Length-grouped batches: on for classification (1.5-2.9x faster steps on GLUE, same scores); off for
    # causal LMs, whose loss is a mean over each batch's tokens, so a batch of short examples would weigh
    # each of its tokens more (E2E, seed 0: held-out loss 1.464 grouped vs 1.428, BLEU 55.0 vs 57.2).
    group_by_length: bool | None = None


def fill(args: _Args, d: Defaults) -> _Args:
    """A copy of dataclass `args` whose None fields that `Defaults` has take `d`'s values."""
    names = {f.name for f in fields(args)}  # type: ignore[arg-type]
    unset: dict[str, Any] = {f.name: getattr(d, f.name) for f in fields(d)
                             if f.name in names and getattr(args, f.name) is None}
    return replace(args, **unset)  # type: ignore[type-var]


def defaults(recipe: str, task: str, method: str, budget: str = "cpu") -> Defaults:
    """The defaults of one `recipe` ("classify", "causal" or "images") for `task`, `method` and `budget`
    (images have one task and no budget)."""
    if recipe == "classify":
        epochs, lr, head_lr, max_train = task_defaults(task, method, budget)
        return Defaults(epochs, lr, head_lr, METHOD_RANK.get(method, 0), BATCH_SIZE, max_train, group_by_length=True)
    if recipe == "causal":
        b = causal_budget(task, budget)
        return Defaults(b.epochs, CAUSAL_LR[method], None, CAUSAL_RANK[method], b.batch_size, b.max_train_samples,
                        b.max_eval_samples, b.gen_eval_samples, group_by_length=False)
    if recipe == "images":
        epochs, lr, head_lr, rank = IMAGE_DEFAULTS[method]
        return Defaults(epochs, lr, head_lr, rank, BATCH_SIZE, None)
    raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")

# Rank when --r is not given: VeRA's shared-projection rank, LoRA's per-layer rank.
METHOD_RANK: Mapping[str, int] = MappingProxyType({"vera": 1024, "lora": 8, "peft-vera": 1024})
FULL_LR = 2e-5
BUDGETS = ("cpu", "paper")


@dataclass(frozen=True)
class Budget:
    """One task's defaults under one preset; any of them is overridden by its own flag."""

    epochs: int  # VeRA (and head, full) epochs
    max_train_samples: int | None  # a seeded subset of the training set; None: all of it
    vera_lr: float  # learning rate of d and b
    head_lr: float  # learning rate of the classification head (every method)
    lora_lr: float
    lora_epochs: int


def _paper(epochs: int, vera_lr: float, head_lr: float, lora_lr: float, lora_epochs: int) -> Budget:
    return Budget(epochs, None, vera_lr, head_lr, lora_lr, lora_epochs)


TASK_BUDGETS: Mapping[str, Mapping[str, Budget]] = MappingProxyType({
    "cpu": MappingProxyType({
        # Swept at this budget (docs/training.md): VeRA 5e-2 (0.874 held-out), LoRA 5e-3 (0.867).
        "sst2": Budget(1, 20_000, vera_lr=5e-2, head_lr=4e-3, lora_lr=5e-3, lora_epochs=1),
        # Every row of the small sets, a few epochs (~5-10 min each on 2 cores). VeRA's rate for MRPC, CoLA and
        # STS-B is the GLUE grid's (issue 16, chosen on rows carved from SST-2's and MRPC's training sets);
        # checked on dev, seed 0 (docs/training.md), against SST-2's 5e-2: MRPC F1 0.847 vs 0.843, STS-B
        # Pearson 0.822 vs 0.790, CoLA MCC 0.255 at 5 epochs vs 0.0 (a constant answer) at 3. CoLA's LoRA
        # takes the grid's 2e-3 x 5 epochs (MCC 0.240). QNLI: 2e-2 x 3 epochs too (accuracy 0.792 on the local
        # split of its dev set, where 5e-2 x 1 epoch stayed at 0.479 < 0.521 trivial). RTE and the other LoRA
        # rates: SST-2's.
        "mrpc": Budget(3, None, vera_lr=2e-2, head_lr=4e-3, lora_lr=5e-3, lora_epochs=3),
        "cola": Budget(5, None, vera_lr=2e-2, head_lr=4e-3, lora_lr=2e-3, lora_epochs=5),
        "qnli": Budget(3, 8_000, vera_lr=2e-2, head_lr=4e-3, lora_lr=5e-3, lora_epochs=3),
        "rte": Budget(3, None, vera_lr=5e-2, head_lr=4e-3, lora_lr=5e-3, lora_epochs=3),
        "stsb": Budget(3, None, vera_lr=2e-2, head_lr=4e-3, lora_lr=5e-3, lora_epochs=3),
        # A user's own data: every row, SST-2's rates.
        "csv": Budget(3, None, vera_lr=5e-2, head_lr=4e-3, lora_lr=5e-3, lora_epochs=3),
    }),
    "paper": MappingProxyType({
        "sst2": _paper(60, vera_lr=4e-3, head_lr=4e-3, lora_lr=5e-4, lora_epochs=60),
        "mrpc": _paper(30, vera_lr=1e-2, head_lr=4e-3, lora_lr=4e-4, lora_epochs=30),
        "cola": _paper(80, vera_lr=1e-2, head_lr=1e-2, lora_lr=4e-4, lora_epochs=80),
        "qnli": _paper(25, vera_lr=1e-2, head_lr=4e-3, lora_lr=4e-4, lora_epochs=25),
        "rte": _paper(160, vera_lr=4e-3, head_lr=1e-2, lora_lr=5e-4, lora_epochs=80),
        "stsb": _paper(80, vera_lr=1e-2, head_lr=1e-2, lora_lr=4e-4, lora_epochs=40),
        # No paper row: SST-2's learning rates with 10 epochs.
        "csv": _paper(10, vera_lr=4e-3, head_lr=4e-3, lora_lr=5e-4, lora_epochs=10),
    }),
})


def task_defaults(task: str, method: str, budget: str = "cpu") -> tuple[int, float, float, int | None]:
    """(epochs, lr of the adapted/body parameters, head lr, max_train_samples) for `task` and `method`.

    For "head" the first learning rate is unused (nothing but the head trains).
    """
    if budget not in TASK_BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    d = TASK_BUDGETS[budget][task]
    if method in ("vera", "peft-vera"):  # PEFT's VeRA: the same method, so verakit VeRA's budget and rates
        return d.epochs, d.vera_lr, d.head_lr, d.max_train_samples
    if method == "lora":
        return d.lora_epochs, d.lora_lr, d.head_lr, d.max_train_samples
    if method == "full":
        return d.epochs, FULL_LR, d.head_lr, d.max_train_samples
    return d.epochs, d.head_lr, d.head_lr, d.max_train_samples


# ------------------------------------------------------------------------------------- causal LMs


@dataclass(frozen=True)
class CausalBudget:
    """A causal-LM task's defaults under one preset (SmolLM2-135M-Instruct on a CPU for ``cpu``)."""

    epochs: int
    max_train_samples: int | None  # a seeded subset of the training examples; None: all of them
    batch_size: int  # global batch, in examples
    max_eval_samples: int | None  # held-out examples scored by loss (e2e: meaning representations)
    gen_eval_samples: int  # of those, generated and scored (BLEU, ROUGE-L, chrF) at each evaluation


CAUSAL_BUDGETS: Mapping[str, Mapping[str, CausalBudget]] = MappingProxyType({
    "cpu": MappingProxyType({
        "e2e": CausalBudget(1, 800, batch_size=8, max_eval_samples=200, gen_eval_samples=100),
        "instruct": CausalBudget(1, 1_000, batch_size=8, max_eval_samples=200, gen_eval_samples=0),
        "jsonl": CausalBudget(1, None, batch_size=8, max_eval_samples=200, gen_eval_samples=0),
    }),
    # The papers' settings: E2E 5 epochs over the whole training set (VeRA/LoRA papers, GPT-2), instruction
    # tuning 1 epoch over the (10k-example) Alpaca set, batch 8 as in those tables.
    "paper": MappingProxyType({
        "e2e": CausalBudget(5, None, batch_size=8, max_eval_samples=None, gen_eval_samples=100),
        "instruct": CausalBudget(1, None, batch_size=8, max_eval_samples=None, gen_eval_samples=0),
        "jsonl": CausalBudget(1, None, batch_size=8, max_eval_samples=None, gen_eval_samples=0),
    }),
})
# Learning rates when --lr is not given (either budget): the better of the two each method tried in the E2E
# learning-rate probe of docs/results.md (## Generation; SmolLM2), checked again by the CPU default run of
# docs/training.md. Full fine-tuning was not probed.
CAUSAL_LR: Mapping[str, float] = MappingProxyType({"vera": 5e-2, "lora": 2e-3, "full": 5e-5})
CAUSAL_RANK: Mapping[str, int] = MappingProxyType({"vera": 1024, "lora": 8, "full": 0})


def causal_budget(task: str, budget: str = "cpu") -> CausalBudget:
    """The defaults of causal-LM `task` under `budget`."""
    if budget not in CAUSAL_BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    return CAUSAL_BUDGETS[budget][task]


# ------------------------------------------------------------------------------------------- images

# method -> (epochs, adapter/body lr, head lr, rank). Ranks follow the paper's ViT-B counts: VeRA's
# 24.6K = 24 layers x (768 + r) gives r = 256; LoRA's 294.9K = 24 x 8 x (768 + 768) gives r = 8.
# The learning rates are CPU-budget choices (docs/vision.md), not the paper's vision table.
IMAGE_DEFAULTS: Mapping[str, tuple[int, float, float, int]] = MappingProxyType({
    "vera": (10, 1e-2, 4e-3, 256),
    "lora": (10, 1e-3, 4e-3, 8),
    "full": (10, 1e-4, 4e-3, 0),
    "head": (10, 4e-3, 4e-3, 0),
})

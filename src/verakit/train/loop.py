"""The training loop, generic over a recipe: AdamW, linear warmup/decay, periodic dev evaluation, best
checkpoint, Ctrl-C -> resumable checkpoint. Runs single process or under `torchrun` / `accelerate launch`.

Semantics: for each global batch of `batch_size` example indices (a fresh permutation per epoch, derived
from (seed, epoch) only), every rank takes a contiguous slice, the recipe returns the *sum* of its
per-unit losses and the unit count, and the loss that is back-propagated is
    loss_sum * world_size / global_units,
so that DDP's gradient *average* equals the gradient of the global mean loss over the whole batch,
exactly, whatever the world size or how unevenly the last batch splits. `batch_size` is therefore the
global batch: one process with batch 32 and two with batch 32 take the same optimizer steps.

Under DDP (through `accelerate`) only trainable parameters (VeRA's d and b, the head) are all-reduced;
the frozen projections are plain attributes regenerated from the seed on every rank, never sent. Under
`accelerate launch --use_fsdp` (`fsdp.py`) every parameter is sharded instead: all ranks evaluate (a
sharded forward is collective) and gather the trained tensors for the main process to save.

What a user sees (the same for every recipe; the lines are written by progress.py): the plan first (rows, epochs, steps, batch), the dev
score before the first step (step 0: for VeRA b = 0, so the base model with its fresh head) beside the
recipe's trivial baseline, then after a few steps an estimate of the whole run, with a warning naming
the budget flags when a CPU run would take over an hour. Step 0 is recorded in the history but never
picks the saved checkpoint: the best evaluation is the best *trained* one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from . import fsdp, precision
from .batching import epoch_order, recipe_lengths
from .checkpoint import (
    Checkpoint,
    load_checkpoint,
    remove_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .progress import ESTIMATE_AFTER, Progress, estimate, eval_line, evaluations, plan_line
from .sigint import SigintFlag

__all__ = [
    "LoopConfig",
    "LoopResult",
    "OptimizerFactory",
    "ParamGroup",
    "Recipe",
    "StepInfo",
    "TrainingInterrupted",
    "adamw",
    "run_loop",
    "train_mode",
]

_clock = time.perf_counter  # every duration the loop measures; tests replace it with a fake clock


@dataclass(frozen=True)
class ParamGroup:
    """Parameters trained with one learning rate, e.g. ("adapter", d and b, 1e-2), ("head", ..., 4e-3)."""

    name: str
    params: tuple[nn.Parameter, ...]
    lr: float


class Recipe(Protocol):
    """What the loop needs from a task: a model, its batches, its loss and its dev evaluation."""

    model: nn.Module  # built, adapted, trainable flags set; on CPU (the loop moves it)
    main_metric: str  # key of `evaluate`'s result used to pick the best checkpoint (higher is better)

    def param_groups(self) -> list[ParamGroup]: ...

    def num_train(self) -> int: ...

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The training batch of these example indices (tensors on CPU)."""
        ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(sum of per-unit losses, number of units): units are examples, or tokens for a causal LM."""
        ...

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Dev metrics of `model` (the unwrapped module, in eval mode)."""
        ...

    def save_best(self, model: nn.Module, run_dir: Path) -> None:
        """Write the artifact of the current (best so far) weights into run_dir, atomically."""
        ...

    # Optional: `eval_note(self) -> str`, said in the plan line when an evaluation is slow (e.g. "each also
    # generates 100 held-out samples"): minutes of silence before the first step otherwise read as a hang.
    # Optional: `baseline(self) -> dict[str, float]`, the dev metrics of a trivial predictor (a constant:
    # the most frequent dev class, the mean dev score), with `evaluate`'s keys, e.g. from
    # metrics.trivial_baseline. The loop shows it beside step 0 and returns it in LoopResult.baseline;
    # a recipe without one (a causal LM has no trivial predictor worth the name) gets None.


@dataclass(frozen=True)
class LoopConfig:
    epochs: int
    batch_size: int  # global batch (split across ranks)
    warmup_ratio: float = 0.06  # fraction of all optimizer steps with a linear ramp from 0
    weight_decay: float = 0.01  # AdamW's (torch's default), applied to every group
    seed: int = 0  # data order and dropout; rank k seeds dropout with seed + k
    eval_every: int | None = None  # evaluate every N optimizer steps too; always at each epoch end
    quiet: bool = False  # log lines instead of a progress bar
    # Batches of similar-length examples (batching.py; the recipe needs `train_lengths()`): less padding.
    group_by_length: bool = False
    mixed_precision: str = "no"  # "bf16": training forwards under bf16 autocast (precision.py)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LoopConfig.{name} must be an integer >= 1, got {v!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"LoopConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError(f"LoopConfig.eval_every must be >= 1 or None, got {self.eval_every!r}")
        precision.check_mode(self.mixed_precision)


@dataclass(frozen=True)
class StepInfo:
    """Passed to `on_step` after every optimizer step (progress hooks, tests)."""

    epoch: int  # 0-based
    step: int  # global optimizer step, 1-based
    total_steps: int
    loss: float  # global mean loss of this batch
    lr: float  # learning rate of the first group after this step


@dataclass(frozen=True)
class LoopResult:
    # One record per evaluation: epoch, step, train_loss, lr, seconds, metrics. The first is step 0, before
    # any training (train_loss None), unless the run was resumed from a checkpoint written without it.
    history: list[dict[str, Any]]
    losses: list[float]  # global mean loss of every optimizer step, in order
    best: dict[str, Any]  # the record of the best evaluation after step 0 (its artifact is in run_dir)
    train_seconds: float  # wall time of training and evaluation, summed over resumed sessions
    total_steps: int
    world_size: int
    baseline: dict[str, float] | None = None  # recipe.baseline() (main process), None without one
    fsdp: dict[str, int] | None = None  # fsdp.shard_stats of the main process under FSDP, else None


class TrainingInterrupted(Exception):
    """Ctrl-C (SIGINT) stopped training after a complete step; a resumable checkpoint was written."""

    def __init__(self, checkpoint_dir: Path, step: int) -> None:
        super().__init__(f"training interrupted after step {step}; checkpoint saved in {checkpoint_dir}, "
                         "rerun the same command with --resume to continue")
        self.checkpoint_dir = checkpoint_dir
        self.step = step


OptimizerFactory = Callable[[list[ParamGroup], float], torch.optim.Optimizer]


def train_mode(model: nn.Module) -> nn.Module:
    """`model.train()`, except normalisation layers with running statistics (BatchNorm, InstanceNorm with
    track_running_stats) whose own parameters are all frozen (or that have none): they stay in eval mode.
    Their running mean and variance belong to the frozen base, no adapter file carries them, so updating
    them in training would make the saved adapter score differently from the run that recorded it (measured
    on a ResNet's 12 convolutions: 0.576 recorded, 0.568 from the file). Full fine-tuning trains them."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and not any(
                p.requires_grad for p in m.parameters(recurse=False)):
            m.eval()
    return model


def adamw(groups: list[ParamGroup], weight_decay: float) -> torch.optim.Optimizer:
    """The loop's default optimizer: torch's AdamW, one param group per non-empty ParamGroup."""
    return torch.optim.AdamW(
        [{"params": list(g.params), "lr": g.lr, "name": g.name} for g in groups if g.params],
        weight_decay=weight_decay,
    )


def _local_slice(indices: list[int], rank: int, world: int) -> list[int]:
    per = math.ceil(len(indices) / world)
    return indices[rank * per : (rank + 1) * per]


def run_loop(
    recipe: Recipe,
    config: LoopConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    on_step: Callable[[StepInfo], None] | None = None,
    optimizer_factory: OptimizerFactory | None = None,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
) -> LoopResult:
    """Train `recipe.model` in place; the best evaluation's artifact ends up in `run_dir`.

    With `resume`, continues from `run_dir/checkpoint` (written by a Ctrl-C) to the same result as an
    uninterrupted run: trainable tensors, optimizer, schedule, RNG states and data position are restored.
    `optimizer_factory(groups, weight_decay)` replaces the default AdamW (e.g. per-slot AdamW for
    grouped training); its param groups must carry "lr", which the schedule scales.
    `on_eval(record)` runs on the main process after each evaluation of a trained model (not step 0),
    once the best artifact is saved (record: epoch, step, train_loss, lr, seconds, metrics); an exception
    it raises (e.g. Optuna's TrialPruned) stops training and propagates, without a checkpoint.
    """
    from accelerate import Accelerator
    from transformers import get_linear_schedule_with_warmup

    run_dir = Path(run_dir)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = acc.process_index, acc.num_processes
    if config.batch_size < world:
        raise ValueError(f"batch_size {config.batch_size} is smaller than the number of processes {world}")

    sharded = fsdp.active(acc)  # FSDP2: the base is split across ranks, not replicated
    if sharded and optimizer_factory is not None:
        raise ValueError("FSDP (accelerate's --use_fsdp) trains with the loop's AdamW only, not a custom optimizer "
                         "(grouped training, --group-column); launch it without --use_fsdp")
    built = recipe.param_groups()
    named = {id(p): n for n, p in recipe.model.named_parameters()}
    model = fsdp.shard(acc, recipe.model) if sharded else acc.prepare_model(recipe.model)
    raw_model = acc.unwrap_model(model)
    # The optimizer is built after sharding: FSDP2 replaces every parameter with a DTensor one.
    now = fsdp.rebind({id(p): named[id(p)] for g in built for p in g.params}, raw_model)
    groups = [ParamGroup(g.name, tuple(now[id(p)] for p in g.params), g.lr) for g in built]
    trainable = {named[id(p)]: now[id(p)] for g in built for p in g.params}
    optimizer = (optimizer_factory or adamw)(groups, config.weight_decay)
    n_train = recipe.num_train()
    lengths = recipe_lengths(recipe) if config.group_by_length else None
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total_steps), total_steps)

    start_step, history, best, seconds_before, losses = 0, [], {}, 0.0, []
    resumed_window = (0.0, 0.0)
    torch.manual_seed(config.seed + rank)
    if resume:
        ckpt = load_checkpoint(run_dir, rank)
        if ckpt is not None:
            missing = sorted(set(trainable) - set(ckpt.tensors))
            if missing:
                raise ValueError(f"{run_dir}/checkpoint: no saved tensor for trainable parameter(s) {missing[:3]}")
            # An FSDP checkpoint keys the optimizer state by parameter name, a plain one by position.
            by_name = any(isinstance(k, str) for k in ckpt.optimizer.get("state", {}))
            if by_name != sharded:
                raise ValueError(f"{run_dir}/checkpoint was written {'with' if by_name else 'without'} FSDP; resume "
                                 f"it the same way ({'with' if by_name else 'without'} accelerate's --use_fsdp)")
            for n, p in trainable.items():
                fsdp.put_full(p, ckpt.tensors[n])
            if sharded:
                fsdp.load_optimizer_state(raw_model, optimizer, ckpt.optimizer)
            else:
                optimizer.load_state_dict(ckpt.optimizer)
            scheduler.load_state_dict(ckpt.scheduler)
            set_rng_state(ckpt.rng)
            start_step, seconds_before, resumed_window, losses = ckpt.step, ckpt.seconds, ckpt.window, list(ckpt.losses)
            if acc.is_main_process:  # the others return an empty `best` as in a fresh run: they write no results
                history, best = ckpt.history, ckpt.best

    main = acc.is_main_process
    progress = Progress(main, config.quiet, total_steps, start_step, config.epochs, _clock())
    note = getattr(recipe, "eval_note", None)  # optional: what an evaluation does when it is slow (generations)
    progress.say(plan_line(n_train, config.epochs, config.batch_size, config.eval_every, steps_per_epoch,
                           total_steps, world, start_step, note() if note else None))
    shard_stats = fsdp.shard_stats(raw_model) if sharded else None
    if shard_stats is not None:
        progress.say(fsdp.stats_line(shard_stats, world))
    baseline = _baseline(recipe) if main else None
    t0 = _clock()
    (window_loss, window_units), window_examples, window_t = resumed_window, 0, _clock()
    step = start_step
    eval_seconds: float | None = None  # of the latest evaluation, for the estimate

    def evaluate(epoch_float: float) -> None:
        nonlocal best, window_loss, window_units, eval_seconds
        record: dict[str, Any] = {
            "epoch": round(epoch_float, 4),
            "step": step,
            # None, not NaN, before the first step: metrics.json stays valid JSON.
            "train_loss": window_loss / window_units if window_units else None,
            "lr": scheduler.get_last_lr()[0],
            "seconds": round(seconds_before + _clock() - t0, 3),
        }
        window_loss, window_units = 0.0, 0.0
        if main or sharded:  # a sharded forward is collective: every rank runs the evaluation
            started = _clock()
            raw_model.eval()
            with torch.no_grad(), evaluating():  # the attention the file will be evaluated with
                record["metrics"] = recipe.evaluate(raw_model)
            train_mode(raw_model)
            eval_seconds = _clock() - started
        # Step 0 never becomes "best": the saved artifact is always a trained one (the first trained
        # evaluation replaces nothing), and the report shows step 0 beside it for comparison.
        improved = main and step > 0 and (not best or record["metrics"][recipe.main_metric] > best["metrics"][recipe.main_metric])
        if sharded:  # the main process decides; every rank takes part in gathering the trained tensors
            improved = acc.reduce(torch.tensor([float(improved)], device=acc.device), reduction="sum").item() > 0
        if improved:
            with fsdp.full_trainables(raw_model, write=main) if sharded else nullcontext():
                if main:
                    best = record
                    recipe.save_best(raw_model, run_dir)
        if main:
            history.append(record)
            progress.say(eval_line(record, baseline))
            if on_eval is not None and step > 0:
                on_eval(record)
        acc.wait_for_everyone()

    train_mode(model)
    timed_steps, step_seconds = 0, 0.0
    estimate_at = min(ESTIMATE_AFTER, total_steps - start_step - 1)
    with SigintFlag() as sigint, precision.training_attention(raw_model, config.mixed_precision,
                                                              acc.device.type) as evaluating:
        if step == 0 and not history:
            evaluate(0.0)  # one dev pass: the score every trained evaluation is compared with
            window_t = _clock()  # the progress bar's examples/s counts training time, not this evaluation's
        while step < total_steps:
            step_start = _clock()
            epoch, in_epoch = divmod(step, steps_per_epoch)
            order = epoch_order(n_train, config.seed, epoch, config.batch_size, lengths)
            global_idx = order[in_epoch * config.batch_size : (in_epoch + 1) * config.batch_size]
            local = _local_slice(global_idx, rank, world)
            # A rank left without examples (tiny last batch) still runs forward/backward, weighted 0,
            # because DDP needs every rank in the all-reduce.
            batch = {k: v.to(acc.device) for k, v in recipe.collate(local or global_idx[:1]).items()}
            with precision.step_context(config.mixed_precision, acc.device.type):
                loss_sum, units = recipe.loss(model, batch)
            if not local:
                loss_sum, units = loss_sum * 0.0, 0
            stats = torch.tensor([float(units), loss_sum.item(), float(sigint.raised)], device=acc.device)
            stats = acc.reduce(stats, reduction="sum") if world > 1 else stats
            global_units = stats[0].item()
            acc.backward(loss_sum * (world / global_units))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            batch_loss = stats[1].item() / global_units
            losses.append(batch_loss)
            window_loss += stats[1].item()
            window_units += global_units
            window_examples += len(global_idx)
            timed_steps, step_seconds = timed_steps + 1, step_seconds + _clock() - step_start
            if on_step is not None:
                on_step(StepInfo(epoch, step, total_steps, batch_loss, scheduler.get_last_lr()[0]))
            now = _clock()
            progress.stepped(now, epoch, step, batch_loss, scheduler.get_last_lr()[0],
                             window_examples / max(now - window_t, 1e-9),
                             step_seconds / timed_steps * (total_steps - step))
            if timed_steps == estimate_at:
                evals_left = evaluations(step, total_steps, steps_per_epoch, config.eval_every)
                for line, warning in estimate(step_seconds / timed_steps, eval_seconds, total_steps - step,
                                              evals_left, _clock() - t0, acc.device.type == "cpu"):
                    progress.say(line, warning)
                if tip := precision.speed_tip_once(config.mixed_precision, acc.device.type):
                    progress.say(tip)
            epoch_end = step % steps_per_epoch == 0
            if epoch_end or (config.eval_every and step % config.eval_every == 0):
                evaluate(step / steps_per_epoch)
                window_examples, window_t = 0, _clock()
                progress.evaluated(_clock())
            if stats[2].item() > 0 and step < total_steps:
                seconds = seconds_before + _clock() - t0
                state = Checkpoint(
                    step=step,
                    tensors={n: fsdp.full_value(p) for n, p in trainable.items()},  # all-gathers under FSDP
                    optimizer=fsdp.optimizer_state(raw_model, optimizer) if sharded else optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    rng=rng_state(),
                    history=history,
                    best=best,
                    seconds=seconds,
                    window=(window_loss, window_units),
                    losses=list(losses),
                )
                save_checkpoint(run_dir, rank, state, write_shared=main)
                acc.wait_for_everyone()
                progress.close()
                raise TrainingInterrupted(run_dir / "checkpoint", step)
    progress.close()
    if main:
        remove_checkpoint(run_dir)
    acc.wait_for_everyone()
    return LoopResult(history, losses, best, seconds_before + _clock() - t0, total_steps, world, baseline, shard_stats)


def _baseline(recipe: Recipe) -> dict[str, float] | None:
    make = getattr(recipe, "baseline", None)  # optional in the Recipe protocol
    return None if make is None else {k: float(v) for k, v in make().items()}


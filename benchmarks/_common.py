"""Shared helpers for the benchmarks: random-config models, adapters side by side, timing, RSS.

Every model is built from a random config of the named size (the numbers are shape-bound, not
weight-bound), so nothing is downloaded. Ratios are only compared within one run, measured interleaved.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

# (model family, targets) per benchmark model name. "smollm2" is SmolLM2-135M's shape with all linears.
TARGETS = {
    "roberta": ("query", "value"),
    "gpt2": ("c_attn",),
    "smollm2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def build_model(name: str, layers: int, seed: int = 0) -> nn.Module:
    """A random-config model of the named size with `layers` blocks, in train mode."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    if name == "roberta":  # RoBERTa-base widths
        cfg = transformers.RobertaConfig(num_hidden_layers=layers, num_labels=2, max_position_embeddings=514)
        return transformers.RobertaForSequenceClassification(cfg).train()
    if name == "gpt2":  # GPT-2 small widths
        cfg = transformers.GPT2Config(n_layer=layers)
        return transformers.GPT2LMHeadModel(cfg).train()
    if name == "smollm2":  # SmolLM2-135M widths: 576 hidden, 9 / 3 heads, 1536 intermediate, tied embeddings
        cfg = transformers.LlamaConfig(
            num_hidden_layers=layers, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
            num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
        )
        return transformers.LlamaForCausalLM(cfg).train()
    raise ValueError(f"unknown benchmark model {name!r}")


def adapt(model: nn.Module, name: str, method: str, r: int) -> nn.Module:
    """Attach `method` ("base", "lora", "peft-vera", "verakit") at rank r to the model's TARGETS."""
    targets = list(TARGETS[name])
    if method == "base":  # head only (classifier), or nothing trainable but the LM head's input path
        for n, p in model.named_parameters():
            p.requires_grad_("classifier" in n)
        return model
    if method == "verakit":
        import verakit

        return verakit.attach(model, verakit.VeraConfig(r=r, target_modules=tuple(targets)))
    import peft

    task = "SEQ_CLS" if name == "roberta" else "CAUSAL_LM"
    if method == "lora":
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type=task,
                              fan_in_fan_out=name == "gpt2")
    elif method == "peft-vera":
        cfg = peft.VeraConfig(r=r, target_modules=targets, task_type=task, fan_in_fan_out=name == "gpt2")
    else:
        raise ValueError(f"unknown method {method!r}")
    return peft.get_peft_model(model, cfg)


def batch_for(name: str, batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out["labels"] = torch.randint(0, 2, (batch,), generator=g) if name == "roberta" else ids
    return out


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn: Callable[[], object], clock: str = "wall") -> float:
    now = CLOCKS[clock]
    start = now()
    fn()
    return now() - start


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, clock: str = "wall"
) -> dict[str, list[float]]:
    """Seconds per call of each fn, measured in rounds (the order rotates each round).

    clock "cpu" counts this process's CPU seconds (all threads): on a machine shared with other jobs it
    is far steadier than wall time, and equals it up to threading overhead when we run undisturbed.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        order = names[i % len(names):] + names[: i % len(names)]
        for n in order:
            gc.collect()
            times[n].append(timed(fns[n], clock))
    return times


def ratio_summary(times: dict[str, list[float]], num: str, den: str) -> tuple[float, float, float]:
    """(median, min, max) over rounds of times[num][i] / times[den][i]: ratios taken within a round."""
    rs = [a / b for a, b in zip(times[num], times[den], strict=True)]
    return statistics.median(rs), min(rs), max(rs)


def rss_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: writing 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# Large tensors go to mmap and back to the OS on free, so RSS tracks live tensors (glibc otherwise
# raises its mmap threshold on the fly and keeps freed memory in the heap).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def child_env() -> dict[str, str]:
    return {**os.environ, **MALLOC_ENV}

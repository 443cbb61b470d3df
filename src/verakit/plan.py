"""Memory a training run needs, from a model's config alone: VeRA, LoRA and full fine-tuning side by side.

Semantics: total = base weights + shared projections + trainable state + activations + transient, where
  base weights   every parameter at the chosen precision; at "8bit"/"4bit" the `nn.Linear` layers that
                 `verakit.quant.quantize_linears` quantizes (all but `lm_head`) at bitsandbytes' storage
                 (int8 + fp32 row scales; packed nf4 + uint8 block absmax + nested fp32 absmax and codes),
                 everything else (embeddings, norms, lm_head, biases) in the compute dtype;
  projections    VeRA's one shared pair A (r, max d_in), B (max d_out, r) in float32, plus a copy in the
                 compute dtype when that is not float32 (`Projection.tables` caches one per dtype);
  trainable      AdamW over the trainable parameters: the parameter (VeRA/LoRA: fp32, extra to the base;
  state          full: the base weights themselves), its gradient and two moments;
  activations    what autograd keeps for backward, counted with `saved_tensors_hooks` (each storage once)
                 in the real forward and loss of the transformers model adapted by verakit's `attach` (or a
                 LoRA-shaped wrapper, or all parameters trainable), its weights built under FakeTensorMode:
                 no weight memory exists and no matmul runs. On a tiny Llama this equals a real run's count
                 byte for byte (tests/test_plan.py).
                 With gradient checkpointing, what the checkpointed run keeps plus the largest block's
                 activations (recomputed one block at a time in backward);
  transient      the largest short-lived buffers at the peak: the fp32 logits and their gradient for a
                 causal LM's loss, one dequantized weight for a quantized base, DVoRA's (`magnitude`) row
                 norms of W0 + delta (the delta and the sum, fp32, of the largest adapted layer, formed
                 without gradients one layer at a time), and AdamW's foreach scratch (one parameter-sized
                 buffer, for full fine-tuning only; torch's GPU default: on CPU it needs less).
The peak is taken at the worse of two moments, both with AdamW's moments allocated (step two onward):
the start of backward (activations + transient) and the optimizer step (gradients + scratch).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .plan_presets import PRESETS  # public configs' shapes, for offline plans

__all__ = ["METHODS", "PRECISIONS", "PRESETS", "MethodPlan", "Plan", "PlanError", "load_config", "plan",
           "quantized_linear_bytes"]

METHODS = ("vera", "lora", "full")
PRECISIONS = ("fp32", "bf16", "8bit", "4bit")
_ITEMSIZE = {"fp32": 4, "bf16": 2}
_ENCODERS = ("bert", "roberta", "xlm-roberta", "deberta-v2", "distilbert")
_HEADS = ("classifier", "score")  # trained in full by every method of a classification run
_NF4_BLOCK, _NESTED_BLOCK = 64, 256  # bitsandbytes Params4bit defaults (compress_statistics=True)


class PlanError(ValueError):
    """The model, precision or option given to the planner is unusable; the message names it."""


@dataclass(frozen=True)
class MethodPlan:
    """Bytes one method needs; `total` is the planned peak. `supported` is False where it cannot run."""

    method: str  # vera, lora or full
    supported: bool  # full fine-tuning of an 8-bit/4-bit base cannot train integer weights
    trainable_params: int  # elements AdamW updates
    base_weights: int
    projections: int  # VeRA's shared pair (0 for the others)
    trainable_state: int  # parameter (when extra to the base) + gradient + two AdamW moments
    activations: int  # saved for backward
    transient: int  # largest short-lived buffers at the peak
    total: int
    note: str = ""


@dataclass(frozen=True)
class Plan:
    """The inputs a plan was made for and one MethodPlan per method."""

    model: str
    model_type: str
    task: str  # causal-lm or classification
    params: int  # base model elements (tied weights once)
    precision: str
    compute_dtype: str
    batch_size: int
    seq_len: int
    checkpointing: bool
    r: int  # VeRA rank
    lora_r: int
    target_modules: tuple[str, ...] | str
    methods: tuple[MethodPlan, ...] = field(default_factory=tuple)
    magnitude: bool = False  # VeRA planned as DVoRA (VeraConfig.magnitude)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "methods"}
        tm = self.target_modules
        d["target_modules"] = list(tm) if isinstance(tm, tuple) else tm
        d["methods"] = [{k: getattr(m, k) for k in m.__dataclass_fields__} for m in self.methods]
        return d


@dataclass(frozen=True)
class _Shapes:
    """What the planner reads off the (weightless) model."""

    params: int  # all elements, tied ones once
    quantizable: tuple[tuple[int, int], ...]  # (d_out, d_in) of each weight quantize_linears would quantize
    other: int  # elements of everything else (embeddings, norms, biases, lm_head)


@dataclass(frozen=True)
class _Trace:
    """What one method's traced training step keeps."""

    trainable: int  # elements with requires_grad
    projection: int  # elements of VeRA's shared pair
    activations: int  # bytes saved for backward
    loss_transient: int  # bytes: the causal-LM loss's fp32 logits gradients
    magnitude_transient: int = 0  # bytes: DVoRA's W0 + delta for the row norms (largest layer, fp32)


def quantized_linear_bytes(d_out: int, d_in: int, kind: str) -> int:
    """Semantics: bytes bitsandbytes stores for one (d_out, d_in) weight: "8bit" n int8 + d_out fp32 row
    scales (SCB); "4bit" nf4 with double quantization: ceil(n/2) packed + ceil(n/64) uint8 absmax +
    4 ceil(n/64/256) nested fp32 absmax + (256 + 16) fp32 codes + an fp32 offset. n = d_out * d_in."""
    n = d_out * d_in
    if kind == "8bit":
        return n + 4 * d_out
    if kind == "4bit":
        blocks = math.ceil(n / _NF4_BLOCK)
        return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / _NESTED_BLOCK) + 4 * (256 + 16 + 1)
    raise PlanError(f"quantized_linear_bytes: kind {kind!r} is not 8bit or 4bit")


def load_config(model: str) -> Any:
    """A transformers config from a preset name (`PRESETS`), a model folder, or a config JSON file."""
    from transformers import AutoConfig

    preset = PRESETS.get({"smollm2": "smollm2-135m"}.get(model.lower(), model.lower()))  # verakit train's alias
    if preset is not None:
        fields_ = dict(preset)
    else:
        path = Path(model).expanduser()
        if path.is_dir():
            path = path / "config.json"
            if not path.is_file():
                raise PlanError(f"--model {model}: the folder has no config.json")
        elif not path.is_file():
            raise PlanError(f"--model {model}: neither a model folder, a config JSON file nor a preset "
                            f"({', '.join(PRESETS)})")
        try:
            fields_ = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PlanError(f"--model {model}: {path} is not a JSON config ({e})") from e
        if not isinstance(fields_, dict) or "model_type" not in fields_:
            raise PlanError(f"--model {model}: {path} has no model_type field")
        fields_.pop("quantization_config", None)  # the planner picks the precision itself
    try:
        cfg = AutoConfig.for_model(fields_.pop("model_type"), **fields_)
    except (ValueError, KeyError) as e:
        raise PlanError(f"--model {model}: transformers cannot build its config ({e})") from e
    # A file without the width would silently plan the config class's default model (LlamaConfig's is 7B).
    width = {"hidden_size", type(cfg).attribute_map.get("hidden_size", "hidden_size")}
    if not width & set(fields_):
        raise PlanError(f"--model {model}: the config gives no {' or '.join(sorted(width))}, so the plan would be of "
                        f"{type(cfg).__name__}'s default sizes, not your model's; pass its full config.json")
    return cfg


def plan(
    model: str,
    *,
    methods: Sequence[str] = METHODS,
    r: int = 1024,
    lora_r: int = 8,
    precision: str = "fp32",
    compute_dtype: str | None = None,
    batch_size: int = 4,
    seq_len: int = 512,
    checkpointing: bool = False,
    target_modules: tuple[str, ...] | str | None = None,
    task: str | None = None,
    magnitude: bool = False,
) -> Plan:
    """Plan the peak memory of a training step for each of `methods` (see the module docstring).

    compute_dtype: dtype of activations and of the unquantized parameters ("fp32" or "bf16"); None: bf16
    for precision "bf16", else fp32 (as `verakit train`, which loads fp32 and then quantizes the linears).
    target_modules None: the model type's default targets (`DEFAULT_TARGETS`, as `verakit train` uses).
    task None: "classification" for encoder model types (a 2-label head), else "causal-lm".
    magnitude: plan VeRA as DVoRA (a trained magnitude per output row: `verakit train --magnitude`).
    """
    from .config import DEFAULT_TARGETS

    if precision not in PRECISIONS:
        raise PlanError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    compute_dtype = compute_dtype or ("bf16" if precision == "bf16" else "fp32")
    if compute_dtype not in _ITEMSIZE:
        raise PlanError(f"--compute-dtype {compute_dtype!r}: choose fp32 or bf16")
    if precision == "bf16" and compute_dtype != "bf16":
        raise PlanError("--precision bf16 computes in bf16; --compute-dtype fp32 contradicts it")
    if not methods or any(m not in METHODS for m in methods):
        raise PlanError(f"--methods {','.join(methods)!r}: choose from {', '.join(METHODS)}")
    for name, v in (("--r", r), ("--lora-r", lora_r), ("--batch-size", batch_size), ("--seq-len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PlanError(f"{name} must be an integer >= 1, got {v!r}")
    cfg = load_config(model)
    task = task or ("classification" if cfg.model_type in _ENCODERS else "causal-lm")
    if task not in ("causal-lm", "classification"):
        raise PlanError(f"--task {task!r}: choose causal-lm or classification")
    if target_modules is None:
        if cfg.model_type not in DEFAULT_TARGETS:
            raise PlanError(f"no default target modules for model_type {cfg.model_type!r}; pass --target-modules")
        target_modules = DEFAULT_TARGETS[cfg.model_type]
    elif isinstance(target_modules, tuple) and target_modules == ("all-linear",):  # the CLI's comma list
        target_modules = "all-linear"
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise PlanError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings ({limit})")

    shapes = _shapes(cfg, task)
    plans = []
    for method in methods:
        if method == "full" and precision in ("8bit", "4bit"):
            plans.append(MethodPlan(method, False, 0, 0, 0, 0, 0, 0, 0, note=f"cannot train {precision} weights"))
            continue
        t = _trace(cfg, task, method, r, lora_r, target_modules, precision, compute_dtype, batch_size, seq_len,
                   checkpointing, magnitude)
        plans.append(_add_up(method, shapes, t, precision, compute_dtype))
    return Plan(model, cfg.model_type, task, shapes.params, precision, compute_dtype, batch_size, seq_len,
                checkpointing, r, lora_r, target_modules, tuple(plans), magnitude)


def _add_up(method: str, shapes: _Shapes, t: _Trace, precision: str, compute_dtype: str) -> MethodPlan:
    item = _ITEMSIZE[compute_dtype]
    quant = precision in ("8bit", "4bit")
    base = item * shapes.other + sum(
        quantized_linear_bytes(o, i, precision) if quant else item * o * i for o, i in shapes.quantizable)
    # fp32 tables, plus the copy Projection.tables caches for a narrower compute dtype
    proj = 4 * t.projection + (item * t.projection if item != 4 else 0)
    if method == "full":  # the parameters are the base weights: gradient and two moments in their dtype
        own, grads, moments = 0, item * t.trainable, 2 * item * t.trainable
    else:  # adapter parameters are fp32 (VeRA's vectors; PEFT upcasts LoRA's), as are their grads and moments
        own, grads, moments = 4 * t.trainable, 4 * t.trainable, 8 * t.trainable
    scratch = grads  # AdamW foreach step (the GPU default): one parameter-sized temporary at a time
    dequant = item * max((o * i for o, i in shapes.quantizable), default=0) if quant else 0
    transient = t.loss_transient + dequant + t.magnitude_transient
    at_backward = base + proj + own + moments + t.activations + transient
    at_step = base + proj + own + moments + grads + scratch
    note = "QLoRA-style (PEFT); verakit train --quantize is VeRA only" if quant and method == "lora" else ""
    return MethodPlan(method, True, t.trainable, base, proj, own + grads + moments, t.activations,
                      transient if at_backward >= at_step else scratch, max(at_backward, at_step), note)


def _build(cfg: Any, task: str, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    try:
        return auto.from_config(cfg, dtype=dtype).train()
    except ValueError as e:
        # only the first line: transformers' message goes on to list every config class it knows
        raise PlanError(f"model_type {cfg.model_type!r} has no {task} model in transformers "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e


def _shapes(cfg: Any, task: str) -> _Shapes:
    """Parameter shapes from a model built on the meta device (no memory, no initialisation cost)."""
    import torch
    from torch import nn

    with torch.device("meta"):
        model = _build(cfg, task, torch.float32)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    quant = tuple((m.out_features, m.in_features) for n, m in model.named_modules()
                  if type(m) is nn.Linear and n.rpartition(".")[2] != "lm_head")  # as quantize_linears
    return _Shapes(total, quant, total - sum(o * i for o, i in quant))


class _LoraShaped:
    """What PEFT's LoRA keeps for backward: x cast to the fp32 adapter dtype and A x (..., r)."""

    @staticmethod
    def wrap(model: Any, targets: dict[str, Any], r: int) -> None:
        import torch
        from torch import nn

        from .layer import linear_shape

        class LoraLinear(nn.Module):
            def __init__(self, base: nn.Module) -> None:
                super().__init__()
                d_out, d_in = linear_shape(base)
                self.base = base
                self.lora_A = nn.Parameter(torch.zeros(r, d_in))  # (r, d_in)
                self.lora_B = nn.Parameter(torch.zeros(d_out, r))  # (d_out, r)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                h = nn.functional.linear(nn.functional.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
                return self.base(x) + h.to(x.dtype)

        for p in model.parameters():
            p.requires_grad_(False)
        for name, base in targets.items():
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, LoraLinear(base))


def _trace(cfg: Any, task: str, method: str, r: int, lora_r: int, target_modules: tuple[str, ...] | str,
           precision: str, compute_dtype: str, batch: int, seq: int, checkpointing: bool,
           magnitude: bool = False) -> _Trace:
    """Run one forward of the adapted model under FakeTensorMode and count what autograd saves."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .config import VeraConfig
    from .inject import AttachError, attach, find_targets, vera_layers
    from .layer import linear_shape
    from .projection import Projection

    dtype = torch.float32 if compute_dtype == "fp32" else torch.bfloat16
    tables: list[torch.Tensor] = []
    with FakeTensorMode(allow_non_fake_inputs=True):  # parameters and tables without memory
        model = _build(cfg, task, dtype)
        # "explicit" tables: no Philox work; the values do not matter, only the shapes and dtypes
        vera = VeraConfig(r=r, target_modules=target_modules, projection_kind="explicit",
                          magnitude=magnitude and method == "vera")
        try:
            targets = find_targets(model, vera)
        except AttachError as e:
            raise PlanError(f"--target-modules: {e}") from e
        projection = 0
        if method == "vera":
            max_out = max(linear_shape(m)[0] for m in targets.values())
            max_in = max(linear_shape(m)[1] for m in targets.values())
            proj = Projection.from_tables(torch.empty(r, max_in), torch.empty(max_out, r), kind="explicit")
            tables = [proj.A, proj.B, *proj.tables(torch.device("cpu"), dtype)]  # counted as projections
            attach(model, vera, projection=proj)  # also makes the classification head trainable
            projection = r * (max_in + max_out)
            if precision in ("8bit", "4bit"):  # over a quantized base VeraLinear always takes the factored
                for layer in vera_layers(model).values():  # path, which keeps more per token than the
                    layer.quantized = precision  # materialized one it may pick over a plain weight
        elif method == "lora":
            _LoraShaped.wrap(model, targets, lora_r)
        else:
            model.requires_grad_(True)
        if task == "classification" and method == "lora":
            for n, m in model.named_modules():
                if n.rpartition(".")[2] in _HEADS:
                    m.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # The forward runs outside the mode: ops on the fake weights stay fake, while the ones transformers
    # computes from the real token ids alone (positions, the padding check that lets SDPA skip the causal
    # mask) run for real, so the traced path is the one training takes, not transformers' tracing path.
    saved, blocks = _saved_bytes(model, task, batch, seq, tables)
    if checkpointing:
        from .recompute import enable_gradient_checkpointing  # exactly what `verakit train` turns on

        enable_gradient_checkpointing(model)
        # kept: block inputs and whatever is outside the blocks; in backward one block at a time is rebuilt
        saved = _saved_bytes(model, task, batch, seq, tables)[0] + max(blocks, default=0)
    logits = batch * seq * cfg.vocab_size if task == "causal-lm" else 0
    # token_loss: the fp32 logits' gradient and the log-softmax gradient (the log-softmax output is saved),
    # plus the fp32 copy of narrower logits
    loss_transient = 8 * logits + (4 * logits if dtype != torch.float32 else 0)
    largest = max((o * i for o, i in (linear_shape(m) for m in targets.values())), default=0)
    magnitude_transient = 8 * largest if magnitude and method == "vera" else 0
    return _Trace(trainable, projection, saved, loss_transient, magnitude_transient)


def _saved_bytes(model: Any, task: str, batch: int, seq: int, tables: list[Any]) -> tuple[int, list[int]]:
    """(bytes autograd saves in one forward, saved bytes per block of the largest ModuleList), each
    storage once; parameters, buffers and the projection `tables` are counted elsewhere."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    known = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers(), *tables]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s._cdata not in known:
            seen.setdefault(s._cdata, s.nbytes())
        return t

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    blocks = max(lists, key=len) if lists else []
    per_block: list[int] = []
    handles = []
    for block in blocks:
        handles.append(block.register_forward_pre_hook(lambda *_: per_block.append(-sum(seen.values()))))
        handles.append(block.register_forward_hook(lambda *_: per_block.__setitem__(-1, per_block[-1] + sum(seen.values()))))
    ids = torch.zeros(batch, seq, dtype=torch.long)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if task == "causal-lm":  # as verakit.train.causal.token_loss, every token labelled
                logits = model(input_ids=ids, use_cache=False).logits
                targets = F.pad(ids[:, 1:], (0, 1), value=-100)
                F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
            else:
                model(input_ids=ids, labels=torch.zeros(batch, dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    return sum(seen.values()), per_block

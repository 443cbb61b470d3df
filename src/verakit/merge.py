"""Merge VeRA into the base weights: on live modules, and as pure functions over tensors.

Merging is only ever an explicit call. Deltas are computed in float32 and cast once to the weight dtype.
`merge_pretrained` (what `verakit merge` runs) writes a folder that transformers loads as is: merged
weights, the trained head, the label names recorded at training and the base model's tokenizer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import new_dir
from .fileformat import Adapter, AdapterError, load_adapter, read_adapter
from .inject import layer_class, vera_state
from .layer_embedding import parse_embedding_kind, table_norms
from .models import TOKENIZER_FILES
from .ops import magnitude_scale, vera_delta
from .projection import Projection, matrix_ids
from .prompting import PROMPT_CONFIG_KEY, prompt_record

__all__ = [
    "merge", "unmerge", "is_merged", "adapter_deltas", "merged_state_dict", "export_merged", "merge_pretrained",
    "base_model_for",
]

# Files from which AutoTokenizer / AutoProcessor build a real tokenizer or image processor. A folder with
# none of them still "loads": a BERT config alone gives a 5-token tokenizer, so we check for them.
_PREPROCESSOR_FILES = (*TOKENIZER_FILES, "preprocessor_config.json", "processor_config.json")


def merge(model: nn.Module) -> nn.Module:
    """Fold every VeRA layer's delta into its base weight. Idempotent; returns the model.

    Refused (RuntimeError, nothing merged) when a base layer is quantized: requantizing W0 + delta would
    round the delta onto the 4-bit or int8 grid; merge into the full-precision base instead."""
    layers = vera_state(model).layers
    quantized = [f"{n} ({ly.quantized})" for n, ly in layers.items() if ly.quantized is not None]
    if quantized:
        more = f" and {len(quantized) - 3} more" if len(quantized) > 3 else ""
        raise RuntimeError(
            f"cannot merge VeRA into quantized base layers: {', '.join(quantized[:3])}{more}; merge into a "
            "full-precision base instead: load the model unquantized, load_adapter, then export_merged"
        )
    for layer in layers.values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge` (within float rounding). Idempotent; returns the model."""
    for layer in vera_state(model).layers.values():
        layer.unmerge()
    return model


def is_merged(model: nn.Module) -> bool:
    return any(layer.merged for layer in vera_state(model).layers.values())


def adapter_deltas(adapter: Adapter) -> dict[str, torch.Tensor]:
    """Semantics: {module: diag(b) B_sl diag(s d) A_sl} in float32, shaped like the module's weight.

    For a DVoRA adapter (config.magnitude) this is VeRA's part only: the merged weight is not W + delta
    but m * (W + delta) / ||W + delta|| per output row (`merged_state_dict` applies it).

    Pure: needs only the adapter, since the projections are regenerated from its seed (or, for a
    non-default projection_kind, carried by the adapter with scale 1). Each kind's class gives the fan-in
    of s and the weight layout: Conv1D's transpose, a convolution's kernel (C_out, C_in/groups, *kernel),
    an embedding's table (V, D) with its padding row zero (docs/format.md, "Layer kinds").
    """
    cfg = adapter.config
    shared = adapter.projection
    if shared is None and cfg.projection_sharing == "shared":
        shared = Projection(
            cfg.seed, cfg.distribution, cfg.r,
            max(v[1] for v in adapter.modules.values()), max(v[0] for v in adapter.modules.values()),
        )
    out = {}
    for name, (d_out, d_in, kind) in adapter.modules.items():
        proj = shared or Projection(cfg.seed, cfg.distribution, cfg.r, d_in, d_out, matrix_ids("unique", name))
        A, B = proj.A[: cfg.r, :d_in], proj.B[:d_out, : cfg.r]
        cls = layer_class(kind, d_out, d_in)
        scale = proj.scale(cls.fan_in(kind, d_in), cfg.r)
        delta = vera_delta(A, B, adapter.d[name], adapter.b[name], scale)  # (d_out, d_in)
        out[name] = cls.weight_delta(delta, kind)
    return out


def merged_state_dict(state_dict: dict[str, torch.Tensor], adapter: Adapter, prefix: str = "") -> dict[str, torch.Tensor]:
    """A new state dict with the adapter merged: `W + delta` per adapted module, saved modules replaced.
    A DVoRA adapter (config.magnitude) merges `m * (W + delta) / ||W + delta||` per output row.

    `prefix` is prepended to the adapter's module names to find keys (e.g. "" or "model.").
    Raises AdapterError when a key is missing or a shape differs.
    """
    out = dict(state_dict)
    for name, delta in adapter_deltas(adapter).items():
        key = f"{prefix}{name}.weight"
        if key not in out:
            raise AdapterError(f"{adapter.path}: state dict has no weight {key!r} for adapted module {name!r}")
        w = out[key]
        if tuple(w.shape) != tuple(delta.shape):
            raise AdapterError(f"{adapter.path}: weight {key!r} has shape {tuple(w.shape)}, adapter expects {tuple(delta.shape)}")
        tied = [k for k, t in state_dict.items() if k != key and t.data_ptr() == w.data_ptr() and w.numel()]
        if tied:  # e.g. an embedding table that is also the output head: one of the two keys would win on load
            raise AdapterError(f"{adapter.path}: weight {key!r} is shared with {tied[:3]}; merging would change "
                               "those too, so a tied weight is not merged")
        merged = w.float() + delta
        if adapter.config.magnitude:  # DVoRA: W' = m * (W + delta) / ||W + delta|| per output row
            _rescale(merged, w, adapter.modules[name][2], adapter.m[name].float())
        out[key] = merged.to(w.dtype)
    for key, t in adapter.saved.items():
        out[f"{prefix}{key}"] = t.clone()
    return out


def _rescale(merged: torch.Tensor, w: torch.Tensor, kind: str, m: torch.Tensor) -> None:
    """DVoRA, in place: `merged` (W + delta in the weight's layout, float32) times m / ||W + delta|| per output
    row of the module's linear view, as its live layer merges it (docs/dvora.md has the norm of each kind)."""
    is_embedding, pad = parse_embedding_kind(kind)
    if is_embedding:  # (V, D): the norm of each column over the vocabulary; the padding row stays W's
        merged.mul_(m / table_norms(merged, None, None).clamp_min(torch.finfo(torch.float32).tiny))
        if pad is not None:
            merged[pad] = w[pad].float()
        return
    # Conv1D stores (d_in, d_out); a convolution's kernel is (C_out, C_in/groups, *kernel)
    rows = merged.t() if kind == "conv1d" else merged.view(merged.shape[0], -1)  # (d_out, d_in) view
    rows.mul_(magnitude_scale(rows, None, m).unsqueeze(1))


def export_merged(model: nn.Module, out_dir: str | os.PathLike[str], tokenizer: Any = None) -> Path:
    """Write a standard `save_pretrained` directory of the merged model, loadable without verakit.

    `tokenizer` (a tokenizer or processor, anything with `save_pretrained`) is saved into the same
    directory, so `pipeline(..., model=out_dir)` finds it. The directory appears atomically (built beside
    it, then renamed); an existing non-empty directory is refused. The live model is left merged or
    unmerged as it was.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder: export_merged writes a folder and keeps the file")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    state = vera_state(model)
    was_merged = {n: layer.merged for n, layer in state.layers.items()}
    merge(model)
    try:
        sd = {}
        renames = {f"{n}.base.": f"{n}." for n in state.layers}
        for k, v in model.state_dict().items():
            if k.endswith((".vera_d", ".vera_b", ".vera_m")):
                continue
            for old, new in renames.items():
                if k.startswith(old):
                    k = new + k[len(old) :]
                    break
            sd[k] = v
        with new_dir(out) as tmp, _quiet_transformers():
            model.save_pretrained(tmp, state_dict=sd)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    finally:
        for n, layer in state.layers.items():
            if not was_merged[n]:
                layer.unmerge()
    return out


def merge_pretrained(
    model_dir: str | None, adapter_path: str | os.PathLike[str], out_dir: str | os.PathLike[str],
    check_base: bool = True,
) -> Path:
    """Merge the adapter into its base model and write a folder transformers loads as is.

    `model_dir`: a folder, hub id or alias (`minilm`, `smollm2`); None: the base model the adapter
    records (`base_model_for`). The folder holds the merged weights, the trained modules to save (e.g.
    pooler and classifier), `id2label`/`label2id` from the labels recorded at training, and the base
    model's tokenizer (or image processor). Raises AdapterError when the base model lacks weights the
    adapter does not supply (the merged model would hold random ones), FileNotFoundError when the base
    folder has no tokenizer or processor files, BaseMismatchError when the base weights differ from the
    samples the adapter recorded (another checkpoint of the same architecture); `check_base=False` skips that
    comparison (names and shapes are still checked).
    """
    import transformers

    adapter = read_adapter(adapter_path)
    path = base_model_for(adapter, model_dir)
    arch = adapter.architecture
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise AdapterError(f"{adapter.path}: unknown model architecture {arch!r}; load the model yourself, "
                           "call load_adapter, then export_merged")
    local = Path(path).expanduser()
    if local.is_dir() and not any((local / f).is_file() for f in _PREPROCESSOR_FILES):
        raise FileNotFoundError(f"{path}: the base model folder has no tokenizer or processor files "
                                f"({', '.join(_PREPROCESSOR_FILES[:3])}, ...), so the merged folder would not "
                                "tokenize; pass the folder the base model was downloaded to")
    with _quiet_transformers():
        # The report would list the head as MISSING (newly initialized): the adapter supplies it, checked below.
        # A base head of another label count (a 2-label folder under a regression adapter) is left fresh, not a
        # size-mismatch error: its tensors count as missing, so the check below wants the adapter's own head.
        head = _head_config(adapter)
        model, loading = cls.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=bool(head), **head)
        tokenizer = transformers.AutoProcessor.from_pretrained(path)
    fresh = {*loading["missing_keys"], *(m[0] for m in loading.get("mismatched_keys") or ())}
    unsupplied = sorted(k for k in fresh if k not in adapter.saved)
    if unsupplied:
        raise AdapterError(f"{adapter.path}: the base model {path} lacks {', '.join(unsupplied[:5])}, which the "
                           "adapter does not supply either; the merged model would hold random weights there")
    load_adapter(model, adapter, check_base=check_base)
    record = prompt_record(adapter.extra)
    if arch.endswith("ForCausalLM") and record:
        # How the adapter's prompts were written, so `verakit generate --model OUT` and `verakit serve` prompt
        # the merged model alone as the adapter was trained (prompting.recorded_prompt_info).
        setattr(model.config, PROMPT_CONFIG_KEY, record)
    return export_merged(model, out_dir, tokenizer)


def base_model_for(adapter: Adapter, model: str | None = None) -> str:
    """What `from_pretrained` should load for `adapter`: `model` (folder, hub id, `minilm`, `smollm2`),
    else the base model recorded in the adapter's run info ("model"), where None means verakit's
    default for the architecture (MiniLM for a sequence classifier, SmolLM2-135M for a causal LM).

    Resolved offline where possible (`verakit.models.resolve_model` / `locate_model`).
    """
    from .models import locate_model, resolve_model

    name = model if model is not None else adapter.extra.get("model")
    arch = adapter.architecture or ""
    kind = ("causal-lm" if arch.endswith(("ForCausalLM", "LMHeadModel"))
            else "classifier" if arch.endswith("ForSequenceClassification") else None)
    if kind is None:
        if name is None:
            raise AdapterError(f"{adapter.path}: a {arch or 'model of unknown architecture'} adapter records no base "
                               "model and has no default; pass the base model (--model)")
        return locate_model(name)
    try:
        return resolve_model(name, kind)
    except ValueError as e:  # an alias of the other kind: smollm2 for a classifier
        raise AdapterError(f"{adapter.path}: a {arch} adapter does not merge into model {name!r}: {e}") from None


def _head_config(adapter: Adapter) -> dict[str, Any]:
    """`from_pretrained` overrides that give a classifier the head and label names recorded at training."""
    if "Classification" not in (adapter.architecture or ""):
        return {}
    labels = adapter.extra.get("labels")
    regression = bool(adapter.extra.get("is_regression"))
    if not labels and regression:
        labels = ["score"]  # the training recipes' name for the one regression output
    if not labels:
        return {}
    out: dict[str, Any] = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                           "label2id": {n: i for i, n in enumerate(labels)}}
    if regression:
        out["problem_type"] = "regression"  # so pipeline() reports the raw score, not a sigmoid of it
    return out


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars off for the block, then as they were."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()

"""Attach VeRA to any PyTorch / transformers model, and detach it again.

`attach` replaces each target leaf with its wrapper (`VeraLinear` for linear layers, `VeraConv` for
torch's convolutions, `VeraEmbedding` for embeddings; `layer_class` finds one by a file's kind string), all
sharing one `Projection` per model, freezes everything except d, b (DVoRA: and m) and the modules to
save, samples the base weights (`fingerprint`), and records what it did in a `VeraState` kept on the
model, so that `detach` can restore the original modules and flags bit for bit. Linear leaves are targets by name or "all-linear", convolutions by name or "all-conv",
embeddings by name only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from . import recompute
from .config import DEFAULT_TARGETS, TARGET_KEYWORDS, VeraConfig
from .fingerprint import BaseSamples, sample_layers
from .layer import VeraLinear, is_conv_leaf, is_embedding_leaf, is_linear_leaf, linear_shape, share_inputs
from .layer_conv import VeraConv
from .layer_embedding import VeraEmbedding
from .projection import MAX_PROJECTION_ELEMENTS, Projection, matrix_ids

__all__ = [
    "head_hidden_layers", "AttachError", "VeraState", "attach", "detach", "vera_state", "vera_layers",
    "trainable_parameters", "find_targets", "set_compute_dtype", "set_input_recompute", "COMPUTE_DTYPES",
    "AdaptedLayer", "LAYER_CLASSES", "layer_class",
]

AdaptedLayer = VeraLinear | VeraConv | VeraEmbedding
# Each class owns its kind strings ("linear"/"conv1d", "conv:3x3", "embedding[:pad=i]"): docs/format.md.
LAYER_CLASSES: tuple[type[AdaptedLayer], ...] = (VeraLinear, VeraConv, VeraEmbedding)


def layer_class(kind: str, d_out: int, d_in: int) -> type[AdaptedLayer]:
    """The wrapper class of a file's module kind; ValueError naming the fault for an unknown or
    inconsistent kind (e.g. a kernel whose positions do not divide d_in)."""
    for cls in LAYER_CLASSES:
        err = cls.kind_error(kind, d_out, d_in)
        if err is None:
            return cls
        if err:  # the class owns the kind and says what is wrong with it
            raise ValueError(err)
    raise ValueError(f"unknown module kind {kind!r}")

_STATE_ATTR = "verakit_state"

# Heads that a task-specific model adds on top of the base; trained in full and saved with the adapter.
# BERT's pooler counts as head: it is task-specific in RoBERTa's classifier, and untrained in sentence
# encoders such as all-MiniLM-L6-v2.
_HEADS_BY_TASK: dict[str, tuple[str, ...]] = {
    "ForSequenceClassification": ("classifier", "score", "pre_classifier", "pooler"),
    "ForImageClassification": ("classifier",),
    "ForTokenClassification": ("classifier",),
}


class AttachError(ValueError):
    """attach/detach cannot proceed; the message names the model part at fault."""


@dataclass
class VeraState:
    """What `attach` did to a model. Kept on the model as the attribute `verakit_state`."""

    config: VeraConfig  # resolved: target_modules and modules_to_save as actually used
    layers: dict[str, AdaptedLayer]  # module name -> wrapper, in model order
    saved_modules: tuple[str, ...]  # full names of modules trained in full and saved with the adapter
    model_type: str | None
    architecture: str
    projection: Projection | None  # None when projections are unique per layer
    original_requires_grad: dict[str, bool] = field(repr=False, default_factory=dict)
    original_saved: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    # The base weights' samples (`fingerprint`) at attach: what a file records where save cannot read them
    base_samples: BaseSamples | None = field(repr=False, default=None)


def vera_state(model: nn.Module) -> VeraState:
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise AttachError(f"{type(model).__name__} has no VeRA attached; call verakit.attach(model, config) first")
    return state


def vera_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    return vera_state(model).layers


def _model_type(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


def _adaptable_leaves(model: nn.Module) -> dict[str, nn.Module]:
    """Linear, convolution and embedding leaves, in model order."""
    return {name: m for name, m in model.named_modules()
            if name and (is_linear_leaf(m) or is_conv_leaf(m) or is_embedding_leaf(m))}


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _resolve_saved(model: nn.Module, config: VeraConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(patterns, full module names) of modules_to_save, including the task head of the model class.

    A head module that contains an explicitly named target (e.g. "pooler.dense" in BERT's pooler) is not
    saved whole: VeRA adapts that layer, and only the head's other parameter-holding parts are saved
    (BERT: nothing of the pooler, the classifier whole; RoBERTa: classifier.out_proj).
    """
    patterns = list(config.modules_to_save)
    cls = type(model).__name__
    modules = dict(model.named_modules())
    names = {n for n in modules if n}
    explicit = _explicitly_targeted(names, config.target_modules)
    for suffix, heads in _HEADS_BY_TASK.items():
        if cls.endswith(suffix):
            for h in heads:
                found = sorted(n for n in names if _matches(n, (h,)))
                for n in found:
                    if n in explicit:
                        parts: list[str] = []  # the head is one adapted linear layer (DistilBERT's pre_classifier)
                    elif any(t.startswith(n + ".") for t in explicit):
                        parts = _untargeted_parts(n, modules, explicit)
                    else:
                        parts = [n]
                    for part in parts:
                        pattern = h + part[len(n):]  # keep the head's short name: "classifier.out_proj"
                        if pattern not in patterns:
                            patterns.append(pattern)
    full = tuple(n for n in names if _matches(n, tuple(patterns)))
    missing = [p for p in config.modules_to_save if not any(_matches(n, (p,)) for n in names)]
    if missing:
        raise AttachError(f"modules_to_save {missing} match no module of {cls}")
    # Keep only outermost matches: a saved module's children are saved with it.
    full = tuple(sorted(n for n in full if not any(n.startswith(o + ".") for o in full if o != n)))
    return tuple(patterns), full


def head_hidden_layers(model: nn.Module) -> tuple[str, ...]:
    """Target patterns for the hidden linear layers of the model's task head, the output layer excepted.

    BERT: ("pooler.dense",); RoBERTa: ("classifier.dense",); DistilBERT: ("pre_classifier",); () for a head
    that is one linear layer. Adding them to `target_modules` gives the head VeRA vectors instead of full
    training: only the output layer is then saved in full (docs/training.md, "Classification heads").
    """
    cls = type(model).__name__
    heads = next((h for suffix, h in _HEADS_BY_TASK.items() if cls.endswith(suffix)), ())
    found: list[str] = []
    for name, m in model.named_modules():
        if not is_linear_leaf(m):
            continue
        for h in heads:
            owner = next((o for o, _ in model.named_modules() if o and (o == h or o.endswith("." + h))
                          and (name == o or name.startswith(o + "."))), None)
            if owner is not None:
                found.append(h + name[len(owner):])
                break
    return tuple(found[:-1])  # the last linear leaf of the head in model order is its output layer


def _explicitly_targeted(names: set[str], tm: tuple[str, ...] | str | None) -> set[str]:
    """Module names that `target_modules` names explicitly (tuple patterns or a regex; not None or a keyword)."""
    if tm is None or tm in TARGET_KEYWORDS:
        return set()
    if isinstance(tm, str):
        return {n for n in names if re.fullmatch(tm, n)}
    return {n for n in names if _matches(n, tm)}


def _untargeted_parts(head: str, modules: dict[str, nn.Module], targets: set[str]) -> list[str]:
    """The outermost submodules of `head` that hold parameters and contain no target, in model order."""
    out: list[str] = []
    for n, m in modules.items():
        if not n.startswith(head + ".") or any(n.startswith(o + ".") for o in out):
            continue
        inside = n in targets or any(t.startswith(n + ".") for t in targets)
        if not inside and any(True for _ in m.parameters()):
            out.append(n)
    return out


def find_targets(model: nn.Module, config: VeraConfig, saved: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """The leaves of `model` that `config.target_modules` selects, in model order: linear leaves by name or
    "all-linear", torch's convolutions by name or "all-conv", embeddings by name."""
    leaves = _adaptable_leaves(model)
    tm = config.target_modules
    if tm is None:
        mt = _model_type(model)
        if mt not in DEFAULT_TARGETS:
            raise AttachError(
                f"no default target_modules for model_type {mt!r}; pass target_modules explicitly. "
                f"Linear leaves: {_short_names(leaves)}"
            )
        tm = DEFAULT_TARGETS[mt]
    in_saved = {n for n in leaves if any(n == s or n.startswith(s + ".") for s in saved)}
    if tm == "all-linear":
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        picked = {n: m for n, m in leaves.items() if n not in in_saved and m is not out_emb and is_linear_leaf(m)}
    elif tm == "all-conv":
        picked = {n: m for n, m in leaves.items() if n not in in_saved and is_conv_leaf(m)}
    elif isinstance(tm, str):
        picked = {n: m for n, m in leaves.items() if re.fullmatch(tm, n)}
    else:
        picked = {n: m for n, m in leaves.items() if _matches(n, tm)}
    overlap = sorted(set(picked) & in_saved)
    if overlap:
        raise AttachError(f"modules {overlap[:3]} are both VeRA targets and inside modules_to_save")
    if not picked:
        what = "convolution (nn.Conv1d/2d/3d)" if tm == "all-conv" else "linear layer (or named convolution or embedding)"
        raise AttachError(
            f"target_modules {tm!r} matched no {what} of {type(model).__name__}. "
            f"Adaptable leaves: {_short_names(leaves)}"
        )
    bad = [n for n, m in picked.items() if is_embedding_leaf(m) and m.max_norm is not None]
    if bad:
        raise AttachError(f"embedding {bad[0]!r} has max_norm={picked[bad[0]].max_norm}, which renormalizes rows in "
                          "place on lookup; VeRA adapts embeddings without max_norm only")
    return picked


def _short_names(leaves: dict[str, nn.Module]) -> list[str]:
    # Leaf names without layer indices, so the list stays readable for a 30-layer model.
    return sorted({re.sub(r"\.\d+\.", ".N.", n) for n in leaves})


def attach(model: nn.Module, config: VeraConfig, *, projection: Projection | None = None) -> nn.Module:
    """Attach VeRA in place and return `model`. Freezes all but d, b and the modules to save.

    `projection`: a prebuilt shared pair whose `kind` equals `config.projection_kind`; required for
    "explicit" (the tables come from a file), optional otherwise (by default the pair is generated
    from the seed at the largest target shapes, which is also how PEFT sizes its pair).
    """
    if getattr(model, _STATE_ATTR, None) is not None:
        raise AttachError(f"{type(model).__name__} already has VeRA attached; detach(model) first")
    if any(isinstance(m, VeraLinear) for m in model.modules()):
        raise AttachError(f"{type(model).__name__} already contains VeraLinear layers")
    patterns, saved = _resolve_saved(model, config)
    targets = find_targets(model, config, saved)
    tied = _tied_names(model)
    resolved_tm = config.target_modules
    if resolved_tm is None:
        resolved_tm = DEFAULT_TARGETS[_model_type(model)]  # type: ignore[index]
    resolved = config.replace(target_modules=resolved_tm, modules_to_save=patterns)

    shared = _shared_projection(config, targets, projection)

    original_rg = {n: p.requires_grad for n, p in model.named_parameters()}
    layers: dict[str, AdaptedLayer] = {}
    for name, base in targets.items():
        proj = shared
        if proj is None:
            d_out, d_in = linear_shape(base)
            proj = Projection(config.seed, config.distribution, config.r, d_in, d_out, matrix_ids("unique", name))
        cls = VeraConv if is_conv_leaf(base) else VeraEmbedding if is_embedding_leaf(base) else VeraLinear
        layer = cls(base, proj, config.r, config.d_initial, config.dropout, config.train_d, config.train_b,
                    magnitude=config.magnitude)
        if isinstance(layer, VeraEmbedding):
            layer.tied = tuple(n for n in tied.get(id(base.weight), ()) if n != f"{name}.weight")
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, layer)
        layers[name] = layer
    # Siblings reading one input (q, k, v) compute A x once on the factored path.
    share_inputs({n: ly for n, ly in layers.items() if isinstance(ly, VeraLinear)})

    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        layer.vera_d.requires_grad_(config.train_d)
        layer.vera_b.requires_grad_(config.train_b)
        if getattr(layer, "vera_m", None) is not None:
            layer.vera_m.requires_grad_(True)  # DVoRA's magnitude is always trained
    original_saved: dict[str, torch.Tensor] = {}
    for s in saved:
        for pn, p in model.get_submodule(s).named_parameters():
            original_saved[f"{s}.{pn}"] = p.detach().clone()
            p.requires_grad_(True)

    state = VeraState(
        config=resolved,
        layers=layers,
        saved_modules=saved,
        model_type=_model_type(model),
        architecture=type(model).__name__,
        projection=shared,
        original_requires_grad=original_rg,
        original_saved=original_saved,
        base_samples=sample_layers(layers),
    )
    setattr(model, _STATE_ATTR, state)
    recompute.enable(model)  # adapted layers fed by a norm keep the norm's input, not their own x
    return model


def _shared_projection(
    config: VeraConfig, targets: dict[str, nn.Module], given: Projection | None
) -> Projection | None:
    """The model's one shared pair: `given` after checks, or generated per config.projection_kind."""
    max_out = max(linear_shape(m)[0] for m in targets.values())
    max_in = max(linear_shape(m)[1] for m in targets.values())
    emb = [n for n, m in targets.items() if is_embedding_leaf(m)]
    if emb and config.r * (max_in + max_out) > MAX_PROJECTION_ELEMENTS:
        raise AttachError(
            f"embedding {emb[0]!r} needs projection tables of r * (max_in + max_out) = {config.r} * "
            f"({max_in} + {max_out}) elements, above verakit.projection.MAX_PROJECTION_ELEMENTS "
            f"({MAX_PROJECTION_ELEMENTS:,}); lower r"
        )
    if given is not None:
        if config.projection_sharing != "shared":
            raise AttachError("a prebuilt projection needs projection_sharing='shared'")
        if given.kind != config.projection_kind:
            raise AttachError(f"projection kind {given.kind!r} differs from config.projection_kind {config.projection_kind!r}")
        if given.rank < config.r or given.max_in < max_in or given.max_out < max_out:
            raise AttachError(
                f"projection (rank {given.rank}, max_in {given.max_in}, max_out {given.max_out}) is too small "
                f"for r={config.r} and the largest target shape ({max_out}, {max_in})"
            )
        return given
    if config.projection_sharing != "shared":
        return None
    if config.projection_kind == "explicit":
        raise AttachError("projection_kind='explicit' needs the stored tables: attach(model, config, projection=...)")
    if config.projection_kind == "peft-torch":
        return Projection.peft_torch(config.seed, config.r, max_in, max_out)
    return Projection(config.seed, config.distribution, config.r, max_in, max_out)


def _tied_names(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it has in `model` (more than one for tied weights)."""
    out: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(n)
    return out


def detach(model: nn.Module) -> nn.Module:
    """Remove VeRA: restore the original modules, modules_to_save weights and requires_grad flags.

    Bit-identical to the model before `attach` unless it is merged; a merged model is unmerged first,
    which restores base weights up to float rounding (<= 1e-6 in fp32).
    """
    state = vera_state(model)
    for name, layer in state.layers.items():
        layer.unmerge()
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, layer.base)
    with torch.no_grad():
        for key, value in state.original_saved.items():
            model.get_parameter(key).copy_(value)
    for n, p in model.named_parameters():
        p.requires_grad_(state.original_requires_grad.get(n, p.requires_grad))
    recompute.disable(model)
    delattr(model, _STATE_ATTR)
    return model


# Lower dtypes `set_compute_dtype` accepts for the adapter's products (None: the model's own dtype).
COMPUTE_DTYPES = (torch.bfloat16, torch.float16)


def set_compute_dtype(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Compute the adapter's own products of every VeRA layer in `dtype` during training; return `model`.

    Opt-in speed for fp32 models on hardware with fast bf16 (CPUs with avx512_bf16 or AMX, GPUs): with
    torch.bfloat16, training calls form the delta diag(b) B diag(c) A, G = g^T x and Q = G A^T (or, per
    token, A x and B (c A x)) from bf16 operands, while W0 x, dx = g W, the vectors d and b and their
    gradients stay float32 (docs/performance.md, "bf16 adapter products"). No effect on gradient-free
    calls (evaluation, serving), merge and the saved file, nor on a model already in bf16/fp16. A runtime
    setting: never in the state_dict or the adapter file. None restores the exact default.
    """
    if dtype is not None and dtype not in COMPUTE_DTYPES:
        raise ValueError(f"set_compute_dtype: dtype must be None, torch.bfloat16 or torch.float16, got {dtype!r}")
    for layer in vera_layers(model).values():
        layer.compute_dtype = dtype
    return model


def set_input_recompute(model: nn.Module, enabled: bool) -> nn.Module:
    """Whether VeRA layers whose input is a LayerNorm / RMSNorm output recompute it in backward from the
    norm's input (which the norm keeps anyway) instead of keeping it: on by `attach`, exact (the norm
    runs again, deterministically), one norm forward per such input per step. Runtime only. Returns
    `model`. See verakit.recompute and docs/performance.md."""
    vera_state(model)  # raises AttachError on a model without VeRA
    (recompute.enable if enabled else recompute.disable)(model)
    return model


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs training must update: d, b (as configured), DVoRA's m, and modules_to_save."""
    state = vera_state(model)
    keep = {id(layer.vera_d) for layer in state.layers.values() if state.config.train_d}
    keep |= {id(layer.vera_b) for layer in state.layers.values() if state.config.train_b}
    keep |= {id(layer.vera_m) for layer in state.layers.values() if getattr(layer, "vera_m", None) is not None}
    for s in state.saved_modules:
        keep |= {id(p) for p in model.get_submodule(s).parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in keep]

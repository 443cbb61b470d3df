"""Which base model an adapter belongs to: the structural fingerprint, the model's modules and settings
(`model_mismatch`), and samples of the base weights.

The structural fingerprint hashes the model type and the adapted modules' names, shapes and kinds: it
tells architectures apart, not checkpoints. The base-weight samples do: at save, a file records a few
entries of each adapted module's base weight, at positions that depend only on the module's name and
shape (`sample_positions`), SAMPLE_BUDGET entries in all, each stored as the top 24 bits of its float32
(3 KiB of metadata whatever the model); a weight that cannot be read at save (sharded by FSDP, a merged
DVoRA layer) gives the samples `attach` took. At load, `compare` reads the same positions of the model.

Semantics: rel(module) = ||w_model - w_file|| / max(||w_model||, ||w_file||) over the module's samples;
the base matches when rel <= the tolerance for every module. Casts of one checkpoint stay below
FLOAT_TOLERANCE by construction: the stored samples lose under 2^-15 (relative) to truncation, a bf16
cast moves a weight by at most 2^-8 and an fp16 cast by 2^-11, so two casts of one checkpoint differ by
at most 2^-8 + 2^-11 + 2^-15 = 0.00443 (under 0.0045) in every entry (fp16 subnormals aside), whatever
dtypes saved and loaded (measured: at most 0.003, docs/format.md). A quantized base is compared through its
dequantized weight against the looser QUANT_TOLERANCE of its kind: that tells a re-initialised or unrelated
checkpoint (rel near 1.4) from the one quantized, but not a fine-tune of it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import VeraConfig
from .leaves import is_conv1d_leaf, is_conv_leaf, is_embedding_leaf
from .projection import Projection
from .quant import dequantized_weight, quant_kind

__all__ = [
    "SAMPLE_RULE",
    "SAMPLE_BUDGET",
    "FLOAT_TOLERANCE",
    "QUANT_TOLERANCE",
    "BaseSamples",
    "BaseComparison",
    "base_fingerprint",
    "sample_counts",
    "sample_positions",
    "sample_layers",
    "compare",
    "read_samples",
    "model_mismatch",
]

SAMPLE_RULE = "sha256-positions/v1"
# 768 values of 3 bytes are 3,072 base64 characters: MiniLM's file (12 modules) stays within its header
# budget (trained numbers x dtype size + 8 KiB), and every file grows by the same 3 KiB whatever its modules.
SAMPLE_BUDGET = 768
_MAX_BUDGET = 1 << 16  # a reader recomputes one sha256 per sample: bound what a crafted file can ask for
FLOAT_TOLERANCE = 5e-3  # above the 0.0045 bound for casts; below the 1e-2 of 1% noise on the weights
# Pooled dequantization error (rel over all samples of quantized modules), measured on MiniLM and SmolLM2 at
# up to 0.0094 (8-bit) and 0.096 (4-bit nf4), with 2.5x margin (docs/format.md); unrelated weights give 1 to 1.4.
QUANT_TOLERANCE = {"8bit": 0.03, "4bit": 0.25}


def base_fingerprint(model_type: str | None, modules: Mapping[str, tuple[int, int, str]]) -> str:
    """sha256 over the model type and the adapted modules' names, shapes and kinds (16 hex digits)."""
    canon = json.dumps([model_type, sorted([k, *v] for k, v in modules.items())], separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def sample_counts(names: Iterable[str], budget: int = SAMPLE_BUDGET) -> dict[str, int]:
    """Samples per module: `budget` spread evenly, the remainder to the first names in sorted order
    (more modules than samples: one each to the first `budget`)."""
    ordered = sorted(names)
    per, rest = divmod(budget, len(ordered)) if ordered else (0, 0)
    return {n: per + (1 if i < rest else 0) for i, n in enumerate(ordered)}


def sample_positions(name: str, d_out: int, d_in: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: sample t of module `name` is entry (p // d_in, p % d_in) of its (d_out, d_in) weight, where
    p = first 8 bytes (little-endian) of sha256("verakit/samples/<name>/<t>") mod (d_out * d_in).

    Returns (rows (k,), cols (k,)) int64. The (d_out, d_in) layout is the file's: see docs/format.md,
    "Layer kinds" (a Conv1D's or an embedding's weight transposed, a kernel flattened)."""
    flat = [int.from_bytes(hashlib.sha256(f"verakit/samples/{name}/{t}".encode()).digest()[:8], "little")
            % (d_out * d_in) for t in range(k)]
    p = torch.tensor(flat, dtype=torch.int64)
    return p // d_in, p % d_in


def _truncate(v: torch.Tensor) -> list[int]:
    """The top 24 bits of each float32 (sign, exponent, 15 mantissa bits): relative error below 2^-15."""
    return ((v.float().contiguous().view(torch.int32) >> 8) & 0xFFFFFF).tolist()


def _widen(words: list[int]) -> torch.Tensor:
    """Inverse of `_truncate`: 24-bit words back to float32 (low 8 bits zero)."""
    bits = [(w << 8) - (1 << 32) if w >= 1 << 23 else w << 8 for w in words]  # as signed int32
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32)


def _plain(w: torch.Tensor) -> bool:
    """A weight whose entries this process can index: a plain tensor, not a sharded DTensor (FSDP)."""
    return type(w) in (torch.Tensor, nn.Parameter)


def _read_weight(layer: nn.Module, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor | None:
    """The base weight's entries at (rows, cols) of the (d_out, d_in) layout, float32 on the CPU, without
    the delta of a merged layer; None when they cannot be read here (sharded, meta, merged DVoRA, a
    quantized weight bitsandbytes cannot dequantize).

    `layer` is any wrapper with `.base` (VeraLinear/VeraConv/VeraEmbedding, or the serving bank's slot
    layers): the layout follows the base module's class, not the wrapper's."""
    base, merged = layer.base, getattr(layer, "merged", False)
    w = base.weight
    if w.is_meta or (merged and getattr(layer, "vera_m", None) is not None):
        return None
    if quant_kind(base) is not None:  # bitsandbytes' parameter classes: packed, not the layer's layout
        try:
            w = dequantized_weight(base)  # (d_out, d_in)
        except (ValueError, TypeError, RuntimeError):  # e.g. bitsandbytes' CPU inference packing
            return None
    elif not _plain(w):
        return None
    elif is_conv1d_leaf(base) or is_embedding_leaf(base):
        w = w.t()  # Conv1D (d_in, d_out), embedding table (V, D)
    elif is_conv_leaf(base):
        w = w.reshape(w.shape[0], -1)  # im2col order, as the file's d_in
    with torch.no_grad():
        vals = w[rows.to(w.device), cols.to(w.device)].float()
        if merged:  # W0 = W - delta; an embedding's padding row was never changed
            delta = layer.delta_weight()[rows.to(vals.device), cols.to(vals.device)]
            pad = getattr(layer, "padding_idx", None)
            vals = vals - (delta if pad is None else delta.masked_fill(cols.to(vals.device) == pad, 0.0))
    return vals.cpu()


@dataclass(frozen=True)
class BaseSamples:
    """Base-weight samples of an adapter: module -> (k,) float32 values (as stored: `_truncate`d), in order;
    k = sample_counts(all adapted modules, budget)[module] (a module without an entry was not sampled).

    quant: "4bit"/"8bit" when a module sampled at save was quantized (its values are dequantized ones).
    budget: the SAMPLE_BUDGET the writer used (it fixes the counts per module)."""

    values: dict[str, torch.Tensor]
    quant: str | None = None
    budget: int = SAMPLE_BUDGET

    def to_meta(self, modules: Iterable[str]) -> dict[str, Any]:
        """The file's `base.samples` JSON: rule, budget, quant, the modules without samples ("missing") and
        the values as base64 of 3-byte little-endian words (`_truncate`), module after module in the order
        of `modules`."""
        words: list[int] = []
        modules = list(modules)
        for n in modules:
            v = self.values.get(n)
            if v is not None:
                words += _truncate(v)
        data = base64.b64encode(b"".join(w.to_bytes(3, "little") for w in words)).decode("ascii")
        missing = [n for n in modules if n not in self.values]
        return {"rule": SAMPLE_RULE, "budget": self.budget, "quant": self.quant, "missing": missing, "data": data}

    @classmethod
    def from_meta(cls, meta: Any, modules: Mapping[str, tuple[int, int, str]]) -> BaseSamples | None:
        """Parse `base.samples`; None for a rule this verakit does not know (then nothing is compared).
        ValueError/TypeError name the fault of a corrupt entry (the caller names the file)."""
        if not isinstance(meta, dict):
            raise TypeError("base.samples is not a JSON object")
        if meta.get("rule") != SAMPLE_RULE:
            return None
        budget, quant, data, missing = meta["budget"], meta.get("quant"), meta["data"], meta.get("missing", [])
        if not isinstance(missing, list) or not set(missing) <= set(modules):
            raise ValueError("base.samples: 'missing' must list adapted modules")
        if not isinstance(budget, int) or not 0 <= budget <= _MAX_BUDGET or quant not in (None, *QUANT_TOLERANCE):
            raise ValueError(f"base.samples: budget {budget!r} or quant {quant!r} is invalid")
        raw = base64.b64decode(data.encode("ascii"), validate=True)
        counts = {n: k for n, k in sample_counts(modules, budget).items() if n not in missing}
        if len(raw) != 3 * sum(counts.values()):
            raise ValueError(f"base.samples holds {len(raw)} bytes, expected {3 * sum(counts.values())} for "
                             f"budget {budget} over {len(counts)} modules")
        flat = _widen([int.from_bytes(raw[i : i + 3], "little") for i in range(0, len(raw), 3)])
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("base.samples contains NaN or Inf")
        values, at = {}, 0
        for n in (n for n in modules if n in counts):
            values[n], at = flat[at : at + counts[n]].clone(), at + counts[n]
        return cls(values, quant, budget)


def sample_layers(layers: Mapping[str, nn.Module], earlier: BaseSamples | None = None) -> BaseSamples:
    """Read the samples of every adapted layer (`VeraState.layers`, or any wrappers with `.base`,
    `.out_features`, `.in_features`) from its base weight. A module whose weight cannot be read here
    (sharded by FSDP, on the meta device, a merged DVoRA layer) takes its entry from `earlier` (what
    `attach` sampled), else gets none and is not compared."""
    counts = sample_counts(layers)
    values, quant = {}, earlier.quant if earlier is not None else None
    for n, layer in layers.items():
        rows, cols = sample_positions(n, layer.out_features, layer.in_features, counts[n])
        vals = _read_weight(layer, rows, cols)
        if vals is not None:
            values[n] = _widen(_truncate(vals))  # as the file will hold them
            quant = quant or quant_kind(layer.base)
        elif earlier is not None and n in earlier.values and earlier.values[n].numel() == counts[n]:
            values[n] = earlier.values[n]
    return BaseSamples(values, quant)


@dataclass(frozen=True)
class BaseComparison:
    """The model's base weights against a file's samples: rel (module docstring) per module, and pooled
    over the modules compared through a quantized weight (on either side), one figure per kind."""

    relative: dict[str, float]  # every compared module
    pooled: dict[str, float]  # "4bit"/"8bit" -> rel over all samples of the modules judged by that kind
    overall: float  # rel over all compared samples together
    samples: int  # how many were compared
    unchecked: tuple[str, ...]  # modules with samples whose weights could not be read here
    quantized: frozenset[str] = frozenset()  # modules judged in `pooled`, not one by one

    @property
    def failed(self) -> list[tuple[str, float, float]]:
        """(module or "<kind>-quantized modules", rel, tolerance) over tolerance (NaN counts), worst first."""
        bad = [(n, r, FLOAT_TOLERANCE) for n, r in self.relative.items() if n not in self.quantized]
        bad += [(f"{k}-quantized modules", r, QUANT_TOLERANCE[k]) for k, r in self.pooled.items()]
        bad = [b for b in bad if not b[1] <= b[2]]
        return sorted(bad, key=lambda b: -math.inf if math.isnan(b[1]) else -b[1] / b[2])

    def describe(self) -> str:
        """One sentence on the size of the mismatch, for an error message."""
        bad = self.failed
        head = f"relative RMS difference {self.overall:.3g} over {self.samples} samples of the base weights"
        if not bad:
            return head
        name, rel, tol = bad[0]
        return (f"{head}; {len(bad)} of {len(self.relative) - len(self.quantized) + len(self.pooled)} checks over "
                f"tolerance, worst {name!r}: {rel:.3g} (tolerance {tol:.2g}; casts of the same weights to "
                "fp32/bf16/fp16 differ by at most 0.0045)")


def read_samples(name: str, layer: nn.Module, k: int) -> torch.Tensor | None:
    """The `k` samples of module `name`'s base weight (`sample_positions`), float32 on the CPU, unrounded;
    None when they cannot be read here (see `_read_weight`)."""
    return _read_weight(layer, *sample_positions(name, layer.out_features, layer.in_features, k))


def compare(samples: BaseSamples, layers: Mapping[str, nn.Module],
            read: Callable[[str, nn.Module, int], torch.Tensor | None] = read_samples) -> BaseComparison:
    """Compare the adapted layers' base weights with `samples` (positions from `sample_positions`); `layers`
    as for `sample_layers` (the serving bank passes its slot layers, and a `read` that caches what it read:
    its base weights never change).

    A module whose weight is quantized in the model or was when the file was written is judged within
    all such modules pooled (4bit when either side is 4-bit): a few nf4 samples of one module can differ
    by 0.3 while the pool stays near 0.1 (docs/format.md)."""
    rel, unchecked, quantized, total = {}, [], set(), 0
    sums: dict[str, list[float]] = {}  # group -> [sum diff^2, sum |model|^2, sum |file|^2]
    for n, want in samples.values.items():
        layer = layers.get(n)
        got = None if layer is None else read(n, layer, want.numel())
        if got is None:
            unchecked.append(n)
            continue
        diff, nm, nf = float((got - want).norm()), float(got.norm()), float(want.norm())
        rel[n] = diff / max(nm, nf) if max(nm, nf) > 0 else 0.0
        kinds = {samples.quant, quant_kind(layer.base)} - {None}
        group = "4bit" if "4bit" in kinds else kinds.pop() if kinds else "float"
        if group != "float":
            quantized.add(n)
        acc = sums.setdefault(group, [0.0, 0.0, 0.0])
        for j, v in enumerate((diff, nm, nf)):
            acc[j] += v * v
        total += want.numel()

    def pool(acc: list[float]) -> float:
        big = math.sqrt(max(acc[1], acc[2]))
        return math.sqrt(acc[0]) / big if big > 0 else 0.0

    everything = [sum(a[j] for a in sums.values()) for j in range(3)]
    pooled = {g: pool(a) for g, a in sums.items() if g != "float"}
    return BaseComparison(rel, pooled, pool(everything), total, tuple(unchecked), frozenset(quantized))


def model_mismatch(
    model: nn.Module, state: Any, modules: Mapping[str, tuple[int, int, str]], config: VeraConfig,
    projection: Projection | None, saved: Iterable[str],
) -> str | None:
    """The first difference between an adapter (its modules, config, projection, saved tensor names) and the
    VeRA attached to `model` (`state`: its `inject.VeraState`), as a sentence; None when they fit. Base
    weights: `compare`."""
    mine = {n: (ly.out_features, ly.in_features, ly.kind) for n, ly in state.layers.items()}
    for n, shape in modules.items():
        if n not in mine:
            return f"base model mismatch: adapter module {n!r} {shape[:2]} is not adapted in the model"
        if mine[n] != shape:
            return f"base model mismatch: module {n!r} has shape {shape[:2]} in the adapter but {mine[n][:2]} in the model"
    if set(mine) != set(modules):
        return f"base model mismatch: the model adapts {sorted(set(mine) - set(modules))[:3]} which the adapter lacks"
    ours = state.config
    for f in ("r", "seed", "distribution", "projection_sharing", "projection_kind", "magnitude"):
        if getattr(ours, f) != getattr(config, f):
            return f"the model's VeRA has {f}={getattr(ours, f)!r} but the adapter {getattr(config, f)!r}"
    if projection is not None and state.projection is not projection:
        mine_p, used_in, used_out = state.projection, max(v[1] for v in modules.values()), max(v[0] for v in modules.values())
        same = mine_p is not None and torch.equal(mine_p.A[: ours.r, :used_in], projection.A[: ours.r, :used_in])
        if not (same and torch.equal(mine_p.B[:used_out, : ours.r], projection.B[:used_out, : ours.r])):
            return "the model's VeRA projection tables differ from the adapter's"
    model_keys = set()
    for s in state.saved_modules:
        model_keys |= {f"{s}.{k}" for k in model.get_submodule(s).state_dict()}
    if set(saved) != model_keys:
        return f"saved modules differ: adapter has {sorted(saved)[:4]}, model {sorted(model_keys)[:4]}"
    return None

"""PEFT VeRA adapters in and out of verakit, exactly.

Semantics (PEFT, peft/tuners/vera/layer.py): h = W0 x + lambda_b * (vera_B[:d_out, :] (lambda_d * (vera_A[:, :d_in] x)))
with one shared pair vera_A (r, max_in), vera_B (max_out, r) sized by the largest target shapes.
Mapping: our b = lambda_b; our s * d = lambda_d, where s is our per-layer fan-in scale over unit tables
(s = 1 for PEFT's own, already-scaled tables). So an exported adapter's lambda_d differs from our d by s
and the logits match; PEFT has no per-layer scale, no unique-per-layer projections, no train_d/train_b.

Import keeps PEFT's projection: stored tables (save_projection=True) become projection_kind "explicit";
regenerated ones (save_projection=False) become "peft-torch" (PEFT's torch.Generator algorithm, seeded
with projection_prng_key). Export always stores the tables, since PEFT cannot regenerate ours.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import VeraConfig
from ..fileformat import Adapter, adapter_from_model
from ..inject import AttachError, attach, detach, find_targets, vera_layers, vera_state
from ..layer import is_linear_leaf, linear_shape
from ..projection import Projection
from .factors import check_exportable, shared_projection
from .peftdir import MODEL_PREFIX, PeftDir, common_config, load_peft_base, read_peft_dir, write_peft_dir

__all__ = ["from_peft", "to_peft"]

_A_KEY, _B_KEY = "base_model.vera_A", "base_model.vera_B"
_VECTORS = ("vera_lambda_d", "vera_lambda_b")


def from_peft(peft_dir: str | os.PathLike[str], model: nn.Module | str | os.PathLike[str] | None = None) -> Adapter:
    """Import a PEFT VeRA adapter directory as a verakit `Adapter` (save it with `write_adapter`).

    The checkpoint lacks each layer's input width, so the base model is needed: an `nn.Module` (used
    read-only: VeRA is attached and detached again, leaving it bit for bit as it was), a model
    directory, or None for the config's `base_model_name_or_path` when that is a local directory.
    """
    peft = read_peft_dir(peft_dir, "VERA")
    cfg = peft.config
    if cfg.get("bias", "none") != "none":
        raise peft.fail(f"bias={cfg['bias']!r} trains biases, which verakit adapters cannot represent")
    base = _base_model(peft, model)
    if getattr(base, "verakit_state", None) is not None:
        raise peft.fail("the base model already has verakit VeRA attached; pass a plain model")
    vectors = _vectors(peft)
    leaves = {n: m for n, m in base.named_modules() if n}
    for name, vec in vectors.items():
        if name not in leaves or not is_linear_leaf(leaves[name]):
            raise peft.fail(f"module {name!r} of the adapter is not a linear layer of {type(base).__name__}")
        d_out = linear_shape(leaves[name])[0]
        if tuple(vec["vera_lambda_b"].shape) != (d_out,):
            raise peft.fail(
                f"tensor '{MODEL_PREFIX}{name}.vera_lambda_b' has shape {tuple(vec['vera_lambda_b'].shape)}, "
                f"the model's {name} has d_out={d_out}"
            )
    r = int(cfg.get("r", 0))
    bad_d = [n for n, v in vectors.items() if tuple(v["vera_lambda_d"].shape) != (r,)]
    if bad_d:
        shape = tuple(vectors[bad_d[0]]["vera_lambda_d"].shape)
        raise peft.fail(f"tensor '{MODEL_PREFIX}{bad_d[0]}.vera_lambda_d' has shape {shape}, expected ({r},) as r={r}")
    max_in = max(linear_shape(leaves[n])[1] for n in vectors)
    max_out = max(linear_shape(leaves[n])[0] for n in vectors)
    seed = torch.Generator().manual_seed(int(cfg.get("projection_prng_key", 0))).initial_seed()  # canonical >= 0
    projection = _projection(peft, r, seed, max_in, max_out)
    saved_names = _saved_modules(peft, base, set(vectors))
    config = VeraConfig(
        r=r, target_modules=_targets(base, cfg.get("target_modules"), set(vectors), saved_names),
        d_initial=float(cfg.get("d_initial", 0.1)), seed=seed, dropout=float(cfg.get("vera_dropout", 0.0)),
        modules_to_save=saved_names, projection_kind=projection.kind,
    )
    try:
        attach(base, config, projection=projection)
    except AttachError as e:
        raise peft.fail(f"cannot attach to {type(base).__name__}: {e}") from None
    try:
        with torch.no_grad():
            for name, layer in vera_layers(base).items():
                layer.vera_d.copy_(vectors[name]["vera_lambda_d"].float())
                layer.vera_b.copy_(vectors[name]["vera_lambda_b"].float())
            model_sd = {}
            for s in vera_state(base).saved_modules:
                model_sd.update({f"{s}.{k}": t for k, t in base.get_submodule(s).state_dict().items()})
            for key, t in _saved_tensors(peft, set(vectors)).items():
                if key not in model_sd:
                    raise peft.fail(f"unexpected tensor '{MODEL_PREFIX}{key}': not a parameter of a module to save")
                if model_sd[key].shape != t.shape:
                    raise peft.fail(f"tensor '{MODEL_PREFIX}{key}' has shape {tuple(t.shape)}, the model's is {tuple(model_sd[key].shape)}")
                model_sd[key].copy_(t)
        extra = {"imported_from": "peft-vera", "peft_version": cfg.get("peft_version")}
        return adapter_from_model(base, extra)
    finally:
        detach(base)


def to_peft(adapter: Adapter, out_dir: str | os.PathLike[str], base_model_name_or_path: str | None = None) -> Path:
    """Write `adapter` as a PEFT VeRA directory (`PeftModel.from_pretrained` loads it); returns the path.

    The shared tables are stored (save_projection=True) and sliced to the largest module shapes, as PEFT
    sizes its own pair; lambda_d = s * d folds our per-layer scale in. Unique per-layer projections are
    refused (PEFT VeRA has one pair per model); use `to_lora` for those.
    """
    check_exportable(adapter, "PEFT VeRA")
    cfg = adapter.config
    proj = shared_projection(adapter)
    max_in = max(v[1] for v in adapter.modules.values())
    max_out = max(v[0] for v in adapter.modules.values())
    tensors: dict[str, torch.Tensor] = {
        _A_KEY: proj.A[: cfg.r, :max_in].float().contiguous(),  # (r, max_in)
        _B_KEY: proj.B[:max_out, : cfg.r].float().contiguous(),  # (max_out, r)
    }
    for name, (_, d_in, _) in adapter.modules.items():
        tensors[f"{MODEL_PREFIX}{name}.vera_lambda_d"] = adapter.d[name].float() * proj.scale(d_in, cfg.r)
        tensors[f"{MODEL_PREFIX}{name}.vera_lambda_b"] = adapter.b[name].float().clone()
    for key, t in adapter.saved.items():
        tensors[f"{MODEL_PREFIX}{key}"] = t.clone()
    peft_cfg = {
        **common_config(adapter, base_model_name_or_path),
        "peft_type": "VERA",
        "init_weights": True,
        "r": cfg.r,
        # The key only matters if PEFT must regenerate the pair; it never does here (the tables are saved).
        "projection_prng_key": cfg.seed if cfg.projection_kind == "peft-torch" else 0,
        "save_projection": True,
        "vera_dropout": cfg.dropout,
        "d_initial": cfg.d_initial,
    }
    return write_peft_dir(out_dir, peft_cfg, tensors)


def _base_model(peft: PeftDir, model: nn.Module | str | os.PathLike[str] | None) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if model is None:
        named = peft.config.get("base_model_name_or_path")
        if not named or not Path(named).is_dir():
            raise peft.fail(
                f"the base model is needed for the layers' input widths, and base_model_name_or_path={named!r} "
                "is not a local directory; pass the model (CLI: --model DIR)"
            )
        model = named
    return load_peft_base(model, peft)


def _vectors(peft: PeftDir) -> dict[str, dict[str, torch.Tensor]]:
    vectors = peft.module_tensors(_VECTORS)
    if not vectors:
        raise peft.fail("missing tensors: no '*.vera_lambda_d' / '*.vera_lambda_b' in the adapter weights")
    for name, vec in vectors.items():
        for part in _VECTORS:
            if part not in vec:
                raise peft.fail(f"missing tensor '{MODEL_PREFIX}{name}.{part}'")
    return vectors


def _projection(peft: PeftDir, r: int, seed: int, max_in: int, max_out: int) -> Projection:
    """PEFT's shared pair: the stored tables, or PEFT's generator at PEFT's max shapes."""
    if not peft.config.get("save_projection", True):
        # PEFT ignores stored tables in this case and regenerates (with a warning); so do we.
        return Projection.peft_torch(seed, r, max_in, max_out)
    for key in (_A_KEY, _B_KEY):
        if key not in peft.tensors:
            raise peft.fail(f"save_projection is true but tensor {key!r} is missing")
    A, B = peft.tensors[_A_KEY].float(), peft.tensors[_B_KEY].float()
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r or A.shape[1] < max_in or B.shape[0] < max_out:
        raise peft.fail(
            f"{_A_KEY} {tuple(A.shape)} / {_B_KEY} {tuple(B.shape)} do not fit r={r} and the largest "
            f"adapted layer (d_out {max_out}, d_in {max_in})"
        )
    return Projection.from_tables(A, B, kind="explicit", seed=seed)


def _saved_tensors(peft: PeftDir, adapted: set[str]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of fully trained modules, by model state-dict key; stray keys are refused."""
    out = {}
    for key, t in peft.tensors.items():
        if key in (_A_KEY, _B_KEY):
            continue
        if not key.startswith(MODEL_PREFIX):
            raise peft.fail(f"unexpected tensor {key!r} (not under {MODEL_PREFIX!r})")
        inner = key[len(MODEL_PREFIX) :]
        module, _, leaf = inner.rpartition(".")
        if leaf in _VECTORS and module in adapted:
            continue
        out[inner] = t
    return out


def _saved_modules(peft: PeftDir, model: nn.Module, adapted: set[str]) -> tuple[str, ...]:
    """Full names of the modules PEFT saved in full: matched by its modules_to_save (PEFT: name.endswith)."""
    keys = set(_saved_tensors(peft, adapted))
    if not keys:
        return ()
    patterns = peft.config.get("modules_to_save") or []
    found = []
    for name, module in model.named_modules():
        sd = module.state_dict()
        if name and sd and any(name.endswith(p) for p in patterns) and all(f"{name}.{k}" in keys for k in sd):
            found.append(name)
    # Outermost only, like attach: a saved module's children are saved with it.
    return tuple(sorted(n for n in found if not any(n.startswith(o + ".") for o in found)))


def _targets(
    model: nn.Module, peft_targets: Any, adapted: set[str], saved: tuple[str, ...]
) -> tuple[str, ...] | str:
    """PEFT's own target_modules when they select exactly the adapted modules here, else the full names."""
    if isinstance(peft_targets, (list, str)) and peft_targets:
        candidate = tuple(sorted(peft_targets)) if isinstance(peft_targets, list) else peft_targets
        try:
            picked = find_targets(model, VeraConfig(r=1, target_modules=candidate), saved)
        except ValueError:
            picked = {}
        if set(picked) == adapted:
            return candidate
    return tuple(sorted(adapted))

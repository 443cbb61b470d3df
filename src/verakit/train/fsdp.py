"""Fully sharded training (torch FSDP2, `fully_shard`) for the loop, under `accelerate launch --use_fsdp`.

Semantics: after `shard`, every parameter (frozen base and trained vectors alike) is a DTensor holding
1/world of its rows on each rank; a wrapped unit (a transformer block, then the root) all-gathers its
parameters for its forward and backward and frees them after, and gradients are reduce-scattered with
an average, as DDP all-reduces them. The VeRA projections are plain attributes of each layer
(`Projection`, never a parameter or buffer), so FSDP neither shards nor sends them: every rank
regenerates them from the seed.

Why verakit shards a CPU run itself: accelerate 1.16 chooses FSDP only for accelerator devices (in
`AcceleratorState`, the `ACCELERATE_USE_FSDP` check sits in the MULTI_GPU/MULTI_XPU/... branch), so a
multi-process CPU launch with `--use_fsdp` becomes MULTI_CPU and would quietly run DDP. torch's
`fully_shard` runs on CPU with gloo, so on CPU we apply it with accelerate's own reading of the FSDP
flags (version, wrap policy, reshard after forward); on GPUs `accelerator.prepare` does it, with every
flag (mixed precision, offload, activation checkpointing).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import recompute

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = [
    "requested", "active", "shard", "rebind", "full_trainables", "full_value", "put_full", "optimizer_state",
    "load_optimizer_state", "shard_stats", "stats_line",
]


def requested() -> bool:
    """True under `accelerate launch --use_fsdp` (or a config file with `distributed_type: FSDP`)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def active(acc: Accelerator) -> bool:
    """FSDP requested and something to shard over: several processes, or accelerate's own FSDP state
    (one GPU process under --use_fsdp, which accelerate insists on preparing itself)."""
    from accelerate.utils import DistributedType

    return requested() and (acc.num_processes > 1 or acc.distributed_type == DistributedType.FSDP)


def shard(acc: Accelerator, model: nn.Module) -> nn.Module:
    """`model` sharded with FSDP2 over all ranks, following accelerate's FSDP flags; in place on CPU."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise ValueError(f"FSDP2 training needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is torch "
                         f"{torch.__version__}: upgrade torch, or train with DDP") from None

    on_accelerator = acc.distributed_type == DistributedType.FSDP
    plugin = acc.state.fsdp_plugin if on_accelerator else FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ValueError(
            f"FSDP version {plugin.fsdp_version} requested (accelerate's --fsdp_version / FSDP_VERSION, default 1): "
            "verakit trains under FSDP2 only; pass --fsdp_version 2 (fsdp_version: 2 in a config file)"
        )
    # Input recompute re-runs the norm that fed a layer during its backward; that norm often belongs to the
    # previous FSDP unit (the last LayerNorm of the block before), whose weights are gathered for that
    # moment only if FSDP happened to prefetch them. Left on, the tiny BERT still trained identically;
    # it saves memory the norm keeps anyway, so it is turned off rather than left to prefetch order.
    recompute.disable(model)
    if on_accelerator:
        return acc.prepare(model)
    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)  # None for NO_WRAP: one unit, the root
    kwargs = {"reshard_after_forward": plugin.reshard_after_forward}
    if policy is not None:
        for module in reversed(list(model.modules())[1:]):  # children before their parents, as FSDP2 asks
            if policy(module):
                fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def rebind(named: dict[int, str], model: nn.Module) -> dict[int, nn.Parameter]:
    """old parameter id -> the parameter now at its name in `model`: FSDP2 replaces each parameter by a
    DTensor parameter, so groups built before sharding must be pointed at the new objects (for DDP the
    map is the identity)."""
    from accelerate.utils.fsdp_utils import fsdp2_canonicalize_names

    now = fsdp2_canonicalize_names(dict(model.named_parameters()))
    missing = sorted(n for n in named.values() if n not in now)
    if missing:
        raise KeyError(f"parameters missing after sharding the model: {missing[:3]}")
    return {pid: now[name] for pid, name in named.items()}


@contextmanager
def full_trainables(model: nn.Module, write: bool) -> Iterator[None]:
    """Every rank gathers the full value of each trainable DTensor parameter (an all-gather of the
    vectors and the head only, never the frozen base); on the writing rank they replace the shards as
    plain parameters until the block ends, so a recipe's `save_best` reads ordinary tensors. Every rank
    must enter it, in the same order."""
    from torch.distributed.tensor import DTensor

    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    with torch.no_grad():
        for module in model.modules():
            for attr, p in list(module._parameters.items()):
                if p is None or not p.requires_grad or not isinstance(p, DTensor):
                    continue
                full = p.full_tensor()
                if write:
                    # What FSDP2 itself does to register unsharded parameters around a forward.
                    module._parameters[attr] = nn.Parameter(full, requires_grad=True)
                    swapped.append((module, attr, p))
    try:
        yield
    finally:
        for module, attr, p in swapped:
            module._parameters[attr] = p


def shard_stats(model: nn.Module) -> dict[str, int]:
    """What this rank holds of a sharded model: element counts of the frozen and the trained parameters,
    in full and in this rank's shards (metrics.json "fsdp", and the line the loop prints)."""
    from torch.distributed.tensor import DTensor

    out = {"frozen_total": 0, "frozen_local": 0, "trained_total": 0, "trained_local": 0}
    for p in model.parameters():
        kind = "trained" if p.requires_grad else "frozen"
        out[f"{kind}_total"] += p.numel()
        out[f"{kind}_local"] += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return out


def stats_line(stats: dict[str, int], world: int) -> str:
    return (f"fsdp2 over {world} processes: this one holds {stats['frozen_local']:,} of {stats['frozen_total']:,} "
            f"frozen parameters and {stats['trained_local']:,} of {stats['trained_total']:,} trained ones; "
            "the VeRA projections are regenerated on every process, never sent")


def full_value(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU: an all-gather for a DTensor (every rank must call it), a copy otherwise."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        return (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()


def put_full(p: nn.Parameter, value: torch.Tensor) -> None:
    """Write a whole tensor into `p`; a DTensor parameter keeps only its own shard of it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(p, DTensor):
            value = distribute_tensor(value.to(p.device, p.dtype), p.device_mesh, p.placements)
        p.copy_(value)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state keyed by parameter name (torch.distributed.checkpoint's full state
    dict), on the main process; collective: every rank calls it, the others get {}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of `optimizer_state`: every rank passes the whole state and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))

"""Run by test_ddp.py, under `torchrun --nproc_per_node 2` or as one plain process: grouped training (one
adapter per group, SlotAdamW) on the tiny model with the library's loop; writes this rank's slot tables to
OUT/rank<k>.pt.

usage: ddp_worker.py MODEL_DIR TASK_DIR OUT MAGNITUDE(0|1)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from verakit.slot_tables import to_slot_tables
from verakit.train.classify import TrainArgs, build_classifier
from verakit.train.classify.data import load_task
from verakit.train.grouped import GroupedArgs, GroupedRecipe, plan_groups
from verakit.train.loop import LoopConfig, run_loop
from verakit.train.methods import MethodSpec, prepare_model


def main(model_dir: str, task_dir: str, out: str, magnitude: str) -> None:
    torch.set_num_threads(1)
    mag = magnitude == "1"
    data = load_task("csv", task_dir, group_column="customer")
    groups = plan_groups(data.train, "customer", 10, 1, "test")
    args = GroupedArgs(TrainArgs(task="csv", data_dir=task_dir, out=out, model=model_dir, r=16, epochs=2,
                                 batch_size=12, lr=2e-2, head_lr=1e-2, quiet=True, magnitude=mag).resolved(), "customer")
    torch.manual_seed(0)
    model, tok = build_classifier(model_dir, data.spec)
    prepare_model(model, MethodSpec("vera", 16, 0.1, None, 0, magnitude=mag))
    tables = to_slot_tables(model, len(groups) + 1)
    recipe = GroupedRecipe(model, tables, groups, tok, data.spec, data.train, data.dev, args, {})
    result = run_loop(recipe, LoopConfig(epochs=2, batch_size=12, seed=0, quiet=True), out,
                      optimizer_factory=recipe.make_optimizer)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    tensors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    steps = [s["slot_steps"].clone() for s in recipe.optimizer.state.values()]
    torch.save({"tensors": tensors, "world": result.world_size, "steps": result.total_steps, "slot_steps": steps},
               Path(out) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:5])

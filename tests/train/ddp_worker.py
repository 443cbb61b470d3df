"""Run by test_ddp.py, under `torchrun --nproc_per_node 2` or as one plain process: trains VeRA on the
tiny model with the library's loop and writes this rank's trainable tensors to OUT/rank<k>.pt.

usage: ddp_worker.py MODEL_DIR TASK_DIR OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from verakit.train.classify import ClassificationRecipe, TrainArgs, build_classifier
from verakit.train.classify.data import load_task
from verakit.train.loop import LoopConfig, run_loop
from verakit.train.methods import MethodSpec, prepare_model


def main(model_dir: str, task_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    args = TrainArgs(task="csv", data_dir=task_dir, out=out, model=model_dir, method="vera", r=64, epochs=2,
                     batch_size=20, lr=1e-2, head_lr=1e-2, quiet=True).resolved()
    data = load_task("csv", task_dir)
    torch.manual_seed(0)
    model, tok = build_classifier(model_dir, data.spec)
    prepared = prepare_model(model, MethodSpec("vera", 64, 0.1, None, 0))
    recipe = ClassificationRecipe(prepared, tok, data.spec, data.train, data.dev, args, {"task": "csv"})
    result = run_loop(recipe, LoopConfig(epochs=2, batch_size=20, seed=0, quiet=True), out)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    tensors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"tensors": tensors, "world": result.world_size, "steps": result.total_steps}, Path(out) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:4])

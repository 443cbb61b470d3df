"""Grouped training under data parallelism (2 CPU processes, gloo, torchrun): each rank sees other rows, so
other groups, in a step; SlotAdamW OR-reduces which groups were present, so both ranks step the same slots
and end with identical tables (VeRA and DVoRA), which match one process trained on the same global
batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.grouped.test_recipe import write_grouped_task

WORKER = Path(__file__).with_name("ddp_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[3] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("magnitude", ["0", "1"], ids=["vera", "dvora"])
def test_two_ranks_step_the_same_groups_and_match_one_process(tmp_path, tiny_bert_dir, magnitude):
    data = write_grouped_task(tmp_path / "data", ["a", "b", "c", "d", "e"], 60, 20)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    subprocess.run([sys.executable, str(WORKER), tiny_bert_dir, str(data), str(single), magnitude], env=_env(),
                   check=True, timeout=300)
    subprocess.run([*TORCHRUN, str(WORKER), tiny_bert_dir, str(data), str(ddp), magnitude], env=_env(),
                   check=True, timeout=300)
    one = torch.load(single / "rank0.pt")
    r0, r1 = torch.load(ddp / "rank0.pt"), torch.load(ddp / "rank1.pt")
    assert (one["world"], r0["world"], r1["world"]) == (1, 2, 2)
    assert one["steps"] == r0["steps"] == 10  # 60 rows / global batch 12 = 5 steps per epoch either way
    assert any(n.endswith("vera_m") for n in r0["tensors"]) is (magnitude == "1")
    # the same slots stepped on both ranks and in one process: per-slot step counts agree exactly
    for a, b, c in zip(one["slot_steps"], r0["slot_steps"], r1["slot_steps"], strict=True):
        assert torch.equal(a, b) and torch.equal(b, c)
    assert one["slot_steps"][0][0] == 0 and one["slot_steps"][0][1:].min() > 0
    for name, t in r0["tensors"].items():
        assert torch.equal(t, r1["tensors"][name]), name  # DDP all-reduces the same averaged gradient
    assert one["tensors"].keys() == r0["tensors"].keys()
    for name, t in one["tensors"].items():  # gradients summed in another order: fp32 rounding only
        torch.testing.assert_close(r0["tensors"][name], t, rtol=1e-4, atol=5e-6, msg=name)

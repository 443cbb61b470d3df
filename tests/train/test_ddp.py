"""Data-parallel training through accelerate: 2 CPU processes (gloo) end with identical trainable
tensors that match one process trained on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def _env() -> dict[str, str]:
    # The worker runs as a script: it needs the src tree and nothing from the test session's threads.
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}


# Both launchers a user would reach for; each starts 2 CPU processes that join one gloo group.
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny_bert_dir, tiny_task) -> Path:
    out = tmp_path_factory.mktemp("single")
    subprocess.run([sys.executable, str(WORKER), tiny_bert_dir, str(tiny_task), str(out)], env=_env(),
                   check=True, timeout=300)
    return out


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_gloo_ranks_match_each_other_and_one_process(launcher, tmp_path, tiny_bert_dir, tiny_task, single_run):
    single, ddp = single_run, tmp_path / "ddp"
    ddp.mkdir()
    subprocess.run([*LAUNCHERS[launcher], str(WORKER), tiny_bert_dir, str(tiny_task), str(ddp)], env=_env(),
                   check=True, timeout=300)
    one = torch.load(single / "rank0.pt")
    r0, r1 = torch.load(ddp / "rank0.pt"), torch.load(ddp / "rank1.pt")
    assert (one["world"], r0["world"], r1["world"]) == (1, 2, 2)
    assert one["steps"] == r0["steps"] == 10  # batch 20 is global: 96 rows -> 5 steps per epoch either way
    # Both ranks hold bit-identical vectors and head: DDP all-reduces the same averaged gradient to each.
    for name, t in r0["tensors"].items():
        assert torch.equal(t, r1["tensors"][name]), name
    # Against one process: the gradient is summed in a different order (two partial sums + all-reduce), so
    # float32 rounding differs slightly; measured max abs difference after 10 AdamW steps: 6e-7.
    assert one["tensors"].keys() == r0["tensors"].keys()
    for name, t in one["tensors"].items():
        torch.testing.assert_close(r0["tensors"][name], t, rtol=1e-4, atol=5e-6, msg=name)
    assert (ddp / "adapter.safetensors").is_file()  # only rank 0 writes the best artifact

"""Run by test_fsdp.py under `accelerate launch --config_file examples/accelerate_fsdp.yaml` (2 CPU
processes, FSDP2): trains VeRA on the tiny model through `train_classifier`, what `verakit train` runs.
Main sends itself SIGINT (Ctrl-C) after the first trained evaluation; every rank writes its shard of the
checkpoint and stops, then resumes in the same process, as a user rerunning with --resume would.

usage: fsdp_worker.py MODEL_DIR TASK_DIR OUT
"""

from __future__ import annotations

import os
import signal
import sys

import torch
from accelerate import PartialState

from verakit.train.classify import TrainArgs, train_classifier
from verakit.train.loop import TrainingInterrupted


def main(model_dir: str, task_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    args = TrainArgs(task="csv", data_dir=task_dir, out=out, model=model_dir, method="vera", r=64, epochs=2,
                     batch_size=20, lr=1e-2, head_lr=1e-2, quiet=True)
    sent: list[int] = []

    def ctrl_c_once(record: dict) -> None:
        if not sent:
            sent.append(record["step"])
            os.kill(os.getpid(), signal.SIGINT)

    try:
        train_classifier(args, on_eval=ctrl_c_once)
        raise SystemExit("fsdp_worker: training was not interrupted")
    except TrainingInterrupted as e:
        print(f"interrupted after step {e.step}", flush=True)
    metrics = train_classifier(TrainArgs(**{**args.__dict__, "resume": True}))
    print(f"rank {PartialState().process_index} returned {'metrics' if metrics else 'nothing'}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])

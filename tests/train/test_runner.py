"""The recipe runner's shared pieces: the classification loss (sums, as the loop's unit weighting needs),
length-sorted evaluation batches, param groups, and the run skeleton's order (RUN_DIR checked before any
data is read; unresolved arguments refused)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from verakit.train.methods import Prepared
from verakit.train.runner import EVAL_BATCH, Run, classification_loss, length_batches, open_run, param_groups


def test_classification_loss_is_a_sum_over_rows():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(5, 3, generator=g), torch.tensor([0, 2, 1, 1, 0])
    loss, n = classification_loss(logits, labels, regression=False)
    assert n == 5
    torch.testing.assert_close(loss, sum(F.cross_entropy(logits[i : i + 1], labels[i : i + 1]) for i in range(5)))
    scores, target = torch.randn(4, 1, generator=g), torch.randn(4, generator=g)
    loss, n = classification_loss(scores, target, regression=True)
    assert n == 4
    torch.testing.assert_close(loss, ((scores[:, 0] - target) ** 2).sum())


def test_length_batches_sort_stably_and_cover_every_row_once():
    lengths = [5, 3, 5, 1, 3, 9, 2]
    batches = list(length_batches(lengths, 3))
    assert batches == [[3, 6, 1], [4, 0, 2], [5]]  # ties keep their order (1 before 4, 0 before 2)
    assert EVAL_BATCH == 64 and list(length_batches(lengths)) == [[3, 6, 1, 4, 0, 2, 5]]


def test_param_groups_adapter_then_head():
    a, h = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    prepared = Prepared(torch.nn.Linear(1, 1), (("d", a),), (("classifier.weight", h),))
    both = param_groups(prepared, 1e-2, 4e-3)
    assert [(g.name, g.params, g.lr) for g in both] == [("adapter", (a,), 1e-2), ("head", (h,), 4e-3)]
    only = param_groups(prepared, 5e-2)  # no task head (causal LMs): one group
    assert [(g.name, g.lr) for g in only] == [("adapter", 5e-2)]


def _args(out, **kw):
    base = dict(out=str(out), resume=False, quiet=True, seed=0, epochs=2, batch_size=8, warmup_ratio=0.06,
                eval_every=None)
    return SimpleNamespace(**{**base, **kw})


def test_run_dir_is_checked_before_anything_else(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(FileExistsError, match="run folder exists and is not empty"):
        open_run(_args(tmp_path / "taken"))
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        open_run(_args(tmp_path / "new", resume=True))
    run = open_run(_args(tmp_path / "new"))
    assert run.loop.epochs == 2 and run.loop.batch_size == 8 and not (tmp_path / "new").exists()


def test_unresolved_arguments_are_refused(tmp_path):
    run = Run(tmp_path, SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None),
              _args(tmp_path, epochs=None))
    with pytest.raises(ValueError, match="epochs and batch_size are None; run on the resolved arguments"):
        run.loop  # noqa: B018
    run = Run(tmp_path / "run", SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None), _args(tmp_path))
    config = run.start({"seed": 0}, {"r": 8})
    assert set(config) == {"args", "loop", "method"} and (tmp_path / "run" / "config.json").is_file()

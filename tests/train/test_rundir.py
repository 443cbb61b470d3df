"""RUN_DIR's start under several processes: every process checks a --resume's settings before any
writes, and only the main process creates RUN_DIR and writes config.json."""

from __future__ import annotations

import json

import pytest

from verakit.train.rundir import start_run


class _Process:
    """A ProcessState that records its barrier calls and RUN_DIR's files at the time of each."""

    def __init__(self, is_main_process: bool, run_dir) -> None:
        self.is_main_process = is_main_process
        self.run_dir = run_dir
        self.seen_at_barrier: list[list[str]] = []

    def wait_for_everyone(self) -> None:
        files = sorted(p.name for p in self.run_dir.iterdir()) if self.run_dir.exists() else []
        self.seen_at_barrier.append(files)


def test_only_the_main_process_writes_config_after_the_barrier(tmp_path):
    run_dir, config = tmp_path / "run", {"args": {"epochs": 2, "resume": False}, "loop": {}}
    other = _Process(False, run_dir)
    start_run(run_dir, config, resume=False, state=other)
    assert other.seen_at_barrier == [[]] and not run_dir.exists()
    main = _Process(True, run_dir)
    start_run(run_dir, config, resume=False, state=main)
    assert main.seen_at_barrier == [[]]  # nothing written before every process got there
    assert json.loads((run_dir / "config.json").read_text()) == config


@pytest.mark.parametrize("is_main", [True, False])
def test_every_process_refuses_a_resume_with_other_settings_before_the_barrier(tmp_path, is_main):
    run_dir = tmp_path / "run"
    start_run(run_dir, {"args": {"epochs": 2, "lr": 0.05, "resume": False}}, resume=False, state=_Process(True, run_dir))
    saved = (run_dir / "config.json").read_bytes()
    state = _Process(is_main, run_dir)
    with pytest.raises(ValueError, match=r"config\.json: --resume with different settings \(lr: 0\.05 -> 0\.02\)"):
        start_run(run_dir, {"args": {"epochs": 2, "lr": 0.02, "resume": True}}, resume=True, state=state)
    assert state.seen_at_barrier == [] and (run_dir / "config.json").read_bytes() == saved


def test_a_setting_an_older_config_lacks_counts_as_its_default(tmp_path):
    # config.json written before the option existed: resuming with the option at its default continues the
    # run; resuming with another value is a different run and is refused.
    from verakit.train.classify import TrainArgs
    from verakit.train.rundir import field_defaults

    run_dir = tmp_path / "run"
    start_run(run_dir, {"args": {"epochs": 2, "resume": False}}, resume=False, state=_Process(True, run_dir))
    defaults = field_defaults(TrainArgs)
    assert defaults["adapter_compute_dtype"] == "fp32"
    new = {"epochs": 2, "adapter_compute_dtype": "fp32", "resume": True}
    with pytest.raises(ValueError, match=r"adapter_compute_dtype: None -> 'fp32'"):  # without defaults: refused
        start_run(run_dir, {"args": new}, resume=True, state=_Process(True, run_dir))
    with pytest.raises(ValueError, match=r"adapter_compute_dtype: 'fp32' -> 'bf16'"):
        start_run(run_dir, {"args": {**new, "adapter_compute_dtype": "bf16"}}, resume=True,
                  state=_Process(True, run_dir), defaults=defaults)
    start_run(run_dir, {"args": new}, resume=True, state=_Process(True, run_dir), defaults=defaults)
    assert json.loads((run_dir / "config.json").read_text())["args"] == new


def test_loop_metrics_carry_the_baseline_into_metrics_json():
    from verakit.train.loop import LoopResult
    from verakit.train.rundir import loop_metrics

    result = LoopResult([], [], {}, 12.345, 6, 1, baseline={"accuracy": 0.5})
    assert loop_metrics(result) == {"train_seconds": 12.35, "total_steps": 6, "world_size": 1,
                                    "baseline": {"accuracy": 0.5}}
    assert loop_metrics(LoopResult([], [], {}, 1.0, 6, 1))["baseline"] is None  # a recipe without baseline()


def test_a_run_from_before_length_grouping_resumes_only_with_random_batches(tmp_path):
    # Grouped batches became the default after runs with random batches existed: such a run's config.json
    # lacks the key, and resuming it under the new default would change its batches mid-run.
    from verakit.train.classify import TrainArgs
    from verakit.train.rundir import field_defaults

    run_dir = tmp_path / "run"
    start_run(run_dir, {"args": {"epochs": 2, "resume": False}}, resume=False, state=_Process(True, run_dir))
    defaults = field_defaults(TrainArgs)
    assert defaults["group_by_length"] is None  # resolved per recipe: classification groups by length
    with pytest.raises(ValueError, match=r"group_by_length: False -> True.*add --no-group-by-length"):
        start_run(run_dir, {"args": {"epochs": 2, "group_by_length": True, "resume": True}}, resume=True,
                  state=_Process(True, run_dir), defaults=defaults)
    start_run(run_dir, {"args": {"epochs": 2, "group_by_length": False, "resume": True}}, resume=True,
              state=_Process(True, run_dir), defaults=defaults)

"""`verakit train` and `verakit tune` declare each training option once (cli/common.py) and read its
default from the recipes' argument dataclasses: every option that fills a dataclass field has that field's
default (None where the field's default is resolved per task, method and budget), so the CLI and the library
cannot drift apart; two recipes with different defaults for one option would be refused when the parser is built."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from verakit.cli import build_parser
from verakit.cli.common import field_default
from verakit.train.causal import CausalArgs, DecodeConfig
from verakit.train.classify import TrainArgs
from verakit.train.grouped import GroupedArgs
from verakit.train.tune import TuneArgs
from verakit.train.vision import ImageArgs


def _sub(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _defaults(*classes: type) -> dict[str, object]:
    out: dict[str, object] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out.setdefault(f.name, f.default)
    return out


@pytest.mark.parametrize("command", ["train", "tune"])
def test_parser_defaults_are_the_dataclass_defaults(command):
    fields = _defaults(TrainArgs, CausalArgs, ImageArgs, GroupedArgs)
    # Options whose parser default is None on purpose: "not given" (the dataclass's own default then applies,
    # shown in --help), and tune's batch size, which studies record as an explicit 32.
    unset = {"max_groups", "min_group_examples"} | ({"batch_size"} if command == "tune" else set())
    checked = []
    for action in _sub(command)._actions:
        if action.dest in fields and action.dest not in unset and action.option_strings:
            assert action.default == fields[action.dest], action.dest
            checked.append(action.dest)
    assert {"d_initial", "max_length", "warmup_ratio", "seed", "budget", "method", "train_d", "distribution",
            "adapter_compute_dtype"} <= set(checked)
    if command == "train":
        assert {"held_out", "report_samples", "num_beams", "max_new_tokens", "quantize"} <= set(checked)
    else:
        tune = {a.dest: a.default for a in _sub("tune")._actions}
        assert (tune["pruner"], tune["sampler_seed"], tune["study_name"]) == (
            TuneArgs.__dataclass_fields__["pruner"].default, TuneArgs.__dataclass_fields__["seed"].default,
            TuneArgs.__dataclass_fields__["study_name"].default)


def test_generate_takes_the_decode_defaults():
    gen = {a.dest: a.default for a in _sub("generate")._actions}
    assert (gen["num_beams"], gen["max_new_tokens"]) == (DecodeConfig().num_beams, DecodeConfig().max_new_tokens)


def test_one_option_needs_one_default():
    @dataclasses.dataclass
    class A:
        seed: int = 0

    @dataclasses.dataclass
    class B:
        seed: int = 1

    assert field_default("seed", (A,)) == 0
    with pytest.raises(ValueError, match=r"option 'seed': defaults \{'A': 0, 'B': 1\} in the recipes' arguments"):
        field_default("seed", (A, B))
    with pytest.raises(ValueError, match="option 'nothing': defaults none"):
        field_default("nothing", (A,))


@pytest.mark.parametrize("command", ["train", "tune"])
def test_adapter_rank_is_r_under_a_name_torchrun_passes_on(command):
    """docs/training.md: `--adapter-rank` is an alias of `--r`, because torchrun's own parser rejects `--r` as
    an ambiguous prefix of its options before the script sees it."""
    from torch.distributed.run import get_args_parser

    base = [command, "--task", "csv", "--data-dir", "d", "--out", "o"]
    assert build_parser().parse_args([*base, "--adapter-rank", "64"]).r == 64
    assert build_parser().parse_args([*base, "--r", "64"]).r == 64
    torchrun = get_args_parser()
    passed = torchrun.parse_args(["--nproc_per_node", "2", "-m", "verakit.cli", *base, "--adapter-rank", "64"])
    assert passed.training_script_args == [*base, "--adapter-rank", "64"]
    with pytest.raises(SystemExit):  # "ambiguous option: --r could match --rdzv-backend, ..."
        torchrun.parse_args(["--nproc_per_node", "2", "-m", "verakit.cli", *base, "--r", "64"])

"""README.md's main-job snippet runs as written on the offline MiniLM, and what it promises holds."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"
TRAIN_MARK = "# ... train as usual"


def main_job_snippet() -> str:
    """The first ```python block after the "## The main job" heading."""
    text = README.read_text()
    section = text[text.index("## The main job"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_main_job_snippet_trains_saves_loads_and_merges(minilm_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    code = main_job_snippet()
    before, after = code.split(TRAIN_MARK)
    ns: dict = {}
    exec(compile(before, "README.md (main job, part 1)", "exec"), ns)  # noqa: S102 (our own README)
    model, opt = ns["model"], ns["opt"]
    trained = {n for n, _ in ns["trainable_parameters"](model)}
    assert trained and all(n.endswith((".vera_d", ".vera_b")) or n.startswith("classifier.") for n in trained)
    assert any("pooler.dense" in n for n in trained)  # the head's hidden layer has VeRA vectors, not weights

    # "train as usual": a few steps, so b leaves zero and the saved vectors carry what was learned
    x, y = torch.randint(1000, 2000, (4, 12)), torch.tensor([0, 1, 0, 1])
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=x, labels=y).loss.backward()
        opt.step()
    model.eval()
    exec(compile(after.split("\n", 1)[1], "README.md (main job, part 2)", "exec"), ns)  # noqa: S102

    size = (tmp_path / "sst2.safetensors").stat().st_size
    assert 40_000 < size < 48_000, size  # the comment says "44 KB"
    fresh = ns["fresh"].eval()
    with torch.no_grad():
        ref, got = model(input_ids=x).logits, fresh(input_ids=x).logits
    assert torch.allclose(ref, got, atol=1e-5), (ref, got)  # loaded + merged = the trained model
    base = ns["AutoModelForSequenceClassification"].from_pretrained(ns["base"], num_labels=2).eval()
    with torch.no_grad():
        assert not torch.allclose(base.bert(input_ids=x).pooler_output, fresh.bert(input_ids=x).pooler_output)


def command_line_block() -> str:
    """The first ```bash block after the "## Command line" heading."""
    text = README.read_text()
    section = text[text.index("## Command line"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def readme_commands() -> list[str]:
    """The block's `verakit ...` command lines, comments dropped, backslash continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", command_line_block())
    return [" ".join(line.split("#", 1)[0].split()) for line in joined.splitlines() if line.startswith("verakit ")]


def test_timed_commands_are_the_readme_lines():
    """experiments/readme_commands.py times the README's commands (docs/training.md quotes its figures): each
    of its commands is a line of the block, argument for argument, with the data and run paths mapped back."""
    import importlib.util
    import shlex

    path = README.parent / "experiments" / "readme_commands.py"
    spec = importlib.util.spec_from_file_location("readme_commands", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lines = readme_commands()
    for name, cmd in module.commands(Path("RUNS")).items():
        text = shlex.join(cmd).replace(str(module.DATA), "../shared/data").replace("RUNS/", "runs/")
        assert text in lines, (name, text)


def test_command_line_block_parses_and_names_real_options():
    """Every `verakit ...` line of the block parses with the real parser (placeholders such as DIR stand in
    for paths), and every --flag the block's comments mention is an option of some subcommand: a renamed
    or removed flag fails here, not in a new user's first hour."""
    import argparse
    import shlex

    from verakit.cli import build_parser

    parser = build_parser()
    block = command_line_block()
    commands = readme_commands()
    assert len(commands) >= 12, commands
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])  # argparse exits (SystemExit) on a bad line
        assert callable(args.func), command
    options = {flag for action in parser._actions if isinstance(action, argparse._SubParsersAction)
               for sub in action.choices.values() for a in sub._actions for flag in a.option_strings}
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", block))
    assert mentioned and not mentioned - options, sorted(mentioned - options)

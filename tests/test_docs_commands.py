"""The `verakit ...` command lines in docs/*.md parse with the real parser and name real options, and the
Python names the docs give exist.

A new user copies these lines first: a renamed flag, a changed choice or a dropped subcommand must fail
here, not in their terminal. Covered: every doc except results.md and benchmarks.md (the measurement
records, whose commands are the experiments' own). A command line is a line of a fenced or indented code
block that starts with `verakit ` (or runs `-m verakit.cli` under torchrun / accelerate); backslash
continuations are joined, shell comments dropped. Synopsis notation is read as a user would:
`[--flag VALUE]` is an optional group (parsed, with its first alternative when it reads `[A | B]`),
`{a,b}` or `a|b` lists values (each must be a valid choice; the first is parsed), and an upper-case
placeholder (N, X, DIR, RUN_DIR, ...) or `...` as an option's value stands for a valid one. Every `--flag`
written on such a line, comments and alternatives included, must be an option of that subcommand; so
must every --flag of a prose span `verakit SUBCOMMAND ...`. A synopsis's literal `[--flag VALUE]` is the
parser's default. Each `verakit.x.y` code span names something that exists, and each verakit import line
of the code blocks runs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from verakit.cli import build_parser

DOCS = Path(__file__).resolve().parents[1] / "docs"
NOT_COVERED = {"results.md", "benchmarks.md"}  # measurement records, not instructions
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*|\.\.\.")  # N, X, DIR, RUN_DIR, NAME_OR_DIR, ...
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
LAUNCHED = re.compile(r"-m verakit(?:\.cli)? (?=[a-z])")  # torchrun / accelerate launch ... -m verakit.cli train


@dataclass(frozen=True)
class DocCommand:
    where: str  # docs/NAME.md:LINE, for the failure message
    text: str  # the command line as written, continuations joined, from `verakit` on


def covered_docs() -> list[Path]:
    return sorted(p for p in DOCS.glob("*.md") if p.name not in NOT_COVERED)


def code_lines(markdown: str) -> list[tuple[int, str]]:
    """(line number, text) of the lines inside fenced (```) or indented (4+ spaces after a blank line)
    code blocks, backslash continuations joined onto their first line."""
    out: list[tuple[int, str]] = []
    fenced = indented = False
    previous_blank = True
    pending: tuple[int, str] | None = None
    for number, line in enumerate(markdown.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fenced, indented, previous_blank = not fenced, False, False
            continue
        if not fenced:
            if not stripped:
                previous_blank = True
                continue
            leading = len(line) - len(line.lstrip(" "))
            indented = leading >= 4 and (indented or previous_blank)
            previous_blank = False
            if not indented:
                pending = None
                continue
        if pending is not None:
            start, text = pending
            text = text + " " + stripped
        else:
            start, text = number, stripped
        if text.endswith("\\"):
            pending = (start, text[:-1].rstrip())
            continue
        pending = None
        out.append((start, text))
    return out


def doc_commands(markdown: str, name: str) -> list[DocCommand]:
    """The `verakit SUBCOMMAND ...` command lines of one doc's code blocks (not program output such as
    `verakit serve: listening on ...`)."""
    commands: list[DocCommand] = []
    previous = -1  # index in code_lines of the last line that belongs to a command
    lines = code_lines(markdown)
    for k, (number, text) in enumerate(lines):
        if text.startswith("[") and commands and previous == k - 1:  # a synopsis's next line of options
            commands[-1] = DocCommand(commands[-1].where, commands[-1].text + " " + text)
            previous = k
            continue
        launched = LAUNCHED.search(text)
        if launched:
            text = "verakit " + text[launched.end():]
        if not text.startswith("verakit ") or re.match(r"verakit \S+:", text):
            continue
        commands.append(DocCommand(f"docs/{name}:{number}", text))
        previous = k
    return commands


def all_doc_commands() -> list[DocCommand]:
    return [c for p in covered_docs() for c in doc_commands(p.read_text(), p.name)]


@functools.cache
def parser() -> argparse.ArgumentParser:
    return build_parser()


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _without_comment(text: str) -> str:
    """The line with its shell comment dropped (a `#` that starts a word, outside quotes)."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].rstrip()
    return text


def _optional_groups(text: str) -> str:
    """`[--flag VALUE]` -> `--flag VALUE`; `[A | B]` -> `A`; `[--x ...]` -> `--x`; a group naming no flag
    (`[limits...]`, `[every flag above]`) is dropped. Brackets inside words (`name[The Eagle]`) are text."""
    def group(m: re.Match[str]) -> str:
        inner = m.group(1).split(" | ")[0].strip()
        if len(inner.split()) > 2:  # [--prompt TEXT ...]: repeatable; [--task ...]: `...` is the value
            inner = re.sub(r"\s+\.\.\.$", "", inner)
        return " " + inner if inner.startswith("-") else " "
    return re.sub(r"(?:^|(?<=\s))\[([^\[\]]*)\]", group, text)


def _value_for(action: argparse.Action, value: str, where: str) -> str:
    """A parseable value for `action` in place of a documented one: each of `{a,b}` / `a|b` must be a
    valid choice (the first is used); a placeholder becomes the first choice or a value of the type."""
    listed = re.fullmatch(r"\{([^{}]+)\}", value)
    alternatives = listed.group(1).split(",") if listed else value.split("|") if "|" in value else None
    if alternatives is not None:
        if action.choices is not None:
            wrong = [a for a in alternatives if a not in action.choices]
            assert not wrong, f"{where}: {action.option_strings[0]} lists {wrong}, not among {list(action.choices)}"
        return alternatives[0]
    if not PLACEHOLDER.fullmatch(value):
        return value
    if action.choices is not None:
        return str(next(iter(action.choices)))
    for candidate in ("1", "0.5", "value"):
        try:
            if action.type is None or action.type(candidate) is not None:
                return candidate
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            continue
    return value


def parse_doc_command(command: DocCommand) -> argparse.Namespace:
    """Parse one doc command line with the real parser (argparse's error becomes an AssertionError)."""
    words = shlex.split(_optional_groups(_without_comment(command.text)))
    assert words[0] == "verakit" and len(words) > 1, command
    subs = subcommands()
    assert words[1] in subs, f"{command.where}: no subcommand {words[1]!r}: {command.text}"
    options = subs[words[1]]._option_string_actions
    args: list[str] = []
    i = 1
    while i < len(words):
        word = words[i]
        action = options.get(word.split("=", 1)[0]) if word.startswith("--") else None
        if action is not None and "=" in word:
            flag, value = word.split("=", 1)
            args.append(f"{flag}={_value_for(action, value, command.where)}")
        elif action is not None and action.nargs != 0 and i + 1 < len(words):
            args += [word, _value_for(action, words[i + 1], command.where)]
            i += 1
        elif word == "...":  # a bare `...`: the other arguments, as above; stand in for the required ones
            args += [x for a in subs[words[1]]._actions if a.required and a.option_strings
                     and not set(a.option_strings) & set(words) for x in (a.option_strings[0], _value_for(a, "...", ""))]
        else:
            args.append(word)
        i += 1
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser().parse_args(args)
    except SystemExit:
        raise AssertionError(f"{command.where}: does not parse ({err.getvalue().strip().splitlines()[-1]}): "
                             f"{command.text}") from None


def unknown_flags(command: DocCommand) -> list[str]:
    """The --flags written on the line (comments and alternatives included) that its subcommand lacks."""
    sub = subcommands().get(command.text.split()[1])
    known = set(sub._option_string_actions) if sub is not None else set()
    return sorted({f for f in FLAG.findall(command.text) if f not in known})


COMMANDS = all_doc_commands()


def test_the_docs_hold_command_lines():
    """The extractor still finds the docs' commands (a format change must not silently empty the checks)."""
    assert len(COMMANDS) >= 25, [c.where for c in COMMANDS]
    assert {c.where.split(":")[0] for c in COMMANDS} >= {
        "docs/training.md", "docs/generation.md", "docs/serving.md", "docs/tuning.md", "docs/grouped.md",
        "docs/vision.md"}
    assert {c.text.split()[1] for c in COMMANDS} >= {"train", "eval", "tune", "generate", "plan", "serve", "hash-key"}


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_doc_command_parses_and_names_real_options(command: DocCommand):
    assert not unknown_flags(command), f"{command.where}: not options of verakit {command.text.split()[1]}: " \
                                       f"{unknown_flags(command)}: {command.text}"
    args = parse_doc_command(command)
    assert callable(args.func), command


def test_synopsis_values_are_the_defaults():
    """A synopsis's `[--flag VALUE]` with a literal value (`[--max-batch 32]`, `[--held-out 0.1]`) states
    the default: it must be the parser's (flags whose default the recipe resolves later, None here, and
    placeholders are not checked)."""
    subs = subcommands()
    checked, wrong = 0, []
    for c in COMMANDS:
        options = subs[c.text.split()[1]]._option_string_actions
        for flag, value in re.findall(r"\[(--[a-z0-9-]+) ([^\s\]|{}]+)\]", c.text):
            action = options.get(flag)
            if action is None or action.default is None or PLACEHOLDER.fullmatch(value):
                continue
            checked += 1
            if (action.type(value) if callable(action.type) else value) != action.default:
                wrong.append(f"{c.where}: [{flag} {value}], default {action.default!r}")
    assert checked >= 10 and not wrong, (checked, wrong)


def inline_commands(markdown: str, name: str) -> list[DocCommand]:
    """Prose's `verakit SUBCOMMAND ...` code spans (fenced blocks left out; a span may wrap a line)."""
    prose = re.sub(r"^\s*```.*?^\s*```", "", markdown, flags=re.S | re.M)
    spans = re.finditer(r"`(verakit [a-z][^`]*)`", prose.replace("\n", " "))
    return [DocCommand(f"docs/{name} (`{m.group(1)}`)", m.group(1)) for m in spans
            if not m.group(1).split()[1].endswith(":")]  # `verakit serve: error: ...` quotes output


INLINE = [c for p in covered_docs() for c in inline_commands(p.read_text(), p.name)]


def test_prose_commands_name_real_subcommands_and_options():
    """`verakit train --task csv ... --adapter-rank 64` in a sentence is copied as often as a code block."""
    assert len(INLINE) >= 50, len(INLINE)
    subs = subcommands()
    wrong = [c.where for c in INLINE if c.text.split()[1] not in subs or unknown_flags(c)]
    assert not wrong, wrong


NOT_NAMES = {"verakit.adapter"}  # format.md: the metadata's "format" string, not a module


def _resolve(dotted: str) -> object:
    """The module or attribute `a.b.c` names: the longest importable prefix, then attributes."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ModuleNotFoundError:
            continue
        for attr in parts[k:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_python_names_in_the_docs_exist():
    """Each `verakit.x.y` (or `verakit.x.y(...)`) code span names a real module, function or constant, and
    every verakit import line of the docs' code blocks (`from verakit.train import TrainArgs, ...`) runs:
    a renamed or moved name fails here."""
    names, imports = set(), set()
    for p in covered_docs():
        text = p.read_text()
        prose = re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M).replace("\n", " ")
        names |= {(p.name, m.group(1)) for m in re.finditer(r"`(verakit(?:\.[A-Za-z_]\w*)+)(?:\([^`]*\))?`", prose)}
        imports |= {(f"docs/{p.name}:{n}", line) for n, line in code_lines(text)
                    if re.match(r"(from verakit[\w.]* import |import verakit)", line)}
    assert len(names) >= 30 and len(imports) >= 10, (len(names), len(imports))
    wrong = []
    for doc, name in sorted(names):
        if name in NOT_NAMES:
            continue
        try:
            _resolve(name)
        except (ImportError, AttributeError) as e:
            wrong.append(f"docs/{doc}: `{name}`: {e}")
    for where, line in sorted(imports):
        try:
            exec(compile(line.split("#", 1)[0], where, "exec"), {})  # noqa: S102 (our own docs' import lines)
        except ImportError as e:
            wrong.append(f"{where}: {line}: {e}")
    assert not wrong, wrong


BROKEN_DOC = """
Some prose mentioning verakit train in passing.

```
verakit train --task sst2 --data-dir DIR --out RUN_DIR \\
    --epochs N --no-such-flag 3
verakit eval --adapter RUN_DIR/adapter.safetensors --split {dev,tests}
verakit serve: listening on http://127.0.0.1:8000 (output, not a command)
```

    verakit plan --model llama-2-7b --batch-size many    # or --methods vera
"""


def test_the_checks_catch_a_wrong_flag_a_wrong_choice_and_a_bad_value():
    """The checks fail on what they exist to catch: an unknown flag, a listed value that is not a choice,
    a value of the wrong type; output lines and prose are not read as commands."""
    commands = doc_commands(BROKEN_DOC, "broken.md")
    assert [c.where for c in commands] == ["docs/broken.md:5", "docs/broken.md:7", "docs/broken.md:11"]
    train, evaluate, plan = commands
    assert unknown_flags(train) == ["--no-such-flag"]
    with pytest.raises(AssertionError, match="unrecognized arguments: --no-such-flag 3"):
        parse_doc_command(train)
    assert not unknown_flags(evaluate)
    with pytest.raises(AssertionError, match=r"--split lists \['tests'\]"):
        parse_doc_command(evaluate)
    assert not unknown_flags(plan)
    with pytest.raises(AssertionError, match="invalid int value: 'many'"):
        parse_doc_command(plan)

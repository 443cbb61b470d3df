"""`verakit generate`: text from a trained causal-LM adapter, or from the base model alone."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_base_check_option, field_default

__all__ = ["add_parsers", "run_generate"]


def run_generate(args: argparse.Namespace) -> int:
    """Generate for every --prompt and every non-blank line of --prompts-file; 2 when there is none, or
    for an unusable option, file, adapter or model (one line on stderr naming it)."""
    from ..train.causal import generate_with_artifact
    from .common import decode_config

    try:
        prompts = list(args.prompt or []) + (_read_prompts(args.prompts_file) if args.prompts_file else [])
        if not prompts:
            raise ValueError(f"--prompts-file {args.prompts_file} has no non-blank line" if args.prompts_file
                             else "give --prompt TEXT or --prompts-file FILE")
        config = decode_config(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
        texts = generate_with_artifact(args.adapter, prompts, model=args.model, chat_template=args.chat_template,
                                       config=config, check_base=args.check_base)
    # ValueError: a bad --num-beams / --max-new-tokens, an adapter of a classifier, a model that cannot
    # generate (no end token) or that transformers cannot read; OSError: a model folder without its files.
    # Each message names the option, file or folder.
    except (ValueError, OSError) as e:
        print(f"verakit generate: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"prompt": p, "generation": t} for p, t in zip(prompts, texts, strict=True)], indent=2))
    else:
        print("\n\n".join(texts))
    return 0


def _read_prompts(path: str) -> list[str]:
    """The non-blank lines of --prompts-file `path`; ValueError naming it when it cannot be read as text."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a BOM (Windows editors) was part of the first prompt
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts-file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:  # missing, a directory, unreadable
        raise ValueError(f"--prompts-file {path}: cannot read it ({e.strerror or e})") from None
    return [line for line in text.splitlines() if line.strip()]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `generate`."""
    from ..train.causal import DecodeConfig

    s = sub.add_parser("generate", help="generate text with a trained causal-LM adapter (or the base model)")
    s.add_argument("--adapter", default=None, help="RUN_DIR/adapter.safetensors, RUN_DIR/adapter (LoRA) or "
                   "RUN_DIR/trained.safetensors (default: none, the base model alone)")
    s.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    s.add_argument("--prompts-file", default=None, help="a text file, one prompt per line")
    s.add_argument("--model", default=None, help="base model (default: the adapter's, else SmolLM2-135M-Instruct)")
    s.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="default: as the adapter was trained; for the base model, on when it has a template")
    decode = (DecodeConfig,)
    s.add_argument("--num-beams", type=int, default=field_default("num_beams", decode),
                   help=f"1: greedy; > 1: beam search (default {field_default('num_beams', decode)})")
    s.add_argument("--max-new-tokens", type=int, default=field_default("max_new_tokens", decode),
                   help=f"tokens generated per prompt at most (default {field_default('max_new_tokens', decode)})")
    s.add_argument("--json", action="store_true", help="print a JSON list of {prompt, generation}")
    add_base_check_option(s)
    s.set_defaults(func=run_generate)

"""`verakit inspect`, `verakit convert` and `verakit merge`: file-level operations on saved adapters."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

from .common import folder_arg

__all__ = ["add_parsers", "describe_modules", "run_convert", "run_inspect", "run_inspect_peft", "run_merge"]


def _block_of(name: str) -> str | None:
    """`model.layers.7` for `model.layers.7.self_attn.q_proj`: the prefix up to the first all-digit component."""
    parts = name.split(".")
    digit = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return None if digit is None else ".".join(parts[: digit + 1])


def describe_modules(names: Iterable[str]) -> str:
    """"60 adapted modules (q_proj, v_proj in 30 blocks)": what is adapted, counted truthfully.

    Blocks are the numbered containers (`model.layers.7`); modules outside any (`lm_head`) are named after them.
    """
    names = list(names)
    leaves = dict.fromkeys(n.rsplit(".", 1)[-1] for n in names if _block_of(n) is not None)  # ordered set
    blocks = {_block_of(n) for n in names} - {None}
    loose = [n for n in names if _block_of(n) is None]
    where = [f"{', '.join(leaves)} in {len(blocks)} block{'s' if len(blocks) != 1 else ''}"] if blocks else []
    where += [", ".join(loose)] if loose else []
    noun = "adapted module" if len(names) == 1 else "adapted modules"
    return f"{len(names)} {noun}" + (f" ({'; '.join(where)})" if where else "")


def run_inspect(args: argparse.Namespace) -> int:
    """Describe a verakit adapter file (a directory goes to `run_inspect_peft`)."""
    from ..fileformat import read_adapter

    if Path(args.file).is_dir():
        _refuse_run_dir(Path(args.file), "inspect")
        return run_inspect_peft(args)
    ad = read_adapter(args.file)
    size = Path(args.file).stat().st_size
    vec = sum(t.numel() for t in (*ad.d.values(), *ad.b.values(), *ad.m.values()))  # m: DVoRA's magnitudes
    info = {
        "file": str(args.file),
        "bytes": size,
        "dtype": ad.dtype,
        "config": ad.config.to_dict(),
        "model_type": ad.model_type,
        "architecture": ad.architecture,
        "fingerprint": ad.fingerprint,
        "base_samples": None if ad.samples is None else {
            "samples": sum(v.numel() for v in ad.samples.values.values()), "modules": len(ad.samples.values),
            "quant": ad.samples.quant,
        },
        "adapted_modules": len(ad.modules),
        "blocks": len({_block_of(n) for n in ad.modules} - {None}),
        "vector_params": vec,
        "saved_params": ad.trained_numel - vec,
        "saved_tensors": sorted(ad.saved),
        "extra": ad.extra,
    }
    if args.json:
        info["modules"] = {n: list(v) for n, v in ad.modules.items()}
        print(json.dumps(info, indent=2))
        return 0
    cfg = ad.config
    print(f"{args.file}: verakit adapter, {size:,} bytes ({ad.dtype})")
    print(f"  base          {ad.architecture} (model_type={ad.model_type}), fingerprint {ad.fingerprint}")
    kind = "" if cfg.projection_kind == "philox4x32-10" else f" kind={cfg.projection_kind}"
    print(f"  projection    seed={cfg.seed} distribution={cfg.distribution} sharing={cfg.projection_sharing} r={cfg.r}{kind}")
    print(f"  targets       {cfg.target_modules} -> {describe_modules(ad.modules)}")
    vectors = "d, b, m: DVoRA" if ad.config.magnitude else "d, b"
    print(f"  trained       {vec:,} vector params ({vectors}) + {info['saved_params']:,} in saved modules")
    print(f"  base samples  {_describe_samples(info['base_samples'])}")
    if ad.saved:
        print(f"  saved modules {', '.join(cfg.modules_to_save)}")
    if ad.extra:
        print(f"  extra         {json.dumps(ad.extra)[:200]}")
    for n, (d_out, d_in, kind) in list(ad.modules.items())[: args.max_layers]:
        print(f"    {n}  ({d_out} x {d_in}, {kind})")
    if len(ad.modules) > args.max_layers:
        print(f"    ... {len(ad.modules) - args.max_layers} more (--max-layers)")
    return 0


def _refuse_run_dir(folder: Path, command: str) -> None:
    """A `verakit train` RUN_DIR (or a grouped run's adapters/) given where its adapter file was meant:
    FileNotFoundError naming that file. A PEFT folder (adapter_config.json) is none."""
    from ..train.artifacts import artifact_in

    held = artifact_in(folder)
    if held is not None:
        raise FileNotFoundError(f"{folder}: a run folder; {command} takes its adapter file, {held}")


def _describe_samples(samples: dict | None) -> str:
    """What `load_adapter` will check of the base model's weights."""
    if samples is None:
        return "none (an older file): loading checks module names and shapes only"
    quant = f", taken from a {samples['quant']} base" if samples["quant"] else ""
    return (f"{samples['samples']} weights of {samples['modules']} modules{quant}: loading refuses another "
            "checkpoint (check_base=False to override)")


def run_inspect_peft(args: argparse.Namespace) -> int:
    """Describe a PEFT VeRA or LoRA adapter directory."""
    from ..interop import describe_peft_dir

    info = describe_peft_dir(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    kind = "PEFT VeRA" if info["peft_type"] == "VERA" else "PEFT LoRA"
    print(f"{args.file}: {kind} adapter directory, {info['bytes']:,} bytes (peft_version {info['peft_version']})")
    print(f"  base          {info['base_model_name_or_path']} (task_type={info['task_type']})")
    if info["peft_type"] == "VERA":
        proj = info["projection"]
        where = f"saved: vera_A {proj['vera_A']}, vera_B {proj['vera_B']}" if proj["saved"] else "not saved, regenerated"
        print(f"  projection    r={info['r']} projection_prng_key={proj['projection_prng_key']}, {where}")
    else:
        print(f"  rank          r={info['r']} lora_alpha={info['lora_alpha']} (scaling {info['scaling']})")
    print(f"  targets       {describe_modules(info['modules'])}")
    print(f"  trained       {info['adapter_params']:,} adapter params + {info['saved_params']:,} in saved modules")
    for n, (d_out, d_in) in list(info["modules"].items())[: args.max_layers]:
        print(f"    {n}  ({d_out} x {'?' if d_in is None else d_in})")
    if len(info["modules"]) > args.max_layers:
        print(f"    ... {len(info['modules']) - args.max_layers} more (--max-layers)")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    """Convert between verakit, PEFT VeRA and LoRA; print the summary as JSON."""
    from ..interop import convert
    from ..models import locate_model

    model = args.model
    if args.direction != "from-peft" and Path(args.src).is_dir():
        _refuse_run_dir(Path(args.src), f"convert {args.direction}")
        raise FileNotFoundError(f"{args.src}: a folder; convert {args.direction} takes a verakit adapter "
                                ".safetensors file (from-peft reads a PEFT VeRA folder)")
    if args.direction == "from-peft":
        if Path(args.dst).exists():  # write_adapter would replace it: a file, e.g. a trained adapter, lost
            raise FileExistsError(f"{args.dst} exists; convert writes a new adapter file, it does not overwrite "
                                  "one: choose another DST or delete it first")
        if model is not None:  # a missing folder or an uncached hub id: one line, not the hub's traceback
            model = locate_model(model)
    summary = convert(args.direction, args.src, args.dst, model=model, max_rank=args.max_rank)
    print(json.dumps(summary))
    return 0


def run_merge(args: argparse.Namespace) -> int:
    """Write a transformers model directory with the adapter merged into its weights."""
    from ..merge import merge_pretrained

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise FileExistsError(f"--out {args.out} is a file; merge writes a new model directory")
    if Path(args.adapter).is_dir():
        _refuse_run_dir(Path(args.adapter), "merge")
        raise FileNotFoundError(f"--adapter {args.adapter}: a folder; merge takes a verakit adapter .safetensors "
                                "file (a LoRA run's adapter/ folder merges with PEFT's merge_and_unload)")
    out = merge_pretrained(args.model, args.adapter, args.out, check_base=not args.no_base_check)
    print(f"merged model written to {out}")
    return 0


def _count(value: str) -> int:
    """An integer >= 0; argparse reports anything else under the option's name (exit 2)."""
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value!r}")
    return n


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `inspect`, `convert` and `merge`, in that order."""
    from ..interop import DIRECTIONS

    s = sub.add_parser("inspect", help="show an adapter's config, layers, size and fingerprint "
                       "(verakit file, PEFT VeRA or LoRA directory)")
    s.add_argument("file", help="verakit .safetensors file or PEFT adapter directory")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--max-layers", type=_count, default=8, help="adapted modules to list (default 8)")
    s.set_defaults(func=run_inspect)

    s = sub.add_parser("convert", help="PEFT VeRA -> verakit, verakit -> PEFT VeRA, verakit -> LoRA (exact)")
    s.add_argument("direction", choices=DIRECTIONS)
    s.add_argument("src", help="from-peft: PEFT VeRA directory; to-peft / to-lora: verakit adapter file")
    s.add_argument("dst", help="from-peft: verakit adapter file; to-peft / to-lora: new directory")
    s.add_argument("--model", default=None, help="from-peft: base model directory (needed for layer widths); "
                   "to-*: recorded as base_model_name_or_path")
    s.add_argument("--max-rank", type=int, default=None, help="to-lora: truncate by SVD above this rank "
                   "(vLLM serves <= 512); the relative error is reported")
    s.set_defaults(func=run_convert)

    s = sub.add_parser("merge", help="merge an adapter into a transformers model directory (with the base "
                       "model's tokenizer and the adapter's label names, loadable by pipeline())")
    s.add_argument("--model", default=None, help="base model: folder, hub id (cached, or when online), or the "
                   "alias minilm / smollm2 (default: the base model the adapter records; none recorded: MiniLM for "
                   "a classifier, SmolLM2-135M-Instruct for a causal LM)")
    s.add_argument("--adapter", required=True, help="adapter .safetensors file")
    s.add_argument("--out", required=True, type=folder_arg, help="output directory (must not exist or be empty)")
    s.add_argument("--no-base-check", action="store_true", help="merge even when the base weights differ from the "
                   "samples the adapter recorded (another checkpoint of the same architecture); names and shapes "
                   "are still checked (default: refused)")
    s.set_defaults(func=run_merge)

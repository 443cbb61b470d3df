"""The `verakit` command line. Each subcommand parses arguments and calls one library function."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]


def _inspect(args: argparse.Namespace) -> int:
    from .fileformat import read_adapter

    if Path(args.file).is_dir():
        return _inspect_peft(args)
    ad = read_adapter(args.file)
    size = Path(args.file).stat().st_size
    vec = sum(t.numel() for t in (*ad.d.values(), *ad.b.values()))
    info = {
        "file": str(args.file),
        "bytes": size,
        "dtype": ad.dtype,
        "config": ad.config.to_dict(),
        "model_type": ad.model_type,
        "architecture": ad.architecture,
        "fingerprint": ad.fingerprint,
        "layers": len(ad.modules),
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
    print(f"  targets       {cfg.target_modules} -> {len(ad.modules)} layers")
    print(f"  trained       {vec:,} vector params (d, b) + {info['saved_params']:,} in saved modules")
    if ad.saved:
        print(f"  saved modules {', '.join(cfg.modules_to_save)}")
    if ad.extra:
        print(f"  extra         {json.dumps(ad.extra)[:200]}")
    for n, (d_out, d_in, kind) in list(ad.modules.items())[: args.max_layers]:
        print(f"    {n}  ({d_out} x {d_in}, {kind})")
    if len(ad.modules) > args.max_layers:
        print(f"    ... {len(ad.modules) - args.max_layers} more (--max-layers)")
    return 0


def _inspect_peft(args: argparse.Namespace) -> int:
    from .interop import describe_peft_dir

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
    print(f"  targets       {info['layers']} layers")
    print(f"  trained       {info['adapter_params']:,} adapter params + {info['saved_params']:,} in saved modules")
    for n, (d_out, d_in) in list(info["modules"].items())[: args.max_layers]:
        print(f"    {n}  ({d_out} x {'?' if d_in is None else d_in})")
    if len(info["modules"]) > args.max_layers:
        print(f"    ... {len(info['modules']) - args.max_layers} more (--max-layers)")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .interop import convert

    summary = convert(args.direction, args.src, args.dst, model=args.model, max_rank=args.max_rank)
    print(json.dumps(summary))
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    from .interop import DIRECTIONS

    s = sub.add_parser("convert", help="PEFT VeRA -> verakit, verakit -> PEFT VeRA, verakit -> LoRA (exact)")
    s.add_argument("direction", choices=DIRECTIONS)
    s.add_argument("src", help="from-peft: PEFT VeRA directory; to-peft / to-lora: verakit adapter file")
    s.add_argument("dst", help="from-peft: verakit adapter file; to-peft / to-lora: new directory")
    s.add_argument("--model", default=None, help="from-peft: base model directory (needed for layer widths); "
                   "to-*: recorded as base_model_name_or_path")
    s.add_argument("--max-rank", type=int, default=None, help="to-lora: truncate by SVD above this rank "
                   "(vLLM serves <= 512); the relative error is reported")
    s.set_defaults(func=_convert)


def _merge(args: argparse.Namespace) -> int:
    from .merge import merge_pretrained

    out = merge_pretrained(args.model, args.adapter, args.out)
    print(f"merged model written to {out}")
    return 0


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _add_vera_options(s: argparse.ArgumentParser) -> None:
    from .config import DISTRIBUTIONS, SHARING_MODES

    g = s.add_argument_group("VeRA options (the paper's ablations; docs/tuning.md)")
    g.add_argument("--train-d", action=argparse.BooleanOptionalAction, default=True,
                   help="train d (--no-train-d: d stays at --d-initial; the paper's 'only b' uses 1.0)")
    g.add_argument("--train-b", action=argparse.BooleanOptionalAction, default=True,
                   help="train b (--no-train-b: b is fixed at ones; the paper's 'only d' uses --d-initial 0)")
    g.add_argument("--distribution", default="kaiming_uniform", choices=DISTRIBUTIONS,
                   help="projection values (default kaiming_uniform; uniform is on [0, 0.1), the paper's bad case)")
    g.add_argument("--projection-sharing", default="shared", choices=SHARING_MODES,
                   help="one projection pair for all layers (default) or a unique pair per layer")


def _train(args: argparse.Namespace) -> int:
    from .train.causal_data import CAUSAL_TASKS
    from .train.classify import TrainArgs, train_classifier
    from .train.loop import TrainingInterrupted
    from .train.methods import VERA_OPTION_DEFAULTS
    from .train.vision import IMAGE_TASK

    if args.group_column is not None:
        return _train_grouped(args)
    if args.shared_head or args.max_groups is not None or args.min_group_examples is not None:
        print("verakit train: error: --shared-head, --max-groups and --min-group-examples need --group-column",
              file=sys.stderr)
        return 2
    ablation = [("--no-" if getattr(args, k) is False else "--") + k.replace("_", "-")
                for k, v in VERA_OPTION_DEFAULTS.items() if getattr(args, k) != v]
    if ablation and (args.task in CAUSAL_TASKS or args.task == IMAGE_TASK):
        print(f"verakit train: error: {', '.join(ablation)}: VeRA ablation options are wired for classification "
              "tasks only", file=sys.stderr)
        return 2
    if args.task in CAUSAL_TASKS:
        return _train_causal(args)
    if args.task == IMAGE_TASK:
        return _train_images(args)
    _log_to_stderr()
    fields = {k: getattr(args, k) for k in TrainArgs.__dataclass_fields__}
    try:
        metrics = train_classifier(TrainArgs(**fields))
    except TrainingInterrupted as e:
        print(f"verakit train: {e}", file=sys.stderr)
        return 130
    except ValueError as e:  # bad data, bad settings, a mismatched --resume: the message names the culprit
        print(f"verakit train: error: {e}", file=sys.stderr)
        return 2
    if metrics:
        main = metrics["main_metric"]
        print(f"{metrics['task']} {metrics['method']}: best dev {main} {metrics['metric'][main]:.4f} "
              f"(step {metrics['best_step']}); {metrics['trainable_params']:,} adapter + {metrics['head_params']:,} "
              f"head params; artifact {metrics['adapter_bytes']:,} bytes; {metrics['train_seconds']:.1f} s; "
              f"results in {args.out}")
    return 0


def _train_grouped(args: argparse.Namespace) -> int:
    from .train.classify import TrainArgs
    from .train.grouped import GroupedArgs, train_grouped
    from .train.loop import TrainingInterrupted

    _log_to_stderr()
    fields = {k: getattr(args, k) for k in TrainArgs.__dataclass_fields__}
    limits = {k: getattr(args, k) for k in ("max_groups", "min_group_examples") if getattr(args, k) is not None}
    try:
        m = train_grouped(GroupedArgs(TrainArgs(**fields), args.group_column, args.shared_head, **limits))
    except TrainingInterrupted as e:
        print(f"verakit train: {e}", file=sys.stderr)
        return 130
    except ValueError as e:  # bad data, bad groups, bad settings: the message names the culprit
        print(f"verakit train: error: {e}", file=sys.stderr)
        return 2
    if m:
        main = m["main_metric"]
        print(f"{m['task']} vera x {m['n_groups']} groups: best dev {main} {m['metric'][main]:.4f} "
              f"(step {m['best_step']}); {m['trainable_params']:,} adapter + {m['head_params']:,} head params per "
              f"group; {m['adapters_total_bytes']:,} bytes of adapters; {m['train_seconds']:.1f} s; "
              f"adapters in {Path(args.out) / 'adapters'}")
    return 0


def _add_group_options(s: argparse.ArgumentParser) -> None:
    from .train.grouped import GroupedArgs

    defaults = GroupedArgs.__dataclass_fields__
    g = s.add_argument_group("one adapter per group (classification, e.g. --task csv)")
    g.add_argument("--group-column", default=None, help="train one VeRA adapter per distinct value of this column "
                   "in one run over mixed batches; writes RUN_DIR/adapters/NAME.safetensors (docs/grouped.md)")
    g.add_argument("--shared-head", action="store_true", help="train one classifier head for all groups "
                   "(default: one head per group)")
    g.add_argument("--max-groups", type=int, default=None, help="refuse more distinct groups than this "
                   f"(default {defaults['max_groups'].default})")
    g.add_argument("--min-group-examples", type=int, default=None, help="refuse groups with fewer training rows "
                   f"(default {defaults['min_group_examples'].default})")


def _eval(args: argparse.Namespace) -> int:
    from .train.causal_data import CAUSAL_TASKS
    from .train.classify import evaluate_classifier
    from .train.methods import read_artifact_info
    from .train.vision import IMAGE_TASK

    task = args.task or read_artifact_info(args.adapter).get("task")
    if task in CAUSAL_TASKS:
        return _eval_causal(args)
    if task == IMAGE_TASK:
        return _eval_images(args)
    _log_to_stderr()
    try:
        result = evaluate_classifier(args.adapter, task=args.task, data_dir=args.data_dir, model=args.model,
                                     max_eval_samples=args.max_eval_samples)
    except ValueError as e:  # bad data, an unusable artifact, labels that do not match the task
        print(f"verakit eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


def _train_causal(args: argparse.Namespace) -> int:
    from .train.causal import CAUSAL_METHODS, CausalArgs, train_causal
    from .train.loop import TrainingInterrupted

    if args.head_lr is not None or args.method not in CAUSAL_METHODS:
        print(f"verakit train: error: causal-LM tasks take --method {'/'.join(CAUSAL_METHODS)} and no --head-lr "
              "(a language model has no task head)", file=sys.stderr)
        return 2
    _log_to_stderr()
    fields = {k: getattr(args, k) for k in CausalArgs.__dataclass_fields__}
    fields["epochs"] = args.epochs or 1
    try:
        m = train_causal(CausalArgs(**fields))
    except TrainingInterrupted as e:
        print(f"verakit train: {e}", file=sys.stderr)
        return 130
    except ValueError as e:  # bad data or settings: the message names the file, line or field
        print(f"verakit train: error: {e}", file=sys.stderr)
        return 2
    if m:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in m["metric"].items())
        print(f"{m['task']} {m['method']}: best held-out {shown} (step {m['best_step']}); {m['trainable_params']:,} "
              f"trainable params; artifact {m['adapter_bytes']:,} bytes; {m['train_seconds']:.1f} s; peak RSS "
              f"{m['peak_rss_mib']:,.0f} MiB; results in {args.out}")
    return 0


def _eval_causal(args: argparse.Namespace) -> int:
    from .train.causal import evaluate_causal
    from .train.generate import DecodeConfig

    _log_to_stderr()
    decode = None
    if args.num_beams is not None or args.max_new_tokens is not None:
        decode = DecodeConfig(max_new_tokens=args.max_new_tokens or 64, num_beams=args.num_beams or 1)
    try:
        result = evaluate_causal(args.adapter, data_dir=args.data_dir, model=args.model,
                                 max_eval_samples=args.max_eval_samples, gen_eval_samples=args.gen_eval_samples,
                                 eval_split=args.split, decode=decode)
    except ValueError as e:  # bad data, an unusable artifact, a split the task lacks
        print(f"verakit eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .train.generate import DecodeConfig, generate_with_artifact

    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line for line in Path(args.prompts_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        print("verakit generate: error: give --prompt TEXT or --prompts-file FILE", file=sys.stderr)
        return 2
    texts = generate_with_artifact(args.adapter, prompts, model=args.model, chat_template=args.chat_template,
                                   config=DecodeConfig(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams))
    if args.json:
        print(json.dumps([{"prompt": p, "generation": t} for p, t in zip(prompts, texts, strict=True)], indent=2))
    else:
        print("\n\n".join(texts))
    return 0


def _add_causal_options(s: argparse.ArgumentParser, train: bool) -> None:
    g = s.add_argument_group("causal-LM tasks (e2e, instruct, jsonl)")
    if train:
        g.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                       help="render prompts with the tokenizer's chat template (default: on for instruct when "
                       "the tokenizer has one, else off)")
        g.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer's activations "
                       "in backward: less memory, one more forward per step")
        g.add_argument("--held-out", type=float, default=0.1, help="instruct / one-file jsonl: fraction held out "
                       "for evaluation (default 0.1)")
        g.add_argument("--report-samples", type=int, default=4, help="held-out generations shown in report.md, "
                       "before and after training (default 4)")
    g.add_argument("--gen-eval-samples", type=int, default=None, help="held-out examples generated and scored "
                   "(BLEU, ROUGE-L, chrF) at each evaluation (default: e2e 100, others 0)")
    g.add_argument("--num-beams", type=int, default=1 if train else None, help="1: greedy (default); > 1: beam search")
    g.add_argument("--max-new-tokens", type=int, default=64 if train else None, help="generation limit (default 64)")
    if not train:
        g.add_argument("--split", default="dev", choices=["dev", "test"], help="e2e: dev or test set (default dev)")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("generate", help="generate text with a trained causal-LM adapter (or the base model)")
    s.add_argument("--adapter", default=None, help="RUN_DIR/adapter.safetensors, RUN_DIR/adapter (LoRA) or "
                   "RUN_DIR/trained.safetensors (default: none, the base model alone)")
    s.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    s.add_argument("--prompts-file", default=None, help="a text file, one prompt per line")
    s.add_argument("--model", default=None, help="base model (default: the adapter's, else SmolLM2-135M-Instruct)")
    s.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="default: as the adapter was trained; for the base model, on when it has a template")
    s.add_argument("--num-beams", type=int, default=1, help="1: greedy (default); > 1: beam search")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--json", action="store_true", help="print a JSON list of {prompt, generation}")
    s.set_defaults(func=_generate)


def _train_images(args: argparse.Namespace) -> int:
    from .train.loop import TrainingInterrupted
    from .train.vision import ImageArgs, train_images

    _log_to_stderr()
    fields = {k: getattr(args, k) for k in ImageArgs.__dataclass_fields__}
    try:
        m = train_images(ImageArgs(**fields))
    except TrainingInterrupted as e:
        print(f"verakit train: {e}", file=sys.stderr)
        return 130
    except ValueError as e:  # bad images, bad settings: the message names the file or field
        print(f"verakit train: error: {e}", file=sys.stderr)
        return 2
    if m:
        print(f"images {m['method']}: best {m['eval_split']} accuracy {m['metric']['accuracy']:.4f} (step "
              f"{m['best_step']}), last {m['final_metric']['accuracy']:.4f}; {m['trainable_params']:,} adapter + "
              f"{m['head_params']:,} head params; artifact {m['adapter_bytes']:,} bytes; {m['train_seconds']:.1f} s; "
              f"results in {args.out}")
    return 0


def _eval_images(args: argparse.Namespace) -> int:
    from .train.vision import evaluate_images

    _log_to_stderr()
    try:
        result = evaluate_images(args.adapter, data_dir=args.data_dir, model=args.model,
                                 max_eval_samples=args.max_eval_samples)
    except ValueError as e:  # bad images, an unusable artifact, classes that do not match the training ones
        print(f"verakit eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


def _add_image_options(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("image classification (--task images; docs/vision.md)")
    g.add_argument("--shots", type=int, default=None, help="training images per class, a seeded choice "
                   "(few-shot protocol; default: all)")
    g.add_argument("--augment", action="store_true", help="random horizontal flips and shifts of training images")


def _log_to_stderr() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .train.causal_data import CAUSAL_TASKS
    from .train.data import TASKS
    from .train.methods import METHODS
    from .train.vision import IMAGE_TASK

    s = sub.add_parser("train", help="finetune a sequence classifier with VeRA, LoRA, full or head-only")
    s.add_argument("--task", required=True, choices=[*TASKS, *CAUSAL_TASKS, IMAGE_TASK])
    s.add_argument("--data-dir", required=True, help="GLUE task folder (or GLUE root); for csv, the folder "
                   "holding train and dev .csv/.jsonl/.tsv; for images, a folder or .zip of train/<class>/ and test/<class>/")
    s.add_argument("--out", required=True, help="RUN_DIR: adapter, metrics.json, report.md, curve.png")
    s.add_argument("--model", default=None, help="model folder or hub id (default: all-MiniLM-L6-v2, offline)")
    s.add_argument("--method", default="vera", choices=list(METHODS))
    # --adapter-rank: the same flag under torchrun, whose own parser rejects "--r" as an ambiguous prefix.
    s.add_argument("--r", "--adapter-rank", dest="r", type=int, default=None,
                   help="rank: VeRA 1024, LoRA 8 by default")
    s.add_argument("--d-initial", type=float, default=0.1, help="VeRA's initial d (default 0.1)")
    s.add_argument("--target-modules", type=_csv, default=None, help="comma-separated leaf names "
                   "(default: the model type's, query,value for BERT)")
    s.add_argument("--epochs", type=int, default=None, help="default: per task (docs/training.md)")
    s.add_argument("--batch-size", type=int, default=32, help="global batch size (default 32)")
    s.add_argument("--max-length", type=int, default=128, help="max tokens per example (default 128)")
    s.add_argument("--lr", type=float, default=None, help="adapter learning rate (default: per task)")
    s.add_argument("--head-lr", type=float, default=None, help="classifier head learning rate (default: per task)")
    s.add_argument("--warmup-ratio", type=float, default=0.06)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-train-samples", type=int, default=None)
    s.add_argument("--max-eval-samples", type=int, default=None)
    s.add_argument("--eval-every", type=int, default=None, help="also evaluate every N steps")
    s.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint (written on Ctrl-C)")
    s.add_argument("--quiet", action="store_true", help="log lines instead of a progress bar")
    _add_vera_options(s)
    _add_group_options(s)
    _add_causal_options(s, train=True)
    _add_image_options(s)
    s.set_defaults(func=_train)

    s = sub.add_parser("eval", help="evaluate a trained adapter on a task's dev set")
    s.add_argument("--task", default=None, choices=[*TASKS, *CAUSAL_TASKS, IMAGE_TASK],
                   help="default: the task it was trained on")
    s.add_argument("--data-dir", default=None, help="default: the folder it was trained on")
    s.add_argument("--adapter", required=True, help="RUN_DIR/adapter.safetensors, RUN_DIR/adapter (LoRA) "
                   "or RUN_DIR/trained.safetensors (full, head)")
    s.add_argument("--model", default=None, help="base model (default: the one it was trained on)")
    s.add_argument("--max-eval-samples", type=int, default=None, help="default: as in training")
    _add_causal_options(s, train=False)
    s.set_defaults(func=_eval)


def _tune(args: argparse.Namespace) -> int:
    from .train.classify import TrainArgs
    from .train.loop import TrainingInterrupted
    from .train.tune import TuneArgs, default_space, load_space, parse_dim, tune

    _log_to_stderr()
    fields = {k: getattr(args, k) for k in TrainArgs.__dataclass_fields__ if hasattr(args, k)}
    try:
        space = tuple(parse_dim(p) for p in args.param or ())
        space += load_space(args.space) if args.space else ()
        if not args.param and not args.space:
            space = default_space(args.method)
        s = tune(TuneArgs(TrainArgs(**fields), space, trials=args.trials, timeout=args.timeout, pruner=args.pruner,
                          seed=args.sampler_seed, study_name=args.study_name))
    except TrainingInterrupted as e:
        print(f"verakit tune: {e.args[0].split(';')[0]}; rerun the same command to resume the study (the "
              "interrupted trial is recorded as failed and not continued)", file=sys.stderr)
        return 130
    except ValueError as e:  # bad space, budget, data or settings: the message names the culprit
        print(f"verakit tune: error: {e}", file=sys.stderr)
        return 2
    st, best = s["states"], s["best"]
    print(f"{s['n_trials']} trials ({st['COMPLETE']} complete, {st['PRUNED']} pruned, {st['FAIL']} failed); "
          + (f"best dev {s['main_metric']} {best['value']:.4f} (trial {best['number']}: "
             + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
             + ")" if best else "no trial completed") + f"; report in {s['report']}")
    return 0


def _add_tune(sub: argparse._SubParsersAction) -> None:
    from .train.data import TASKS
    from .train.methods import METHODS
    from .train.tune import PRUNERS, TUNABLE

    s = sub.add_parser("tune", help="hyperparameter search (Optuna) over verakit train runs, resumable, with a report")
    s.add_argument("--task", required=True, choices=list(TASKS))
    s.add_argument("--data-dir", required=True, help="as for verakit train")
    s.add_argument("--out", required=True, help="RUN_DIR: study.db (resume by rerunning), trials/NNNN/, report.md, "
                   "importance.png, summary.json")
    s.add_argument("--model", default=None, help="model folder or hub id (default: all-MiniLM-L6-v2, offline)")
    s.add_argument("--method", default="vera", choices=list(METHODS))
    g = s.add_argument_group("budget and search")
    g.add_argument("--trials", type=int, default=None, help="finished (complete + pruned) trials the study should "
                   "hold; a rerun runs only the missing ones")
    g.add_argument("--timeout", type=float, default=None, help="seconds for this invocation (no trial starts after it)")
    g.add_argument("--param", action="append", metavar="SPEC", help="a searched setting (repeatable): NAME=float:LOW:"
                   "HIGH[:log], NAME=int:LOW:HIGH[:log] or NAME=choice:A,B,...; NAME one of " + ", ".join(TUNABLE)
                   + " (default space: docs/tuning.md)")
    g.add_argument("--space", default=None, help="JSON file of dimensions (docs/tuning.md), with or instead of --param")
    g.add_argument("--pruner", default="median", choices=list(PRUNERS), help="stop trials below the median of "
                   "earlier ones at the same point (default), or never")
    g.add_argument("--sampler-seed", type=int, default=0)
    g.add_argument("--study-name", default="verakit-tune")
    f = s.add_argument_group("fixed training settings (as verakit train; a searched setting overrides its flag)")
    f.add_argument("--r", "--adapter-rank", dest="r", type=int, default=None)
    f.add_argument("--d-initial", type=float, default=0.1)
    f.add_argument("--target-modules", type=_csv, default=None)
    f.add_argument("--epochs", type=int, default=None, help="default: per task (docs/training.md)")
    f.add_argument("--batch-size", type=int, default=32)
    f.add_argument("--max-length", type=int, default=128)
    f.add_argument("--lr", type=float, default=None)
    f.add_argument("--head-lr", type=float, default=None)
    f.add_argument("--warmup-ratio", type=float, default=0.06)
    f.add_argument("--seed", type=int, default=0, help="training seed of every trial (data subset, order, init)")
    f.add_argument("--max-train-samples", type=int, default=None)
    f.add_argument("--max-eval-samples", type=int, default=None)
    f.add_argument("--eval-every", type=int, default=None, help="also evaluate (and maybe prune) every N steps")
    _add_vera_options(s)
    s.set_defaults(func=_tune)


def _serve(args: argparse.Namespace) -> int:
    from .serve.app import run_server
    from .serve.options import ServeOptions

    fields = {k: getattr(args, k) for k in ServeOptions.__dataclass_fields__}
    try:
        options = ServeOptions(**fields)
    except ValueError as e:
        print(f"verakit serve: error: {e}", file=sys.stderr)
        return 2
    run_server(options)
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    import os

    s = sub.add_parser("serve", help="serve many adapters over one base model over HTTP (mixed-adapter batches)")
    s.add_argument("--model", default=None, help="base model folder, hub id, or minilm / smollm2 (default: per task)")
    s.add_argument("--adapters", required=True, help="directory of NAME.safetensors adapters, loaded on first use")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--capacity", type=int, default=256, help="adapters resident at once, LRU-evicted (default 256)")
    s.add_argument("--admin-token", default=os.environ.get("VERAKIT_ADMIN_TOKEN"),
                   help="bearer token enabling adapter upload/delete (default: $VERAKIT_ADMIN_TOKEN; off without)")
    s.add_argument("--max-batch", type=int, default=32, help="most rows per batched forward (default 32)")
    s.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill (default 5)")
    s.add_argument("--task", default=None, choices=["classify", "generate"], help="default: from the model")
    s.add_argument("--rank", type=int, default=None, help="bank rank (default: the largest adapter rank on disk)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20)
    s.add_argument("--max-upload-bytes", type=int, default=64 << 20)
    s.add_argument("--max-inputs", type=int, default=64, help="inputs per classify request / prompts per completion")
    s.add_argument("--max-input-tokens", type=int, default=512)
    s.add_argument("--max-new-tokens", type=int, default=256, help="largest max_tokens allowed")
    s.add_argument("--max-n", type=int, default=8, help="largest n allowed")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    s.set_defaults(func=_serve)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="verakit", description="VeRA adapters: train, inspect, merge, serve.")
    p.add_argument("--version", action="version", version=f"verakit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="show an adapter's config, layers, size and fingerprint "
                       "(verakit file, PEFT VeRA or LoRA directory)")
    s.add_argument("file", help="verakit .safetensors file or PEFT adapter directory")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--max-layers", type=int, default=8, help="layers to list (default 8)")
    s.set_defaults(func=_inspect)

    _add_convert(sub)

    s = sub.add_parser("merge", help="merge an adapter into a transformers model directory")
    s.add_argument("--model", required=True, help="base model directory (or hub id when online)")
    s.add_argument("--adapter", required=True, help="adapter .safetensors file")
    s.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    s.set_defaults(func=_merge)

    _add_serve(sub)

    _add_train(sub)
    _add_tune(sub)
    _add_generate(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .config import ConfigError
    from .fileformat import AdapterError
    from .train.data import DataError  # stdlib only
    from .train.lm_data import LMDataError
    from .train.methods import ArtifactError

    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (AdapterError, ConfigError, FileExistsError, FileNotFoundError, DataError, ArtifactError, LMDataError) as e:
        print(f"verakit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

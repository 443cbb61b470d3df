"""`verakit train` and `verakit eval`: dispatch by task to the classification, grouped, causal-LM and
image recipes of `verakit.train`, each a small function calling one library function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import (
    add_base_check_option,
    add_run_options,
    add_target_options,
    add_vera_options,
    baseline_note,
    command_line,
    defaults_help,
    dev_once_note,
    field_default,
    fields_of,
    folder_arg,
    interrupted_run,
    print_evaluation,
    run_training,
)

__all__ = [
    "add_parsers",
    "run_eval",
    "run_eval_causal",
    "run_eval_images",
    "run_train",
    "run_train_causal",
    "run_train_grouped",
    "run_train_images",
]


def run_train(args: argparse.Namespace) -> int:
    """Refuse flags the task cannot use (2), then train the recipe the task and flags name."""
    from ..train.causal import CAUSAL_TASKS
    from ..train.classify import TrainArgs, train_classifier
    from ..train.grouped.recipe import COMPUTE_DTYPE_REFUSED
    from ..train.methods import VERA_OPTION_DEFAULTS
    from ..train.vision import IMAGE_TASK

    finished = _finished_run(Path(args.out))
    if finished is not None:
        print(f"verakit train: error: {finished}", file=sys.stderr)
        return 2
    if args.adapter_compute_dtype != "fp32" and (args.task in CAUSAL_TASKS or args.task == IMAGE_TASK):
        # Their arguments have no such field; GroupedArgs refuses it itself, with the same message.
        print(f"verakit train: error: {COMPUTE_DTYPE_REFUSED}", file=sys.stderr)
        return 2
    if args.task == IMAGE_TASK and args.mixed_precision != "no":  # (--group-by-length: images have one length)
        print("verakit train: error: --mixed-precision is wired for text tasks only", file=sys.stderr)
        return 2
    if args.quantize is not None and args.mixed_precision != "no":
        print("verakit train: error: --mixed-precision bf16 with --quantize is not supported: the quantized "
              "layers pick their own compute dtype", file=sys.stderr)
        return 2
    if args.quantize is not None and args.task not in CAUSAL_TASKS:
        print("verakit train: error: --quantize is wired for causal-LM tasks (e2e, instruct, jsonl) only",
              file=sys.stderr)
        return 2
    if args.selection_rows and (args.task in CAUSAL_TASKS or args.task == IMAGE_TASK):
        print("verakit train: error: --selection-rows is wired for text classification only (causal LMs: --held-out)",
              file=sys.stderr)
        return 2
    if args.group_column is not None:
        return run_train_grouped(args)
    if args.shared_head or args.max_groups is not None or args.min_group_examples is not None:
        print("verakit train: error: --shared-head, --max-groups and --min-group-examples need --group-column",
              file=sys.stderr)
        return 2
    ablation = [("--no-" if getattr(args, k) is False else "--") + k.replace("_", "-")
                for k, v in VERA_OPTION_DEFAULTS.items() if getattr(args, k) != v
                and not (k == "magnitude" and (args.task in CAUSAL_TASKS or args.task == IMAGE_TASK))]  # DVoRA: every task
    if ablation and (args.task in CAUSAL_TASKS or args.task == IMAGE_TASK):
        print(f"verakit train: error: {', '.join(ablation)}: VeRA ablation options are wired for classification "
              "tasks only", file=sys.stderr)
        return 2
    if args.task in CAUSAL_TASKS:
        return run_train_causal(args)
    if args.task == IMAGE_TASK:
        return run_train_images(args)
    fields = fields_of(TrainArgs, args)
    code, metrics = run_training(lambda: train_classifier(TrainArgs(**fields)))
    if metrics:
        main = metrics["main_metric"]
        split = "held-out" if "dev" in metrics else "dev"
        dev = dev_once_note(metrics, main)
        note = baseline_note(metrics["metric"][main], metrics.get("baseline"), main)
        print(f"{metrics['task']} {metrics['method']}: best {split} {main} {metrics['metric'][main]:.4f} "
              f"(step {metrics['best_step']}){note}{dev}; {metrics['trainable_params']:,} adapter + {metrics['head_params']:,} "
              f"head params; artifact {metrics['adapter_bytes']:,} bytes; {metrics['train_seconds']:.1f} s; "
              f"results in {args.out}")
    return code


def _finished_run(run_dir: Path) -> str | None:
    """Why --out cannot be used when it holds a finished run (metrics.json and an artifact, no Ctrl-C
    checkpoint), else None. Rerunning the README's command said "pass --resume", and --resume then said
    "no checkpoint to resume"."""
    from ..train.artifacts import artifact_in

    if not (run_dir / "metrics.json").is_file() or (run_dir / "checkpoint" / "state.pt").is_file():
        return None
    artifact = artifact_in(run_dir) or (run_dir / "adapter" if (run_dir / "adapter").is_dir() else None)  # LoRA
    if artifact is None:
        return None
    return (f"{run_dir}: holds a finished run (metrics.json, {artifact.name}), so there is nothing to resume and it "
            "is not overwritten; choose another --out, or delete the folder to train again")


def run_train_grouped(args: argparse.Namespace) -> int:
    """--group-column: one VeRA adapter per group in one run."""
    from ..train.classify import TrainArgs
    from ..train.grouped import GroupedArgs, train_grouped

    fields = fields_of(TrainArgs, args)
    limits = {k: getattr(args, k) for k in ("max_groups", "min_group_examples") if getattr(args, k) is not None}
    code, m = run_training(
        lambda: train_grouped(GroupedArgs(TrainArgs(**fields), args.group_column, args.shared_head, **limits)))
    if m:
        main = m["main_metric"]
        note = baseline_note(m["metric"][main], m.get("baseline"), main)
        print(f"{m['task']} vera x {m['n_groups']} groups: best dev {main} {m['metric'][main]:.4f} "
              f"(step {m['best_step']}){note}; {m['trainable_params']:,} adapter + {m['head_params']:,} head params per "
              f"group; {m['adapters_total_bytes']:,} bytes of adapters; {m['train_seconds']:.1f} s; "
              f"adapters in {Path(args.out) / 'adapters'}")
    return code


def run_train_causal(args: argparse.Namespace) -> int:
    """Causal-LM tasks (e2e, instruct, jsonl): vera, lora or full, no head."""
    from ..train.causal import CAUSAL_METHODS, CausalArgs, train_causal

    if args.head_lr is not None or args.head is not None or args.method not in CAUSAL_METHODS:
        print(f"verakit train: error: causal-LM tasks take --method {'/'.join(CAUSAL_METHODS)} and no --head-lr "
              "or --head (a language model has no task head)", file=sys.stderr)
        return 2
    fields = fields_of(CausalArgs, args)
    code, m = run_training(lambda: train_causal(CausalArgs(**fields)))
    if m:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in m["metric"].items())
        print(f"{m['task']} {m['method']}: best held-out {shown} (step {m['best_step']}); {m['trainable_params']:,} "
              f"trainable params; artifact {m['adapter_bytes']:,} bytes; {m['train_seconds']:.1f} s; peak RSS "
              f"{m['peak_rss_mib']:,.0f} MiB; results in {args.out}")
    return code


def run_train_images(args: argparse.Namespace) -> int:
    """--task images: an image classifier on class folders."""
    from ..train.vision import ImageArgs, train_images

    if args.head is not None:
        print("verakit train: error: --head applies to text classifiers; an image classifier's head is one linear "
              "layer, trained in full", file=sys.stderr)
        return 2
    fields = fields_of(ImageArgs, args)
    code, m = run_training(lambda: train_images(ImageArgs(**fields)))
    if m:
        note = baseline_note(m["metric"]["accuracy"], m.get("baseline"), "accuracy")
        print(f"images {m['method']}: best {m['eval_split']} accuracy {m['metric']['accuracy']:.4f} (step "
              f"{m['best_step']}), last {m['final_metric']['accuracy']:.4f}{note}; {m['trainable_params']:,} adapter + "
              f"{m['head_params']:,} head params; artifact {m['adapter_bytes']:,} bytes; {m['train_seconds']:.1f} s; "
              f"results in {args.out}")
    return code


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate a saved artifact with the recipe of its task (--task, else the one it was trained on); one
    that records no task (saved outside `verakit train`) and gets no --task is refused (2)."""
    from ..train.artifacts import read_artifact_info, recorded
    from ..train.causal import CAUSAL_TASKS
    from ..train.classify import evaluate_classifier
    from ..train.vision import IMAGE_TASK

    run_dir = interrupted_run(args.adapter)
    if run_dir is not None:
        resume = _resume_command(run_dir)
        if not Path(args.adapter).is_file() and not (Path(args.adapter) / "adapter_config.json").is_file():
            print(f"verakit eval: error: {run_dir}: this run was interrupted (Ctrl-C) before it saved an artifact to "
                  f"evaluate; continue it with\n  {resume}\nthen evaluate what it writes", file=sys.stderr)
            return 2
        print(f"verakit eval: note: {run_dir} was interrupted before it finished: this scores its best evaluation "
              f"so far; finish it with\n  {resume}", file=sys.stderr)
    info = read_artifact_info(args.adapter)
    task = recorded(info, args.adapter, "task", args.task, "--task and --data-dir")

    def kind(t: str) -> str:
        return "causal-LM" if t in CAUSAL_TASKS else "image" if t == IMAGE_TASK else "classification"

    if info.get("task") is not None and kind(info["task"]) != kind(task):  # before loading a base it cannot fit
        print(f"verakit eval: error: {args.adapter}: a {info['task']!r} adapter ({kind(info['task'])}), but --task "
              f"{task} is a {kind(task)} task; evaluate it on its own kind of task", file=sys.stderr)
        return 2
    if task in CAUSAL_TASKS:
        return run_eval_causal(args)
    if task == IMAGE_TASK:
        return run_eval_images(args)
    return print_evaluation(lambda: evaluate_classifier(
        args.adapter, task=args.task, data_dir=args.data_dir, model=args.model, max_eval_samples=args.max_eval_samples,
        check_base=args.check_base))


def _resume_command(run_dir: Path) -> str:
    """`verakit train` with the settings in RUN_DIR/config.json, plus --resume: the command that continues it."""
    import json

    try:
        values = json.loads((run_dir / "config.json").read_text())["args"]
    except (OSError, ValueError, KeyError):
        return "the same `verakit train` command that started it, with --resume"
    sub = argparse.ArgumentParser().add_subparsers()
    add_parsers(sub)
    return command_line(sub.choices["train"], "verakit train", values, ["--resume"])


def run_eval_causal(args: argparse.Namespace) -> int:
    """Held-out loss (and generation metrics) of a causal-LM artifact."""
    from ..train.causal import evaluate_causal
    from .common import decode_config

    def evaluate() -> dict:
        decode = None  # as in training; one flag given: the other takes DecodeConfig's default
        if args.num_beams is not None or args.max_new_tokens is not None:  # 0 is refused, not replaced
            given = {k: getattr(args, k) for k in ("num_beams", "max_new_tokens") if getattr(args, k) is not None}
            decode = decode_config(**given)  # inside print_evaluation: a bad value is exit 2, named by its flag
        return evaluate_causal(
            args.adapter, task=args.task, data_dir=args.data_dir, model=args.model,
            max_eval_samples=args.max_eval_samples, gen_eval_samples=args.gen_eval_samples, eval_split=args.split,
            decode=decode, check_base=args.check_base)

    return print_evaluation(evaluate)


def run_eval_images(args: argparse.Namespace) -> int:
    """Accuracy of an image-classifier artifact on the test split."""
    from ..train.vision import evaluate_images

    return print_evaluation(lambda: evaluate_images(
        args.adapter, data_dir=args.data_dir, model=args.model, max_eval_samples=args.max_eval_samples,
        check_base=args.check_base))


def _add_group_options(s: argparse.ArgumentParser) -> None:
    from ..train.grouped import GroupedArgs

    defaults = GroupedArgs.__dataclass_fields__
    g = s.add_argument_group("one adapter per group (classification, e.g. --task csv)")
    g.add_argument("--group-column", default=None, help="train one VeRA adapter per distinct value of this column "
                   "in one run over mixed batches; writes RUN_DIR/adapters/NAME.safetensors (docs/grouped.md; "
                   "default: none, one adapter for all rows)")
    g.add_argument("--shared-head", action="store_true", help="train one classifier head for all groups "
                   "(default: one head per group)")
    g.add_argument("--max-groups", type=int, default=None, help="refuse more distinct groups than this "
                   f"(default {defaults['max_groups'].default})")
    g.add_argument("--min-group-examples", type=int, default=None, help="refuse groups with fewer training rows "
                   f"(default {defaults['min_group_examples'].default})")


def _add_causal_options(s: argparse.ArgumentParser, train: bool) -> None:
    from ..quant import QUANT_KINDS

    g = s.add_argument_group("causal-LM tasks (e2e, instruct, jsonl)")
    if train:
        g.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=field_default("chat_template"),
                       help="render prompts with the tokenizer's chat template (default: on for instruct when "
                       "the tokenizer has one, else off)")
        g.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer's activations "
                       "in backward: less memory, one more forward per step (default off)")
        g.add_argument("--held-out", type=float, default=field_default("held_out"), help="instruct / one-file jsonl: "
                       f"fraction held out for evaluation (default {field_default('held_out')})")
        g.add_argument("--report-samples", type=int, default=field_default("report_samples"), help="held-out "
                       f"generations shown in report.md, before and after training (default {field_default('report_samples')})")
        g.add_argument("--quantize", choices=QUANT_KINDS, default=field_default("quantize"), help="load the base's "
                       "linear layers quantized by bitsandbytes (QVeRA; --method vera only; the adapter loads into "
                       "the fp32 base; default: fp32 base)")
    g.add_argument("--gen-eval-samples", type=int, default=None, help="held-out examples generated and scored "
                   "(BLEU, ROUGE-L, chrF) at each evaluation (default: " + (
                       defaults_help("gen_eval_samples", ("causal LMs",)) if train else "as in training") + ")")
    beams, new_tokens = field_default("num_beams"), field_default("max_new_tokens")
    g.add_argument("--num-beams", type=int, default=beams if train else None, help="1: greedy; > 1: beam search "
                   f"(default {beams if train else 'as in training'})")
    g.add_argument("--max-new-tokens", type=int, default=new_tokens if train else None, help="generation limit "
                   f"(default {new_tokens if train else 'as in training'})")
    if not train:
        g.add_argument("--split", default="dev", choices=["dev", "test"], help="e2e: dev or test set (default dev)")


def _add_image_options(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("image classification (--task images; docs/vision.md)")
    g.add_argument("--shots", type=int, default=None, help="training images per class, a seeded choice "
                   "(few-shot protocol; default: all)")
    g.add_argument("--augment", action="store_true", help="random horizontal flips and shifts of training images "
                   "(default off)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `train` and `eval`, in that order."""
    from ..train.causal import CAUSAL_METHODS, CAUSAL_TASKS
    from ..train.classify import TASKS
    from ..train.methods import METHODS
    from ..train.vision import IMAGE_TASK

    what = ("train an adapter (VeRA, LoRA, full fine-tuning or head only) for sequence classification or "
            "regression (GLUE tasks, your csv), a causal LM (e2e, instruct, jsonl), image classification (images), "
            "or one VeRA adapter per group of rows (--group-column)")
    s = sub.add_parser("train", help=what, description=what[0].upper() + what[1:] + ". Writes RUN_DIR: the best "
                       "evaluation's adapter, config.json, metrics.json, report.md, curve.png (docs/training.md).")
    add_target_options(
        s, tasks=[*TASKS, *CAUSAL_TASKS, IMAGE_TASK], methods=METHODS,
        task="GLUE task or csv (classification), e2e / instruct / jsonl (causal LM), images",
        data="GLUE task folder (or GLUE root); for csv, the folder holding train and dev .csv/.jsonl/.tsv; for "
        "images, a folder or .zip of train/<class>/ and test/<class>/; for causal LMs, the task's file or folder",
        out="RUN_DIR, absent or empty: adapter, config.json, metrics.json, report.md, curve.png",
        model="classification all-MiniLM-L6-v2, causal LMs SmolLM2-135M-Instruct, both installed offline; images: "
        "required", method=f"; causal LMs take {', '.join(CAUSAL_METHODS[:-1])} or {CAUSAL_METHODS[-1]}")
    add_run_options(s, defaults_help, per_trial=False)
    s.add_argument("--resume", action="store_true", help="continue an interrupted run from RUN_DIR/checkpoint "
                   "(written on Ctrl-C); repeat the same command with --resume (default off: a new run)")
    s.add_argument("--quiet", action="store_true", help="log lines instead of a progress bar (default: a bar)")
    add_vera_options(s)
    _add_group_options(s)
    _add_causal_options(s, train=True)
    _add_image_options(s)
    s.set_defaults(func=run_train)

    what = "evaluate a trained adapter on its task's dev (or test) set, as training evaluated it"
    s = sub.add_parser("eval", help=what, description=what[0].upper() + what[1:] + "; prints the metrics as JSON.")
    s.add_argument("--task", default=None, choices=[*TASKS, *CAUSAL_TASKS, IMAGE_TASK],
                   help="task to score (default: the task it was trained on)")
    s.add_argument("--data-dir", default=None, type=folder_arg, help="data folder (default: the folder it was trained on)")
    s.add_argument("--adapter", required=True, help="RUN_DIR/adapter.safetensors, RUN_DIR/adapter (LoRA) "
                   "or RUN_DIR/trained.safetensors (full, head) (required)")
    s.add_argument("--model", default=None, help="base model (default: the one it was trained on)")
    s.add_argument("--max-eval-samples", type=int, default=None, help="evaluate on a seeded subset of this many "
                   "rows (default: as in training)")
    add_base_check_option(s)
    _add_causal_options(s, train=False)
    s.set_defaults(func=run_eval)

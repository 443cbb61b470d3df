"""E2E NLG on SmolLM2-135M-Instruct: VeRA vs LoRA (PEFT) at an equal CPU budget (docs/results.md, ## Generation).

Every cell is one `verakit` command (printed, and recorded in the summary), run one after another; a cell
whose output already exists is skipped, so the script can be stopped and restarted at will.

    python experiments/e2e_results.py run    [--runs runs/e2e]   # probe, train, test-set generation
    python experiments/e2e_results.py report [--runs runs/e2e]   # prints the Markdown table
    python experiments/e2e_results.py paired [--runs runs/e2e]   # VeRA - LoRA on the test MRs, paired bootstrap

Phases (a shared 2-core CPU, no GPU; sized to about half an hour of two free cores, which a busy shared
machine stretches ten-fold):
1. learning-rate probe: 2 learning rates per method, 12 steps of batch 8 (96 train examples), scored by
   held-out loss on 40 dev MRs; the better learning rate of each method goes on to phase 2.
2. training: 400 examples of trainset.csv (a seeded subset), one epoch (50 steps), batch 8, max length 96,
   q_proj and v_proj targets; VeRA r=1024, LoRA r=8 (alpha 8); held-out loss on 50 dev MRs at the end.
3. test: greedy decoding (at most 64 new tokens) of 50 test MRs (a seeded subset of testset_w_refs.csv),
   BLEU / ROUGE-L / chrF against all of each MR's references; also for the base model with no training.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "e2e"
PROBE_LRS = {"vera": (1e-2, 5e-2), "lora": (5e-4, 2e-3)}
RANK = {"vera": 1024, "lora": 8}
COMMON = ["--task", "e2e", "--data-dir", str(DATA), "--batch-size", "8", "--max-length", "96", "--seed", "0",
          "--gen-eval-samples", "0", "--quiet"]
N_TRAIN, N_DEV, N_TEST = 400, 50, 50


def _run(cmd: list[str], log: Path, stdout_to: Path | None = None) -> float:
    if cmd[1] == "train":  # an interrupted cell (RUN_DIR without metrics.json): start it again
        shutil.rmtree(cmd[cmd.index("--out") + 1], ignore_errors=True)
    print("$", shlex.join(cmd), flush=True)
    with log.open("a") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=stdout_to is not None, text=True)
    if stdout_to is not None:
        stdout_to.write_text(out.stdout)
    return time.perf_counter() - t0


def _train_cmd(method: str, lr: float, out: Path, n_train: int, n_dev: int, extra: list[str]) -> list[str]:
    return ["verakit", "train", *COMMON, "--out", str(out), "--method", method, "--r", str(RANK[method]),
            "--lr", f"{lr:g}", "--max-train-samples", str(n_train), "--max-eval-samples", str(n_dev), *extra]


def _best_lr(runs: Path, method: str) -> float:
    scores = {}
    for lr in PROBE_LRS[method]:
        m = json.loads((runs / f"probe-{method}-lr{lr:g}" / "metrics.json").read_text())
        scores[lr] = m["metric"]["loss"]
    return min(scores, key=scores.get)  # type: ignore[arg-type]


def run(args: argparse.Namespace) -> None:
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    log = runs / "commands.log"
    for method in RANK:
        for lr in PROBE_LRS[method]:
            out = runs / f"probe-{method}-lr{lr:g}"
            if not (out / "metrics.json").is_file():
                _run(_train_cmd(method, lr, out, 96, 40, ["--report-samples", "0"]), log)
    for method in RANK:
        out = runs / f"train-{method}"
        if not (out / "metrics.json").is_file():
            _run(_train_cmd(method, _best_lr(runs, method), out, N_TRAIN, N_DEV, []), log)
        test = runs / f"test-{method}.json"
        if not test.is_file():
            artifact = out / ("adapter.safetensors" if method == "vera" else "adapter")
            cmd = ["verakit", "eval", "--adapter", str(artifact), "--split", "test", "--max-eval-samples", str(N_TEST),
                   "--gen-eval-samples", str(N_TEST), "--max-new-tokens", "64", "--num-beams", "1"]
            seconds = _run(cmd, log, stdout_to=test)
            result = json.loads(test.read_text())
            result["seconds"] = round(seconds, 1)
            result["command"] = shlex.join(cmd)
            test.write_text(json.dumps(result, indent=2))
    base = runs / "test-base.json"
    if not base.is_file():
        t0 = time.perf_counter()
        result = _base_test()
        result["seconds"] = round(time.perf_counter() - t0, 1)
        base.write_text(json.dumps(result, indent=2))


def _base_test() -> dict:
    """The untrained model on the same test MRs, prompts encoded as in training (plain text, no template)."""
    from verakit.train.causal import DecodeConfig, build_causal_lm, evaluate_lm, load_causal_data
    from verakit.train.causal.lm_data import tokenize_examples

    _, test = load_causal_data("e2e", str(DATA), max_train_samples=1, max_eval_samples=N_TEST, eval_split="test")
    model, tok = build_causal_lm(None)
    metrics, texts = evaluate_lm(model.eval(), tok, tokenize_examples(tok, test, 96, False), test,
                                 use_chat_template=False, decode=DecodeConfig(max_new_tokens=64))
    return {"metric": metrics, "n_eval": len(test), "generations": texts[:8]}


def paired(args: argparse.Namespace) -> None:
    """VeRA - LoRA differences on the same test MRs with a paired bootstrap over MRs (1,000 resamples):
    generations are redone (greedy, so identical to phase 3's) and kept whole in paired.json."""
    import random

    from verakit.train.causal import DecodeConfig, generate_with_artifact, load_causal_data
    from verakit.train.causal.gen_metrics import generation_metrics

    runs = Path(args.runs)
    out = runs / "paired.json"
    _, test = load_causal_data("e2e", str(DATA), max_train_samples=1, max_eval_samples=N_TEST, eval_split="test")
    refs = [list(e.references) for e in test]
    result = json.loads(out.read_text()) if out.is_file() else {"generations": {}}
    for method, artifact in (("vera", "train-vera/adapter.safetensors"), ("lora", "train-lora/adapter")):
        if method not in result["generations"]:
            result["generations"][method] = generate_with_artifact(
                runs / artifact, [e.prompt for e in test], config=DecodeConfig(max_new_tokens=64))
            out.write_text(json.dumps(result, indent=1))
    gens = result["generations"]
    full = {m: generation_metrics(gens[m], refs) for m in gens}
    rng = random.Random(0)
    diffs: dict[str, list[float]] = {k: [] for k in full["vera"]}
    for _ in range(1000):
        idx = [rng.randrange(len(test)) for _ in test]
        a = generation_metrics([gens["vera"][i] for i in idx], [refs[i] for i in idx])
        b = generation_metrics([gens["lora"][i] for i in idx], [refs[i] for i in idx])
        for k in diffs:
            diffs[k].append(a[k] - b[k])
    summary = {}
    for k, ds in diffs.items():
        ds.sort()
        summary[k] = {"vera": full["vera"][k], "lora": full["lora"][k], "diff": full["vera"][k] - full["lora"][k],
                      "ci95": [ds[24], ds[974]], "p_vera_lower": sum(d < 0 for d in ds) / len(ds)}
    result.update({"n_mrs": len(test), "resamples": 1000, "summary": summary})
    out.write_text(json.dumps(result, indent=1))
    print("| metric | VeRA | LoRA | VeRA - LoRA | 95% paired bootstrap interval |\n|---|---|---|---|---|")
    for k, v in summary.items():
        print(f"| {k} | {v['vera']:.2f} | {v['lora']:.2f} | {v['diff']:+.2f} | [{v['ci95'][0]:+.2f}, {v['ci95'][1]:+.2f}] |")


def report(args: argparse.Namespace) -> None:
    runs = Path(args.runs)
    probe = ["| method | lr | held-out loss (40 dev MRs) | train wall time (s) |", "|---|---|---|---|"]
    for method in RANK:
        for lr in PROBE_LRS[method]:
            p = runs / f"probe-{method}-lr{lr:g}" / "metrics.json"
            if p.is_file():
                m = json.loads(p.read_text())
                probe.append(f"| {method} | {lr:g} | {m['metric']['loss']:.4f} | {m['train_seconds']:.0f} |")
    rows = ["| method | lr | trainable params | adapter file (B) | dev loss | test BLEU | test ROUGE-L | test chrF "
            "| test loss | train wall time (s) | peak RSS (MiB) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = runs / "test-base.json"
    if base.is_file():
        b = json.loads(base.read_text())["metric"]
        rows.append(f"| none (base model) | | 0 | 0 | | {b['bleu']:.2f} | {b['rouge_l']:.2f} | {b['chrf']:.2f} "
                    f"| {b['loss']:.4f} | | |")
    for method in RANK:
        mp, tp = runs / f"train-{method}" / "metrics.json", runs / f"test-{method}.json"
        if not (mp.is_file() and tp.is_file()):
            rows.append(f"| {method} | not yet measured | | | | | | | | | |")
            continue
        m, t = json.loads(mp.read_text()), json.loads(tp.read_text())["metric"]
        lr = json.loads((runs / f"train-{method}" / "config.json").read_text())["args"]["lr"]
        rows.append(f"| {method} | {lr:g} | {m['trainable_params']:,} | {m['adapter_bytes']:,} | {m['metric']['loss']:.4f} "
                    f"| {t['bleu']:.2f} | {t['rouge_l']:.2f} | {t['chrf']:.2f} | {t['loss']:.4f} "
                    f"| {m['train_seconds']:.0f} | {m['peak_rss_mib']:,.0f} |")
    print("\n".join(probe) + "\n\n" + "\n".join(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["run", "report", "paired"])
    p.add_argument("--runs", default=str(REPO / "runs" / "e2e"))
    args = p.parse_args()
    if not DATA.is_dir():
        sys.exit(f"E2E data not found at {DATA}")
    {"run": run, "report": report, "paired": paired}[args.action](args)


if __name__ == "__main__":
    main()

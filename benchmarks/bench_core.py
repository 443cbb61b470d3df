"""Core benchmark: verakit vs PEFT VeRA on a RoBERTa-base-sized random model (q+v).

Measures, side by side and interleaved in one run: adapter file bytes, training step time, peak training
memory above the loaded model, merge time and adapter load time. Prints ratios (verakit / PEFT).

    python benchmarks/bench_core.py [--ranks 256 1024] [--batch 8] [--seq 128] [--steps 4]

Peak memory: each (method, rank) runs in a fresh subprocess that records RSS after loading the model
and ru_maxrss after the training steps; the difference is the training overhead.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def roberta_base(seed: int = 0, head: bool = True):
    """RoBERTa-base-sized random model; with `head`, a 2-label sequence classifier."""
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaModel

    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=514, num_labels=2)
    return RobertaForSequenceClassification(cfg) if head else RobertaModel(cfg, add_pooling_layer=False)


def with_verakit(base, r):
    from verakit import VeraConfig, attach

    # A sequence classifier gets its head saved automatically; a bare encoder saves vectors only.
    return attach(base, VeraConfig(r=r, target_modules=("query", "value")))


def with_peft(base, r, save_projection=True):
    from peft import VeraConfig, get_peft_model

    heads = ["classifier"] if hasattr(base, "classifier") else None
    cfg = VeraConfig(r=r, target_modules=["query", "value"], projection_prng_key=0, d_initial=0.1,
                     save_projection=save_projection, modules_to_save=heads)
    return get_peft_model(base, cfg)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def make_batch(batch, seq):
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 50000, (batch, seq), generator=g), torch.randint(0, 2, (batch,), generator=g)


def step_fn(model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train()

    def step(x, y):
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_worker(method: str, r: int, batch: int, seq: int, steps: int) -> None:
    """Run in a fresh process: print JSON with the peak RSS growth of training over the loaded model."""
    torch.set_num_threads(2)
    model = roberta_base()
    model = with_verakit(model, r) if method == "verakit" else with_peft(model, r)
    x, y = make_batch(batch, seq)
    step = step_fn(model)
    loaded = rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS high-water mark, so model construction does not count
    for _ in range(steps):
        step(x, y)
    peak = _vm_hwm()
    print(json.dumps({"loaded": loaded, "peak": peak, "extra": peak - loaded}))


def run_memory(method, r, args):
    cmd = [sys.executable, __file__, "--memory-worker", method, "--ranks", str(r), "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def timed(fn, *fn_args) -> float:
    t = time.perf_counter()
    fn(*fn_args)
    return time.perf_counter() - t


def measure_rank(base, r: int, args: argparse.Namespace, tmp: Path) -> dict:
    from peft import PeftModel

    from verakit import load_adapter, merge, save_adapter, unmerge

    # Adapter bytes on the bare encoder (no task head), so the files hold the adapter alone.
    bare = roberta_base(head=False)
    files = {}
    for name, m in (("ours", with_verakit(copy.deepcopy(bare), r)), ("peft", with_peft(copy.deepcopy(bare), r)),
                    ("peftnp", with_peft(copy.deepcopy(bare), r, save_projection=False))):
        for n, p in m.named_parameters():
            if "vera_b" in n or "vera_lambda_b" in n:
                torch.nn.init.normal_(p, std=0.01)
        if name == "ours":
            files[name] = (save_adapter(m, tmp / f"bare{r}.safetensors"), None)
        else:
            m.save_pretrained(tmp / f"bare-{name}{r}")
            files[name] = ((tmp / f"bare-{name}{r}" / "adapter_model.safetensors").stat().st_size,
                           dir_bytes(tmp / f"bare-{name}{r}"))
    del bare

    ours = with_verakit(copy.deepcopy(base), r)
    peft = with_peft(copy.deepcopy(base), r)
    for m in (ours, peft):  # non-zero b so merge does real work
        for n, p in m.named_parameters():
            if "vera_b" in n or "vera_lambda_b" in n:
                torch.nn.init.normal_(p, std=0.01)
    save_adapter(ours, tmp / f"ours{r}.safetensors")
    peft.save_pretrained(tmp / f"peft{r}")

    x, y = make_batch(args.batch, args.seq)
    s_ours, s_peft = step_fn(ours), step_fn(peft)
    s_ours(x, y), s_peft(x, y)  # warm-up
    t_ours, t_peft = [], []
    for _ in range(args.steps):  # interleaved: slow phases of the machine hit both sides
        t_ours.append(timed(s_ours, x, y))
        t_peft.append(timed(s_peft, x, y))
    step_ratios = [a / b for a, b in zip(t_ours, t_peft, strict=True)]

    ours.eval(), peft.eval()

    def merge_ours():
        merge(ours), unmerge(ours)

    def merge_peft():
        peft.merge_adapter(), peft.unmerge_adapter()

    m_ours, m_peft = [], []
    for _ in range(3):
        m_ours.append(timed(merge_ours))
        m_peft.append(timed(merge_peft))
    l_ours, l_peft = [], []
    for _ in range(3):
        l_ours.append(timed(load_adapter, copy.deepcopy(base), tmp / f"ours{r}.safetensors"))
        l_peft.append(timed(PeftModel.from_pretrained, copy.deepcopy(base), tmp / f"peft{r}"))
    mem_o, mem_p = run_memory("verakit", r, args), run_memory("peft", r, args)
    return {
        "r": r,
        "bytes": files,
        "step": (statistics.median(t_ours), statistics.median(t_peft), statistics.median(step_ratios),
                 min(step_ratios), max(step_ratios)),
        "mem": (mem_o["extra"], mem_p["extra"]),
        "merge": (statistics.median(m_ours), statistics.median(m_peft)),
        "load": (statistics.median(l_ours), statistics.median(l_peft)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4, help="interleaved timed steps per method")
    ap.add_argument("--memory-worker", default=None)
    args = ap.parse_args()
    if args.memory_worker:
        memory_worker(args.memory_worker, args.ranks[0], args.batch, args.seq, args.steps)
        return

    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(2)
    base = roberta_base()
    tmp = Path(tempfile.mkdtemp())
    rows = [measure_rank(base, r, args, tmp) for r in args.ranks]

    print(f"\nRoBERTa-base-sized random config, q+v, batch {args.batch}x{args.seq}, {torch.get_num_threads()} threads")
    print("| r | metric | verakit | PEFT VeRA | ratio |")
    print("|---|---|---|---|---|")
    for row in rows:
        r = row["r"]
        o = row["bytes"]["ours"][0]
        np_file, np_dir = row["bytes"]["peftnp"]
        p_file, p_dir = row["bytes"]["peft"]
        print(f"| {r} | adapter bytes, no head (PEFT save_projection=False: safetensors / +config dir) "
              f"| {o:,} | {np_file:,} / {np_dir:,} | {o / np_file:.3f} / {o / np_dir:.3f} |")
        print(f"| {r} | adapter bytes, no head (PEFT default, safetensors) | {o:,} | {p_file:,} | 1/{p_file / o:.1f} |")
        so, sp, med, lo, hi = row["step"]
        print(f"| {r} | train step s (median; ratio of interleaved pairs, range) | {so:.3f} | {sp:.3f} | {med:.3f} ({lo:.2f}-{hi:.2f}) |")
        mo, mp = row["mem"]
        print(f"| {r} | peak train memory above loaded model, MB | {mo / 2**20:.0f} | {mp / 2**20:.0f} | {mo / mp:.2f} |")
        a, b = row["merge"]
        print(f"| {r} | merge + unmerge s | {a:.4f} | {b:.4f} | {a / b:.2f} |")
        a, b = row["load"]
        print(f"| {r} | adapter load s | {a:.4f} | {b:.4f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()

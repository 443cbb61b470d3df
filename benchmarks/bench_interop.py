"""Interop benchmark: verakit's closed-form VeRA -> LoRA export vs PEFT's `save_as_lora` (dense delta + SVD).

Model: a SmolLM2-135M-shaped Llama (hidden 576, 30 layers, k/v 192 x 576, MLP 1536), randomly initialised
(the conversion cost and exactness do not depend on the weights), VeRA on all linear layers.
Both exporters run side by side, interleaved, in one process, on the same adapter; each output directory
is loaded with PeftModel.from_pretrained and its logits compared with the VeRA model's (fp32).

    python benchmarks/bench_interop.py [--r 128] [--trunc-r 256 --trunc-rank 64] [--repeats 3] [--layers 30]

Exact case: rank r LoRA from both (PEFT's SVD is exact too while r <= every layer's min(d_out, d_in)).
Truncated case: r = trunc-r adapters cut to trunc-rank by both; the relative Frobenius errors are compared.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch


def smollm2_shaped(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def vera_model(base, r):
    from verakit import VeraConfig, attach, vera_layers

    model = attach(copy.deepcopy(base), VeraConfig(r=r, target_modules="all-linear"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in vera_layers(model).values():
            layer.vera_b.copy_(torch.randn(layer.vera_b.shape, generator=g) * 0.1)
            layer.vera_d.copy_(torch.randn(layer.vera_d.shape, generator=g) * 0.1)
    return model


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def run_case(base, r, rank, repeats, x, tmp: Path):
    from peft import PeftModel
    from peft.tuners.lora.conversion import save_as_lora

    from verakit.fileformat import adapter_from_model
    from verakit.interop import to_lora, to_peft
    from verakit.merge import adapter_deltas

    model = vera_model(base, r)
    want = logits(model, x)
    adapter = adapter_from_model(model)
    peft_vera = PeftModel.from_pretrained(copy.deepcopy(base), to_peft(adapter, tmp / f"vera{r}")).eval()
    times = {"verakit": [], "peft": []}
    for i in range(repeats):  # interleaved
        t = time.perf_counter()
        ours = to_lora(adapter, tmp / f"ours{r}_{i}", max_rank=rank)
        times["verakit"].append(time.perf_counter() - t)
        t = time.perf_counter()
        save_as_lora(tmp / f"peft{r}_{i}", peft_vera, rank=rank)
        times["peft"].append(time.perf_counter() - t)
    out = {"r": r, "rank": rank, "verakit_s": statistics.median(times["verakit"]),
           "peft_s": statistics.median(times["peft"])}
    for who, path in (("verakit", tmp / f"ours{r}_0"), ("peft", tmp / f"peft{r}_0")):
        lora = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
        out[f"{who}_maxabs"] = float((logits(lora, x) - want).abs().max())
    # relative Frobenius error of each exporter's factors, worst layer
    from safetensors.torch import load_file

    deltas = adapter_deltas(adapter)
    peft_sd = load_file(tmp / f"peft{r}_0" / "adapter_model.safetensors")
    worst = {"verakit": ours.max_rel_error, "peft": 0.0}
    for name, delta in deltas.items():
        a = peft_sd[f"base_model.model.{name}.lora_A.weight"].double()
        b = peft_sd[f"base_model.model.{name}.lora_B.weight"].double()
        worst["peft"] = max(worst["peft"], float((delta.double() - b @ a).norm() / delta.double().norm()))
    out["verakit_rel_err"], out["peft_rel_err"] = worst["verakit"], worst["peft"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--r", type=int, default=128)
    p.add_argument("--trunc-r", type=int, default=256)
    p.add_argument("--trunc-rank", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)  # 2 threads oversubscribe a shared 2-core box
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    base = smollm2_shaped(args.layers)
    x = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        for r, rank in ((args.r, args.r), (args.trunc_r, args.trunc_rank)):
            res = run_case(base, r, rank, args.repeats, x, Path(tmp))
            print(f"VeRA r={res['r']} -> LoRA rank {res['rank']} ({args.layers} layers x 7 linear, median of "
                  f"{args.repeats}): verakit {res['verakit_s']:.3f} s, PEFT save_as_lora {res['peft_s']:.3f} s, "
                  f"PEFT / verakit = {res['peft_s'] / res['verakit_s']:.1f}x")
            print(f"  logits max|diff| vs VeRA: verakit {res['verakit_maxabs']:.2e}, PEFT {res['peft_maxabs']:.2e}; "
                  f"worst-layer relative error: verakit {res['verakit_rel_err']:.3e}, PEFT {res['peft_rel_err']:.3e}")


if __name__ == "__main__":
    main()

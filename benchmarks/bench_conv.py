"""VeRA on convolutions: a training step with VeraConv's cost rule (factored on small feature maps, the delta
kernel otherwise) against the kernel everywhere, and against PEFT LoRA, side by side in one process.

The model is experiments/cnn_cifar.py's ResNet (4.9M parameters, 12 Conv2d layers, widths 64-512) on 32x32
inputs, VeRA r=256 on every convolution ("all-conv"), LoRA r=8 on the same convolutions; a step is forward,
cross-entropy, backward and AdamW over the trainable vectors and the head. Rounds interleave the variants
(this machine has slow phases), and the figure is the median per variant and the ratio of medians.

    OMP_NUM_THREADS=1 python benchmarks/bench_conv.py [--batch 32] [--rounds 7] [--steps 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

BACKBONE = {"num_channels": 3, "embedding_size": 64, "hidden_sizes": [64, 128, 256, 512], "depths": [1, 1, 1, 1],
            "layer_type": "basic", "hidden_act": "relu", "num_labels": 5}


def build(kind: str):
    from transformers import ResNetConfig, ResNetForImageClassification

    from verakit import VeraConfig, attach, trainable_parameters
    from verakit.train.loop import train_mode

    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(**BACKBONE))
    for p in model.parameters():
        p.requires_grad_(False)
    if kind == "lora":
        import peft

        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=8, target_modules=names,
                                                           modules_to_save=["classifier"]))
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        attach(model, VeraConfig(r=256, target_modules="all-conv", modules_to_save=("classifier",)))
        params = [p for _, p in trainable_parameters(model)]
    train_mode(model)
    return model, torch.optim.AdamW(params, lr=1e-3)


def step_seconds(model, opt, x, y, steps: int, kernel_only: bool) -> float:
    from verakit.layer_conv import VeraConv

    rule = VeraConv.factored_for
    if kernel_only:
        VeraConv.factored_for = lambda self, x: False  # the kernel on every layer, as before the rule
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) / steps
    finally:
        VeraConv.factored_for = rule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    x, y = torch.randn(a.batch, 3, 32, 32), torch.randint(0, 5, (a.batch,))
    vera, vera_opt = build("vera")
    kernel, kernel_opt = copy.deepcopy(vera), None
    from verakit import trainable_parameters

    kernel_opt = torch.optim.AdamW([p for _, p in trainable_parameters(kernel)], lr=1e-3)
    lora, lora_opt = build("lora")
    variants = {"vera (rule)": (vera, vera_opt, False), "vera (kernel always)": (kernel, kernel_opt, True),
                "lora r=8": (lora, lora_opt, False)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for m, o, k in variants.values():  # warm-up
        step_seconds(m, o, x, y, 1, k)
    for _ in range(a.rounds):
        for name, (m, o, k) in variants.items():
            times[name].append(step_seconds(m, o, x, y, a.steps, k))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"batch {a.batch}, 32x32, {torch.get_num_threads()} thread(s), median of {a.rounds} rounds x {a.steps} steps")
    for name, t in med.items():
        print(f"  {name:22s} {t:.4f} s/step")
    print(f"kernel always / rule: {med['vera (kernel always)'] / med['vera (rule)']:.2f}x; "
          f"rule / lora: {med['vera (rule)'] / med['lora r=8']:.2f}x")


if __name__ == "__main__":
    main()

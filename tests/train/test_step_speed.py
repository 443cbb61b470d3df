"""The loop's two step-speed options on the tiny BERT recipe: group_by_length feeds the recipe exactly
batching.epoch_order's grouped batches; mixed_precision="bf16" runs training forwards (only) under bf16
autocast with eager attention, keeps parameters, optimizer and the saved file fp32, and learns as fp32 does."""

from __future__ import annotations

import math

import pytest
import torch

from verakit.train.batching import epoch_order
from verakit.train.loop import LoopConfig, run_loop
from verakit.train.precision import step_context, training_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def test_grouped_loop_trains_on_the_grouped_batches(make_recipe, tmp_path):
    recipe = make_recipe(seed=4)
    seen: list[list[int]] = []
    collate = recipe.collate
    recipe.collate = lambda idx: (seen.append(list(idx)), collate(idx))[1]
    cfg = LoopConfig(epochs=2, batch_size=16, seed=4, quiet=True, group_by_length=True)
    result = run_loop(recipe, cfg, tmp_path)
    n, lengths = recipe.num_train(), recipe.train_lengths()
    steps = math.ceil(n / 16)
    want = [o[k * 16 : (k + 1) * 16] for e in range(2) for o in [epoch_order(n, 4, e, 16, lengths)] for k in range(steps)]
    assert seen == want and result.total_steps == 2 * steps
    # a grouped batch pads less than the random one at the same position, summed over the run
    pad = lambda bs: sum(max(lengths[i] for i in b) * len(b) for b in bs)  # noqa: E731
    random_batches = [o[k * 16 : (k + 1) * 16] for e in range(2) for o in [epoch_order(n, 4, e)] for k in range(steps)]
    assert pad(seen) < pad(random_batches)


def test_group_by_length_needs_lengths(make_recipe, tmp_path):
    class NoLengths:  # a recipe that cannot say its examples' lengths (as images)
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            if name == "train_lengths":
                raise AttributeError(name)
            return getattr(self.inner, name)

    with pytest.raises(ValueError, match="NoLengths does not report its examples' lengths"):
        run_loop(NoLengths(make_recipe()), LoopConfig(epochs=1, batch_size=16, quiet=True, group_by_length=True),
                 tmp_path)


def test_unknown_mixed_precision_is_refused():
    with pytest.raises(ValueError, match="mixed_precision must be one of no, bf16, got 'fp16'"):
        LoopConfig(epochs=1, batch_size=4, mixed_precision="fp16")


def test_bf16_autocasts_training_forwards_only_and_keeps_fp32_state(make_recipe, tmp_path):
    recipe = make_recipe(seed=5)
    model = recipe.model
    calls: list[tuple[bool, bool, str]] = []  # (training, autocast on, attention) of each forward
    model.register_forward_pre_hook(lambda m, a: calls.append((m.training, torch.is_autocast_enabled("cpu"),
                                                               m.config._attn_implementation)))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert model.config._attn_implementation == "sdpa"  # transformers' default, which bf16 steps replace on CPU
    result = run_loop(recipe, LoopConfig(epochs=2, batch_size=16, seed=5, quiet=True, mixed_precision="bf16"), tmp_path)
    assert model.config._attn_implementation == "sdpa"  # restored after training
    train_calls = [(a, impl) for t, a, impl in calls if t]
    eval_calls = [(a, impl) for t, a, impl in calls if not t]
    assert len(train_calls) == result.total_steps and set(train_calls) == {(True, "eager")}
    # evaluations run as `verakit eval` will run the file: fp32, the loaded attention
    assert len(eval_calls) == 3 and set(eval_calls) == {(False, "sdpa")}
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, n
            assert not torch.equal(p.detach(), before[n]), f"{n} did not train"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_bf16_learns_like_fp32(make_recipe, tmp_path):
    # The same run in fp32 and bf16: loss curves and trained vectors agree to bf16's precision.
    runs = {}
    for mode in ("no", "bf16"):
        recipe = make_recipe(seed=6)
        res = run_loop(recipe, LoopConfig(epochs=3, batch_size=16, seed=6, quiet=True, mixed_precision=mode),
                       tmp_path / mode)
        runs[mode] = (res.losses, {n: p.detach().clone() for n, p in recipe.model.named_parameters() if p.requires_grad})
    (l32, p32), (l16, p16) = runs["no"], runs["bf16"]
    assert l32[-1] < l32[0] and l16[-1] < l16[0]
    assert max(abs(a - b) for a, b in zip(l32, l16, strict=True)) < 0.05
    for n in p32:
        rel = (p32[n] - p16[n]).norm() / p32[n].norm().clamp_min(1e-12)
        assert rel < 0.1, (n, float(rel))


def test_attention_switch_only_for_bf16_on_cpu(make_recipe):
    model = make_recipe().model
    for mode, device in (("no", "cpu"), ("bf16", "cuda")):
        with training_attention(model, mode, device) as evaluating:
            assert model.config._attn_implementation == "sdpa"
            with evaluating():
                assert model.config._attn_implementation == "sdpa"
    with training_attention(model, "bf16", "cpu") as evaluating:
        assert model.config._attn_implementation == "eager"
        with evaluating():
            assert model.config._attn_implementation == "sdpa"
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "sdpa"
    with step_context("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with step_context("no", "cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_cli_options_reach_the_loop_and_refusals(tiny_bert_dir, tiny_task, tmp_path, capsys):
    import json

    from verakit.cli import main

    run = tmp_path / "run"
    code = main(["train", "--task", "csv", "--data-dir", str(tiny_task), "--model", tiny_bert_dir, "--out", str(run),
                 "--r", "32", "--epochs", "1", "--quiet", "--mixed-precision", "bf16"])
    assert code == 0
    loop = json.loads((run / "config.json").read_text())["loop"]
    assert (loop["group_by_length"], loop["mixed_precision"]) == (True, "bf16")  # grouping: the default
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run / "adapter.safetensors")]) == 0  # a fresh model, SDPA attention
    assert json.loads(capsys.readouterr().out)["metric"] == json.loads((run / "metrics.json").read_text())["metric"]
    code = main(["train", "--task", "csv", "--data-dir", str(tiny_task), "--model", tiny_bert_dir, "--out",
                 str(tmp_path / "plain"), "--r", "32", "--epochs", "1", "--quiet", "--no-group-by-length"])
    loop = json.loads((tmp_path / "plain" / "config.json").read_text())["loop"]
    assert code == 0 and (loop["group_by_length"], loop["mixed_precision"]) == (False, "no")
    for flags, message in [
        (["--task", "images", "--mixed-precision", "bf16"], "--mixed-precision is wired for text tasks only"),
        (["--task", "jsonl", "--quantize", "4bit", "--mixed-precision", "bf16"], "--mixed-precision bf16 with --quantize"),
    ]:
        code = main(["train", "--data-dir", str(tmp_path), "--out", str(tmp_path / "refused"), *flags])
        assert code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "refused").exists()


def test_causal_recipe_groups_by_length(tmp_path):
    import json

    from lm_helpers import e2e_like, save_tiny_lm, write_jsonl
    from verakit.cli import main

    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", e2e_like(40, seed=0))
    write_jsonl(data / "dev.jsonl", e2e_like(8, seed=1))
    model = save_tiny_lm(tmp_path / "llama", "llama")
    code = main(["train", "--task", "jsonl", "--data-dir", str(data), "--model", model, "--out", str(tmp_path / "run"),
                 "--r", "32", "--epochs", "1", "--batch-size", "8", "--max-length", "48", "--gen-eval-samples", "0",
                 "--report-samples", "0", "--quiet", "--group-by-length", "--mixed-precision", "bf16"])
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["step_losses"]) == 5 and all(math.isfinite(v) for v in metrics["step_losses"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["loop"]["group_by_length"] is True
    # without the flag a causal LM trains on random batches (its token-mean loss; hparams.Defaults)
    code = main(["train", "--task", "jsonl", "--data-dir", str(data), "--model", model, "--out", str(tmp_path / "plain"),
                 "--r", "32", "--epochs", "1", "--batch-size", "8", "--max-length", "48", "--gen-eval-samples", "0",
                 "--report-samples", "0", "--quiet"])
    assert code == 0 and json.loads((tmp_path / "plain" / "config.json").read_text())["loop"]["group_by_length"] is False


def test_bf16_tip(tmp_path, monkeypatch, make_recipe, caplog):
    from verakit.train import precision

    info = tmp_path / "cpuinfo"
    units = precision.cpu_bf16_units.__wrapped__
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert units(str(info)) == ("AMX", "AVX-512 BF16")
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n")  # e.g. an AMD EPYC (Zen 4)
    assert units(str(info)) == ("AVX-512 BF16",)
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\nbugs\t\t: amx_bf16\n")  # flags line only
    assert units(str(info)) == ()
    assert units(str(tmp_path / "absent")) == ()
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: ())
    assert precision.speed_tip("no", "cpu") is None
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: ("AVX-512 BF16",))
    monkeypatch.setattr(precision, "_SHOWN_TIPS", set())  # as in a fresh process
    assert "--mixed-precision bf16" in precision.speed_tip("no", "cpu")
    assert precision.speed_tip("bf16", "cpu") is None and precision.speed_tip("no", "cuda") is None
    with caplog.at_level("INFO", logger="verakit.train"):
        run_loop(make_recipe(), LoopConfig(epochs=1, batch_size=16, quiet=True), tmp_path / "run")
        run_loop(make_recipe(), LoopConfig(epochs=1, batch_size=16, quiet=True), tmp_path / "run2")
    assert caplog.text.count("this CPU has bf16 units (AVX-512 BF16)") == 1  # once per process (tune: one loop per trial)

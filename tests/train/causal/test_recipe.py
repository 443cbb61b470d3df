"""The causal-LM recipe: completion-only loss vs transformers' own, training runs and their outputs,
save/load/merge parity of generations, gradient checkpointing, --resume, eval of an adapter without run
info, bad data, and (real SmolLM2) E2E and Alpaca runs."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from helpers import randomize_vectors
from lm_helpers import e2e_like, save_tiny_lm, write_jsonl
from verakit.cli import main
from verakit.train.causal import (
    CausalArgs,
    build_causal_lm,
    enable_gradient_checkpointing,
    evaluate_causal,
    evaluate_lm,
    token_loss,
    train_causal,
)
from verakit.train.causal.generate import DecodeConfig, generate_ids
from verakit.train.causal.lm_data import IGNORE_INDEX, LMExample, collate_lm, tokenize_examples
from verakit.train.methods import NO_HEAD, MethodSpec, prepare_model

DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> str:
    return save_tiny_lm(tmp_path_factory.mktemp("gpt2"), "gpt2")


@pytest.fixture(scope="module")
def jsonl_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("jsonl")
    write_jsonl(folder / "train.jsonl", e2e_like(64, seed=0))
    write_jsonl(folder / "dev.jsonl", e2e_like(12, seed=1))
    return folder


def _args(out: Path, model: str, data: Path, **kw) -> CausalArgs:
    base = dict(task="jsonl", data_dir=str(data), out=str(out), model=model, r=64, epochs=2, batch_size=8,
                max_length=48, lr=5e-2, max_new_tokens=8, gen_eval_samples=4, report_samples=2, quiet=True)
    return CausalArgs(**{**base, **kw})


def _examples(n: int = 5, seed: int = 3) -> list[LMExample]:
    return [LMExample(r["prompt"], r["completion"]) for r in e2e_like(n, seed)]


# ------------------------------------------------------------------------------------ loss


def test_token_loss_equals_transformers_mean_loss_on_completion_tokens(llama_dir):
    model, tok = build_causal_lm(llama_dir)
    rows = tokenize_examples(tok, _examples(), 48, use_chat_template=False)
    batch = collate_lm(rows, tok.pad_token_id)
    total, count = token_loss(model, batch)
    # Units are completion + EOS tokens only: never prompt or padding.
    want_count = sum(len(tok(e.completion, add_special_tokens=False)["input_ids"]) + 1 for e in _examples())
    assert count == want_count == int((batch["labels"] != IGNORE_INDEX).sum())
    hf = model(**batch).loss  # transformers' own shifted, -100-masked mean
    torch.testing.assert_close(total / count, hf, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients(llama_dir):
    grads = []
    for ckpt in (False, True):
        model, tok = build_causal_lm(llama_dir)
        if ckpt:
            enable_gradient_checkpointing(model)
        prepared = prepare_model(model, MethodSpec("vera", 32, 0.1, None, 0, head=NO_HEAD))
        randomize_vectors(model, seed=1, std=0.3)
        model.train()
        batch = collate_lm(tokenize_examples(tok, _examples(), 48, False), tok.pad_token_id)
        token_loss(model, batch)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for _, p in prepared.adapter]))
    scale = float(grads[0].abs().max())
    assert scale > 0
    # Same math; the recomputed forward may sum in another order (the layer picks its path per call).
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5 * scale)


def test_all_linear_shares_one_projection_across_shapes(llama_dir):
    model, _ = build_causal_lm(llama_dir)
    prepared = prepare_model(model, MethodSpec("vera", 16, 0.1, "all-linear", 0, head=NO_HEAD))
    from verakit import vera_state

    state = vera_state(model)
    shapes = {(layer.out_features, layer.in_features) for layer in state.layers.values()}
    assert len(state.layers) == 2 * 7 and "lm_head" not in state.layers
    assert shapes == {(64, 64), (32, 64), (96, 64), (64, 96)}
    assert {id(layer.projection) for layer in state.layers.values()} == {id(state.projection)}
    assert prepared.adapter_numel == sum(16 + layer.out_features for layer in state.layers.values())


# ------------------------------------------------------------------------------- training runs


def test_vera_run_lowers_loss_and_writes_outputs(tmp_path, llama_dir, jsonl_dir):
    model, tok = build_causal_lm(llama_dir)
    dev = [LMExample(r["prompt"], r["completion"]) for r in e2e_like(12, seed=1)]
    before, _ = evaluate_lm(model.eval(), tok, tokenize_examples(tok, dev, 48, False), [], use_chat_template=False,
                            decode=DecodeConfig())
    out = tmp_path / "run"
    m = train_causal(_args(out, llama_dir, jsonl_dir))
    assert {p.name for p in out.iterdir()} >= {"adapter.safetensors", "metrics.json", "config.json", "report.md",
                                                "curve.png"}
    assert m["metric"]["loss"] < before["loss"] - 0.5, (before, m["metric"])
    assert m["main_metric"] == "bleu" and 0 <= m["metric"]["bleu"] <= 100 and m["n_generated"] == 4
    assert m["trainable_params"] == 2 * ((64 + 64) + (64 + 32))  # r + d_out for q_proj, v_proj per layer
    assert 100 < m["peak_rss_mib"] < 24 * 1024
    assert json.loads((out / "metrics.json").read_text())["peak_rss_mib"] == m["peak_rss_mib"]
    report = (out / "report.md").read_text()
    assert "Before training:" in report and m["samples"][0]["after"] in report
    # `verakit eval` reproduces the evaluation that picked the saved checkpoint.
    again = evaluate_causal(out / "adapter.safetensors")
    assert again["metric"] == pytest.approx(m["metric"], rel=1e-5, abs=1e-5)


def test_gpt2_conv1d_lora_and_full(tmp_path, gpt2_dir, jsonl_dir):
    from verakit.fileformat import read_adapter

    m = train_causal(_args(tmp_path / "vera", gpt2_dir, jsonl_dir, epochs=1))
    adapter = read_adapter(tmp_path / "vera" / "adapter.safetensors")
    assert {kind for _, _, kind in adapter.modules.values()} == {"conv1d"}
    assert set(adapter.modules) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    assert m["trainable_params"] == 2 * (64 + 192)
    lora = train_causal(_args(tmp_path / "lora", gpt2_dir, jsonl_dir, method="lora", r=4, lr=1e-2, epochs=1))
    assert lora["trainable_params"] == 2 * 4 * (64 + 192) and (tmp_path / "lora" / "adapter").is_dir()
    full = train_causal(_args(tmp_path / "full", gpt2_dir, jsonl_dir, method="full", lr=1e-3, epochs=1))
    model, _ = build_causal_lm(gpt2_dir)
    assert full["trainable_params"] == sum(p.numel() for p in model.parameters())
    for run, metrics in (("lora", lora), ("full", full)):
        artifact = tmp_path / run / ("adapter" if run == "lora" else "trained.safetensors")
        assert evaluate_causal(artifact)["metric"] == pytest.approx(metrics["metric"], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("fixture", ["llama_dir", "gpt2_dir"])
def test_save_load_merge_give_identical_greedy_generations(request, tmp_path, fixture):
    from verakit import VeraConfig, attach, load_adapter, merge, save_adapter, unmerge

    folder = request.getfixturevalue(fixture)
    prompts = [e.prompt for e in _examples(4, seed=7)]
    cfg = DecodeConfig(max_new_tokens=10)
    model, tok = build_causal_lm(folder)
    base_ids = generate_ids(model.eval(), tok, prompts, use_chat_template=False, config=cfg)
    attach(model, VeraConfig(r=32))
    randomize_vectors(model, seed=2, std=1.0)
    trained = generate_ids(model.eval(), tok, prompts, use_chat_template=False, config=cfg)
    assert trained != base_ids, "the adapter should change what the model generates"
    save_adapter(model, tmp_path / "a.safetensors")
    fresh, _ = build_causal_lm(folder)
    load_adapter(fresh, tmp_path / "a.safetensors")
    assert generate_ids(fresh.eval(), tok, prompts, use_chat_template=False, config=cfg) == trained
    batch = collate_lm(tokenize_examples(tok, _examples(), 48, False), tok.pad_token_id)
    with torch.no_grad():
        unmerged_logits = fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        merge(fresh)
        merged_logits = fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(merged_logits, unmerged_logits, rtol=1e-4, atol=1e-4)
    assert generate_ids(fresh, tok, prompts, use_chat_template=False, config=cfg) == trained
    unmerge(fresh)


# -------------------------------------------------------------------------------------- CLI, data


def test_cli_train_generate_and_eval(tmp_path, llama_dir, jsonl_dir, capsys, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="verakit.train")
    out = tmp_path / "run"
    rc = main(["train", "--task", "jsonl", "--data-dir", str(jsonl_dir), "--out", str(out), "--model", llama_dir,
               "--r", "32", "--epochs", "1", "--batch-size", "16", "--max-length", "48", "--lr", "0.05",
               "--gen-eval-samples", "2", "--max-new-tokens", "6", "--report-samples", "1", "--quiet"])
    assert rc == 0
    assert "jsonl vera: best held-out loss" in capsys.readouterr().out
    # the plan says why the first step is slow to come: each evaluation generates (E2E: 100 samples, minutes)
    plan = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("plan: "))
    assert plan.endswith("dev evaluation at step 0 and each epoch end (each also generates 2 held-out samples for "
                         "BLEU/ROUGE-L/chrF, slower than many training steps)"), plan
    adapter = str(out / "adapter.safetensors")
    prompt = e2e_like(1, seed=5)[0]["prompt"]
    assert main(["generate", "--adapter", adapter, "--prompt", prompt, "--max-new-tokens", "6", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    from verakit.train.causal.generate import generate_with_artifact

    assert printed == [{"prompt": prompt, "generation": generate_with_artifact(adapter, [prompt],
                                                                               config=DecodeConfig(max_new_tokens=6))[0]}]
    prompts = [r["prompt"].strip() for r in e2e_like(2, seed=6)]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    assert main(["generate", "--adapter", adapter, "--prompts-file", str(tmp_path / "prompts.txt"),
                 "--max-new-tokens", "6", "--num-beams", "2"]) == 0
    want = generate_with_artifact(adapter, prompts, config=DecodeConfig(max_new_tokens=6, num_beams=2))
    assert capsys.readouterr().out == "\n\n".join(want) + "\n"
    assert main(["eval", "--adapter", adapter]) == 0
    result = json.loads(capsys.readouterr().out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert result["metric"] == pytest.approx(metrics["metric"], rel=1e-5, abs=1e-5)


def test_magnitude_trains_a_dvora_causal_lm(tmp_path, llama_dir, jsonl_dir, capsys):
    """--magnitude on a causal LM: the file carries vera_m for every adapted layer, moved from W0's row
    norms by training; `verakit eval` reproduces the training-time held-out loss and `verakit generate`
    answers with the magnitudes applied (the same vectors without them generate otherwise)."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    from verakit import read_adapter
    from verakit.fileformat import write_adapter

    out = tmp_path / "run"
    assert main(["train", "--task", "jsonl", "--data-dir", str(jsonl_dir), "--out", str(out), "--model", llama_dir,
                 "--r", "32", "--epochs", "1", "--batch-size", "16", "--max-length", "48", "--lr", "0.05",
                 "--magnitude", "--quiet"]) == 0
    adapter = read_adapter(out / "adapter.safetensors")
    assert adapter.config.magnitude and set(adapter.m) == set(adapter.modules)
    weights = AutoModelForCausalLM.from_pretrained(llama_dir).state_dict()
    moved = max(float((m - weights[f"{n}.weight"].norm(dim=1)).abs().max()) for n, m in adapter.m.items())
    assert moved > 1e-4
    metrics = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out / "adapter.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["metric"] == pytest.approx(metrics["metric"], rel=1e-5, abs=1e-5)
    prompt = e2e_like(1, seed=5)[0]["prompt"]
    (tmp_path / "gen").mkdir()
    plain = tmp_path / "gen" / "plain.safetensors"
    write_adapter(replace(adapter, config=replace(adapter.config, magnitude=False), m={}),
                  plain)
    texts = []
    for path in (out / "adapter.safetensors", plain):
        assert main(["generate", "--adapter", str(path), "--prompt", prompt, "--max-new-tokens", "8", "--json"]) == 0
        texts.append(json.loads(capsys.readouterr().out)[0]["generation"])
    assert texts[0] != texts[1] or moved < 1e-2  # the magnitudes matter when they moved visibly


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_refuses_other_settings_and_continues_the_same_run(tmp_path, llama_dir, jsonl_dir, capsys, monkeypatch):
    """Ctrl-C mid-run, then --resume: with another --epochs it is refused (2, the setting named, RUN_DIR
    untouched); the same command ends with the metrics and adapter of an uninterrupted run."""
    from verakit import read_adapter
    from verakit.train.causal import CausalRecipe

    def train(out: Path, epochs: str = "2", *extra: str) -> int:
        return main(["train", "--task", "jsonl", "--data-dir", str(jsonl_dir), "--out", str(out), "--model", llama_dir,
                     "--r", "32", "--epochs", epochs, "--batch-size", "16", "--max-length", "48", "--lr", "0.05",
                     "--report-samples", "1", "--max-new-tokens", "4", "--quiet", *extra])

    assert train(tmp_path / "full") == 0
    loss, steps = CausalRecipe.loss, []

    def ctrl_c_at_step_6(recipe, model, batch):
        steps.append(len(steps) + 1)
        if len(steps) == 6:  # mid epoch 2 of 2 (64 rows, batch 16): data position and RNG are restored
            os.kill(os.getpid(), signal.SIGINT)
        return loss(recipe, model, batch)

    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(CausalRecipe, "loss", ctrl_c_at_step_6)
        assert train(run_dir) == 130
    before = _files(run_dir)
    assert "checkpoint/state.pt" in before and json.loads(before["config.json"])["args"]["epochs"] == 2
    capsys.readouterr()
    assert train(run_dir, "3", "--resume") == 2
    assert (f"verakit train: error: {run_dir / 'config.json'}: --resume with different settings (epochs: 2 -> 3); "
            "repeat the interrupted command with --resume") in capsys.readouterr().err.splitlines()
    assert _files(run_dir) == before
    assert train(run_dir, "2", "--resume") == 0
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, tmp_path / "full"))
    assert len(want["step_losses"]) == 8 and got["step_losses"] == want["step_losses"]
    assert (got["metric"], got["best_step"]) == (want["metric"], want["best_step"])
    assert [e["metrics"] for e in got["epochs"]] == [e["metrics"] for e in want["epochs"]]
    x, y = read_adapter(run_dir / "adapter.safetensors"), read_adapter(tmp_path / "full" / "adapter.safetensors")
    assert all(torch.equal(x.d[n], y.d[n]) and torch.equal(x.b[n], y.b[n]) for n in y.d)
    assert not (run_dir / "checkpoint").exists()


def test_eval_of_an_adapter_without_run_info_needs_task_and_data_dir(tmp_path, llama_dir, jsonl_dir, capsys):
    """`verakit.save_adapter` records no task or data: `verakit eval` names the flags to pass, one at a time,
    then scores the adapter with training's defaults (max length 128, no chat template for jsonl)."""
    from verakit import VeraConfig, attach, save_adapter

    model, tok = build_causal_lm(llama_dir)
    dev = tokenize_examples(tok, [LMExample(r["prompt"], r["completion"]) for r in e2e_like(12, seed=1)], 128, False)
    base, _ = evaluate_lm(model.eval(), tok, dev, [], use_chat_template=False, decode=DecodeConfig())
    attach(model, VeraConfig(r=32))
    randomize_vectors(model, seed=4, std=1.0)
    adapter = tmp_path / "plain.safetensors"
    save_adapter(model, adapter)
    want, _ = evaluate_lm(model.eval(), tok, dev, [], use_chat_template=False, decode=DecodeConfig())
    assert abs(want["loss"] - base["loss"]) > 0.1, (base, want)
    capsys.readouterr()
    why = "(it was not saved by `verakit train`); pass"
    assert main(["eval", "--adapter", str(adapter)]) == 2
    assert capsys.readouterr().err == f"verakit eval: error: {adapter}: no task recorded with this artifact {why} " \
                                      "--task and --data-dir\n"
    assert main(["eval", "--adapter", str(adapter), "--task", "jsonl"]) == 2
    assert capsys.readouterr().err == f"verakit eval: error: {adapter}: no data_dir recorded with this artifact {why} " \
                                      "--data-dir\n"
    assert main(["eval", "--adapter", str(adapter), "--task", "jsonl", "--data-dir", str(jsonl_dir),
                 "--model", llama_dir]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metric"] == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert (result["n_eval"], result["n_generated"], result["method"]) == (12, 0, "vera")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a", "text": "b"}', r"train\.jsonl:2: missing key\(s\) \['completion'\]"),
        ('{"prompt": "a", "completion": "  "}', r"train\.jsonl:2: empty completion"),
        ('{"prompt": "a", "completion": "b",}', r"train\.jsonl:2: not valid JSON"),
    ],
)
def test_bad_jsonl_is_refused_before_anything_is_written(tmp_path, capsys, line, message):
    folder = tmp_path / "data"
    good = json.dumps(e2e_like(1)[0])
    (folder).mkdir()
    (folder / "train.jsonl").write_text(f"{good}\n{line}\n{good}\n")
    write_jsonl(folder / "dev.jsonl", e2e_like(2))
    out = tmp_path / "run"
    rc = main(["train", "--task", "jsonl", "--data-dir", str(folder), "--out", str(out), "--model", "/nonexistent"])
    assert rc == 2
    import re

    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_instruct_uses_the_chat_template_and_rejects_head(tmp_path, llama_dir, capsys):
    data = tmp_path / "alpaca.json"
    rows = [{"instruction": f"Say where {r['prompt'].split(']')[0][5:]} is.", "input": "", "output": r["completion"]}
            for r in e2e_like(30)]
    data.write_text(json.dumps(rows))
    m = train_causal(CausalArgs(task="instruct", data_dir=str(data), out=str(tmp_path / "run"), model=llama_dir,
                                r=16, batch_size=9, max_length=64, held_out=0.2, report_samples=1,
                                max_new_tokens=4, quiet=True))
    assert m["main_metric"] == "token_logprob" and m["n_train"] == 24 and m["n_eval"] == 6
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["args"]["chat_template"] is True
    rc = main(["train", "--task", "instruct", "--data-dir", str(data), "--out", str(tmp_path / "h"), "--method", "head"])
    assert rc == 2 and "causal-LM tasks take --method vera/lora/full" in capsys.readouterr().err


# ------------------------------------------------------------------------------ real SmolLM2


@pytest.fixture(scope="module")
def smollm2() -> str:
    from verakit.models import ModelNotInstalledError, smollm2_dir

    try:
        return str(smollm2_dir())
    except ModelNotInstalledError as e:
        pytest.skip(str(e))


@pytest.mark.skipif(not (DATA / "e2e" / "trainset.csv").is_file(), reason=f"E2E CSVs not found under {DATA / 'e2e'}")
def test_smollm2_e2e_few_vera_steps_lower_loss_and_change_generations(smollm2):
    from verakit.train.causal.data import load_causal_data

    train, dev = load_causal_data("e2e", str(DATA / "e2e"), max_train_samples=200, max_eval_samples=8)
    model, tok = build_causal_lm(smollm2)
    prepared = prepare_model(model, MethodSpec("vera", 256, 0.1, None, 0, head=NO_HEAD))
    held = tokenize_examples(tok, dev, 48, False)
    decode = DecodeConfig(max_new_tokens=12)
    before, gen_before = evaluate_lm(model.eval(), tok, held, dev[:2], use_chat_template=False, decode=decode)
    rows = tokenize_examples(tok, train, 48, False)
    opt = torch.optim.AdamW([p for _, p in prepared.adapter], lr=5e-2)
    model.train()
    for step in range(4):  # 4 steps of 4 examples: seconds of compute, enough to learn E2E's output format
        loss, n = token_loss(model, collate_lm(rows[step * 4 : step * 4 + 4], tok.pad_token_id))
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
    after, gen_after = evaluate_lm(model.eval(), tok, held, dev[:2], use_chat_template=False, decode=decode)
    assert after["loss"] < before["loss"] - 0.15, (before, after)
    assert gen_after != gen_before
    assert all(0 <= after[k] <= 100 for k in ("bleu", "rouge_l", "chrf"))


@pytest.mark.skipif(not (DATA / "alpaca" / "alpaca_5000.json").is_file(), reason=f"Alpaca JSON not found under {DATA}")
def test_smollm2_instruct_on_100_alpaca_examples_end_to_end(smollm2, tmp_path):
    rows = json.loads((DATA / "alpaca" / "alpaca_5000.json").read_text(encoding="utf-8"))[:100]
    assert all(r["output"].strip() for r in rows)
    data = tmp_path / "alpaca100.json"
    data.write_text(json.dumps(rows))
    m = train_causal(CausalArgs(task="instruct", data_dir=str(data), out=str(tmp_path / "run"), model=smollm2,
                                r=64, batch_size=40, max_length=32, held_out=0.2, lr=2e-2, report_samples=1,
                                max_new_tokens=8, quiet=True))
    assert m["n_train"] == 80 and m["n_eval"] == 20 and m["total_steps"] == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["args"]["chat_template"] is True
    assert m["metric"]["perplexity"] == pytest.approx(float(torch.tensor(m["metric"]["loss"]).exp()), rel=1e-5)
    assert m["samples"][0]["after"] and "Sample 1" in (tmp_path / "run" / "report.md").read_text()

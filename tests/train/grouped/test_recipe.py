"""Grouped training (one VeRA adapter per group in one run) against slow references: each group's gradient
equals training that group alone on the same rows (SlotAdamW: test_slot_optim.py), a whole grouped run
equals per-group reference training, and the real MiniLM's per-group adapters reproduce their dev metrics
when loaded alone. What grouped training refuses: test_refusals.py."""

from __future__ import annotations

import copy
import csv
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import randomize_vectors
from train.conftest import NEGATIVE, NEUTRAL, POSITIVE
from verakit import VeraConfig, attach, load_adapter, read_adapter, vera_layers
from verakit.cli import main
from verakit.fileformat import adapter_from_model
from verakit.slot_tables import to_slot_tables

pytestmark = pytest.mark.usefixtures("one_thread")


def write_grouped_task(folder: Path, groups: list[str], n_train: int, n_dev: int, seed: int = 0) -> Path:
    """The tiny sentiment task of conftest.write_task with a `customer` column; the last group's labels
    are flipped, so one shared adapter cannot fit every group."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        with (folder / f"{split}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label", "customer"])
            for i in range(n):
                group, positive = groups[i % len(groups)], (i // len(groups)) % 2 == 1
                words = rng.sample(NEUTRAL, 4) + rng.sample(POSITIVE if positive else NEGATIVE, 2)
                rng.shuffle(words)
                label = positive != (group == groups[-1])
                w.writerow([" ".join(words), "pos" if label else "neg", group])
    return folder


# ---------------------------------------------------------------- gradients vs each group alone


def _group_adapters(base, n: int, shared_head: bool, magnitude: bool = False):
    """n adapters on the tiny BERT with random vectors, (DVoRA) magnitudes off W0's row norms and (unless
    shared) different heads."""
    model = attach(copy.deepcopy(base), VeraConfig(r=8, target_modules=("query", "value"), magnitude=magnitude))
    m0 = {n: ly.vera_m.detach().clone() for n, ly in vera_layers(model).items() if ly.vera_m is not None}
    out = []
    for i in range(n):
        randomize_vectors(model, seed=10 + i)
        with torch.no_grad():
            for name, m in m0.items():  # each group's rows scaled by 1 + 0.3 N(0, 1)
                g = torch.Generator().manual_seed(30 + i)
                vera_layers(model)[name].vera_m.copy_(m * (1 + 0.3 * torch.randn(m.shape, generator=g)))
        if i == 0 or not shared_head:  # heads far from the 0.02-std init, so gradients are not tiny
            g = torch.Generator().manual_seed(20 + i)
            with torch.no_grad():
                for name in ("bert.pooler", "classifier"):
                    for p in model.get_submodule(name).parameters():
                        p.add_(torch.randn(p.shape, generator=g) * 0.5)
        out.append(adapter_from_model(model))
    return model, out


def _batch(n_rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 99, (n_rows, 9), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n_rows):  # ragged rows, right-padded as the collate does
        mask[i, int(torch.randint(3, 10, (1,), generator=g)) :] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}, torch.randint(0, 3, (n_rows,), generator=g)


@pytest.mark.parametrize("shared_head, magnitude", [(False, False), (True, False), (False, True)],
                         ids=["per-group-heads", "shared-head", "dvora"])
def test_one_sgd_step_equals_each_group_trained_alone(tiny_bert_clf, shared_head, magnitude):
    """Sum-reduced loss over a mixed batch of 3 groups (slot 4 allocated but absent): each group's d, b
    (DVoRA: and m) and head gradients and SGD step equal those of that group alone on its rows; a shared
    head's gradient is the sum of the groups' head gradients; the absent slot gets exactly zero."""
    base = tiny_bert_clf  # eval mode: no dropout, so both sides see the same function
    attached, adapters = _group_adapters(base, 3, shared_head, magnitude)
    model = copy.deepcopy(attached)
    tables = to_slot_tables(model, 5, per_slot_heads=not shared_head)
    for i, ad in enumerate(adapters):
        tables.write(i + 1, ad)
    if shared_head:
        model.load_state_dict(adapters[0].saved, strict=False)
    inputs, labels = _batch(10)
    slots = torch.tensor([1, 2, 3, 1, 3, 3, 2, 1, 1, 2])
    with tables.rows.use(slots):
        F.cross_entropy(model(**inputs).logits, labels, reduction="sum").backward()
    trained = [*tables.adapter_params(), *tables.head_params(model)]
    before = [p.detach().clone() for p in trained]
    torch.optim.SGD(trained, lr=0.5).step()

    head_sum: dict[str, torch.Tensor] = {}
    for i, ad in enumerate(adapters):
        alone = load_adapter(copy.deepcopy(base), ad)
        rows = slots == i + 1
        F.cross_entropy(alone(**{k: v[rows] for k, v in inputs.items()}).logits, labels[rows], reduction="sum").backward()
        layers = dict(alone.named_modules())
        for name, layer in tables.layers.items():
            ref = layers[name]
            # a real gradient, not two zeros compared (DVoRA's is smaller: m / ||W0 + delta|| < 1 at these vectors)
            assert ref.vera_d.grad.abs().max() > (2e-4 if magnitude else 1e-3)
            torch.testing.assert_close(layer.vera_d.grad[i + 1], ref.vera_d.grad, atol=1e-6, rtol=0)
            torch.testing.assert_close(layer.vera_b.grad[i + 1], ref.vera_b.grad, atol=1e-6, rtol=0)
            torch.testing.assert_close(layer.vera_d[i + 1], ref.vera_d - 0.5 * ref.vera_d.grad, atol=1e-6, rtol=0)
            torch.testing.assert_close(layer.vera_b[i + 1], ref.vera_b - 0.5 * ref.vera_b.grad, atol=1e-6, rtol=0)
            assert layer.vera_d.grad[4].abs().max() == 0 and layer.vera_b.grad[4].abs().max() == 0
            if magnitude:  # m's gradient is (W0 x + delta x) / ||W0 + delta||: O(1) sums over tokens
                assert ref.vera_m.grad.abs().max() > 2e-4  # m ~ 0.1 on this model (W0 std 0.02): small, not zero
                torch.testing.assert_close(layer.vera_m.grad[i + 1], ref.vera_m.grad, atol=2e-7, rtol=1e-4)
                torch.testing.assert_close(layer.vera_m[i + 1], ref.vera_m - 0.5 * ref.vera_m.grad, atol=2e-7, rtol=0)
                assert layer.vera_m.grad[4].abs().max() == 0 and layer.vera_m.grad[0].abs().max() == 0
            else:
                assert layer.vera_m is None
        for head in ("bert.pooler.dense", "classifier"):
            for attr in ("weight", "bias"):
                ref_grad = getattr(layers[head], attr).grad
                if shared_head:
                    head_sum[f"{head}.{attr}"] = head_sum.get(f"{head}.{attr}", 0) + ref_grad
                else:
                    table = getattr(tables.heads[head], attr)
                    # head gradients are O(1) sums over rows, summed in another order: fp32 relative
                    torch.testing.assert_close(table.grad[i + 1], ref_grad, atol=1e-6, rtol=1e-5)
                    assert table.grad[4].abs().max() == 0
    if shared_head:
        for key, grad in head_sum.items():
            torch.testing.assert_close(model.get_parameter(key).grad, grad, atol=1e-6, rtol=1e-5)
    for p, b in zip(trained, before, strict=True):  # the step used the gradients checked above
        torch.testing.assert_close(p.detach(), b - 0.5 * p.grad, atol=0, rtol=0)


def _grouped_recipe(model_dir, data_dir: Path, magnitude: bool = False):
    """(GroupedRecipe over the tiny task's groups with r=8 (DVoRA with `magnitude`) and per-group heads, the
    initial adapter, data)."""
    from verakit.train.classify import TrainArgs, build_classifier
    from verakit.train.classify.data import load_task
    from verakit.train.grouped import GroupedArgs, GroupedRecipe, plan_groups
    from verakit.train.methods import MethodSpec, prepare_model

    data = load_task("csv", data_dir, group_column="customer")
    groups = plan_groups(data.train, "customer", 10, 1, "test")
    args = GroupedArgs(TrainArgs(task="csv", data_dir=str(data_dir), out="unused", model=model_dir, r=8,
                                 epochs=3, batch_size=8, lr=2e-2, head_lr=1e-2, quiet=True, magnitude=magnitude).resolved(),
                       "customer")
    torch.manual_seed(0)
    model, tok = build_classifier(model_dir, data.spec)
    prepare_model(model, MethodSpec("vera", 8, 0.1, None, 0, magnitude=magnitude))
    init = adapter_from_model(model)
    tables = to_slot_tables(model, len(groups) + 1)
    return GroupedRecipe(model, tables, groups, tok, data.spec, data.train, data.dev, args, {}), init, data


def test_ctrl_c_then_resume_equals_uninterrupted_grouped_run(tmp_path, tiny_bert_dir):
    """The loop's checkpoint carries the slot tables and SlotAdamW's per-slot moments and step counts."""
    import os
    import signal

    from verakit.train.loop import LoopConfig, TrainingInterrupted, run_loop

    data_dir = write_grouped_task(tmp_path / "data", ["a", "b", "c"], 30, 9)
    cfg = LoopConfig(epochs=2, batch_size=8, seed=1, quiet=True)
    full, _, _ = _grouped_recipe(tiny_bert_dir, data_dir)
    run_loop(full, cfg, tmp_path / "full", optimizer_factory=full.make_optimizer)

    def ctrl_c_at_step_5(info):
        if info.step == 5:  # mid epoch 2
            os.kill(os.getpid(), signal.SIGINT)

    first, _, _ = _grouped_recipe(tiny_bert_dir, data_dir)
    with pytest.raises(TrainingInterrupted):
        run_loop(first, cfg, tmp_path / "resumed", optimizer_factory=first.make_optimizer, on_step=ctrl_c_at_step_5)
    resumed, _, _ = _grouped_recipe(tiny_bert_dir, data_dir)
    run_loop(resumed, cfg, tmp_path / "resumed", resume=True, optimizer_factory=resumed.make_optimizer)
    for a, b in zip(resumed.tables.slotted_params(), full.tables.slotted_params(), strict=True):
        assert torch.equal(a, b)
    steps = [s["slot_steps"] for s in resumed.optimizer.state.values()]
    assert all(torch.equal(t, steps[0]) for t in steps) and steps[0][0] == 0 and steps[0][1:].min() > 0
    assert json.loads((tmp_path / "resumed" / "group_metrics.json").read_text()) == full.group_metrics


@pytest.mark.parametrize("magnitude", [False, True], ids=["vera", "dvora"])
def test_grouped_run_equals_per_group_adamw_reference(tmp_path, tiny_bert_dir, magnitude):
    """A whole run_loop of GroupedRecipe (3 epochs, warmup, weight decay) against the slow reference: per
    group, a model of its own with torch's AdamW, stepped only at the global steps where its rows were in
    the batch, on those rows' share of the batch loss, at the schedule's lr of that step. DVoRA: each
    group's m too, its row norms recomputed from its own vectors at every step."""
    from transformers import get_linear_schedule_with_warmup

    from verakit.train.batching import epoch_order as _epoch_order
    from verakit.train.classify import build_classifier
    from verakit.train.loop import LoopConfig, run_loop

    data_dir = write_grouped_task(tmp_path / "data", ["a", "b", "c"], 30, 9)
    recipe, init, data = _grouped_recipe(tiny_bert_dir, data_dir, magnitude)
    model, tables, groups = recipe.model, recipe.tables, recipe.groups
    cfg = LoopConfig(epochs=3, batch_size=8, warmup_ratio=0.2, weight_decay=0.05, seed=1, quiet=True)
    run_loop(recipe, cfg, tmp_path / "run", optimizer_factory=recipe.make_optimizer)

    base, _ = build_classifier(tiny_bert_dir, data.spec)
    refs = [load_adapter(copy.deepcopy(base), init).train() for _ in groups.values]
    opts = []
    for ref in refs:
        names = {n for n, _ in ref.named_parameters() if "classifier" in n or "pooler" in n}
        params = dict(ref.named_parameters())
        opts.append(torch.optim.AdamW([{"params": [p for n, p in params.items() if p.requires_grad and n not in names],
                                        "lr": 2e-2},
                                       {"params": [params[n] for n in sorted(names)], "lr": 1e-2}], weight_decay=0.05))
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_linear_schedule_with_warmup(dummy, 3, 12)  # 3 epochs x ceil(30 / 8) steps; ceil(0.2 * 12) warmup
    for epoch in range(3):
        order = _epoch_order(recipe.num_train(), 1, epoch)
        for start in range(0, len(order), 8):
            batch = recipe.collate(order[start : start + 8])
            scale = sched.get_last_lr()[0]
            for i, (ref, opt) in enumerate(zip(refs, opts, strict=True)):
                rows = batch["slots"] == i + 1
                if not rows.any():
                    continue
                inputs = {k: v[rows] for k, v in batch.items() if k not in ("labels", "slots")}
                loss = F.cross_entropy(ref(**inputs).logits, batch["labels"][rows], reduction="sum") / len(batch["labels"])
                loss.backward()
                opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = 2e-2 * scale, 1e-2 * scale
                opt.step()
                opt.zero_grad()
            dummy.step()
            sched.step()
    for i, ref in enumerate(refs):
        got = tables.export(model, i + 1, {})
        expected = adapter_from_model(ref)
        assert (got.b[next(iter(got.b))] - init.b[next(iter(init.b))]).abs().max() > 1e-3  # it trained
        assert set(got.m) == set(expected.m) == (set(expected.d) if magnitude else set())
        for n in expected.d:
            torch.testing.assert_close(got.d[n], expected.d[n], atol=2e-5, rtol=0)
            torch.testing.assert_close(got.b[n], expected.b[n], atol=2e-5, rtol=0)
        for n in expected.m:
            assert (got.m[n] - init.m[n]).abs().max() > 1e-3  # m trained...
            torch.testing.assert_close(got.m[n], expected.m[n], atol=2e-5, rtol=0)  # ...as the group alone
        for k in expected.saved:
            torch.testing.assert_close(got.saved[k], expected.saved[k], atol=2e-5, rtol=0)


# ---------------------------------------------------------------- the CLI: outputs, serving, bad input


def _alone(model_dir, data_dir: Path):
    """evaluate(adapter_path, group, max_length) -> (dev metrics, logits) of one adapter file loaded alone
    (load_adapter on a fresh copy of the base classifier), on its group's dev rows."""
    from verakit.train.classify import Encoded, build_classifier, evaluate_encoded
    from verakit.train.classify.data import load_task

    data = load_task("csv", data_dir, group_column="customer")
    torch.manual_seed(0)
    base, tok = build_classifier(model_dir, data.spec)

    def evaluate(adapter_path, group: str, max_length: int = 128):
        model = load_adapter(copy.deepcopy(base), adapter_path).eval()
        dev = Encoded(tok, [e for e in data.dev if e.group == group], max_length, False)
        batch = dev.batch(range(len(dev)))
        batch.pop("labels")
        with torch.no_grad():
            logits = model(**batch).logits
        return evaluate_encoded(model, dev, data.spec), logits

    return evaluate

@pytest.mark.parametrize("magnitude, embeddings", [(False, False), (True, False), (True, True)],
                         ids=["vera", "dvora", "dvora-embeddings"])
def test_cli_writes_one_servable_adapter_per_group(tmp_path, capsys, tiny_bert_dir, magnitude, embeddings):
    """Names are sanitized, metrics.json and report.md list every group, each file loaded alone gives its
    recorded dev metric, and `verakit serve`'s engine on RUN_DIR/adapters answers as the file alone does;
    with --magnitude every file is a DVoRA adapter (m per layer), also with the word embeddings adapted."""
    from verakit.serve.engine import Engine
    from verakit.serve.options import ServeOptions
    from verakit.train.classify.data import load_task

    data_dir = write_grouped_task(tmp_path / "data", ["acme corp", "globex", "initech/eu"], 60, 24)
    run_dir = tmp_path / "run"
    rc = main(["train", "--task", "csv", "--data-dir", str(data_dir), "--out", str(run_dir), "--model", tiny_bert_dir,
               "--group-column", "customer", "--r", "16", "--epochs", "2", "--batch-size", "16", "--lr", "2e-2",
               "--head-lr", "2e-2", "--quiet", *(["--magnitude"] if magnitude else []),
               *(["--target-modules", "query,value,word_embeddings"] if embeddings else [])])
    assert rc == 0, capsys.readouterr().err
    assert "csv vera x 3 groups: best dev mean_group_accuracy" in capsys.readouterr().out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    names = {"acme_corp": "acme corp", "globex": "globex", "initech_eu": "initech/eu"}
    assert {n: g["group"] for n, g in metrics["groups"].items()} == names
    assert sorted(p.name for p in (run_dir / "adapters").iterdir()) == [f"{n}.safetensors" for n in sorted(names)]
    assert metrics["n_groups"] == 3 and metrics["n_train"] == 60 and metrics["n_eval"] == 24
    # 2 layers x {query, value}, the pooler's dense layer (default --head vera) (and the word embeddings,
    # 32 wide too) x (d + b (+ m))
    assert metrics["trainable_params"] == (2 * 2 + 1 + embeddings) * (16 + 32 + (32 if magnitude else 0))
    report = (run_dir / "report.md").read_text()
    assert "| `initech_eu` | initech/eu | 20 | 8 |" in report
    scores = [g["metric"]["accuracy"] for g in metrics["groups"].values()]
    assert metrics["metric"]["mean_group_accuracy"] == pytest.approx(sum(scores) / 3)

    data = load_task("csv", data_dir, group_column="customer")
    texts = {g: [e.text for e in data.dev if e.group == g] for g in names.values()}
    evaluate_alone = _alone(tiny_bert_dir, data_dir)
    engine = Engine(ServeOptions(model=tiny_bert_dir, adapters=str(run_dir / "adapters"), task="classify", threads=1))
    try:
        for name, group in names.items():
            path = run_dir / "adapters" / f"{name}.safetensors"
            adapter = read_adapter(path)
            assert adapter.extra["group"] == group and adapter.config.magnitude is magnitude
            assert len(adapter.m) == (5 + embeddings if magnitude else 0)
            assert ("bert.embeddings.word_embeddings" in adapter.m) is embeddings
            alone, logits = evaluate_alone(path, group)
            assert alone == metrics["groups"][name]["metric"]
            served = engine.classify(name, engine.encode_inputs(texts[group])).result(timeout=60)
            torch.testing.assert_close(torch.tensor(served.probs), logits.softmax(-1), atol=1e-5, rtol=0)
    finally:
        engine.close()


def test_baseline_pools_one_constant_and_averages_each_groups_own(tmp_path, capsys, tiny_bert_dir):
    """metrics.json "baseline": the pooled metrics of always answering the most frequent dev label over the
    scored dev rows, and mean_group_accuracy = the mean over groups of each group's majority share; a dev
    row of an untrained group is not scored. Expected values by hand from the dev labels written here."""
    data_dir = write_grouped_task(tmp_path / "data", ["a", "b", "c"], 30, 6)
    # a: 4 pos (majority share 1.0), b: 1 pos 3 neg (0.75), c: 2 pos 2 neg (0.5), zzz: not a trained group.
    dev = [("a", "pos")] * 4 + [("b", "pos")] + [("b", "neg")] * 3 + [("c", "pos")] * 2 + [("c", "neg")] * 2
    with (data_dir / "dev.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "customer"])
        w.writerows([f"row {i} {NEUTRAL[i % len(NEUTRAL)]} {POSITIVE[i % len(POSITIVE)]}", label, group]
                    for i, (group, label) in enumerate(dev + [("zzz", "neg")] * 5))
    run_dir = tmp_path / "run"
    rc = main(["train", "--task", "csv", "--data-dir", str(data_dir), "--out", str(run_dir), "--model", tiny_bert_dir,
               "--group-column", "customer", "--r", "8", "--epochs", "1", "--batch-size", "30", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    pooled = 7 / 12  # 7 of the 12 scored rows are "pos"
    assert metrics["baseline"] == pytest.approx({
        "accuracy": pooled,
        "macro_f1": (2 * pooled / (1 + pooled)) / 2,  # F1 of "pos" (precision 7/12, recall 1) and 0 for "neg"
        "mean_group_accuracy": (1.0 + 0.75 + 0.5) / 3,
    })
    report = (run_dir / "report.md").read_text()
    assert "| trivial baseline (constant prediction: the most frequent class, or the mean score) | - | 0.5833 | " \
           "0.3684 | 0.7500 |" in report


def test_a_group_without_dev_rows_gets_a_null_metric_and_stays_out_of_the_mean(tmp_path, capsys, tiny_bert_dir):
    """docs/grouped.md: groups without dev rows get `metric: null` and mean_group_<metric> is the unweighted
    mean over the groups that have dev rows; the group still trains and gets its file."""
    data_dir = write_grouped_task(tmp_path / "data", ["a", "b", "c"], 30, 12)
    dev = data_dir / "dev.csv"
    lines = dev.read_text().splitlines()
    dev.write_text("\n".join([lines[0], *(line for line in lines[1:] if not line.endswith(",c"))]) + "\n")
    run_dir = tmp_path / "run"
    rc = main(["train", "--task", "csv", "--data-dir", str(data_dir), "--out", str(run_dir), "--model", tiny_bert_dir,
               "--group-column", "customer", "--r", "8", "--epochs", "1", "--batch-size", "30", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    groups = metrics["groups"]
    assert groups["c"]["metric"] is None and (groups["c"]["n_train"], groups["c"]["n_dev"]) == (10, 0)
    scores = [groups[g]["metric"]["accuracy"] for g in ("a", "b")]
    assert sum(scores) > 0  # so counting c as a group scoring 0 would change the mean
    assert metrics["metric"]["mean_group_accuracy"] == pytest.approx(sum(scores) / 2)
    assert (run_dir / "adapters" / "c.safetensors").is_file()


# ---------------------------------------------------------------- the real MiniLM on SST-2 groups


def _carve_sst2(sst2: Path, out: Path, groups: list[str], n_train: int, n_dev: int) -> Path:
    """Groups carved from SST-2 in file order: train.tsv rows 1..n_train*G and dev.tsv rows 1..n_dev*G,
    row i going to groups[i % G] (a deterministic, label-independent split)."""
    out.mkdir(parents=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        with (sst2 / f"{split}.tsv").open(encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1 : 1 + n * len(groups)]
        with (out / f"{split}.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label", "customer"])
            for i, (sentence, label) in enumerate(rows):
                w.writerow([sentence, label, groups[i % len(groups)]])
    return out


def test_minilm_sst2_groups_end_to_end(tmp_path, capsys, shared_data, minilm_path):
    """Real MiniLM, 4 groups of 32 SST-2 train rows (20 dev rows each), 2 epochs: every group's adapter
    differs from the others, and each file loaded alone reproduces its recorded per-group dev metric."""
    groups = ["acme corp", "globex", "initech/eu", "umbrella"]
    data_dir = _carve_sst2(shared_data / "glue" / "SST-2", tmp_path / "data", groups, 32, 20)
    run_dir = tmp_path / "run"
    rc = main(["train", "--task", "csv", "--data-dir", str(data_dir), "--out", str(run_dir), "--model", minilm_path,
               "--group-column", "customer", "--r", "128", "--epochs", "2", "--batch-size", "16", "--max-length", "64",
               "--lr", "1e-2", "--head-lr", "4e-3", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_groups"] == 4 and metrics["head_params"] == 2 * 384 + 2  # classifier (the pooler: d, b)
    adapters = {n: read_adapter(run_dir / g["adapter"]) for n, g in metrics["groups"].items()}
    vectors = {n: torch.cat([*a.d.values(), *a.b.values()]) for n, a in adapters.items()}
    heads = {n: a.saved["classifier.weight"] for n, a in adapters.items()}
    names = sorted(adapters)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (vectors[a] - vectors[b]).abs().max() > 1e-3, (a, b)
            assert (heads[a] - heads[b]).abs().max() > 1e-3, (a, b)
    evaluate_alone = _alone(minilm_path, data_dir)
    for name, g in metrics["groups"].items():
        alone, _ = evaluate_alone(run_dir / g["adapter"], g["group"], max_length=64)
        assert alone == pytest.approx(g["metric"], abs=1e-9), name

"""The VeRA ablation options (issue #7) do what they claim through the real training path: a frozen
vector gets no gradient and stays constant through run_loop while the other one learns ("only d" is not
a silent no-op), `verakit train` flags reach the adapter file, unique projections differ per layer yet
regenerate bit for bit on load (same dev metric as training), uniform projections give a non-negative
delta, and bad combinations fail naming the option. Core behaviour (config validation, reference
math, table statistics) is tested in tests/test_{config,layer,projection,inject}.py."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from train.conftest import write_task
from verakit import VeraConfig, attach, read_adapter, vera_layers
from verakit.cli import main
from verakit.config import ConfigError
from verakit.projection import distribution_scale, matrix_ids, unit_table
from verakit.train.loop import LoopConfig, run_loop

pytestmark = pytest.mark.usefixtures("one_thread")


def _vectors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (ly.vera_d.detach().clone(), ly.vera_b.detach().clone()) for n, ly in vera_layers(model).items()}


def _logits(recipe) -> torch.Tensor:
    batch = recipe.train.batch(range(16))
    batch.pop("labels")
    with torch.no_grad():
        return recipe.model.eval()(**batch).logits


# (frozen vector, its constant value, the paper's setup): "only d" omits b (ones) and starts d at 0;
# "only b" omits d (ones).
FROZEN = {"only d": ({"train_b": False, "d_initial": 0.0}, "b", 1.0),
          "only b": ({"train_d": False, "d_initial": 1.0}, "d", 1.0)}


@pytest.mark.parametrize("setup", list(FROZEN))
def test_frozen_vector_gets_no_gradient_and_stays_constant_through_run_loop(make_recipe, tmp_path, setup):
    options, frozen, value = FROZEN[setup]
    recipe = make_recipe("vera", epochs=2, batch_size=16, lr=2e-2, **options)
    base = make_recipe("head")  # the same pretrained model and head, no adapter
    # The paper's setups start from the pretrained model: delta = b B (s d A x) is zero at init.
    torch.testing.assert_close(_logits(recipe), _logits(base), rtol=0, atol=0)
    recipe.model.train()

    names = [n for g in recipe.param_groups() for p in g.params for n, q in recipe.model.named_parameters() if p is q]
    assert names and not any(n.endswith(f"vera_{frozen}") for n in names)  # the optimizer never sees it
    batch = recipe.collate(range(16))
    recipe.loss(recipe.model, batch)[0].backward()
    for layer in vera_layers(recipe.model).values():
        still, trained = (layer.vera_d, layer.vera_b) if frozen == "d" else (layer.vera_b, layer.vera_d)
        assert not still.requires_grad and still.grad is None
        assert trained.grad is not None and trained.grad.abs().sum() > 0  # not silenced by the frozen one
    recipe.model.zero_grad(set_to_none=True)

    before = _vectors(recipe.model)
    run_loop(recipe, LoopConfig(epochs=2, batch_size=16, seed=0, quiet=True), tmp_path)
    for name, (d, b) in _vectors(recipe.model).items():
        still, moved = (d, b) if frozen == "d" else (b, d)
        still0, moved0 = (before[name][0], before[name][1]) if frozen == "d" else (before[name][1], before[name][0])
        assert torch.equal(still, still0) and torch.all(still == value), name
        assert (moved - moved0).abs().max() > 1e-3, name


def test_frozen_zero_d_and_options_of_other_methods_are_refused(tmp_path, capsys, tiny_bert_dir, tiny_task):
    with pytest.raises(ConfigError, match="train_d=False with d_initial=0 trains nothing"):
        VeraConfig(train_d=False, d_initial=0.0)
    base = ["train", "--task", "csv", "--data-dir", str(tiny_task), "--model", tiny_bert_dir, "--quiet"]
    cases = {
        "zero d": (["--no-train-d", "--d-initial", "0"], "train_d=False with d_initial=0 trains nothing"),
        "lora": (["--method", "lora", "--no-train-b", "--distribution", "uniform"],
                 "train_b, distribution: VeRA options, but the method is 'lora'"),
        "causal": (["--task", "e2e", "--projection-sharing", "unique"],
                   "--projection-sharing: VeRA ablation options are wired for classification tasks only"),
        "images": (["--task", "images", "--no-train-d"], "--no-train-d"),
    }
    for case, (flags, message) in cases.items():
        run_dir = tmp_path / case
        assert main([*base, "--out", str(run_dir), *flags]) == 2, case
        assert message in capsys.readouterr().err, case
        assert not run_dir.exists(), case


def test_cli_options_reach_the_file_and_unique_projections_regenerate_bit_identically(tmp_path, capsys,
                                                                                      tiny_bert_dir, tiny_task):
    """--no-train-d --distribution kaiming_normal --projection-sharing unique: the file records them, d
    is still d_initial, every layer has its own pair, and loading the file regenerates exactly the tables
    derived from (seed, layer name), reproducing the training-time dev metric."""
    from verakit.train.classify import evaluate_classifier

    run_dir = tmp_path / "run"
    rc = main(["train", "--task", "csv", "--data-dir", str(tiny_task), "--out", str(run_dir), "--model",
               tiny_bert_dir, "--r", "16", "--epochs", "1", "--batch-size", "16", "--lr", "2e-2", "--seed", "5",
               "--no-train-d", "--d-initial", "1.0", "--distribution", "kaiming_normal",
               "--projection-sharing", "unique", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    path = run_dir / "adapter.safetensors"
    ad = read_adapter(path)
    cfg = ad.config
    assert (cfg.train_d, cfg.train_b, cfg.distribution, cfg.projection_sharing, cfg.seed, cfg.r) == (
        False, True, "kaiming_normal", "unique", 5, 16)
    assert json.loads((run_dir / "config.json").read_text())["method"] == cfg.to_dict()
    assert all(torch.all(d == 1.0) for d in ad.d.values())
    assert all(b.abs().max() > 0 for b in ad.b.values())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # b only: 2 layers x {query, value} and the head's pooler.dense (default --head vera), d_out 32 each
    assert metrics["trainable_params"] == (2 * 2 + 1) * 32

    from verakit import load_adapter
    from verakit.train.classify import build_classifier
    from verakit.train.classify.data import load_task

    spec = load_task("csv", tiny_task).spec
    layers = vera_layers(load_adapter(build_classifier(tiny_bert_dir, spec)[0], path))
    tables = {}
    for name, layer in layers.items():
        A, B = layer.slices(torch.device("cpu"), torch.float32)
        ida, idb = matrix_ids("unique", name)
        want_a = unit_table(5, ida, "kaiming_normal", 16, layer.in_features)
        want_b = unit_table(5, idb, "kaiming_normal", layer.out_features, 16)
        assert torch.equal(A, want_a) and torch.equal(B, want_b), name
        tables[name] = A
    first, *others = tables.values()
    assert len(tables) == 5 and all(not torch.equal(first, t) for t in others)  # 4 attention layers + pooler.dense
    assert evaluate_classifier(path)["metric"] == metrics["metric"]


def test_uniform_projections_give_a_non_negative_bounded_delta(tiny_bert_clf):
    """With d = b = 1, delta = s B_sl A_sl: all-positive U[0, 0.1) tables make every entry >= 0 and at
    most r * 0.1 * 0.1; Kaiming tables give both signs."""
    r = 8
    deltas = {}
    for dist in ("uniform", "kaiming_uniform"):
        model = attach(tiny_bert_clf.__class__(tiny_bert_clf.config), VeraConfig(r=r, distribution=dist))
        layer = next(iter(vera_layers(model).values()))
        with torch.no_grad():
            layer.vera_d.fill_(1.0)
            layer.vera_b.fill_(1.0)
        deltas[dist] = layer.delta_weight()
    A = unit_table(0, 0, "uniform", r, 32) * distribution_scale("uniform", 32)
    assert A.min() >= 0 and A.max() < 0.1
    assert deltas["uniform"].min() >= 0 and deltas["uniform"].max() <= r * 0.1 * 0.1
    assert deltas["uniform"].mean() == pytest.approx(r * 0.05 * 0.05, rel=0.3)
    assert deltas["kaiming_uniform"].min() < 0 < deltas["kaiming_uniform"].max()


def test_grouped_training_applies_the_options(tmp_path, capsys, tiny_bert_dir):
    """Every per-group adapter of `--group-column` gets the options: b fixed at ones, unique tables."""
    from train.grouped.test_recipe import write_grouped_task

    data_dir = write_grouped_task(tmp_path / "data", ["a", "b"], 40, 16)
    run_dir = tmp_path / "run"
    rc = main(["train", "--task", "csv", "--data-dir", str(data_dir), "--out", str(run_dir), "--model",
               tiny_bert_dir, "--group-column", "customer", "--r", "16", "--epochs", "1", "--batch-size", "16",
               "--no-train-b", "--d-initial", "0", "--projection-sharing", "unique", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    for name in ("a", "b"):
        ad = read_adapter(run_dir / "adapters" / f"{name}.safetensors")
        assert (ad.config.train_b, ad.config.projection_sharing) == (False, "unique")
        assert all(torch.all(b == 1.0) for b in ad.b.values())
        assert all(d.abs().max() > 0 for d in ad.d.values())  # d learned from 0 with b = 1


def test_only_d_learns_the_tiny_task(tmp_path, tiny_bert_dir):
    """Behaviour, not just plumbing: with the head frozen at a tiny lr, "only d" must lower the training
    loss well below its start (with b frozen at zero, as before this option existed, it could not)."""
    from verakit.train.classify import ClassificationRecipe, TrainArgs, build_classifier
    from verakit.train.classify.data import load_task
    from verakit.train.methods import prepare_model

    task = write_task(tmp_path / "task", n_train=64, n_dev=16, seed=1)
    args = TrainArgs(task="csv", data_dir=str(task), out=str(tmp_path / "run"), model=tiny_bert_dir, r=64,
                     epochs=4, batch_size=16, lr=5e-2, head_lr=1e-6, train_b=False, d_initial=0.0,
                     quiet=True).resolved()
    data = load_task("csv", task)
    torch.manual_seed(0)
    model, tok = build_classifier(tiny_bert_dir, data.spec)
    recipe = ClassificationRecipe(prepare_model(model, args.method_spec()), tok, data.spec, data.train, data.dev,
                                  args, {"task": "csv"})

    def loss() -> float:
        batch = recipe.collate(range(64))
        labels = batch.pop("labels")
        with torch.no_grad():
            return F.cross_entropy(recipe.model.eval()(**batch).logits, labels).item()

    start = loss()
    run_loop(recipe, LoopConfig(epochs=4, batch_size=16, seed=0, quiet=True), tmp_path / "run")
    assert loss() < 0.8 * start


def test_magnitude_trains_a_dvora_file_and_is_refused_elsewhere(tmp_path, capsys, tiny_bert_dir, tiny_task):
    """--magnitude: a tiny run writes an adapter file with vera_m (d_out, fp32) for every adapted layer, the
    magnitudes moved from their start (W0's row norms), and `verakit eval` of the file reproduces the
    training-time dev metric; with another method or the image task it is refused by name (causal LMs take
    it: tests/train/causal/test_recipe.py; --group-column: tests/train/grouped/test_recipe.py)."""
    base = ["train", "--task", "csv", "--data-dir", str(tiny_task), "--model", tiny_bert_dir, "--r", "16",
            "--epochs", "1", "--batch-size", "16", "--lr", "0.05", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "dvora"), "--magnitude"]) == 0
    metrics = json.loads((tmp_path / "dvora" / "metrics.json").read_text())
    assert json.loads((tmp_path / "dvora" / "config.json").read_text())["method"]["magnitude"] is True
    adapter = read_adapter(tmp_path / "dvora" / "adapter.safetensors")
    assert adapter.config.magnitude and set(adapter.m) == set(adapter.modules)
    from transformers import AutoModelForSequenceClassification

    weights = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).state_dict()
    moved = 0.0
    for name, m in adapter.m.items():
        assert m.dtype == torch.float32 and m.shape == (adapter.modules[name][0],)
        moved = max(moved, float((m - weights[f"{name}.weight"].norm(dim=1)).abs().max()))
    assert moved > 1e-4  # trained: m is not still W0's row norms
    capsys.readouterr()
    assert main(["eval", "--adapter", str(tmp_path / "dvora" / "adapter.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["metric"] == metrics["metric"]
    refused = {
        "lora": (["--method", "lora"], "magnitude: VeRA options, but the method is 'lora'"),
    }
    for case, (flags, message) in refused.items():
        assert main([*base, "--out", str(tmp_path / case), "--magnitude", *flags]) == 2, case
        assert message in capsys.readouterr().err, case
        assert not (tmp_path / case).exists(), case

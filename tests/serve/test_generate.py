"""Per-row generation: sampling against a reference nucleus, stop strings and streaming, and a mixed-adapter
batch (left padded, one generate call) against each prompt generated alone with its adapter loaded."""

import copy

import pytest
import torch

from serve.cases import make_tokenizer, tiny_llama, trained_adapter
from verakit import VeraConfig, attach, load_adapter
from verakit.serve import AdapterBank
from verakit.serve.generate import GenRow, RowSampling, RowStops, _held_back, generate_rows


def _nucleus_reference(logits, t, p):
    """The set of token ids that top-p sampling at temperature t may pick, by a plain loop."""
    probs = torch.softmax(logits / t, dim=-1)
    order = torch.argsort(probs, descending=True).tolist()
    keep, mass = [], 0.0
    for k in order:
        if mass >= p:
            break
        keep.append(k)
        mass += float(probs[k])
    return set(keep)


def test_row_sampling_greedy_and_nucleus_per_row():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 50, generator=g) * 3
    t = torch.tensor([0.0, 0.7, 1.0, 1.3])
    p = torch.tensor([1.0, 0.9, 0.5, 1.0])
    out = RowSampling(t, p)(torch.zeros(4, 1, dtype=torch.long), scores.clone())
    finite = [set(torch.isfinite(out[i]).nonzero().squeeze(1).tolist()) for i in range(4)]
    assert finite[0] == {int(scores[0].argmax())}
    for i in (1, 2, 3):
        assert finite[i] == _nucleus_reference(scores[i], float(t[i]), float(p[i]))
        kept = sorted(finite[i])
        torch.testing.assert_close(out[i, kept], scores[i, kept] / t[i])  # temperature applied
    assert len(finite[3]) == 50


def test_held_back_text():
    assert _held_back("hello wor", ["world"]) == 3
    assert _held_back("hello", ["xyz"]) == 0
    assert _held_back("ab\ufffd", []) == 1  # an incomplete UTF-8 character waits for its next byte
    assert _held_back("end: E", ["END", "E!"]) == 1


class _CharTokenizer:
    """decode() of ids as characters: enough for RowStops."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_row_stops_limits_stop_strings_eos_and_streaming():
    sent = [[], [], []]
    rows = [GenRow((1,), 10, stop=("cd",), sink=sent[0].append), GenRow((1,), 3, sink=sent[1].append),
            GenRow((1,), 10, sink=sent[2].append)]
    stops = RowStops(_CharTokenizer(), rows, prompt_len=1, eos_ids=[2])
    seqs = [[ord(c) for c in "abcde"], [ord(c) for c in "xyzwv"], [ord("q"), ord("r"), 2, 0, 0]]
    for step in range(1, 6):  # input_ids grow by one token per step, as in generate
        ids = torch.tensor([[1] + s[:step] for s in seqs])
        done = stops(ids)
    assert done.tolist() == [True, True, True]
    res = stops.finish(ids)
    assert [(r.text, r.finish_reason) for r in res] == [("ab", "stop"), ("xyz", "length"), ("qr", "stop")]
    assert ["".join(s) for s in sent] == ["ab", "xyz", "qr"]
    assert sent[0] == ["a", "b"]  # "c" was held back as a possible start of "cd", then dropped


@pytest.fixture(scope="module")
def llama_bank():
    tok = make_tokenizer("llama")
    base = tiny_llama(len(tok))
    adapters = {"g0": trained_adapter(base, VeraConfig(r=8), 0, std=1.0),
                "g1": trained_adapter(base, VeraConfig(r=4), 1, std=1.0)}
    bank = AdapterBank(attach(copy.deepcopy(base), VeraConfig(r=8)), capacity=2)
    for name, ad in adapters.items():
        bank.add(name, ad)
    return tok, base, adapters, bank


def test_mixed_adapter_generation_equals_each_prompt_alone(llama_bank):
    torch.set_num_threads(1)
    tok, base, adapters, bank = llama_bank
    prompts = ["hello world", "a", "the quick brown fox", "hello world", "zz"]
    names = ["g0", None, "g1", "g1", "g0"]
    rows = [GenRow(tuple(tok(p).input_ids), 10) for p in prompts]
    with torch.no_grad(), bank.rows(names):
        results = generate_rows(bank.model, tok, rows)
    texts = []
    for p, name in zip(prompts, names, strict=True):
        model = copy.deepcopy(base)
        if name is not None:
            load_adapter(model, adapters[name])
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        texts.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    assert [r.text for r in results] == texts
    assert len(set(texts[1:4])) == 3 and texts[0] != texts[3]  # adapters really change the output
    assert all(r.finish_reason == "length" and r.tokens == 10 for r in results)


def test_streamed_text_equals_final_text_and_sampling_runs(llama_bank):
    tok, _, _, bank = llama_bank
    pieces: list[str] = []
    rows = [GenRow(tuple(tok("hello").input_ids), 12, sink=pieces.append),
            GenRow(tuple(tok("x").input_ids), 6, temperature=0.9, top_p=0.8)]
    torch.manual_seed(0)
    with torch.no_grad(), bank.rows(["g0", "g1"]):
        results = generate_rows(bank.model, tok, rows)
    assert "".join(pieces) == results[0].text and len(pieces) > 1
    assert results[1].tokens == 6


def test_row_stop_ids_end_only_their_row():
    """A row's own stop tokens (training's end-of-turn marker) end it like EOS; other rows run on."""
    rows = [GenRow((1,), 10, stop_ids=(ord("c"),)), GenRow((1,), 10)]
    stops = RowStops(_CharTokenizer(), rows, prompt_len=1, eos_ids=[2])
    for step in range(1, 6):
        done = stops(torch.tensor([[1] + [ord(c) for c in "abcde"[:step]]] * 2))
    assert done.tolist() == [True, False]
    res = stops.finish(torch.tensor([[1] + [ord(c) for c in "abcde"]] * 2))
    assert [(r.text, r.finish_reason, r.tokens) for r in res] == [("ab", "stop", 2), ("abcde", "length", 5)]

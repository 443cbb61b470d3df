"""generate_texts: batched, left-padded greedy and beam search against slow references; stop tokens."""

from __future__ import annotations

import pytest
import torch

from helpers import randomize_vectors
from lm_helpers import save_tiny_lm
from verakit.prompting import stop_token_ids
from verakit.train.causal.generate import DecodeConfig, generate_ids, generate_texts
from verakit.train.causal.lm_data import prompt_ids

PROMPTS = [
    "name[Aromi], food[Chinese], area[riverside]\n",
    "name[Zizzi]\n",
    "Give three tips for staying healthy.\n",
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    folder = save_tiny_lm(tmp_path_factory.mktemp(request.param), request.param)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _greedy_ref(model, tokenizer, prompt: str, chat: bool, n: int) -> list[int]:
    """One prompt, no padding, no KV cache: append the argmax of a full forward n times (or until EOS)."""
    ids = prompt_ids(tokenizer, [prompt], chat)["input_ids"]  # (1, T)
    stops = stop_token_ids(tokenizer, chat)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            if nxt in stops:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@pytest.mark.parametrize("chat", [False, True])
def test_batched_greedy_equals_one_prompt_reference(lm, chat):
    model, tokenizer = lm
    got = generate_ids(model, tokenizer, PROMPTS, use_chat_template=chat,
                       config=DecodeConfig(max_new_tokens=6, batch_size=3))
    want = [_greedy_ref(model, tokenizer, p, chat, 6) for p in PROMPTS]
    assert got == want
    assert len({tuple(w) for w in want}) == 3, "the prompts should lead to different continuations"
    texts = generate_texts(model, tokenizer, PROMPTS, use_chat_template=chat,
                           config=DecodeConfig(max_new_tokens=6, batch_size=2))
    assert texts == [tokenizer.decode(w, skip_special_tokens=True).strip() for w in want]


def test_beam_search_equals_exhaustive_two_step_reference(lm):
    """With 2 new tokens, beam search (k beams) returns argmax over the top-k first tokens t1 of
    log p(t1) + max_t2 log p(t2 | t1)."""
    model, tokenizer = lm
    k = 3
    prompt = PROMPTS[0]
    ids = prompt_ids(tokenizer, [prompt], False)["input_ids"]
    with torch.no_grad():
        first = model(ids).logits[0, -1].log_softmax(-1)  # (V,)
        top = first.topk(k).indices
        branches = torch.cat([ids.repeat(k, 1), top[:, None]], dim=1)  # (k, T + 1)
        second = model(branches).logits[:, -1].log_softmax(-1)  # (k, V)
    best2 = second.max(-1)
    total = first[top] + best2.values
    j = int(total.argmax())
    got = generate_ids(model, tokenizer, [prompt, PROMPTS[1]], use_chat_template=False,
                       config=DecodeConfig(max_new_tokens=2, num_beams=k))
    assert got[0] == [int(top[j]), int(best2.indices[j])]


def test_generation_stops_at_the_end_marker(lm):
    """Declare the 3rd greedy token of a prompt the tokenizer's EOS: that row must be cut right before it."""
    from copy import deepcopy

    model, tokenizer = lm
    refs = [_greedy_ref(model, tokenizer, p, False, 6) for p in PROMPTS]
    i = next(i for i, r in enumerate(refs) if r[2] not in r[:2])  # its 3rd token is new in that row
    stop_tok = deepcopy(tokenizer)
    stop_tok.eos_token = stop_tok.convert_ids_to_tokens(refs[i][2])
    got = generate_ids(model, stop_tok, PROMPTS, use_chat_template=False, config=DecodeConfig(max_new_tokens=6))
    assert got[i] == refs[i][:2]
    assert all(refs[i][2] not in row for row in got)


def test_stop_ids_follow_the_chat_template(lm):
    _, tokenizer = lm
    assert stop_token_ids(tokenizer, False) == [tokenizer.eos_token_id]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tokenizer, True) == [im_end, tokenizer.eos_token_id]


def test_bad_decode_settings_and_no_prompts(lm):
    model, tokenizer = lm
    with pytest.raises(ValueError, match="DecodeConfig.num_beams must be an integer >= 1"):
        DecodeConfig(num_beams=0)
    with pytest.raises(ValueError, match="DecodeConfig.max_new_tokens"):
        DecodeConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="no prompts"):
        generate_texts(model, tokenizer, [], use_chat_template=False)


@pytest.mark.parametrize("record, has_template, flag, texts, chat", [
    (None, True, None, ["hi", "ok\n"], True),  # the base model alone: the template when the tokenizer has one
    (None, False, None, ["hi", "ok\n"], False),
    ({"task": "e2e", "chat_template": False}, True, None, ["hi\n", "ok\n"], False),  # loaders end prompts with \n
    ({"task": "instruct", "chat_template": True}, True, None, ["hi\n", "ok\n"], True),
    ({"task": "jsonl", "chat_template": False}, True, None, ["hi", "ok\n"], False),  # jsonl prompts are the user's
    ({"task": "jsonl"}, True, None, ["hi", "ok\n"], True),  # nothing recorded: as for the base model
    ({"task": "e2e", "chat_template": False}, True, True, ["hi\n", "ok\n"], True),  # --chat-template wins
    ({"task": "instruct", "chat_template": True}, True, False, ["hi\n", "ok\n"], False),
])
def test_artifact_prompts_get_the_recorded_format(monkeypatch, record, has_template, flag, texts, chat):
    """What `verakit generate` hands to generation for prompts "hi" and "ok\\n" under each recorded format."""
    from types import SimpleNamespace

    from verakit.train import artifacts
    from verakit.train.causal import generate, model

    base = SimpleNamespace(eval=lambda: "model", config=SimpleNamespace())  # a config with no prompt record
    tokenizer = SimpleNamespace(chat_template="{{ x }}" if has_template else None)
    seen = {}
    monkeypatch.setattr(model, "build_causal_lm", lambda name: (base, tokenizer))
    monkeypatch.setattr(artifacts, "read_artifact_info", lambda path: dict(record))
    monkeypatch.setattr(artifacts, "load_artifact", lambda path, model, check_base=True: model)

    def fake_generate_texts(model, tok, prompts, *, use_chat_template, config):
        seen.update(model=model, prompts=list(prompts), chat=use_chat_template)
        return ["out"] * len(prompts)

    monkeypatch.setattr(generate, "generate_texts", fake_generate_texts)
    adapter = None if record is None else "adapter.safetensors"
    assert generate.generate_with_artifact(adapter, ["hi", "ok\n"], chat_template=flag) == ["out", "out"]
    assert seen == {"model": "model", "prompts": texts, "chat": chat}


def test_generate_refuses_a_classification_adapter_before_loading_a_model(tmp_path, monkeypatch, capsys):
    """A GLUE adapter given to `verakit generate`: one line naming the file and the task, exit 2, and no base
    model loaded (it used to load SmolLM2 and fail attaching `classifier`)."""
    from verakit.train import artifacts
    from verakit.train.causal import model as causal_model

    adapter = tmp_path / "adapter.safetensors"
    adapter.write_bytes(b"")  # never read: the run info is
    monkeypatch.setattr(artifacts, "read_artifact_info", lambda path: {"task": "sst2", "model": None})

    def no_model(*args, **kwargs):
        raise AssertionError("a base model was loaded")

    monkeypatch.setattr(causal_model, "build_causal_lm", no_model)
    from verakit.cli import main

    assert main(["generate", "--adapter", str(adapter), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err == (f"verakit generate: error: {adapter}: a 'sst2' adapter, not a causal-LM one: generate takes "
                   "adapters trained with --task e2e / instruct / jsonl (score this one with verakit eval)\n")


def test_a_prompts_file_with_a_byte_order_mark(tmp_path):
    """A file saved by a Windows editor starts with a BOM, which was read into the first prompt ("\\ufeffhello"):
    its generation was of another prompt than the one the user wrote."""
    from verakit.cli.generate import _read_prompts

    (tmp_path / "p.txt").write_bytes(b"\xef\xbb\xbfhello\r\nworld\r\n")
    assert _read_prompts(str(tmp_path / "p.txt")) == ["hello", "world"]


def test_a_merged_folder_is_prompted_as_its_adapter_was(tmp_path, llama_dir, capsys):
    """The merged folder keeps the tokenizer's chat template; without a record, `verakit generate --model
    MERGED` rendered a plain-prompt adapter's prompt with it: another text than the adapter's, exit 0. The
    folder's config now records the adapter's prompt format, and generate (and serve) follow it."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    from verakit import VeraConfig, attach, save_adapter
    from verakit.cli import main

    model = attach(AutoModelForCausalLM.from_pretrained(llama_dir), VeraConfig(r=8, target_modules=("q_proj",)))
    randomize_vectors(model, seed=3, std=1.0)  # an adapter that changes the text
    adapter = tmp_path / "a.safetensors"
    save_adapter(model, adapter, extra={"task": "e2e", "chat_template": False})
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--model", llama_dir, "--out", str(merged)]) == 0
    capsys.readouterr()
    assert AutoConfig.from_pretrained(merged).verakit_prompt == {"task": "e2e", "chat_template": False}

    def generation(*flags: str, prompt: str = "name[Aromi]") -> str:
        assert main(["generate", *flags, "--prompt", prompt, "--max-new-tokens", "6", "--json"]) == 0
        return json.loads(capsys.readouterr().out)[0]["generation"]

    own = generation("--adapter", str(adapter), "--model", llama_dir)  # plain prompt + the e2e newline
    assert own != generation("--model", llama_dir)  # the base's tokenizer has a template: used by default
    assert generation("--model", str(merged)) == own  # the record: no template, the newline added
    assert generation("--model", str(merged), "--chat-template") != own  # the flag still overrides it

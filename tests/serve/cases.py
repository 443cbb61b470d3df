"""Serving test cases: a byte-level tokenizer built offline, tiny random BERT / Llama models and folders
with adapters, and a real `verakit serve` process on a free loopback port."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from helpers import randomize_vectors

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-admin-token"
BERT_LABELS = ["neg", "neu", "pos"]


def make_tokenizer(kind: str):
    """A real fast tokenizer with one token per printable ASCII character (and newline), built offline.

    Every token decodes to readable text, so even a random model's output streams and compares cleanly.
    kind "bert": [CLS] a [SEP] (b [SEP]) with token_type_ids; kind "llama": <s> prefix, </s> EOS and a
    small chat template.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "[CLS]", "[SEP]"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")  # (?m): "." matches "\n" in Oniguruma
    tok.decoder = decoders.Fuse()
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 4), ("[SEP]", 5)]
        )
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", cls_token="[CLS]",
                                       sep_token="[SEP]", model_max_length=64,
                                       model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                eos_token="</s>", model_max_length=128)
    t.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return t


def _quiet():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def tiny_bert(vocab: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                     vocab_size=vocab, max_position_embeddings=64, pad_token_id=0, num_labels=3,
                     id2label=dict(enumerate(BERT_LABELS)), label2id={n: i for i, n in enumerate(BERT_LABELS)})
    return BertForSequenceClassification(cfg).eval()


def tiny_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def trained_adapter(base, config, seed: int, std: float = 0.5):
    """A copy of `base` with VeRA attached and every trained tensor (vectors and heads) randomized."""
    from verakit import attach
    from verakit.fileformat import adapter_from_model
    from verakit.inject import vera_state

    model = attach(copy.deepcopy(base), config)
    randomize_vectors(model, seed=seed, std=std)
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for s in vera_state(model).saved_modules:
            for p in model.get_submodule(s).parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return adapter_from_model(model)


def dvora_adapter(base, config, seed, std=0.5):
    """`trained_adapter` for DVoRA too: every vector, head and (with config.magnitude) magnitude randomized;
    m starts at W0's row norms (identity), so each row's is scaled by 1 + 0.3 N(0, 1)."""
    from verakit import attach, vera_layers
    from verakit.fileformat import adapter_from_model

    model = attach(copy.deepcopy(base), config)
    randomize_vectors(model, seed=seed, std=std)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for layer in vera_layers(model).values():
            if getattr(layer, "vera_m", None) is not None:  # ||W0|| per row at init: move it off identity
                layer.vera_m.mul_(1 + 0.3 * torch.randn(layer.vera_m.shape, generator=g))
        for name, p in model.named_parameters():
            if p.requires_grad and "vera_" not in name:  # the heads
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return adapter_from_model(model)


def write_model(root: Path, name: str, kind: str, adapters: dict[str, tuple[int, float]]) -> tuple[Path, Path]:
    """<root>/<name> (model + tokenizer) and <root>/<name>_adapters with adapters {name: (rank, std)}."""
    from verakit import VeraConfig
    from verakit.fileformat import write_adapter

    _quiet()
    tok = make_tokenizer(kind)
    base = tiny_bert(len(tok)) if kind == "bert" else tiny_llama(len(tok))
    model_dir, adapter_dir = root / name, root / f"{name}_adapters"
    base.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    adapter_dir.mkdir()
    for i, (ad_name, (r, std)) in enumerate(adapters.items()):
        write_adapter(trained_adapter(base, VeraConfig(r=r), seed=i, std=std), adapter_dir / f"{ad_name}.safetensors")
    return model_dir, adapter_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `verakit serve` subprocess on 127.0.0.1; `url` is its base address."""

    def __init__(self, args: list[str], log: Path) -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "verakit.cli", "serve", "--port", str(self.port), "--threads", "1", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )
        self.log = log
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not come up in 120 s:\n{log.read_text()[-3000:]}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()



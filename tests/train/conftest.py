"""Fixtures for the training tests: a tiny random BERT classifier folder (with a real tokenizer) and a
small, learnable csv task, so the loop, methods and CLI run in seconds without the real model."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

POSITIVE = ["good", "great", "fine", "happy", "nice", "superb", "lovely", "bright"]
NEGATIVE = ["bad", "awful", "poor", "sad", "nasty", "dull", "grim", "ugly"]
NEUTRAL = ["the", "a", "movie", "film", "plot", "actor", "story", "was", "is", "very", "quite", "and"]


def write_task(folder: Path, n_train: int = 96, n_dev: int = 48, seed: int = 0) -> Path:
    """A csv task whose label is whether positive words outnumber negative ones."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        lines = ["text,label"]
        for i in range(n):
            label = i % 2
            words = rng.sample(NEUTRAL, 4) + rng.sample(POSITIVE if label else NEGATIVE, 2)
            words += rng.sample(NEGATIVE if label else POSITIVE, rng.randint(0, 1))
            rng.shuffle(words)
            lines.append(f"{' '.join(words)},{'pos' if label else 'neg'}")
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def one_thread():
    """torch on one thread during the test, restored afterwards: the CPU is shared, and results compared
    bit for bit should not depend on how many cores there are. Modules that want it for every test say
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    """A saved BertForSequenceClassification (2 layers, hidden 32, dropout 0) with a word-level vocab.

    initializer_range 0.3 (not 0.02): at 0.02 a random BERT gives nearly the same [CLS] features for
    every input, so a head alone cannot learn and every method would sit at chance."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *NEUTRAL]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                     vocab_size=len(vocab), max_position_embeddings=64, hidden_dropout_prob=0.0, initializer_range=0.3,
                     attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("task"))


@pytest.fixture
def make_recipe(tiny_bert_dir, tiny_task):
    """make_recipe(method="vera", **TrainArgs fields) -> ClassificationRecipe on the tiny model and task."""
    from verakit.train.classify import ClassificationRecipe, TrainArgs, build_classifier
    from verakit.train.classify.data import load_task
    from verakit.train.methods import prepare_model

    def make(method: str = "vera", **kw):
        kw = {"r": 64, "epochs": 2, "batch_size": 16, "lr": 1e-2, "head_lr": 1e-2, **kw}
        args = TrainArgs(task="csv", data_dir=str(tiny_task), out="unused", model=tiny_bert_dir, method=method,
                         quiet=True, **kw).resolved()
        data = load_task("csv", tiny_task, max_train_samples=args.max_train_samples, seed=args.seed)
        torch.manual_seed(args.seed)
        model, tok = build_classifier(tiny_bert_dir, data.spec)
        prepared = prepare_model(model, args.method_spec())  # with any VeRA options passed in kw
        info = {"task": "csv", "model": tiny_bert_dir, "labels": list(data.spec.label_names), "max_length": 128,
                "seed": args.seed, "max_eval_samples": None, "data_dir": str(tiny_task)}
        return ClassificationRecipe(prepared, tok, data.spec, data.train, data.dev, args, info)

    return make


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> str:
    """A saved tiny Llama causal LM with a real tokenizer (tests/lm_helpers.py), for the causal-LM recipe."""
    from lm_helpers import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("llama"), "llama")

"""README.md's main-job snippet runs as written on the offline MiniLM, and what it promises holds."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"
TRAIN_MARK = "# ... train as usual"


def main_job_snippet() -> str:
    """The first ```python block after the "## The main job" heading."""
    text = README.read_text()
    section = text[text.index("## The main job"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_main_job_snippet_trains_saves_loads_and_merges(minilm_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    code = main_job_snippet()
    before, after = code.split(TRAIN_MARK)
    ns: dict = {}
    exec(compile(before, "README.md (main job, part 1)", "exec"), ns)  # noqa: S102 (our own README)
    model, opt = ns["model"], ns["opt"]
    trained = {n for n, _ in ns["trainable_parameters"](model)}
    assert trained and all(n.endswith((".vera_d", ".vera_b")) or n.startswith("classifier.") for n in trained)
    assert any("pooler.dense" in n for n in trained)  # the head's hidden layer has VeRA vectors, not weights

    # "train as usual": a few steps, so b leaves zero and the saved vectors carry what was learned
    x, y = torch.randint(1000, 2000, (4, 12)), torch.tensor([0, 1, 0, 1])
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=x, labels=y).loss.backward()
        opt.step()
    model.eval()
    exec(compile(after.split("\n", 1)[1], "README.md (main job, part 2)", "exec"), ns)  # noqa: S102

    size = (tmp_path / "sst2.safetensors").stat().st_size
    assert 40_000 < size < 48_000, size  # the comment says "44 KB"
    fresh = ns["fresh"].eval()
    with torch.no_grad():
        ref, got = model(input_ids=x).logits, fresh(input_ids=x).logits
    assert torch.allclose(ref, got, atol=1e-5), (ref, got)  # loaded + merged = the trained model
    base = ns["AutoModelForSequenceClassification"].from_pretrained(ns["base"], num_labels=2).eval()
    with torch.no_grad():
        assert not torch.allclose(base.bert(input_ids=x).pooler_output, fresh.bert(input_ids=x).pooler_output)

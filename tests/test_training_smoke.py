"""The core works for training: 20 AdamW steps on a real SST-2 batch lower the loss of the real MiniLM."""

import csv

import torch

from verakit import VeraConfig, attach, trainable_parameters


def test_adamw_steps_lower_loss_on_sst2(minilm_clf, minilm_path, shared_data):
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    with open(shared_data / "glue" / "SST-2" / "train.tsv", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:17]
    tok = AutoTokenizer.from_pretrained(minilm_path)
    batch = tok([r[0] for r in rows], padding=True, truncation=True, max_length=40, return_tensors="pt")
    labels = torch.tensor([int(r[1]) for r in rows])
    model = attach(minilm_clf, VeraConfig(r=256))
    model.train()
    params = trainable_parameters(model)
    vectors = [p for n, p in params if n.endswith(("vera_d", "vera_b"))]
    head = [p for n, p in params if not n.endswith(("vera_d", "vera_b"))]
    opt = torch.optim.AdamW([{"params": vectors, "lr": 1e-2}, {"params": head, "lr": 4e-3}], weight_decay=0.0)
    frozen_before = model.bert.encoder.layer[0].attention.self.query.base.weight.clone()
    losses = []
    for _ in range(20):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.base.weight, frozen_before)
    moved_b = model.bert.encoder.layer[0].attention.self.query.vera_b.abs().max().item()
    assert moved_b > 1e-3  # the VeRA vectors themselves trained, not only the head

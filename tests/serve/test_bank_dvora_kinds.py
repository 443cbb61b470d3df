"""DVoRA convolutions and embeddings in the AdapterBank: each slot keeps its scale m / ||W0 + delta|| (per
output channel, per embedding dimension) computed once when the adapter enters, and a batch mixing DVoRA,
plain VeRA and base rows equals every row run alone on a model with its adapter loaded (load_adapter)."""

import copy
import dataclasses

import torch
from torch import nn

from verakit import VeraConfig, attach, load_adapter, vera_layers
from verakit.fileformat import adapter_from_model
from verakit.serve import AdapterBank

TARGETS = ("emb", "conv", "conv2d", "head")


class _Net(nn.Module):
    """Token ids -> embedding (padding row 0) -> Conv1d over the sequence -> Conv2d (groups 2) -> linear head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 12, padding_idx=0)
        self.conv = nn.Conv1d(12, 8, 3, padding=1)
        self.conv2d = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.head = nn.Linear(16, 5)

    def forward(self, ids):
        h = self.conv(self.emb(ids).transpose(1, 2)).relu()  # (N, 8, L)
        h = self.conv2d(h.view(h.shape[0], 2, 4, -1)).relu()  # (N, 4, 4, L)
        return self.head(h.flatten(1, 2).mean(-1))


def _adapter(base, config, seed):
    model = attach(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in vera_layers(model).values():
            layer.vera_d.copy_(torch.randn(layer.vera_d.shape, generator=g))
            layer.vera_b.copy_(torch.randn(layer.vera_b.shape, generator=g) * 0.5)
            if layer.vera_m is not None:  # W0's norms at init: move them off identity
                layer.vera_m.mul_(1 + 0.3 * torch.randn(layer.vera_m.shape, generator=g))
    return adapter_from_model(model)


def _alone(base, adapter, ids):
    model = copy.deepcopy(base)
    if adapter is not None:
        load_adapter(model, adapter)
    with torch.no_grad():
        return model(ids)


def test_mixed_dvora_conv_embedding_rows_equal_each_alone():
    torch.manual_seed(0)
    base = _Net()
    adapters = {"dv8": _adapter(base, VeraConfig(r=8, target_modules=TARGETS, magnitude=True), 1),
                "dv4": _adapter(base, VeraConfig(r=4, target_modules=TARGETS, magnitude=True), 2),
                "plain": _adapter(base, VeraConfig(r=8, target_modules=TARGETS), 3)}
    assert set(adapters["dv8"].m) == set(TARGETS) and not adapters["plain"].m
    bank = AdapterBank(attach(copy.deepcopy(base), VeraConfig(r=8, target_modules=TARGETS)), capacity=4)
    for name, ad in adapters.items():
        bank.add(name, ad)
    names = ["dv8", None, "plain", "dv4", "dv8", "plain", "dv4"]
    ids = torch.randint(0, 40, (7, 9), generator=torch.Generator().manual_seed(0))
    ids[:, -2:] = 0  # padded positions: the padding row stays the base's in every slot
    with torch.no_grad():
        got = bank.forward(names, ids)
    want = torch.cat([_alone(base, adapters.get(n), ids[i : i + 1]) for i, n in enumerate(names)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # every kind's scale was computed once, at add, and kept per slot
    slot = bank.slot("dv8")
    for n in TARGETS:
        s = bank.layers[n].vera_s
        assert s is not None and not bool((s[slot] == 1).all()) and bool((s[bank.slot("plain")] == 1).all())
    # the magnitudes matter: the same rows without them answer differently
    dv8 = adapters["dv8"]
    no_m = dataclasses.replace(dv8, config=dataclasses.replace(dv8.config, magnitude=False), m={})
    assert (_alone(base, no_m, ids[:1]) - want[:1]).abs().max() > 1e-3
    # plain VeRA and base rows are bit for bit what a bank that never saw a DVoRA adapter answers
    plain_bank = AdapterBank(attach(copy.deepcopy(base), VeraConfig(r=8, target_modules=TARGETS)), capacity=4)
    plain_bank.add("plain", adapters["plain"])
    names = ["plain", None, "plain"]
    with torch.no_grad():
        assert torch.equal(bank.forward(names, ids[:3]), plain_bank.forward(names, ids[:3]))

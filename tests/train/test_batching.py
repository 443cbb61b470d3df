"""Training batch order: the random permutation (unchanged golden order), and length grouping: a
permutation of every example, deterministic in (seed, epoch), aligned batches that each come from one
sorted megabatch, the short batch last, and far fewer padded tokens than random batches."""

from __future__ import annotations

import random

import pytest

from verakit.train.batching import MEGABATCH, epoch_order, padded_tokens


def test_random_order_is_the_seeded_shuffle_of_earlier_versions():
    # Golden: the order every run since the loop's first version used (a resumed or repeated run depends on it).
    want = list(range(10))
    random.Random("verakit:order:3:1").shuffle(want)
    assert epoch_order(10, 3, 1) == want
    assert epoch_order(10, 3, 1, batch_size=4, lengths=None) == want


def _lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([rng.randint(3, 20), rng.randint(20, 128)]) for _ in range(n)]


@pytest.mark.parametrize(("n", "batch"), [(5000, 32), (1601, 32), (70, 8), (3, 4), (0, 8)])
def test_grouped_order_is_a_deterministic_permutation(n, batch):
    lengths = _lengths(n)
    order = epoch_order(n, 7, 2, batch, lengths)
    assert sorted(order) == list(range(n))
    assert order == epoch_order(n, 7, 2, batch, lengths)
    if n > 2 * batch:
        assert order != epoch_order(n, 7, 3, batch, lengths)  # another epoch, another order
        assert order != epoch_order(n, 8, 2, batch, lengths)


def test_grouped_batches_come_from_one_megabatch_and_the_short_batch_is_last():
    n, batch = 5000 + 17, 32
    lengths = _lengths(n, 1)
    shuffled = epoch_order(n, 0, 0)  # the permutation the megabatches are cut from
    mega_of = {i: k // (MEGABATCH * batch) for k, i in enumerate(shuffled)}
    order = epoch_order(n, 0, 0, batch, lengths)
    batches = [order[k : k + batch] for k in range(0, n, batch)]
    for b in batches:
        assert len({mega_of[i] for i in b}) == 1
    assert [len(b) for b in batches[:-1]] == [batch] * (len(batches) - 1) and len(batches[-1]) == n % batch
    # the last megabatch (n % 1600 = 217 rows) ends with its short batch, of its shortest rows
    last_mega = [i for i in shuffled if mega_of[i] == mega_of[shuffled[-1]]]
    quartile = sorted(lengths[i] for i in last_mega)[len(last_mega) // 4]
    assert sum(lengths[i] for i in batches[-1]) / len(batches[-1]) < quartile
    # batches are shuffled across megabatches: not in megabatch order
    firsts = [mega_of[b[0]] for b in batches[:-1]]
    assert firsts != sorted(firsts)


def test_grouping_cuts_padding():
    n, batch = 6000, 32
    lengths = _lengths(n, 2)
    random_tokens = padded_tokens(epoch_order(n, 0, 0), lengths, batch)
    grouped_tokens = padded_tokens(epoch_order(n, 0, 0, batch, lengths), lengths, batch)
    assert grouped_tokens < 1.15 * sum(lengths) < 0.6 * random_tokens


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="3 lengths for 4 examples"):
        epoch_order(4, 0, 0, 2, [1, 2, 3])


def test_small_sets_get_new_batches_every_epoch():
    # 200 rows, one megabatch: without the jitter, sorting would cut the same 13 batches in every epoch.
    lengths = _lengths(200, 3)
    def batches(epoch):
        order = epoch_order(200, 0, epoch, 16, lengths)
        return {frozenset(order[k : k + 16]) for k in range(0, 200, 16)}
    assert len(batches(0) & batches(1)) < 4

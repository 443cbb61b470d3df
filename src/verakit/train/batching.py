"""Which examples form each training batch: a fresh permutation per epoch, optionally grouped by length.

Both orders depend on (seed, epoch) and the lengths only, never on a global RNG, so a resumed run sees the
same batches. The loop takes `order[k * batch_size : (k + 1) * batch_size]` as global batch k.

Grouping by length (`LoopConfig.group_by_length`, as transformers' `group_by_length` / the "megabatch"
scheme of fairseq): the permutation is cut into megabatches of MEGABATCH global batches, each megabatch
is sorted by length (jittered by +-10% per epoch, so batches are new draws every epoch), cut into batches, and the full batches are shuffled (the short last batch stays
last, so every other batch stays aligned). A batch is padded to its longest example, so on GLUE
(MiniLM's tokenizer, batch 32) random batches carry 1.5x (MRPC) to 3.0x (SST-2) the tokens of the
examples themselves, grouped ones 1.08-1.12x (docs/performance.md). Each batch is still a random sample
of similar-length examples; the batch *sizes* and the epoch's example set are unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = ["JITTER", "MEGABATCH", "epoch_order", "padded_tokens", "recipe_lengths"]

MEGABATCH = 50  # global batches per sorted megabatch (transformers' LengthGroupedSampler uses 50 too)
JITTER = 0.1  # each length is scaled by a factor in [1 - JITTER, 1 + JITTER] before sorting


def epoch_order(n: int, seed: int, epoch: int, batch_size: int = 1,
                lengths: Sequence[int] | None = None) -> list[int]:
    """Every index in range(n) once, in epoch `epoch`'s training order; with `lengths` (one per example),
    grouped by length into batches of `batch_size` as the module says."""
    order = list(range(n))
    random.Random(f"verakit:order:{seed}:{epoch}").shuffle(order)
    if lengths is None:
        return order
    if len(lengths) != n:
        raise ValueError(f"epoch_order: {len(lengths)} lengths for {n} examples")
    span = MEGABATCH * batch_size
    rng = random.Random(f"verakit:jitter:{seed}:{epoch}")
    # Sorted by length times a fresh jitter per epoch: otherwise a set of one or two megabatches (RTE, MRPC)
    # would be cut into the same batches every epoch, only their order changing.
    key = [length * rng.uniform(1 - JITTER, 1 + JITTER) for length in lengths]
    batches: list[list[int]] = []
    for start in range(0, n, span):
        mega = sorted(order[start : start + span], key=lambda i: key[i], reverse=True)
        batches += [mega[k : k + batch_size] for k in range(0, len(mega), batch_size)]
    tail = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    random.Random(f"verakit:batches:{seed}:{epoch}").shuffle(batches)
    return [i for b in batches + tail for i in b]


def padded_tokens(order: Sequence[int], lengths: Sequence[int], batch_size: int) -> int:
    """Tokens the batches of `order` hold once each is padded to its longest example."""
    return sum(max(lengths[i] for i in order[k : k + batch_size]) * len(order[k : k + batch_size])
               for k in range(0, len(order), batch_size))


def recipe_lengths(recipe: object) -> list[int]:
    """A loop recipe's optional `train_lengths() -> Sequence[int]`: each training example's length in tokens."""
    get = getattr(recipe, "train_lengths", None)
    if get is None:
        raise ValueError(f"group_by_length: {type(recipe).__name__} does not report its examples' lengths")
    return list(get())

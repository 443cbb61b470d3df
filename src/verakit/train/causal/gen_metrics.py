"""Text-generation metrics over multiple references: BLEU, ROUGE-L, chrF; and perplexity.

All scores are on a 0-100 scale, as sacrebleu reports them and as E2E tables print them.

* ``bleu``: sacrebleu corpus BLEU (13a tokenization, 4-grams, brevity penalty against the closest
  reference length). Segments may have different numbers of references.
* ``rouge_l``: rouge-score ROUGE-L F1 per segment, the max over that segment's references, averaged
  over segments (no stemming; rouge-score lowercases and keeps only ``[a-z0-9]`` tokens). The E2E
  challenge script (pycocoevalcap) instead combines per-reference precision and recall with
  beta=1.2, so its ROUGE-L differs slightly from this one.
* ``chrf``: sacrebleu corpus chrF (character 6-grams, beta=2).

Missing, because no well-kept offline implementation is installed and we download nothing:
METEOR (nltk's needs the WordNet corpus, a separate ``nltk.download``; the official one is Java),
CIDEr (pycocoevalcap is not installed) and NIST (sacrebleu has none; nltk's ``corpus_nist`` is
not a verakit dependency and takes pre-tokenized text, so it would not reproduce the ``mteval``
numbers E2E tables report).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

__all__ = ["generation_metrics", "perplexity"]


def generation_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus ``bleu``, ``chrf`` and mean max-over-references ``rouge_l``, each in [0, 100].

    ``references[i]`` holds every reference for ``hypotheses[i]`` (at least one, any count).
    """
    _check(hypotheses, references)
    import sacrebleu
    from rouge_score import rouge_scorer

    _quiet_absl()

    # sacrebleu wants reference *streams* (stream k = every segment's k-th reference); a segment with
    # fewer references is padded with None, which sacrebleu drops, rather than "" which would count
    # as an empty reference and pull the brevity penalty's closest length down to 0.
    width = max(len(refs) for refs in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    hyps = list(hypotheses)
    bleu = sacrebleu.corpus_bleu(hyps, streams).score
    chrf = sacrebleu.corpus_chrf(hyps, streams).score

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = sum(
        max(scorer.score(ref, hyp)["rougeL"].fmeasure for ref in refs)
        for hyp, refs in zip(hyps, references, strict=True)
    ) / len(hyps)
    return {"bleu": float(bleu), "rouge_l": 100.0 * rouge, "chrf": float(chrf)}


def _quiet_absl() -> None:
    # rouge-score logs "Using default tokenizer." at INFO through absl's python logger on every
    # RougeScorer, which `verakit train`'s INFO logging would print into training output at each
    # evaluation. Raise that logger to WARNING, so absl's warnings and errors still show; a level the
    # user set on it themselves is left alone.
    absl = logging.getLogger("absl")
    if absl.level == logging.NOTSET:
        absl.setLevel(logging.WARNING)


def _check(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(
            f"generation_metrics: {len(hypotheses)} hypotheses but {len(references)} reference lists"
        )
    if not hypotheses:
        raise ValueError("generation_metrics: no hypotheses to score")
    for i, (hyp, refs) in enumerate(zip(hypotheses, references, strict=True)):
        if not isinstance(hyp, str):
            raise TypeError(f"generation_metrics: hypotheses[{i}] is {type(hyp).__name__}, not str")
        if isinstance(refs, str):
            # A bare string would be read as a list of one-character references.
            raise TypeError(f"generation_metrics: references[{i}] is a str; wrap it in a list")
        if not refs:
            raise ValueError(f"generation_metrics: references[{i}] is empty; each segment needs a reference")
        for k, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise TypeError(f"generation_metrics: references[{i}][{k}] is {type(ref).__name__}, not str")


def perplexity(mean_loss: float) -> float:
    """``exp(mean_loss)`` for a mean per-token cross-entropy in nats; ``inf`` when it overflows."""
    if math.isnan(mean_loss) or mean_loss < 0:
        raise ValueError(f"perplexity: mean_loss must be a non-negative cross-entropy, got {mean_loss}")
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf

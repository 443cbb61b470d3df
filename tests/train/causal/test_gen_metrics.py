"""Generation metrics: golden BLEU / ROUGE-L / chrF values worked out by hand, ragged references, perplexity."""

from __future__ import annotations

import math

import pytest

from verakit.train.causal.gen_metrics import generation_metrics, perplexity


def test_identical_hypothesis_scores_100_everywhere():
    scores = generation_metrics(["The Vaults is a pub near Café Adriatic."], [["The Vaults is a pub near Café Adriatic."]])
    assert scores == pytest.approx({"bleu": 100.0, "rouge_l": 100.0, "chrf": 100.0})


def test_golden_bleu_by_hand():
    # hyp "the cat sat on the mat" vs ref "the cat is on the mat", both 6 tokens (brevity penalty 1):
    # clipped n-gram matches 5/6, 3/5, 1/4, 0/3; sacrebleu's default 'exp' smoothing turns the zero
    # 4-gram precision into 1/(2*3). BLEU = (5/6 * 3/5 * 1/4 * 1/6) ** (1/4) = 0.0208333 ** 0.25.
    scores = generation_metrics(["the cat sat on the mat"], [["the cat is on the mat"]])
    assert scores["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25, abs=1e-9)
    assert scores["bleu"] == pytest.approx(37.9918, abs=1e-4)
    # ROUGE-L: the LCS "the cat on the mat" has 5 of 6 tokens on both sides, so F1 = 5/6.
    assert scores["rouge_l"] == pytest.approx(100 * 5 / 6)


def test_rouge_l_is_the_max_over_references_averaged_over_segments():
    # Segment 1: "a dog" vs "a dog barked": P = 1, R = 2/3, F1 = 0.8; the unrelated reference scores 0.
    # Segment 2: exact match, F1 = 1. Mean = 0.9.
    scores = generation_metrics(["a dog", "red fish"], [["x y z", "a dog barked"], ["red fish"]])
    assert scores["rouge_l"] == pytest.approx(90.0)


def test_multi_reference_bleu_matches_any_reference():
    refs = [["completely different words here", "the cat sat on the mat"]]
    assert generation_metrics(["the cat sat on the mat"], refs)["bleu"] == pytest.approx(100.0)


def test_ragged_references_are_padded_not_filled_with_empty_strings():
    hyps = ["the cat sat on the mat", "a quick brown fox jumps"]
    ragged = [["the cat is on the mat", "a cat sat on a mat"], ["the quick brown fox jumps over"]]
    # Repeating a segment's reference changes neither clipped counts nor the closest reference length,
    # so the ragged score must equal the score with the short list padded by a duplicate.
    padded = [ragged[0], ragged[1] * 2]
    assert generation_metrics(hyps, ragged) == pytest.approx(generation_metrics(hyps, padded))


@pytest.mark.parametrize(
    ("hyps", "refs", "error", "message"),
    [
        (["a"], [["a"], ["b"]], ValueError, r"1 hypotheses but 2 reference lists"),
        ([], [], ValueError, r"no hypotheses to score"),
        (["a", "b"], [["a"], []], ValueError, r"references\[1\] is empty"),
        (["a"], ["a"], TypeError, r"references\[0\] is a str; wrap it in a list"),
        ([None], [["a"]], TypeError, r"hypotheses\[0\] is NoneType, not str"),
        (["a"], [["a", None]], TypeError, r"references\[0\]\[1\] is NoneType, not str"),
    ],
)
def test_bad_arguments(hyps, refs, error, message):
    with pytest.raises(error, match=message):
        generation_metrics(hyps, refs)


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(93.0)) == pytest.approx(93.0)
    assert perplexity(1e6) == math.inf
    for bad in (-0.1, math.nan):
        with pytest.raises(ValueError, match=r"mean_loss must be a non-negative cross-entropy"):
            perplexity(bad)


def test_rouge_scores_print_nothing_under_info_logging_but_absl_warnings_still_show():
    """`verakit train` logs at INFO on stderr; rouge-score's absl INFO line "Using default tokenizer."
    leaked into training output at every evaluation. Run as the CLI does, in a fresh process."""
    import subprocess
    import sys

    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
            "from verakit.train.causal.gen_metrics import generation_metrics\n"
            "generation_metrics(['a b c'], [['a b d']]); generation_metrics(['x'], [['x']])\n"
            "logging.getLogger('absl').warning('a real absl warning')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Using default tokenizer" not in done.stderr
    assert done.stderr.strip() == "WARNING:absl:a real absl warning"

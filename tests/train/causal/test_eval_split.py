"""`verakit eval --split test` on an e2e adapter (docs/generation.md): the CLI scores the test set
(testset_w_refs.csv), one example per meaning representation with all its references, with the run's
settings, not the dev set that training evaluated on."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lm_helpers import e2e_like
from verakit import load_adapter
from verakit.cli import main
from verakit.train.causal import build_causal_lm, evaluate_lm
from verakit.train.causal.gen_metrics import generation_metrics
from verakit.train.causal.generate import DecodeConfig
from verakit.train.causal.lm_data import load_e2e, tokenize_examples

pytestmark = pytest.mark.usefixtures("one_thread")

DEV = {"name[Aromi], food[French], area[riverside]": ["Aromi serves French food in the riverside.",
                                                      "Aromi is a French place by the river."],
       "name[Cotto], food[Indian], area[city centre]": ["Cotto serves Indian food in the city centre.",
                                                       "Cotto is an Indian place in the centre."],
       "name[Strada], food[English], area[riverside]": ["Strada serves English food in the riverside."]}
# Other MRs than dev, with 1 to 3 references each; rows of one MR need not be adjacent.
TEST_ROWS = [("name[Zizzi], food[Japanese], area[city centre]", "Zizzi serves Japanese food in the city centre."),
             ("name[Giraffe], food[Italian], area[riverside]", "Giraffe serves Italian food in the riverside."),
             ("name[Zizzi], food[Japanese], area[city centre]", "Zizzi is a Japanese place in the centre."),
             ("name[Loch Fyne], food[Chinese], area[riverside]", "Loch Fyne serves Chinese food in the riverside."),
             ("name[Zizzi], food[Japanese], area[city centre]", "In the city centre, Zizzi serves Japanese food."),
             ("name[Giraffe], food[Italian], area[riverside]", "Giraffe is an Italian place by the river."),
             ("name[Bibimbap], food[French], area[city centre]", "Bibimbap serves French food in the city centre.")]


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["mr", "ref"])
        writer.writerows(rows)


@pytest.fixture
def e2e_dir(tmp_path) -> Path:
    folder = tmp_path / "e2e"
    folder.mkdir()
    _write_csv(folder / "trainset.csv", [(r["prompt"].strip(), r["completion"]) for r in e2e_like(48, seed=0)])
    _write_csv(folder / "devset.csv", [(mr, ref) for mr, refs in DEV.items() for ref in refs])
    _write_csv(folder / "testset_w_refs.csv", TEST_ROWS)
    return folder


def test_cli_eval_split_test_scores_the_test_set_with_all_references(tmp_path, llama_dir, e2e_dir, capsys):
    out = tmp_path / "run"
    assert main(["train", "--task", "e2e", "--data-dir", str(e2e_dir), "--out", str(out), "--model", llama_dir,
                 "--r", "32", "--epochs", "1", "--batch-size", "16", "--max-length", "48", "--lr", "0.05",
                 "--gen-eval-samples", "1", "--max-new-tokens", "4", "--report-samples", "1", "--quiet"]) == 0, \
        capsys.readouterr().err
    trained = json.loads((out / "metrics.json").read_text())
    assert trained["n_eval"] == 3  # training evaluated on dev: one example per dev MR
    adapter = str(out / "adapter.safetensors")
    capsys.readouterr()

    assert main(["eval", "--adapter", adapter, "--split", "test", "--gen-eval-samples", "3",
                 "--max-new-tokens", "6"]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    # One example per test MR (4 MRs from 7 rows), in order of first appearance, generated for the first 3.
    assert (result["task"], result["split"], result["n_eval"], result["n_generated"]) == ("e2e", "test", 4, 3)
    mrs = ["Zizzi", "Giraffe", "Loch Fyne"]
    assert [g["prompt"].split("]")[0] for g in result["generations"]] == [f"name[{n}" for n in mrs]

    # The same numbers computed here from the test CSV: the adapter loaded by hand, every reference of an MR
    # scoring its generation, the run's max length (48) and no chat template (e2e's default).
    test = load_e2e(e2e_dir, "test")
    assert [len(e.references) for e in test] == [3, 2, 1, 1]
    model, tok = build_causal_lm(llama_dir)
    load_adapter(model, adapter)
    assert json.loads((out / "config.json").read_text())["args"]["chat_template"] is False
    want, texts = evaluate_lm(model.eval(), tok, tokenize_examples(tok, test, 48, False), test[:3],
                              use_chat_template=False, decode=DecodeConfig(max_new_tokens=6))
    assert set(result["metric"]) == {"loss", "perplexity", "token_logprob", "bleu", "rouge_l", "chrf"}
    assert result["metric"] == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert [g["generation"] for g in result["generations"]] == texts
    # Scoring against the first reference only would give other numbers: the extra references count.
    first_only = generation_metrics(texts, [[e.completion] for e in test[:3]])
    assert first_only["chrf"] != pytest.approx(result["metric"]["chrf"], rel=1e-3)

    # Without --split the dev set is scored: other examples, another loss (what training reported).
    assert main(["eval", "--adapter", adapter]) == 0
    dev = json.loads(capsys.readouterr().out)
    assert (dev["split"], dev["n_eval"]) == ("dev", 3)
    assert dev["metric"]["loss"] == pytest.approx(trained["metric"]["loss"], rel=1e-5)
    assert abs(dev["metric"]["loss"] - result["metric"]["loss"]) > 1e-3

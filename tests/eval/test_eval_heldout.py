"""What a run trained on: training prompts removed from the task items, held-out ppl text in no corpus."""

from __future__ import annotations

import json

import pytest

from tunelab.data.config import DataConfig
from tunelab.eval.heldout import NGRAM, remove_training_prompts, scan_training_data, word_ngrams
from tunelab.eval.heldout_prose import PARAGRAPHS
from tunelab.eval.tasks import TRAIN_FAMILIES, generate_items


def _sft_run_data(path, records) -> DataConfig:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return DataConfig(task="sft", sources=[{"name": "mine", "path": str(path), "kind": "instructions"}])


def test_heldout_prose_is_in_no_builtin_corpus():
    """No word 8-gram and no paragraph of the ppl suite's prose occurs in local:prose or local:code (local:qa
    is built from the code's docstrings plus a "What does `x` do in Python?" line, so code covers it)."""
    assert sum(len(p.split()) for p in PARAGRAPHS) > 1000  # enough text for a stable perplexity
    for kind in ("prose", "code"):
        scan = scan_training_data(DataConfig(task="pretrain", sources=[{"name": kind, "path": f"local:{kind}"}]),
                                  {"held-out prose": list(PARAGRAPHS)})
        assert scan.records > 400
        assert scan.total["held-out prose"] > 1000
        assert scan.found["held-out prose"] == set() and scan.same_docs["held-out prose"] == 0, kind


def test_the_check_finds_text_that_is_in_the_corpus():
    """The control: the ppl suite's old "held-out" text, CPython's last reference page, is in local:prose."""
    import pydoc_data.topics

    page = list(pydoc_data.topics.topics.values())[-1]
    scan = scan_training_data(DataConfig(task="pretrain", sources=[{"name": "p", "path": "local:prose"}]),
                              {"python-docs": [page]})
    assert scan.total["python-docs"] > 50 and scan.found["python-docs"] == word_ngrams(page)
    assert scan.same_docs["python-docs"] == 1


def test_training_prompts_are_removed_and_counted(tmp_path):
    items = generate_items(TRAIN_FAMILIES, 3, seed=5)
    trained = [items[0], items[4], items[20]]
    records = [{"prompt": "  " + it.prompt.replace("\n", "\n  ") + " ", "response": it.answer} for it in trained]
    records += [{"prompt": "an unrelated prompt", "response": "ok"},
                {"messages": [{"role": "user", "content": items[7].prompt + "?"},  # not the same prompt
                              {"role": "assistant", "content": "x"}]}]
    scan = scan_training_data(_sft_run_data(tmp_path / "train.jsonl", records))
    assert scan.records == 5 and len(scan.prompts) == 5
    kept, removed = remove_training_prompts(items, scan.prompts)
    assert removed == 3 and kept == [it for it in items if it not in trained]


def test_overlap_of_eval_text_with_sft_data_is_counted(tmp_path):
    records = [{"prompt": "Tell me about bread.", "response": PARAGRAPHS[0]},
               {"prompt": PARAGRAPHS[3], "response": "noted"}]
    scan = scan_training_data(_sft_run_data(tmp_path / "train.jsonl", records), {"prose": list(PARAGRAPHS)})
    assert scan.found["prose"] == word_ngrams(PARAGRAPHS[0]) | word_ngrams(PARAGRAPHS[3])
    assert scan.total["prose"] == len(set().union(*map(word_ngrams, PARAGRAPHS)))
    assert scan.same_docs["prose"] == 0  # each record's text is prompt + response, not the paragraph alone
    assert f"word {NGRAM}-grams" in scan.overlap_line("prose")


def test_word_ngrams():
    assert word_ngrams("A b, c d", n=2) == {("a", "b"), ("b", "c"), ("c", "d")}
    assert word_ngrams("too short", n=3) == set()


def test_unreadable_training_data_raises_a_data_error(tmp_path):
    from tunelab.errors import DataError

    cfg = DataConfig(task="sft", sources=[{"name": "gone", "path": str(tmp_path / "gone.jsonl")}])
    with pytest.raises(DataError, match="no such file"):
        scan_training_data(cfg)

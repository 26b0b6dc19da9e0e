"""Preference and KTO records -> ids with labels on the final response only; truncation; bad records."""

import json

import pytest

from tunelab.data.preference import encode_pair, encode_unpaired, read_preference
from tunelab.errors import DataError

PAIR = {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "I think it is Lyon, maybe."}
CHAT_PAIR = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
             "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}
IMPLICIT = {"chosen": CHAT_PAIR["prompt"] + CHAT_PAIR["chosen"], "rejected": CHAT_PAIR["prompt"] + CHAT_PAIR["rejected"]}


def _labelled(tok, ids, labels):
    return tok.decode([t for t, y in zip(ids, labels) if y != -100])


@pytest.mark.parametrize("record", [PAIR, CHAT_PAIR, IMPLICIT], ids=["strings", "chat", "implicit-prompt"])
def test_pair_labels_cover_only_the_final_response(bundled_tokenizer, record):
    tok = bundled_tokenizer
    p = encode_pair(record, tok, max_len=512)
    eos = tok.eos_token
    chosen = record["chosen"] if isinstance(record["chosen"], str) else record["chosen"][-1]["content"]
    rejected = record["rejected"] if isinstance(record["rejected"], str) else record["rejected"][-1]["content"]
    assert _labelled(tok, p.chosen_ids, p.chosen_labels) == chosen + eos
    assert _labelled(tok, p.rejected_ids, p.rejected_labels) == rejected + eos
    n = p.chosen_labels.index(next(y for y in p.chosen_labels if y != -100))
    assert p.chosen_ids[:n] == p.rejected_ids[:n] and p.cut == 0  # one prompt, the same tokens
    # the prompt is exactly what the model sees at inference (rendered with the generation prompt)
    messages = CHAT_PAIR["prompt"] if record is not PAIR else [{"role": "user", "content": PAIR["prompt"]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.decode(p.chosen_ids[:n]) == text


def test_chat_equals_its_implicit_prompt_form(bundled_tokenizer):
    assert encode_pair(CHAT_PAIR, bundled_tokenizer, 512) == encode_pair(IMPLICIT, bundled_tokenizer, 512)


def test_truncation_keeps_the_prompt_end_and_responses_comparable(bundled_tokenizer):
    tok = bundled_tokenizer
    rec = {"prompt": "START " + "filler words here " * 60 + "QUESTION: what is two plus two?",
           "chosen": "four " * 80, "rejected": "five " * 30}
    full = encode_pair(rec, tok, max_len=4096)
    p = encode_pair(rec, tok, max_len=128)
    assert len(p.chosen_ids) <= 128 and len(p.rejected_ids) <= 128 and p.cut > 0
    n_c = sum(y != -100 for y in p.chosen_labels)
    n_r = sum(y != -100 for y in p.rejected_labels)
    full_r = sum(y != -100 for y in full.rejected_labels)
    assert n_c == 64 and n_r == min(full_r, 64)  # one common cap, max_len // 2 here
    prompt = tok.decode(p.chosen_ids[: len(p.chosen_ids) - n_c])
    assert "QUESTION: what is two plus two?" in prompt and "START" not in prompt
    assert p.chosen_ids[: len(p.chosen_ids) - n_c] == p.rejected_ids[: len(p.rejected_ids) - n_r]
    full_c = sum(y != -100 for y in full.chosen_labels)
    kept_prompt, full_prompt = p.chosen_ids[: len(p.chosen_ids) - n_c], full.chosen_ids[: len(full.chosen_ids) - full_c]
    assert full_prompt[-len(kept_prompt):] == kept_prompt  # the prompt's end, cut at its start
    assert full.chosen_ids[len(full_prompt):][:n_c] == p.chosen_ids[len(kept_prompt):]  # the response's start


def test_unpaired_record(bundled_tokenizer):
    tok = bundled_tokenizer
    u = encode_unpaired({"prompt": "Who wrote Hamlet?", "completion": "Shakespeare.", "label": False}, tok, 256)
    assert u.desirable is False and _labelled(tok, u.input_ids, u.labels) == "Shakespeare." + tok.eos_token
    assert all(y == -100 for y in u.labels[: u.prompt_len]) and u.labels[u.prompt_len] != -100


@pytest.mark.parametrize(("record", "words"), [
    ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "'chosen' is an empty response"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "expected a list of messages"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]}, "share every message"),
])
def test_bad_pairs_are_one_line_errors_with_file_and_line(bundled_tokenizer, tmp_path, record, words):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(PAIR) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as e:
        read_preference(str(path), bundled_tokenizer, 256)
    msg = str(e.value)
    assert msg.startswith(f"{path}:2: ") and words in msg and "\n" not in msg
    skipped = []
    kept = read_preference(str(path), bundled_tokenizer, 256, skip_bad_rows=True, skipped=skipped)
    assert len(kept) == 1 and [s.line for s in skipped] == [2]


@pytest.mark.parametrize(("record", "words"), [
    ({"prompt": "q", "completion": "a", "label": "yes"}, "'label' is 'yes'"),
    ({"prompt": "q", "completion": "", "label": True}, "empty response"),
    ({"prompt": "q", "label": True}, "missing field 'completion'"),
])
def test_bad_unpaired_records(bundled_tokenizer, tmp_path, record, words):
    path = tmp_path / "kto.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=f"^{path}:1: .*{words}"):
        read_preference(str(path), bundled_tokenizer, 256, unpaired=True)

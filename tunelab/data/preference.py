"""Preference records -> token ids with labels on the final response only, for DPO/IPO/ORPO/SimPO and KTO.

Record layouts (TRL's), one JSON object per line:
  pair      {"prompt", "chosen", "rejected", "system"?}: each a string, or a list of chat messages
            (prompt: the conversation so far; chosen/rejected: the assistant's answer, one message), or
            {"chosen", "rejected"} as whole conversations sharing every message but the last (implicit prompt)
  unpaired  {"prompt", "completion", "label": true|false, "system"?} (KTO: desirable or not)

Rendering and masks are SFT's (tunelab.data.sft.segments: the chat template, tokenized piece by piece):
labels are the final response's tokens and its EOS; earlier assistant turns are prompt. Text the template
puts after the final EOS (ChatML's newline) is dropped: no label follows it.

Truncation keeps the pair comparable: when prompt + the longer response exceed max_len, both responses are
cut from the right to the same cap (what is left after the prompt, but at least max_len // 2), and the
prompt keeps its END (the question just before the answer) in the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.data import sft
from tunelab.data.sources import iter_rows
from tunelab.errors import DataError

RecordError = sft.RecordError
IGNORE = sft.IGNORE


@dataclass
class Pair:
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    cut: int  # tokens dropped (prompt start + response ends)


@dataclass
class Unpaired:
    input_ids: list[int]
    labels: list[int]
    desirable: bool
    prompt_len: int  # the first prompt_len tokens are the prompt (KTO's mismatched pairs swap what follows)
    cut: int


def _messages(value, key: str, role: str | None = None) -> list[dict]:
    """A string (as one message of `role`) or a list of chat messages; RecordError if missing or mistyped."""
    if value is None:
        raise RecordError(f"missing field {key!r}: add it (a string or a list of chat messages)")
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return sft._chat(value, key)


def _response(value, key: str) -> dict:
    msgs = _messages(value, key, "assistant")
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise RecordError(f"field {key!r} must be one assistant answer (a string or one assistant message), "
                          f"got {len(msgs)} message(s)")
    if not msgs[0]["content"].strip():
        raise RecordError(f"field {key!r} is an empty response: drop the record or write the response")
    return msgs[0]


def _prompt(example: dict) -> list[dict]:
    system = sft._str(example, "system", required=False)
    prompt = _messages(example.get("prompt"), "prompt", "user")
    if prompt[-1]["role"] == "assistant":
        raise RecordError("field 'prompt' ends with an assistant message: it must end with the user's turn")
    return ([{"role": "system", "content": system}] if system and prompt[0]["role"] != "system" else []) + prompt


def to_pair(example: dict) -> tuple[list[dict], dict, dict]:
    """(prompt messages, chosen answer, rejected answer) of a pair record in either layout."""
    if not isinstance(example, dict):
        raise RecordError(f"expected an object, got {type(example).__name__}")
    if "completion" in example and "chosen" not in example:
        raise RecordError("an unpaired record {prompt, completion, label} where pairs are expected: set "
                          "data.preference=unpaired and train.objective=kto, or give chosen and rejected")
    for key in ("chosen", "rejected"):
        if example.get(key) is None:
            raise RecordError(f"missing field {key!r}: a preference record needs prompt, chosen and rejected")
    if "prompt" not in example and isinstance(example["chosen"], list):  # implicit prompt: shared prefix
        c, r = _messages(example["chosen"], "chosen"), _messages(example["rejected"], "rejected")
        if c[:-1] != r[:-1] or not c[:-1]:
            raise RecordError("chosen and rejected conversations must share every message but the last "
                              "(or give the prompt in its own field)")
        example = {**example, "prompt": c[:-1], "chosen": c[-1:], "rejected": r[-1:]}
    prompt, chosen, rejected = _prompt(example), _response(example["chosen"], "chosen"), _response(example["rejected"], "rejected")
    if chosen["content"] == rejected["content"]:
        raise RecordError("chosen and rejected are identical: nothing to prefer; drop the record or fix one of them")
    return prompt, chosen, rejected


def _tokens(prompt: list[dict], answer: dict, tokenizer, template: str | None) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids ending in EOS) of one conversation, rendered and split as SFT does."""
    pieces = sft.segments(prompt + [answer], tokenizer, template)
    last = max(i for i, (_, is_response) in enumerate(pieces) if is_response)
    ids = tokenizer([t for t, _ in pieces[: last + 1]], add_special_tokens=False)["input_ids"]
    response = ids[-1]
    if not response or response[-1] != tokenizer.eos_token_id:
        raise RecordError(f"the response does not end in the EOS token {tokenizer.eos_token!r} after tokenizing")
    return [t for part in ids[:-1] for t in part], response


def _fit(prompt: list[int], responses: list[list[int]], max_len: int) -> tuple[list[int], list[list[int]], int]:
    """The module docstring's truncation: responses to one common cap, the prompt to its last tokens."""
    longest = max(len(r) for r in responses)
    if len(prompt) + longest <= max_len:
        return prompt, responses, 0
    cap = min(longest, max(max_len - len(prompt), max_len // 2))
    kept = [r[:cap] for r in responses]
    keep_prompt = max_len - max(len(r) for r in kept)
    cut = len(prompt) - keep_prompt + sum(len(r) - len(k) for r, k in zip(responses, kept))
    return prompt[len(prompt) - keep_prompt:], kept, cut


def encode_pair(example: dict, tokenizer, max_len: int, template: str | None = None) -> Pair:
    prompt, chosen, rejected = to_pair(example)
    p_ids, c_ids = _tokens(prompt, chosen, tokenizer, template)
    p_ids2, r_ids = _tokens(prompt, rejected, tokenizer, template)
    if p_ids != p_ids2:
        raise RecordError("the chat template renders the prompt differently before chosen and rejected; "
                          "set data.template: chatml")
    p_ids, (c_ids, r_ids), cut = _fit(p_ids, [c_ids, r_ids], max_len)
    mask = [IGNORE] * len(p_ids)
    return Pair(p_ids + c_ids, mask + c_ids, p_ids + r_ids, mask + r_ids, cut)


def to_unpaired(example: dict) -> tuple[list[dict], dict, bool]:
    """(prompt messages, the answer, desirable) of an unpaired (KTO) record."""
    if not isinstance(example, dict):
        raise RecordError(f"expected an object, got {type(example).__name__}")
    if "completion" not in example and "chosen" in example:
        raise RecordError("a pair record (chosen/rejected) where unpaired records {prompt, completion, label} are "
                          "expected (data.preference=unpaired, train.objective=kto): use unpaired data")
    label = example.get("label")
    if not isinstance(label, bool):
        raise RecordError(f"field 'label' is {label!r}: it must be true (desirable) or false (undesirable)")
    return _prompt(example), _response(example.get("completion"), "completion"), label


def encode_unpaired(example: dict, tokenizer, max_len: int, template: str | None = None) -> Unpaired:
    prompt, answer, label = to_unpaired(example)
    p_ids, ids = _tokens(prompt, answer, tokenizer, template)
    p_ids, (ids,), cut = _fit(p_ids, [ids], max_len)
    return Unpaired(p_ids + ids, [IGNORE] * len(p_ids) + ids, label, len(p_ids), cut)


def builtin_records(name: str, n: int = 400, seed: int = 0) -> list[dict]:
    """The builtin seeded preference sets (`local:` + tunelab.data.sources.PREFERENCE_SOURCES), from the
    standard library's docstrings (tunelab.data.corpus, kind qa), against hallucination. `preference`: n
    pairs, alternately
      known     "What does `json.dumps` do in Python?": chosen its docstring's summary, rejected the summary of
                a seeded other name from another module (fluent, but fabricated);
      unknown   the same question about a name that does not exist (a real module, made-up syllables):
                chosen "I don't know ...: there is no such name", rejected a real summary (fabricated).
    `preference-unpaired`: the same pairs as 2n KTO records {prompt, completion, label} (chosen: true)."""
    import random

    from tunelab.data.corpus import local_corpus

    qa = local_corpus("qa", seed=seed, max_docs=n)
    rng = random.Random(seed + 1)
    syllables = "ba co de fi gu ka lo mi nu po ra se ti vo zu".split()
    pairs = []
    for i, r in enumerate(qa):
        other = rng.choice(qa)
        while other["path"] == r["path"] or other["response"] == r["response"]:
            other = rng.choice(qa)
        if i % 2 == 0:
            pairs.append({"prompt": r["prompt"], "chosen": r["response"], "rejected": other["response"]})
            continue
        made_up = f"{r['path']}.{''.join(rng.sample(syllables, 3))}_{''.join(rng.sample(syllables, 2))}"
        pairs.append({"prompt": f"What does `{made_up}` do in Python?",
                      "chosen": f"I don't know `{made_up}`: there is no such name in `{r['path']}` that I know of.",
                      "rejected": other["response"]})
    if name == "preference":
        return pairs
    return [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"} for p in pairs
            for k in ("chosen", "rejected")]


def read_preference(path: str, tokenizer, max_len: int, template: str | None = None, unpaired: bool = False,
                    skip_bad_rows: bool = False, skipped: list[DataError] | None = None) -> list:
    """Every record of a JSONL/JSON/Parquet/HF source encoded as Pair (or Unpaired for KTO). A bad record
    raises DataError naming file and line, or with skip_bad_rows is appended to `skipped` and left out."""
    encode = encode_unpaired if unpaired else encode_pair
    out = []
    for line, row in iter_rows(path, skip_bad_rows=skip_bad_rows, skipped=skipped):
        try:
            out.append(encode(row, tokenizer, max_len, template))
        except RecordError as e:
            if not skip_bad_rows:
                raise DataError(path, line, str(e)) from None
            if skipped is not None:
                skipped.append(DataError(path, line, str(e)))
    return out


def row(example: Pair | Unpaired) -> dict:
    """A training row: a pair as one row, chosen then rejected end to end with position_ids restarting at 0
    where rejected begins (tunelab.train.preference.collate splits it there); an unpaired response as one
    row with its `desirable` flag."""
    if isinstance(example, Unpaired):
        n = len(example.input_ids)
        return {"input_ids": example.input_ids, "labels": example.labels, "position_ids": list(range(n)),
                "desirable": example.desirable}
    nc, nr = len(example.chosen_ids), len(example.rejected_ids)
    return {"input_ids": example.chosen_ids + example.rejected_ids,
            "labels": example.chosen_labels + example.rejected_labels,
            "position_ids": list(range(nc)) + list(range(nr))}

"""Verifiable instruction tasks in families, for instruction tuning and for measuring it.

A family is one skill (reverse a word list, add two numbers, extract fields into JSON, ...) with a seeded
input generator, several paraphrased instruction templates, a canonical short answer and a checker that
scores an output in [0, 1]. Families come in pairs that share a *group* (the kind of skill): one family of
each pair is for training and the other is held out, so tuning on TRAIN_FAMILIES and scoring on
HELDOUT_FAMILIES measures transfer to new instructions of a familiar kind, never the same instruction.

Answers are short (a few to ~20 tokens) so a 135M model can be scored by greedy generation on a CPU.
Word material comes from the Python reference text shipped with CPython (`pydoc_data.topics`), so the
generators need no download and give the same items for the same seed on every machine.
"""

from __future__ import annotations

import functools
import json
import random
import re
import time
from dataclasses import dataclass, field
from typing import Callable

from tunelab.errors import TunelabError

# ----------------------------------------------------------------------------------------------------------
# Items and families


@dataclass(frozen=True)
class Item:
    """One task instance: `prompt` is the full user turn (instruction + input), `answer` the canonical reply."""

    id: str
    family: str
    prompt: str
    answer: str
    meta: dict = field(default_factory=dict)

    def to_sft(self) -> dict:
        """The item as an SFT example: {"prompt": user turn, "response": canonical answer}."""
        return {"prompt": self.prompt, "response": self.answer}


@dataclass(frozen=True)
class Sample:
    """What a family's generator returns: the input text to fill into a template, the answer, extra facts."""

    input: str
    answer: str
    meta: dict = field(default_factory=dict)


Checker = Callable[[str, Item], float]


@dataclass(frozen=True)
class Family:
    """A skill: `generate(rng) -> Sample`, paraphrased `templates` (each has one `{input}`), a `check`er.

    `heldout_templates` are paraphrases kept out of training (`generate_items(..., phrasings="heldout")`);
    `scoring` says in words how `check` scores (exact match or partial credit, and how)."""

    name: str
    group: str
    generate: Callable[[random.Random], Sample]
    templates: tuple[str, ...]
    check: Checker
    heldout_templates: tuple[str, ...] = ()
    scoring: str = ""


# ----------------------------------------------------------------------------------------------------------
# Normalisation and checkers (each returns a score in [0, 1]; 1.0 only for a fully right output)


def normalize(text: str, case_sensitive: bool = False) -> str:
    """Light normalisation: trim, drop wrapping quotes/backticks and one trailing period, collapse spaces."""
    s = text.strip().strip("`").strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
        s = s[1:-1].strip()
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)  # 3,000 -> 3000
    s = re.sub(r"\s+", " ", s).rstrip(".").strip()
    return s if case_sensitive else s.lower()


def _exact(case_sensitive: bool = False) -> Checker:
    def check(output: str, item: Item) -> float:
        return float(normalize(output, case_sensitive) == normalize(item.answer, case_sensitive))

    return check


def _positional(got: list[str], want: list[str]) -> float:
    """Fraction of positions that agree, over the longer list: extra or missing entries cost credit."""
    if not got and not want:
        return 1.0
    return sum(g == w for g, w in zip(got, want)) / max(len(got), len(want))


def _word_list(case_sensitive: bool = False) -> Checker:
    """Space- or comma-separated words, compared position by position (partial credit)."""

    def check(output: str, item: Item) -> float:
        got = normalize(output, case_sensitive).replace(",", " ").split()
        return _positional(got, normalize(item.answer, case_sensitive).split())

    return check


_BULLET = re.compile(r"^\s*[-*\u2022]\s+(.*\S)\s*$")
_NUMBERED = re.compile(r"^\s*(\d+)[.)]\s+(.*\S)\s*$")


def _list_lines(output: str, numbered: bool) -> list[str]:
    """Entries of a bullet or numbered list; a line that is not a list entry (or a wrong number) counts as ''."""
    entries = []
    for line in (ln for ln in output.strip().splitlines() if ln.strip()):
        m = (_NUMBERED if numbered else _BULLET).match(line)
        ok = m is not None and (not numbered or int(m.group(1)) == len(entries) + 1)
        entries.append(normalize(m.group(m.lastindex)) if ok else "")
    return entries


def _line_list(numbered: bool) -> Checker:
    def check(output: str, item: Item) -> float:
        return _positional(_list_lines(output, numbered), _list_lines(item.answer, numbered))

    return check


def field_score(got: dict, want: dict) -> float:
    """Fields with the right value, over max(#wanted, #given): a missing, wrong or extra key costs credit."""
    right = sum(normalize(str(got.get(k, ""))) == normalize(str(v)) for k, v in want.items() if k in got)
    return right / max(len(want), len(got))


def parse_json_object(text: str) -> dict | None:
    """The outermost {...} in `text` parsed as a JSON object (keys lowercased), or None."""
    m = re.search(r"\{.*\}", text, re.DOTALL)
    try:
        got = json.loads(m.group(0)) if m else None
    except json.JSONDecodeError:
        return None
    return {str(k).lower(): v for k, v in got.items()} if isinstance(got, dict) else None


def check_json_fields(output: str, item: Item) -> float:
    """Parse the first {...} in the output as JSON and compare its fields with the answer's."""
    got = parse_json_object(output)
    return 0.0 if got is None else field_score(got, json.loads(item.answer))


def _key_values(text: str) -> dict[str, str]:
    pairs = (ln.split(":", 1) for ln in text.strip().splitlines() if ":" in ln)
    return {k.strip().strip("-* ").lower(): v.strip() for k, v in pairs}


def check_key_values(output: str, item: Item) -> float:
    """`key: value` lines, compared field by field with the answer's."""
    return field_score(_key_values(output), _key_values(item.answer))


# ----------------------------------------------------------------------------------------------------------
# Word material and generators


@functools.cache
def word_pool() -> tuple[str, ...]:
    """~600 lowercase words of 4-8 letters that occur >= 8 times in CPython's reference text (sorted)."""
    import collections
    import pydoc_data.topics

    counts = collections.Counter(
        w for text in pydoc_data.topics.topics.values() for w in re.findall(r"\b[a-z]{4,8}\b", text)
    )
    return tuple(sorted(w for w, n in counts.items() if n >= 8))


def _words(rng: random.Random, lo: int = 4, hi: int = 6) -> list[str]:
    return rng.sample(word_pool(), rng.randint(lo, hi))


NAMES = ("Alice", "Bruno", "Chen", "Dana", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Jonas", "Keiko",
         "Lena", "Marco", "Nadia", "Omar", "Priya", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Yara")
CITIES = ("Paris", "Lagos", "Osaka", "Lima", "Oslo", "Cairo", "Dublin", "Quito", "Hanoi", "Perth", "Porto",
          "Riga", "Seoul", "Tunis", "Vienna", "Zagreb", "Bergen", "Kyoto", "Nairobi", "Austin")
POSITIVE = ("wonderful", "delightful", "excellent", "friendly", "great", "lovely", "pleasant", "superb")
NEGATIVE = ("terrible", "awful", "rude", "horrible", "dreadful", "poor", "disappointing", "unpleasant")
SUBJECTS = ("the food", "the service", "the hotel room", "the concert", "the film", "the staff", "the trip",
            "the book", "the coffee", "the game")


def gen_reverse(rng: random.Random) -> Sample:
    ws = _words(rng)
    return Sample(" ".join(ws), " ".join(reversed(ws)))


def gen_sort(rng: random.Random) -> Sample:
    ws = _words(rng)
    return Sample(" ".join(ws), " ".join(sorted(ws)))


def gen_upper(rng: random.Random) -> Sample:
    ws = _words(rng, 3, 5)
    return Sample(" ".join(ws), " ".join(ws).upper())


def gen_title(rng: random.Random) -> Sample:
    ws = _words(rng, 3, 5)
    return Sample(" ".join(ws), " ".join(w.capitalize() for w in ws))


def gen_add(rng: random.Random) -> Sample:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return Sample(f"{a} + {b}", str(a + b), {"a": a, "b": b})


def gen_multiply(rng: random.Random) -> Sample:
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    return Sample(f"{a} x {b}", str(a * b), {"a": a, "b": b})


def gen_km_to_m(rng: random.Random) -> Sample:
    km = rng.randint(1, 50)
    return Sample(f"{km} km", str(km * 1000), {"km": km})


def gen_hours_to_minutes(rng: random.Random) -> Sample:
    h = rng.randint(1, 40)
    return Sample(f"{h} hours", str(h * 60), {"hours": h})


def gen_person_json(rng: random.Random) -> Sample:
    name, age, city = rng.choice(NAMES), rng.randint(18, 90), rng.choice(CITIES)
    text = rng.choice((
        f"{name} is {age} years old and lives in {city}.",
        f"Living in {city}, {name} turned {age} last spring.",
        f"At {age}, {name} still walks every morning in {city}.",
    ))
    return Sample(text, json.dumps({"name": name, "age": age}), {"city": city})


def gen_move_kv(rng: random.Random) -> Sample:
    name, year, city = rng.choice(NAMES), rng.randint(1950, 2023), rng.choice(CITIES)
    text = rng.choice((
        f"{name} moved to {city} in {year}.",
        f"In {year}, {name} left home and settled in {city}.",
        f"{name} has lived in {city} since {year}.",
    ))
    return Sample(text, f"city: {city}\nyear: {year}", {"name": name})


def gen_parity(rng: random.Random) -> Sample:
    n = rng.randint(1, 999)
    return Sample(str(n), "even" if n % 2 == 0 else "odd")


def gen_sentiment(rng: random.Random) -> Sample:
    label = rng.choice(("positive", "negative"))
    adjs = POSITIVE if label == "positive" else NEGATIVE
    a, b = rng.sample(adjs, 2)
    s1, s2 = rng.sample(SUBJECTS, 2)
    return Sample(f"{s1.capitalize()} was {a} and {s2} was {b}.", label)


def gen_bullets(rng: random.Random) -> Sample:
    ws = _words(rng, 3, 4)
    return Sample(" ".join(ws), "\n".join(f"- {w}" for w in ws))


def gen_numbered(rng: random.Random) -> Sample:
    ws = _words(rng, 3, 4)
    return Sample(" ".join(ws), "\n".join(f"{i}. {w}" for i, w in enumerate(ws, 1)))


# ----------------------------------------------------------------------------------------------------------
# The families: (train, held-out) pairs per group. Templates are never shared between families.

_FAMILY_LIST = (
    # group "word-order": rearrange a list of words
    Family("reverse_words", "word-order", gen_reverse, (
        "Reverse the order of these words. Reply with the words only, separated by spaces.\n\n{input}",
        "Write the following words backwards, last word first, and nothing else:\n{input}",
        "Words: {input}\nList them in reverse order, separated by single spaces.",
    ), _word_list()),
    Family("sort_words", "word-order", gen_sort, (
        "Sort these words alphabetically. Reply with the sorted words only, separated by spaces.\n\n{input}",
        "Put the following words in dictionary order and output nothing else:\n{input}",
        "Words: {input}\nArrange them from A to Z, separated by single spaces.",
    ), _word_list()),
    # group "case": change letter case
    Family("uppercase", "case", gen_upper, (
        "Rewrite this phrase in capital letters. Reply with the phrase only.\n\n{input}",
        "Convert the following text to uppercase and output nothing else:\n{input}",
        "Text: {input}\nWrite it in ALL CAPS.",
    ), _word_list(case_sensitive=True)),
    Family("title_case", "case", gen_title, (
        "Capitalize the first letter of every word in this phrase. Reply with the phrase only.\n\n{input}",
        "Convert the following text to title case and output nothing else:\n{input}",
        "Text: {input}\nStart each word with a capital letter.",
    ), _word_list(case_sensitive=True)),
    # group "arithmetic"
    Family("add", "arithmetic", gen_add, (
        "What is {input}? Reply with the number only.",
        "Compute the sum {input} and give just the result.",
        "Add the numbers: {input}\nAnswer with a single number.",
    ), _exact()),
    Family("multiply", "arithmetic", gen_multiply, (
        "What is {input}? Reply with the number only.\n(x means multiplied by)",
        "Compute the product {input} and give just the result.",
        "Multiply the numbers: {input}\nAnswer with a single number.",
    ), _exact()),
    # group "units"
    Family("km_to_m", "units", gen_km_to_m, (
        "How many meters is {input}? Reply with the number only.",
        "Convert {input} to meters. Give just the number.",
        "Distance: {input}\nExpress it in meters as a single number.",
    ), _exact()),
    Family("hours_to_minutes", "units", gen_hours_to_minutes, (
        "How many minutes is {input}? Reply with the number only.",
        "Convert {input} to minutes. Give just the number.",
        "Duration: {input}\nExpress it in minutes as a single number.",
    ), _exact()),
    # group "extraction": pull fields out of a sentence into a format
    Family("extract_json", "extraction", gen_person_json, (
        'Extract the person\'s name and age from the text as JSON with keys "name" and "age". '
        "Reply with the JSON only.\n\n{input}",
        'Text: {input}\nReturn a JSON object {{"name": ..., "age": ...}} and nothing else.',
        'Read the sentence and output JSON with the fields "name" (string) and "age" (number):\n{input}',
    ), check_json_fields),
    Family("extract_kv", "extraction", gen_move_kv, (
        "From the text, give the city and the year on two lines, as `city: ...` and `year: ...`. "
        "Reply with those two lines only.\n\n{input}",
        "Text: {input}\nWrite two lines, `city: <city>` then `year: <year>`, and nothing else.",
        "Read the sentence and fill in:\ncity: ?\nyear: ?\n\n{input}",
    ), check_key_values),
    # group "classification": one label from a fixed set
    Family("parity", "classification", gen_parity, (
        "Is the number {input} even or odd? Reply with one word: even or odd.",
        "Number: {input}\nAnswer `even` or `odd`, nothing else.",
        "Classify {input} as even or odd. Give only the label.",
    ), _exact()),
    Family("sentiment", "classification", gen_sentiment, (
        "Is the sentiment of this review positive or negative? Reply with one word.\n\n{input}",
        "Review: {input}\nAnswer `positive` or `negative`, nothing else.",
        "Classify the feeling of the following text as positive or negative. Give only the label.\n{input}",
    ), _exact()),
    # group "list-format": lay words out as a list
    Family("bullet_list", "list-format", gen_bullets, (
        "Write these words as a bullet list, one per line, each line starting with '- '. "
        "Reply with the list only.\n\n{input}",
        "Words: {input}\nFormat them as a dash bullet list, nothing else.",
        "Turn the following words into a markdown bullet list (one word per bullet):\n{input}",
    ), _line_list(numbered=False)),
    Family("numbered_list", "list-format", gen_numbered, (
        "Write these words as a numbered list, one per line: '1. word', '2. word', ... "
        "Reply with the list only.\n\n{input}",
        "Words: {input}\nFormat them as a numbered list starting at 1, nothing else.",
        "Turn the following words into an ordered list (1., 2., 3., ...), one word per line:\n{input}",
    ), _line_list(numbered=True)),
)

FAMILIES: dict[str, Family] = {f.name: f for f in _FAMILY_LIST}
# The first family of each group trains, the second is held out: same kind of skill, new instruction.
TRAIN_FAMILIES: list[str] = [f.name for f in _FAMILY_LIST[0::2]]
HELDOUT_FAMILIES: list[str] = [f.name for f in _FAMILY_LIST[1::2]]


@functools.cache
def all_families() -> dict[str, Family]:
    """Every built-in family by name: the 14 above and those of tunelab.eval.instruct_tasks."""
    from tunelab.eval import instruct_tasks

    return {**FAMILIES, **instruct_tasks.FAMILIES}


# Named collections of families, each split by family into (trained, held-out) lists.
COLLECTIONS = ("quickstart", "instruct")


def collection(name: str) -> tuple[list[str], list[str]]:
    """(train families, held-out families) of a collection: `quickstart` (the 14 families above, what the
    quickstart and `tunelab eval` use by default) or `instruct` (55 families, tunelab.eval.instruct_tasks)."""
    if name == "quickstart":
        return TRAIN_FAMILIES, HELDOUT_FAMILIES
    if name == "instruct":
        from tunelab.eval import instruct_tasks

        return instruct_tasks.TRAIN_FAMILIES, instruct_tasks.HELDOUT_FAMILIES
    raise TunelabError(f"unknown task collection {name!r}; choose from: {', '.join(COLLECTIONS)}")


def _family(name: str) -> Family:
    if name not in all_families():
        raise TunelabError(f"unknown task family {name!r}; choose from: {', '.join(all_families())}")
    return all_families()[name]


def generate_items(families: list[str], n: int, seed: int, template: int | None = None,
                   phrasings: str = "train") -> list[Item]:
    """`n` items per family, the same for the same seed on every machine.

    Item contents depend only on (seed, family, index); the template is drawn from a separate stream, so
    `template=k` gives the same items under template k for every k (what prompt sensitivity needs).
    `template=None` draws one of the family's templates per item. `phrasings="heldout"` takes the templates
    from the family's held-out paraphrases instead (same contents; ids end in "-p", meta["phrasing"]).
    """
    if phrasings not in ("train", "heldout"):
        raise TunelabError(f"phrasings must be 'train' or 'heldout', not {phrasings!r}")
    heldout = phrasings == "heldout"
    items = []
    for name in families:
        fam = _family(name)
        pool, kind = (fam.heldout_templates, "held-out templates") if heldout else (fam.templates, "templates")
        if not pool:
            raise TunelabError(f"family {name!r} has no held-out phrasings (the `instruct` collection's families have)")
        if template is not None and not 0 <= template < len(pool):
            raise TunelabError(f"family {name!r} has {kind} 0..{len(pool) - 1}, not {template}")
        content_rng = random.Random(f"tunelab.tasks:{seed}:{name}")
        template_rng = random.Random(f"tunelab.tasks.template:{seed}:{name}")
        for i in range(n):
            s = fam.generate(content_rng)
            t = template_rng.randrange(len(pool)) if template is None else template
            meta = {"template": t, "input": s.input, "group": fam.group, **s.meta, **({"phrasing": "heldout"} if heldout else {})}
            items.append(Item(f"{name}-{seed}-{i}" + ("-p" if heldout else ""), name, pool[t].format(input=s.input), s.answer, meta))
    return items


def every_phrasing(families: list[str], n: int, seed: int) -> list[tuple[str, list[Item]]]:
    """The same `n` items per family under each phrasing the families share, training ones first:
    [("train0", items), ..., ("train4", items), ("heldout0", items), ("heldout1", items)] for the `instruct`
    collection. Item k of every list has the same contents, so scores pair across phrasings."""
    fams = [_family(f) for f in families]
    counts = {"train": min(len(f.templates) for f in fams), "heldout": min(len(f.heldout_templates) for f in fams)}
    return [(f"{kind}{t}", generate_items(families, n, seed, template=t, phrasings=kind))
            for kind, count in counts.items() for t in range(count)]


def check_contains(output: str, item: Item) -> float:
    """1.0 when the normalised answer appears in the normalised output as whole words."""
    want = normalize(item.answer)
    return float(bool(want) and re.search(rf"(?<!\w){re.escape(want)}(?!\w)", normalize(output)) is not None)


# Checkers by name, for user items (JSONL "check" field) that belong to no built-in family.
CHECKERS: dict[str, Checker] = {
    "exact": _exact(), "exact_case": _exact(case_sensitive=True), "contains": check_contains,
    "words": _word_list(), "json": check_json_fields, "key_values": check_key_values,
}


def score(output: str, item: Item) -> float:
    """The item's checker applied to one model output: a score in [0, 1].

    The checker is meta["check"] (a CHECKERS name) when set, else the item's family's checker."""
    if "check" in item.meta:
        return CHECKERS[item.meta["check"]](output, item)
    return _family(item.family).check(output, item)


# ----------------------------------------------------------------------------------------------------------
# Evaluation by generation


def max_answer_tokens(tokenizer, items: list[Item], slack: int = 8) -> int:
    """A generation budget: the longest canonical answer in tokens, plus slack for harmless extra words."""
    return max(len(tokenizer(it.answer, add_special_tokens=False)["input_ids"]) for it in items) + slack


def score_outputs(items: list[Item], outputs: list[str]) -> dict:
    """Mean score overall and per family for outputs aligned with items."""
    scores = [score(o, it) for o, it in zip(outputs, items, strict=True)]
    per_family: dict[str, list[float]] = {}
    for it, s in zip(items, scores):
        per_family.setdefault(it.family, []).append(s)
    return {
        "accuracy": sum(scores) / len(scores) if scores else 0.0,
        "per_family": {f: sum(v) / len(v) for f, v in per_family.items()},
        "scores": scores,
    }


def answer_items(model, tokenizer, items: list[Item], batch_size: int = 16, max_new_tokens: int | None = None,
                 system: str | None = None) -> dict:
    """Greedy outputs for items (any suite's), timed: {"outputs", "n", "seconds", "items_per_s"}.
    The default budget is the longest canonical answer in tokens plus slack."""
    from tunelab.eval.generate import generate

    if not items:
        raise TunelabError("no items to evaluate")
    budget = max_new_tokens or max_answer_tokens(tokenizer, items)
    t0 = time.perf_counter()
    outputs = generate(model, tokenizer, [it.prompt for it in items], max_new_tokens=budget,
                       batch_size=batch_size, system=system)
    seconds = time.perf_counter() - t0
    return {"outputs": outputs, "n": len(items), "seconds": seconds, "items_per_s": len(items) / seconds}


def evaluate_items(model, tokenizer, items: list[Item], batch_size: int = 16,
                   max_new_tokens: int | None = None, system: str | None = None) -> dict:
    """Greedy-generate an answer for every task item and score it with its checker.

    Returns {"accuracy", "per_family": {family: mean score}, "scores", "outputs", "n", "seconds",
    "items_per_s"}. "accuracy" is the mean checker score (exact-match families give 0/1 per item).
    """
    r = answer_items(model, tokenizer, items, batch_size, max_new_tokens, system)
    return {**score_outputs(items, r["outputs"]), **r}

def evaluate_sensitivity(model, tokenizer, families: list[str], n: int, seed: int, batch_size: int = 16) -> dict:
    """Prompt sensitivity: the same `n` items per family under each of the family's templates.

    Returns {"per_template": {family: [accuracy under template t]}, "mean": accuracy over all templates,
    "spread": mean over families of (best - worst template accuracy), "items_per_s"}. The spread is the
    sensitivity: 0 means the wording of the instruction does not matter.
    """
    n_templates = min(len(_family(f).templates) for f in families)
    per_template: dict[str, list[float]] = {f: [] for f in families}
    seconds = count = 0
    for t in range(n_templates):
        r = evaluate_items(model, tokenizer, generate_items(families, n, seed, template=t), batch_size)
        seconds, count = seconds + r["seconds"], count + r["n"]
        for f in families:
            per_template[f].append(r["per_family"][f])
    return {
        "per_template": per_template,
        "mean": sum(sum(v) for v in per_template.values()) / (len(families) * n_templates),
        "spread": sum(max(v) - min(v) for v in per_template.values()) / len(families),
        "items_per_s": count / seconds,
    }

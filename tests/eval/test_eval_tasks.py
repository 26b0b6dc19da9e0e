"""Task families: deterministic generators, disjoint train/held-out sets, checkers on hand-made outputs."""

from __future__ import annotations

import json

import pytest

from tunelab.errors import TunelabError
from tunelab.eval.tasks import (
    FAMILIES,
    HELDOUT_FAMILIES,
    TRAIN_FAMILIES,
    Item,
    generate_items,
    normalize,
    score,
    score_outputs,
)


def test_generators_are_deterministic_for_a_seed():
    a = generate_items(list(FAMILIES), 5, seed=7)
    b = generate_items(list(FAMILIES), 5, seed=7)
    c = generate_items(list(FAMILIES), 5, seed=8)
    assert a == b
    assert [i.prompt for i in a] != [i.prompt for i in c]
    assert len({i.id for i in a}) == len(a) == 5 * len(FAMILIES)


def test_fixed_template_keeps_the_same_contents():
    # prompt sensitivity relies on this: only the instruction wording changes between templates
    per_template = [generate_items(["sort_words", "extract_kv"], 4, seed=3, template=t) for t in range(3)]
    for items in zip(*per_template):
        assert len({it.answer for it in items}) == 1
        assert len({it.meta["input"] for it in items}) == 1
        assert len({it.prompt for it in items}) == 3
    with pytest.raises(TunelabError, match="templates 0..2"):
        generate_items(["add"], 1, seed=0, template=3)
    with pytest.raises(TunelabError, match="unknown task family"):
        generate_items(["nope"], 1, seed=0)


def test_train_and_heldout_share_no_family_or_template():
    assert set(TRAIN_FAMILIES).isdisjoint(HELDOUT_FAMILIES)
    assert set(TRAIN_FAMILIES) | set(HELDOUT_FAMILIES) == set(FAMILIES)
    train_t = {t for f in TRAIN_FAMILIES for t in FAMILIES[f].templates}
    held_t = {t for f in HELDOUT_FAMILIES for t in FAMILIES[f].templates}
    assert train_t.isdisjoint(held_t)
    # and no template is used twice anywhere
    all_t = [t for f in FAMILIES.values() for t in f.templates]
    assert len(all_t) == len(set(all_t))
    # every group has a family on each side, so held-out accuracy measures transfer within a kind of skill
    assert {FAMILIES[f].group for f in TRAIN_FAMILIES} == {FAMILIES[f].group for f in HELDOUT_FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_checker_accepts_canonical_and_rejects_wrong(family):
    for it in generate_items([family], 10, seed=1):
        assert score(it.answer, it) == 1.0
        assert score("  " + it.answer + "\n", it) == 1.0
        assert score("I don't know.", it) == 0.0
        assert score("", it) == 0.0


def _item(family, answer, prompt="p"):
    return Item("x", family, prompt, answer)


@pytest.mark.parametrize("family,answer,output,expected", [
    # word lists: positional credit
    ("reverse_words", "c b a", "c b a.", 1.0),
    ("reverse_words", "c b a", "c, b, a", 1.0),
    ("reverse_words", "c b a", "c a b", 1 / 3),
    ("reverse_words", "c b a", "c b", 2 / 3),
    ("reverse_words", "c b a", "a b c", 1 / 3),
    ("sort_words", "apple pear zoo", "Apple Pear Zoo", 1.0),  # case-insensitive family
    ("uppercase", "ALPHA BETA", "ALPHA BETA", 1.0),
    ("uppercase", "ALPHA BETA", "ALPHA beta", 0.5),           # case-sensitive family
    ("uppercase", "ALPHA BETA", "alpha beta", 0.0),
    ("title_case", "Alpha Beta", "Alpha beta", 0.5),
    # numbers: exact after normalisation
    ("add", "139", "139", 1.0),
    ("km_to_m", "3000", "3,000.", 1.0),
    ("add", "139", "140", 0.0),
    ("add", "139", "The answer is 139", 0.0),
    ("parity", "odd", "Odd.", 1.0),
    ("parity", "odd", "even", 0.0),
    ("sentiment", "negative", '"negative"', 1.0),
    ("sentiment", "negative", "positive", 0.0),
    # JSON fields
    ("extract_json", '{"name": "Lena", "age": 60}', '{"age": "60", "name": "lena"}', 1.0),
    ("extract_json", '{"name": "Lena", "age": 60}', 'Sure! ```json\n{"name": "Lena", "age": 60}\n```', 1.0),
    ("extract_json", '{"name": "Lena", "age": 60}', '{"name": "Lena", "age": 61}', 0.5),
    ("extract_json", '{"name": "Lena", "age": 60}', '{"name": "Lena"}', 0.5),
    ("extract_json", '{"name": "Lena", "age": 60}', '{"name": "Lena", "age": 60, "city": "Oslo"}', 2 / 3),
    ("extract_json", '{"name": "Lena", "age": 60}', '{"name": "Lena", "age": 60', 0.0),
    # key: value lines
    ("extract_kv", "city: Porto\nyear: 2022", "City: Porto\nYear: 2022", 1.0),
    ("extract_kv", "city: Porto\nyear: 2022", "city: Porto\nyear: 2021", 0.5),
    ("extract_kv", "city: Porto\nyear: 2022", "Porto, 2022", 0.0),
    # lists: every line must carry the marker (and the right number)
    ("bullet_list", "- a\n- b\n- c", "* a\n* b\n* c", 1.0),
    ("bullet_list", "- a\n- b\n- c", "- a\n- b", 2 / 3),
    ("bullet_list", "- a\n- b\n- c", "a\nb\nc", 0.0),
    ("numbered_list", "1. a\n2. b\n3. c", "1) a\n2) b\n3) c", 1.0),
    ("numbered_list", "1. a\n2. b\n3. c", "1. a\n3. b\n3. c", 2 / 3),
    ("numbered_list", "1. a\n2. b\n3. c", "- a\n- b\n- c", 0.0),
])
def test_checkers_on_hand_made_outputs(family, answer, output, expected):
    assert score(output, _item(family, answer)) == pytest.approx(expected)


def test_normalize():
    assert normalize("  `Hello   World.`  ") == "hello world"
    assert normalize("'Hi'", case_sensitive=True) == "Hi"
    assert normalize("1,234,567") == "1234567"


def test_score_outputs_aggregates_per_family():
    items = generate_items(["add", "parity"], 2, seed=0)
    outs = [items[0].answer, "wrong", items[2].answer, items[3].answer]
    r = score_outputs(items, outs)
    assert r["scores"] == [1.0, 0.0, 1.0, 1.0]
    assert r["per_family"] == {"add": 0.5, "parity": 1.0}
    assert r["accuracy"] == 0.75


def test_items_serialise_as_sft_examples():
    it = generate_items(["extract_json"], 1, seed=0)[0]
    ex = it.to_sft()
    assert ex == {"prompt": it.prompt, "response": it.answer}
    assert set(json.loads(ex["response"])) == {"name", "age"}

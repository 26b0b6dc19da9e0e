"""The `instruct` collection: >= 40 families, split by family and by phrasing, deterministic, checkers scored
on canonical and hand-made wrong outputs."""

from __future__ import annotations

import json

import pytest

from tunelab.errors import TunelabError
from tunelab.eval import instruct_tasks as I
from tunelab.eval.tasks import FAMILIES as QUICKSTART
from tunelab.eval.tasks import Item, all_families, collection, generate_items, score

TRAIN, HELD = collection("instruct")


def test_collection_size_and_split_by_family():
    assert len(I.FAMILIES) >= 40 and len(TRAIN) >= 40
    assert set(TRAIN).isdisjoint(HELD)
    assert set(TRAIN) | set(HELD) == set(I.FAMILIES)
    # every group trains some families and holds one out: transfer within a kind of skill
    assert {I.FAMILIES[f].group for f in TRAIN} == {I.FAMILIES[f].group for f in HELD}
    assert set(I.FAMILIES).isdisjoint(QUICKSTART)  # names resolve to one family in all_families()
    assert collection("quickstart") == (list(QUICKSTART)[0::2], list(QUICKSTART)[1::2])
    with pytest.raises(TunelabError, match="unknown task collection"):
        collection("nope")


def test_phrasings_per_family_and_held_out_ones_are_disjoint():
    every = []
    for f in I.FAMILIES.values():
        assert len(f.templates) >= 5 and len(f.heldout_templates) >= 2, f.name
        assert set(f.templates).isdisjoint(f.heldout_templates)
        assert all(t.count("{input}") == 1 for t in f.templates + f.heldout_templates)
        assert f.scoring, f"{f.name} states no scoring"
        every += f.templates + f.heldout_templates
    every += [t for f in QUICKSTART.values() for t in f.templates]
    assert len(every) == len(set(every))  # no template string shared by two families or two phrasings


@pytest.mark.parametrize("family", list(I.FAMILIES))
def test_deterministic_seeded_and_canonical_answers_score_one(family):
    a = generate_items([family], 12, seed=5)
    assert a == generate_items([family], 12, seed=5)
    b = generate_items([family], 12, seed=6)
    assert [it.meta["input"] for it in a] != [it.meta["input"] for it in b]
    assert len({it.meta["input"] for it in a}) >= 3  # the generator varies within a seed too
    para = generate_items([family], 12, seed=5, phrasings="heldout")
    # held-out phrasings: the same contents and answers, other wording, other ids
    assert [it.answer for it in para] == [it.answer for it in a]
    assert {it.prompt for it in para}.isdisjoint(it.prompt for it in a)
    assert all(it.id.endswith("-p") and it.meta["phrasing"] == "heldout" for it in para)
    for it in a + para:
        assert score(it.answer, it) == 1.0
        assert score("\n" + it.answer + "  ", it) == 1.0
        assert score("", it) == 0.0
        assert score("I don't know.", it) == 0.0
        assert len(it.answer) <= 90  # short answers: greedy scoring of a small model on a CPU
    for it, other in zip(a, a[1:] + a[:1]):  # another item's answer is wrong unless it is the same answer
        assert score(other.answer, it) < 1.0 or other.answer.lower() == it.answer.lower()


def test_fixed_template_and_range_errors():
    per_t = [generate_items(["kv_to_json"], 3, seed=2, phrasings="heldout", template=t) for t in range(2)]
    assert [it.answer for it in per_t[0]] == [it.answer for it in per_t[1]]
    with pytest.raises(TunelabError, match="held-out templates 0..1"):
        generate_items(["kv_to_json"], 1, seed=0, phrasings="heldout", template=2)
    with pytest.raises(TunelabError, match="no held-out phrasings"):
        generate_items(["add"], 1, seed=0, phrasings="heldout")
    with pytest.raises(TunelabError, match="phrasings must be"):
        generate_items(["add"], 1, seed=0, phrasings="test")


def _item(family, answer):
    return Item("x", family, "p", answer)


@pytest.mark.parametrize("family,answer,output,expected", [
    # exact, case-sensitive
    ("upper_phrase", "ALPHA BETA", "ALPHA BETA.", 1.0),
    ("upper_phrase", "ALPHA BETA", "ALPHA Beta", 0.0),
    ("camel_case", "alphaBetaGamma", "AlphaBetaGamma", 0.0),
    ("snake_case", "alpha_beta", "alpha beta", 0.0),
    ("acronym", "ABC", "abc", 0.0),
    # exact, case-insensitive; numbers normalised
    ("extract_email", "lena@zero.org", "Lena@zero.org", 1.0),
    ("count_words", "7", "seven", 0.0),
    ("word_add", "1000", "1,000", 1.0),
    ("compare_numbers", "yes", "no", 0.0),
    ("digits_to_words", "forty-two", "Forty two", 1.0),
    ("digits_to_words", "forty-two", "42", 0.0),
    # raw tokens: punctuation counts, partial credit by position
    ("quote_each", '"a" "b" "c"', '"a" "b" "c"', 1.0),
    ("quote_each", '"a" "b" "c"', '"a" b "c"', 2 / 3),
    ("quote_each", '"a" "b" "c"', "a b c", 0.0),
    ("comma_join", "a, b, c", "a b c", 1 / 3),
    ("wrap_parens", "(a b)", "a b", 0.0),
    ("first_two_words", "a b", "a b c", 2 / 3),
    ("repeat_word", "x x x", "x x", 2 / 3),
    # word lists: commas or spaces, positional
    ("sort_numbers", "3 12 40", "3, 12, 40", 1.0),
    ("sort_numbers", "3 12 40", "12 3 40", 1 / 3),
    ("json_keys", "size color", "color size", 0.0),
    # lines: the marker is part of the line
    ("star_bullets", "* a\n* b", "* a\n* b\n", 1.0),
    ("star_bullets", "* a\n* b", "- a\n- b", 0.0),
    ("checkbox_list", "- [ ] a\n- [ ] b", "- [ ] a\n- [x] b", 0.5),
    ("first_three_bullets", "- a\n- b\n- c", "- a\n- b\n- c\n- d", 3 / 4),
    ("one_per_line", "a\nb", "a b", 0.0),
    # JSON and key: value fields
    ("extract_person_city", '{"name": "Lena", "city": "Oslo"}', '{"city": "oslo", "name": "Lena"}', 1.0),
    ("extract_person_city", '{"name": "Lena", "city": "Oslo"}', '{"name": "Lena"}', 0.5),
    ("kv_to_json", '{"size": 4, "tone": "red"}', '{"size": "4", "tone": "blue"}', 0.5),
    ("json_array_words", '["a", "b", "c"]', '["a", "c", "b"]', 1 / 3),
    ("json_array_words", '["a", "b", "c"]', "a, b, c", 0.0),
    ("json_array_words", '["a", "b", "c"]', '["a", "b"', 0.0),
    ("json_to_kv", "size: 4\ntone: red", "size: 4\ntone: blue", 0.5),
    ("extract_date_kv", "day: 3\nmonth: May", "Day: 3\nMonth: may", 1.0),
])
def test_checkers_on_hand_made_outputs(family, answer, output, expected):
    assert score(output, _item(family, answer)) == pytest.approx(expected)


def test_number_words_and_generators_agree():
    assert [I.number_words(n) for n in (0, 13, 20, 42, 99)] == ["zero", "thirteen", "twenty", "forty-two", "ninety-nine"]
    for it in generate_items(["word_add", "word_subtract"], 20, seed=0):
        a, op, b = it.meta["input"].split()
        words = {I.number_words(n): n for n in range(100)}
        assert int(it.answer) == (words[a] + words[b] if op == "plus" else words[a] - words[b])
    for it in generate_items(["kv_to_json", "json_to_kv"], 5, seed=0):
        assert score(it.answer, it) == 1.0 and isinstance(json.loads(it.meta["input"].split("\n")[0]
                                                                     if it.family == "json_to_kv" else it.answer), dict)


def test_all_families_resolves_both_collections():
    assert set(all_families()) == set(QUICKSTART) | set(I.FAMILIES)
    it = generate_items(["odd_one_out"], 1, seed=0)[0]
    assert it.answer in it.meta["input"].split()

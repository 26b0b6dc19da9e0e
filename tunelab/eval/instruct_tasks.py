"""The `instruct` collection: 55 verifiable instruction families for instruction-tuning experiments.

11 groups (kinds of skill) of 5 families each; in every group the first 4 families train and the 5th is
held out (44 trained, 11 held-out families), so held-out accuracy measures transfer to a new task of a
familiar kind. Every family has 7 hand-written instructions: the first 5 are its training phrasings
(`Family.templates`), the last 2 its held-out paraphrases (`Family.heldout_templates`, never trained on),
each laid out differently around the input. Each family states its scoring (`Family.scoring`).

Skills in the manner of IFEval's verifiable constraints (case, joining, quoting, bullets, JSON keys,
language-free transformations) plus extraction, classification, arithmetic in words and list operations.
Answers are short (1-15 tokens) for greedy scoring of a small model on a CPU; word material comes from
CPython's reference text (tunelab.eval.tasks.word_pool), so no download is needed.
"""

from __future__ import annotations

import json
import random
import re

from tunelab.eval.tasks import (
    CITIES,
    NAMES,
    NEGATIVE,
    POSITIVE,
    Family,
    Item,
    Sample,
    _exact,
    _positional,
    _word_list,
    check_json_fields,
    check_key_values,
    normalize,
    word_pool,
)

# ----------------------------------------------------------------------------------------------------------
# Checkers, each paired with the sentence that states its scoring


def _raw_tokens(text: str) -> list[str]:
    s = text.strip()
    return (s[:-1] if s.endswith(".") else s).split()


def check_tokens(output: str, item: Item) -> float:
    return _positional(_raw_tokens(output), _raw_tokens(item.answer))


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.strip().splitlines() if ln.strip()]


def check_lines(output: str, item: Item) -> float:
    return _positional(_lines(output), _lines(item.answer))


def check_json_array(output: str, item: Item) -> float:
    m = re.search(r"\[.*\]", output, re.DOTALL)
    try:
        got = json.loads(m.group(0)) if m else None
    except json.JSONDecodeError:
        return 0.0
    if not isinstance(got, list):
        return 0.0
    return _positional([normalize(str(g)) for g in got], [normalize(str(w)) for w in json.loads(item.answer)])


def check_number_words(output: str, item: Item) -> float:
    return float(normalize(output).replace("-", " ") == normalize(item.answer).replace("-", " "))


EXACT = (_exact(), "exact match: 1 when the output equals the answer after trimming, dropping wrapping quotes "
         "and one final period, case-insensitive; else 0")
EXACT_CASE = (_exact(case_sensitive=True), "exact match as above, but case-sensitive")
NUMBER_WORDS = (check_number_words, "exact match, case-insensitive; a hyphen or a space between tens and units")
TOKENS = (check_tokens, "partial credit: share of space-separated tokens equal to the answer's at the same "
          "position (case and punctuation count), over the longer of output and answer")
WORDS = (_word_list(), "partial credit: share of words right at their position (spaces or commas between "
         "them, case-insensitive), over the longer list")
LINES = (check_lines, "partial credit: share of non-empty lines equal to the answer's at the same position "
         "(list marker included), over the longer of output and answer")
FIELDS = (check_json_fields, "partial credit: fields of the first JSON object with the right value, over "
          "max(#wanted, #given); 0 without a JSON object")
KEY_VALUES = (check_key_values, "partial credit: `key: value` lines right, over max(#wanted, #given)")
ARRAY = (check_json_array, "partial credit: entries of the first JSON array right at their position, over the "
         "longer array; 0 without a JSON array")

# ----------------------------------------------------------------------------------------------------------
# Word material and small helpers

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen").split()
TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
CATEGORIES = {
    "animal": ("horse", "tiger", "rabbit", "eagle", "salmon", "donkey", "monkey", "turtle", "camel", "sheep"),
    "color": ("purple", "orange", "yellow", "green", "brown", "violet", "scarlet", "silver", "black", "white"),
    "fruit": ("banana", "apple", "cherry", "mango", "lemon", "peach", "grape", "melon", "plum", "papaya"),
}
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")


def number_words(n: int) -> str:
    """0..99 in English words: 42 -> 'forty-two'."""
    return ONES[n] if n < 20 else TENS[n // 10 - 2] + (f"-{ONES[n % 10]}" if n % 10 else "")


def _ws(rng: random.Random, lo: int = 3, hi: int = 5) -> list[str]:
    return rng.sample(word_pool(), rng.randint(lo, hi))


def _with_repeats(rng: random.Random) -> list[str]:
    """5-7 words drawn from 3-4 distinct ones, so some repeat."""
    base = _ws(rng, 3, 4)
    return base + [rng.choice(base) for _ in range(rng.randint(2, 3))]


def _nums(rng: random.Random, k: int = 5, lo: int = 1, hi: int = 99) -> list[int]:
    return rng.sample(range(lo, hi + 1), k)


def _words_sample(f):
    """A generator from `f(words) -> answer` over 3-5 random words given space-separated."""
    def gen(rng: random.Random) -> Sample:
        ws = _ws(rng)
        return Sample(" ".join(ws), f(ws))
    return gen


def _word_sample(f):
    """A generator from `f(word) -> answer` over one random word."""
    def gen(rng: random.Random) -> Sample:
        w = rng.choice(word_pool())
        return Sample(w, f(w))
    return gen


def _numbers_sample(f, k: int = 5, hi: int = 99):
    def gen(rng: random.Random) -> Sample:
        ns = _nums(rng, k, 1, hi)
        return Sample(" ".join(map(str, ns)), f(ns))
    return gen


# ----------------------------------------------------------------------------------------------------------
# Generators that need more than one list of words


def gen_lower(rng):
    ws = _ws(rng)
    shown = [rng.choice((w.upper(), w.capitalize())) for w in ws]  # some capitals to remove
    return Sample(" ".join(shown), " ".join(ws))


def gen_dedupe(rng):
    ws = _with_repeats(rng)
    rng.shuffle(ws)
    return Sample(" ".join(ws), " ".join(dict.fromkeys(ws)))


def gen_count_distinct(rng):
    ws = _with_repeats(rng)
    rng.shuffle(ws)
    return Sample(" ".join(ws), str(len(set(ws))))


def gen_count_occurrences(rng):
    ws = _with_repeats(rng)
    rng.shuffle(ws)
    target = rng.choice(ws)
    return Sample(f"list: {' '.join(ws)}\nword: {target}", str(ws.count(target)))


def gen_count_words(rng):
    ws = _ws(rng, 3, 9)
    return Sample(" ".join(ws), str(len(ws)))


def gen_word_add(rng):
    a, b = rng.randint(1, 40), rng.randint(1, 40)
    return Sample(f"{number_words(a)} plus {number_words(b)}", str(a + b))


def gen_word_subtract(rng):
    a = rng.randint(10, 60)
    b = rng.randint(1, a)
    return Sample(f"{number_words(a)} minus {number_words(b)}", str(a - b))


def gen_digits_to_words(rng):
    n = rng.randint(0, 99)
    return Sample(str(n), number_words(n))


def gen_words_to_digits(rng):
    n = rng.randint(0, 99)
    return Sample(number_words(n), str(n))


def gen_word_problem(rng):
    name, a, b = rng.choice(NAMES), rng.randint(2, 20), rng.randint(2, 20)
    thing = rng.choice(("apples", "books", "stamps", "coins", "shells"))
    return Sample(f"{name} has {number_words(a)} {thing} and gets {number_words(b)} more. "
                  f"How many {thing} does {name} have now?", str(a + b))


def gen_email(rng):
    name, host, topic = rng.choice(NAMES), rng.choice(word_pool()), rng.choice(word_pool())
    email = f"{name.lower()}@{host}.org"
    text = rng.choice((f"Write to {email} if you have questions about the {topic}.",
                       f"{name} ({email}) will answer every {topic} request.",
                       f"For the {topic} report, the contact address is {email} until Friday."))
    return Sample(text, email)


def gen_year(rng):
    year, w, city = rng.randint(1900, 2024), rng.choice(word_pool()), rng.choice(CITIES)
    text = rng.choice((f"The {w} museum in {city} opened in {year} after a long delay.",
                       f"In {year}, {city} hosted its first {w} festival.",
                       f"{city} has kept the {w} records since {year}."))
    return Sample(text, str(year))


def gen_price(rng):
    price, w, name = rng.randint(3, 250), rng.choice(word_pool()), rng.choice(NAMES)
    text = rng.choice((f"The {w} kit costs {price} euros at the market.",
                       f"{name} paid {price} dollars for a {w} lamp.",
                       f"A new {w} sells for {price} pounds this week."))
    return Sample(text, str(price))


def gen_person_city(rng):
    name, city, w = rng.choice(NAMES), rng.choice(CITIES), rng.choice(word_pool())
    text = rng.choice((f"{name} lives in {city} and studies {w} patterns.",
                       f"After years abroad, {name} now works in {city}.",
                       f"In {city} you will often meet {name} near the {w} shop."))
    return Sample(text, json.dumps({"name": name, "city": city}))


def gen_date_kv(rng):
    name, day, month = rng.choice(NAMES), rng.randint(1, 28), rng.choice(MONTHS)
    text = rng.choice((f"{name} was born on {day} {month}.", f"The meeting with {name} is on {month} {day}.",
                       f"On {day} {month}, {name} signed the lease."))
    return Sample(text, f"day: {day}\nmonth: {month}")


def gen_compare(rng):
    a, b = _nums(rng, 2)
    return Sample(f"{a} and {b}", "yes" if a > b else "no")


def gen_category(rng):
    label = rng.choice(sorted(CATEGORIES))
    return Sample(rng.choice(CATEGORIES[label]), label)


def gen_vowel_start(rng):
    w = rng.choice(word_pool())
    return Sample(w, "yes" if w[0] in "aeiou" else "no")


def gen_adjective(rng):
    label = rng.choice(("positive", "negative"))
    return Sample(rng.choice(POSITIVE if label == "positive" else NEGATIVE), label)


def gen_odd_one_out(rng):
    same, other = rng.sample(sorted(CATEGORIES), 2)
    odd = rng.choice(CATEGORIES[other])
    ws = rng.sample(CATEGORIES[same], 3) + [odd]
    rng.shuffle(ws)
    return Sample(" ".join(ws), odd)


def _object(rng, k: int) -> dict:
    keys = rng.sample(word_pool(), k)
    return {key: rng.choice((rng.choice(word_pool()), rng.randint(1, 99))) for key in keys}


def gen_kv_to_json(rng):
    obj = _object(rng, 2)
    return Sample("\n".join(f"{k} = {v}" for k, v in obj.items()), json.dumps(obj))


def gen_json_get(rng):
    obj = _object(rng, 3)
    key = rng.choice(list(obj))
    return Sample(f"{json.dumps(obj)}\nkey: {key}", str(obj[key]))


def gen_json_keys(rng):
    obj = _object(rng, rng.randint(2, 4))
    return Sample(json.dumps(obj), " ".join(obj))


def gen_json_to_kv(rng):
    obj = _object(rng, rng.randint(2, 3))
    return Sample(json.dumps(obj), "\n".join(f"{k}: {v}" for k, v in obj.items()))


def gen_first_three_bullets(rng):
    ws = _ws(rng, 5, 6)
    return Sample(" ".join(ws), "\n".join(f"- {w}" for w in ws[:3]))


# ----------------------------------------------------------------------------------------------------------
# Families. Each instruction list has 7 entries: 5 training phrasings, then 2 held-out paraphrases.

TRAIN_LAYOUTS = ("{instr}\n\n{input}", "{input}\n\n{instr}", "{instr}\nInput: {input}",
                 "Input:\n{input}\n\n{instr}", "{instr}\n{input}")
HELDOUT_LAYOUTS = ("Here is the input.\n{input}\nTask: {instr}", "Task: {instr}\n---\n{input}\n---")


def _make(name: str, group: str, generate, scoring: tuple, instructions: tuple[str, ...]) -> Family:
    assert len(instructions) == 7, name
    esc = [i.replace("{", "{{").replace("}", "}}") for i in instructions]  # JSON braces survive .format
    train = tuple(lay.format(instr=i, input="{input}") for lay, i in zip(TRAIN_LAYOUTS, esc[:5]))
    held = tuple(lay.format(instr=i, input="{input}") for lay, i in zip(HELDOUT_LAYOUTS, esc[5:]))
    return Family(name, group, generate, train, scoring[0], heldout_templates=held, scoring=scoring[1])


_GROUPS: dict[str, list[tuple]] = {
    "case": [
        ("upper_phrase", _words_sample(lambda ws: " ".join(ws).upper()), EXACT_CASE, (
            "Rewrite the phrase in capital letters only. Reply with the phrase.",
            "Convert every letter of the phrase to uppercase and output nothing else.",
            "Make the whole phrase UPPERCASE.",
            "Write this phrase again with all letters capitalized.",
            "Change the phrase to all caps; give only the result.",
            "Shout the phrase: every letter upper case, nothing added.",
            "Return the same words, but in block capitals.")),
        ("lower_phrase", gen_lower, EXACT_CASE, (
            "Rewrite the phrase in lowercase letters only. Reply with the phrase.",
            "Convert every letter of the phrase to lowercase and output nothing else.",
            "Make the whole phrase lower case.",
            "Write this phrase again without any capital letters.",
            "Change the phrase to small letters; give only the result.",
            "Remove all capitalization from the phrase and return it.",
            "Return the same words with every letter in lower case.")),
        ("snake_case", _words_sample(lambda ws: "_".join(ws)), EXACT_CASE, (
            "Join the words with underscores (snake_case). Reply with the result only.",
            "Turn the words into one snake_case identifier.",
            "Connect these words using _ between them, no spaces.",
            "Write the words as a single name, separated by underscores.",
            "Make a snake case variable name from the words, in the same order.",
            "Produce the identifier you get by putting an underscore between each pair of words.",
            "Glue the words together with underscore characters.")),
        ("kebab_case", _words_sample(lambda ws: "-".join(ws)), EXACT_CASE, (
            "Join the words with hyphens (kebab-case). Reply with the result only.",
            "Turn the words into one kebab-case slug.",
            "Connect these words using - between them, no spaces.",
            "Write the words as a single name, separated by dashes.",
            "Make a URL slug from the words, hyphen separated, same order.",
            "Produce the string you get by putting a hyphen between each pair of words.",
            "Glue the words together with minus signs.")),
        ("camel_case", _words_sample(lambda ws: ws[0] + "".join(w.capitalize() for w in ws[1:])), EXACT_CASE, (
            "Join the words into one camelCase identifier. Reply with the result only.",
            "Write the words as camel case: no spaces, every word after the first capitalized.",
            "Make a camelCase variable name from these words.",
            "Remove the spaces and capitalize each word except the first.",
            "Convert the words to lowerCamelCase.",
            "Give the identifier a Java programmer would write for these words (camel case).",
            "Squash the words together, marking each new word after the first with a capital letter.")),
    ],
    "quoting": [
        ("quote_each", _words_sample(lambda ws: " ".join(f'"{w}"' for w in ws)), TOKENS, (
            "Put each word in double quotes, separated by spaces. Reply with the result only.",
            "Wrap every word in \"double quotes\" and keep the spaces between them.",
            "Quote each of the words separately with double quotation marks.",
            "Write the words again, each one enclosed in double quotes.",
            "Surround every single word with \" characters.",
            "Give each word its own pair of double quotation marks.",
            "Return the words with a \" before and after each one.")),
        ("wrap_parens", _words_sample(lambda ws: f"({' '.join(ws)})"), TOKENS, (
            "Put the whole phrase in parentheses. Reply with the result only.",
            "Wrap the phrase in round brackets and output nothing else.",
            "Enclose the entire phrase in ( and ).",
            "Write the phrase again between an opening and a closing parenthesis.",
            "Surround the phrase with parentheses, one pair for the whole phrase.",
            "Bracket the full phrase with round brackets.",
            "Return the phrase inside a single pair of parentheses.")),
        ("comma_join", _words_sample(lambda ws: ", ".join(ws)), TOKENS, (
            "Separate the words with a comma and a space. Reply with the result only.",
            "Rewrite the words as a comma-separated list.",
            "Put a comma after every word except the last one.",
            "Join these words with ', ' between them.",
            "List the words separated by commas.",
            "Return the words, comma plus space between neighbours.",
            "Write the words in a row with commas in between.")),
        ("semicolon_join", _words_sample(lambda ws: "; ".join(ws)), TOKENS, (
            "Separate the words with a semicolon and a space. Reply with the result only.",
            "Rewrite the words as a semicolon-separated list.",
            "Put a semicolon after every word except the last one.",
            "Join these words with '; ' between them.",
            "List the words separated by semicolons.",
            "Return the words, semicolon plus space between neighbours.",
            "Write the words in a row with semicolons in between.")),
        ("angle_each", _words_sample(lambda ws: " ".join(f"<{w}>" for w in ws)), TOKENS, (
            "Put each word in angle brackets, like <word>, separated by spaces. Reply with the result only.",
            "Wrap every word in < and >, keeping the spaces.",
            "Enclose each of the words in its own angle brackets.",
            "Write the words again, each between a less-than and a greater-than sign.",
            "Tag every word as <word>.",
            "Give each word a pair of pointy brackets around it.",
            "Return the words with < before and > after each one.")),
    ],
    "list-ops": [
        ("last_word", _words_sample(lambda ws: ws[-1]), EXACT, (
            "What is the last word of the list? Reply with that word only.",
            "Give the final word in this list and nothing else.",
            "Output only the word that comes last.",
            "Which word ends the list? Answer with it.",
            "Copy the last word of the list.",
            "Name the word at the very end.",
            "Return the closing word of the sequence.")),
        ("first_two_words", _words_sample(lambda ws: " ".join(ws[:2])), TOKENS, (
            "Give the first two words of the list, separated by a space. Reply with them only.",
            "Output only the first 2 words.",
            "Copy the two words that open the list.",
            "Which are the first two words? Answer with them in order.",
            "Keep the first two words and drop the rest.",
            "Return the opening pair of words.",
            "Cut the list after its second word and return what is left.")),
        ("drop_first_word", _words_sample(lambda ws: " ".join(ws[1:])), TOKENS, (
            "Remove the first word and give the remaining words. Reply with them only.",
            "Output every word except the first one.",
            "Copy the list without its first word.",
            "Delete the opening word; keep the others in order.",
            "Give all words after the first.",
            "Return the sequence with its leading word cut off.",
            "Skip the first word and repeat the rest.")),
        ("dedupe_words", gen_dedupe, TOKENS, (
            "Remove repeated words, keeping the first time each word appears. Reply with the words only.",
            "Output the list without duplicates, in order of first appearance.",
            "Delete every word that already appeared earlier in the list.",
            "Give each distinct word once, in the order they first occur.",
            "Deduplicate the words, keeping their original order.",
            "Return the sequence with all repeats dropped.",
            "Write every different word once, earliest occurrence first.")),
        ("every_other_word", _words_sample(lambda ws: " ".join(ws[::2])), TOKENS, (
            "Give the 1st, 3rd, 5th ... words of the list. Reply with them only.",
            "Output every other word, starting with the first.",
            "Keep the words at odd positions (first, third, ...) and drop the others.",
            "Skip every second word and return what remains.",
            "Copy alternate words beginning with the first one.",
            "Return words one, three, five and so on.",
            "Take a word, skip a word, take a word ... starting at the start.")),
    ],
    "counting": [
        ("count_words", gen_count_words, EXACT, (
            "How many words are in the list? Reply with the number only.",
            "Count the words and give just the count in digits.",
            "Give the number of words as a single number.",
            "What is the word count of this text?",
            "Tell me how many words there are, digits only.",
            "Return the total number of words.",
            "Count the space-separated words; answer with the count.")),
        ("word_length", _word_sample(lambda w: str(len(w))), EXACT, (
            "How many letters does the word have? Reply with the number only.",
            "Count the letters of the word and give just the count.",
            "Give the length of the word in characters.",
            "What is the number of letters in this word?",
            "Tell me how long the word is, in letters, as digits.",
            "Return the character count of the word.",
            "Spell the word silently and say how many letters it has.")),
        ("count_occurrences", gen_count_occurrences, EXACT, (
            "How many times does the word appear in the list? Reply with the number only.",
            "Count the occurrences of the given word in the list.",
            "Give the number of times the word is in the list, as digits.",
            "In the list, how often does the word occur?",
            "Tell me the count of the word in the list.",
            "Return how many entries of the list equal the word.",
            "Count matches of the word among the list's entries.")),
        ("count_above_50", _numbers_sample(lambda ns: str(sum(n > 50 for n in ns))), EXACT, (
            "How many of the numbers are greater than 50? Reply with the count only.",
            "Count the numbers above 50 and give just the count.",
            "Give the number of values larger than 50.",
            "How many numbers in the list exceed 50?",
            "Tell me how many numbers are bigger than fifty, as digits.",
            "Return the count of entries strictly over 50.",
            "Of these numbers, count those that are more than 50.")),
        ("count_distinct", gen_count_distinct, EXACT, (
            "How many different words are in the list? Reply with the number only.",
            "Count the distinct words and give just the count.",
            "Give the number of unique words as a single number.",
            "Ignoring repeats, how many words does the list contain?",
            "Tell me how many distinct entries there are, as digits.",
            "Return the number of different words, counting duplicates once.",
            "How many words would remain after removing repetitions?")),
    ],
    "arithmetic-words": [
        ("word_add", gen_word_add, EXACT, (
            "Compute the sum. Reply with the result in digits only.",
            "Add the two numbers written in words; give the answer as digits.",
            "What is the result? Answer with a number in digits.",
            "Work out this addition and write the total with digits.",
            "Calculate it and output only the number.",
            "Evaluate the spelled-out sum; digits only in the answer.",
            "Return the total as an Arabic numeral.")),
        ("word_subtract", gen_word_subtract, EXACT, (
            "Compute the difference. Reply with the result in digits only.",
            "Subtract the numbers written in words; give the answer as digits.",
            "What is the result of this subtraction? Answer with digits.",
            "Work out the difference and write it with digits.",
            "Calculate the subtraction and output only the number.",
            "Evaluate the spelled-out subtraction; digits only in the answer.",
            "Return what is left, as an Arabic numeral.")),
        ("digits_to_words", gen_digits_to_words, NUMBER_WORDS, (
            "Write the number in English words. Reply with the words only.",
            "Spell out this number in words, like forty-two.",
            "Give the English name of the number.",
            "Convert the digits to words.",
            "How do you write this number in words?",
            "Return the number written out in letters, no digits.",
            "Say the number in words as you would on a cheque.")),
        ("words_to_digits", gen_words_to_digits, EXACT, (
            "Write this number with digits. Reply with the number only.",
            "Convert the number in words to digits, like 42.",
            "Give the numeral for these words.",
            "Which number is this? Answer in digits.",
            "Turn the spelled-out number into digits.",
            "Return the value as an Arabic numeral.",
            "Translate the words into a number written with digits.")),
        ("word_problem", gen_word_problem, EXACT, (
            "Solve the problem. Reply with the number in digits only.",
            "Answer the question with a single number written in digits.",
            "Work out the answer; output only the number.",
            "Read the story and give the final count as digits.",
            "What is the answer? Digits only.",
            "Compute the total the question asks for and return it as a numeral.",
            "Give just the resulting number, no words.")),
    ],
    "number-lists": [
        ("max_number", _numbers_sample(lambda ns: str(max(ns))), EXACT, (
            "Which number is the largest? Reply with that number only.",
            "Give the maximum of these numbers.",
            "Output the biggest number in the list.",
            "Find the highest value and write it.",
            "What is the greatest number here?",
            "Return the top value of the list.",
            "Pick the number that is larger than all the others.")),
        ("min_number", _numbers_sample(lambda ns: str(min(ns))), EXACT, (
            "Which number is the smallest? Reply with that number only.",
            "Give the minimum of these numbers.",
            "Output the lowest number in the list.",
            "Find the smallest value and write it.",
            "What is the least number here?",
            "Return the bottom value of the list.",
            "Pick the number that is smaller than all the others.")),
        ("sum_numbers", _numbers_sample(lambda ns: str(sum(ns)), k=3, hi=20), EXACT, (
            "Add up the numbers. Reply with the total only.",
            "Give the sum of these numbers.",
            "What do the numbers add up to?",
            "Compute the total of the list.",
            "Output the sum as a single number.",
            "Return the result of adding every number in the list.",
            "Total the values and write the result.")),
        ("sort_numbers", _numbers_sample(lambda ns: " ".join(map(str, sorted(ns)))), WORDS, (
            "Sort the numbers from smallest to largest. Reply with the numbers only, separated by spaces.",
            "Put these numbers in ascending order.",
            "List the numbers in increasing order.",
            "Arrange the numbers from low to high.",
            "Output the numbers sorted ascending, space separated.",
            "Return the values ordered with the smallest first.",
            "Reorder the list so each number is bigger than the one before.")),
        ("sort_numbers_desc", _numbers_sample(lambda ns: " ".join(map(str, sorted(ns, reverse=True)))), WORDS, (
            "Sort the numbers from largest to smallest. Reply with the numbers only, separated by spaces.",
            "Put these numbers in descending order.",
            "List the numbers in decreasing order.",
            "Arrange the numbers from high to low.",
            "Output the numbers sorted descending, space separated.",
            "Return the values ordered with the biggest first.",
            "Reorder the list so each number is smaller than the one before.")),
    ],
    "extraction": [
        ("extract_email", gen_email, EXACT, (
            "Extract the email address from the text. Reply with the address only.",
            "What is the email address in this sentence?",
            "Copy the e-mail address mentioned in the text.",
            "Find the email and output nothing else.",
            "Give the contact address (the one with @).",
            "Return only the electronic mail address that appears.",
            "Pull out the address containing an @ sign.")),
        ("extract_year", gen_year, EXACT, (
            "Which year is mentioned in the text? Reply with the year only.",
            "Extract the year from the sentence.",
            "Copy the four-digit year in the text.",
            "Find the year and output nothing else.",
            "Give the year the sentence refers to.",
            "Return the date's year as four digits.",
            "Pull out the year that appears in the text.")),
        ("extract_price", gen_price, EXACT, (
            "What is the price in the text? Reply with the number only, no currency.",
            "Extract the amount paid or asked, as a plain number.",
            "Copy the price from the sentence without its currency word.",
            "Find how much it costs; output just the number.",
            "Give the amount of money mentioned, digits only.",
            "Return the cost as a bare number.",
            "Pull out the price figure, leaving out the currency.")),
        ("extract_person_city", gen_person_city, FIELDS, (
            'Extract the person\'s name and city as JSON with keys "name" and "city". Reply with the JSON only.',
            'Return a JSON object {"name": ..., "city": ...} for the text.',
            'Give JSON with the fields "name" and "city" taken from the sentence.',
            'Output {"name": "<person>", "city": "<city>"} filled in from the text.',
            'Read the text and answer in JSON: who ("name") and where ("city").',
            'Produce a JSON record with two keys, "name" and "city", from the sentence.',
            'Fill a JSON object with the person as "name" and the place as "city".')),
        ("extract_date_kv", gen_date_kv, KEY_VALUES, (
            "Give the day and month from the text as two lines, `day: ...` and `month: ...`. Reply with those lines only.",
            "Write two lines, `day: <number>` then `month: <name>`, from the sentence.",
            "Fill in from the text:\nday: ?\nmonth: ?",
            "Extract the date as `day:` and `month:` lines.",
            "Output the day and the month of the date, one `key: value` line each.",
            "Answer with the lines `day: ...` and `month: ...` taken from the date in the text.",
            "Split the date into a day line and a month line, as `day: X` and `month: Y`.")),
    ],
    "classification": [
        ("compare_numbers", gen_compare, EXACT, (
            "Is the first number larger than the second? Reply with yes or no.",
            "Answer yes if the first number is bigger than the second, otherwise no.",
            "Is the first value greater? Give only yes or no.",
            "Does the first number exceed the second one? yes/no.",
            "Compare the two numbers: is the first the larger? One word, yes or no.",
            "Say yes when the number on the left is the greater one, else no.",
            "Is number one above number two? Answer yes or no only.")),
        ("word_category", gen_category, EXACT, (
            "Is the word an animal, a color or a fruit? Reply with one word: animal, color or fruit.",
            "Classify the word as animal, color or fruit.",
            "Which category does the word belong to: animal, color, or fruit?",
            "Give the category of the word (animal / color / fruit).",
            "Label the word with animal, color or fruit, nothing else.",
            "Tell whether this names an animal, a color or a fruit; one word.",
            "Sort the word into one of three bins, animal, color, fruit, and name the bin.")),
        ("vowel_start", gen_vowel_start, EXACT, (
            "Does the word start with a vowel (a, e, i, o, u)? Reply with yes or no.",
            "Answer yes if the first letter is a vowel, otherwise no.",
            "Is the first letter of the word one of a, e, i, o, u? yes or no.",
            "Does this word begin with a vowel? Give only yes or no.",
            "Check the first letter: vowel means yes, consonant means no.",
            "Say yes when the word opens with a vowel, else no.",
            "Is the initial letter a vowel? Answer yes or no only.")),
        ("adjective_sentiment", gen_adjective, EXACT, (
            "Is this adjective positive or negative? Reply with one word.",
            "Classify the word as positive or negative.",
            "Does the adjective express a positive or a negative feeling?",
            "Label the word's sentiment: positive or negative.",
            "Answer positive or negative for this word, nothing else.",
            "Tell whether the adjective sounds good (positive) or bad (negative); one word.",
            "Give the polarity of the adjective, positive or negative.")),
        ("odd_one_out", gen_odd_one_out, EXACT, (
            "Which word does not belong with the others? Reply with that word only.",
            "Three words share a category and one does not. Give the odd one.",
            "Find the word that is out of place in the list.",
            "Name the word whose category differs from the rest.",
            "Output the one word that does not fit.",
            "Spot the intruder among these words and return it.",
            "Return the word that is unlike the other three.")),
    ],
    "json": [
        ("json_array_words", _words_sample(json.dumps), ARRAY, (
            "Write the words as a JSON array of strings. Reply with the JSON only.",
            "Return the words as a JSON list, in order.",
            "Give a JSON array containing each word as a string.",
            "Format the words as [\"...\", \"...\"] in JSON.",
            "Turn the words into a JSON array.",
            "Produce a JSON list whose items are the words, same order.",
            "Encode the words as a JSON array of strings.")),
        ("kv_to_json", gen_kv_to_json, FIELDS, (
            "Convert the `key = value` lines to one JSON object. Reply with the JSON only.",
            "Return a JSON object with these keys and values.",
            "Write the pairs as JSON.",
            "Turn the assignments into a JSON dictionary.",
            "Give the JSON object that these lines describe.",
            "Encode the key-value lines as a single JSON object.",
            "Produce JSON where each line becomes one field.")),
        ("json_get_value", gen_json_get, EXACT, (
            "Give the value of the named key in the JSON object. Reply with the value only.",
            "Look up the key in the JSON and output its value.",
            "What value does the JSON object store under the key?",
            "Read the JSON and return the value for the key.",
            "Output only the value of that key.",
            "Fetch the field named by `key` from the object and return it.",
            "Return whatever the object maps the key to.")),
        ("json_keys", gen_json_keys, WORDS, (
            "List the keys of the JSON object in order, separated by spaces. Reply with the keys only.",
            "Give the field names of this JSON object.",
            "What keys does the JSON object have? Answer in order.",
            "Output the object's keys, space separated.",
            "Name every key of the JSON, first to last.",
            "Return the property names of the object in their order.",
            "Write the keys of the object, leaving out the values.")),
        ("json_to_kv", gen_json_to_kv, KEY_VALUES, (
            "Rewrite the JSON object as `key: value` lines, one per field. Reply with the lines only.",
            "Convert the JSON to lines of the form key: value.",
            "Write each field of the object on its own line as key: value.",
            "Turn the JSON into plain `key: value` lines.",
            "Give the object's fields as key: value pairs, one per line.",
            "Flatten the JSON object into lines, each `name: value`.",
            "Print the fields one per line, key then colon then value.")),
    ],
    "line-lists": [
        ("one_per_line", _words_sample(lambda ws: "\n".join(ws)), LINES, (
            "Write each word on its own line. Reply with the lines only.",
            "Put one word per line, no other marks.",
            "Split the words onto separate lines.",
            "Output the words one below the other.",
            "Give the words as lines, one word each, no bullets.",
            "Return the words stacked vertically, a line per word.",
            "Break the phrase into lines so that every line holds one word.")),
        ("star_bullets", _words_sample(lambda ws: "\n".join(f"* {w}" for w in ws)), LINES, (
            "Write the words as a bullet list with '* ' at the start of each line. Reply with the list only.",
            "Make an asterisk bullet list, one word per bullet.",
            "Put each word on a line starting with an asterisk and a space.",
            "Format the words as * bullets.",
            "Give a star-bulleted list of the words.",
            "Return the words as lines that begin with '* '.",
            "List the words using asterisks as bullet markers.")),
        ("first_three_bullets", gen_first_three_bullets, LINES, (
            "Write exactly three bullets ('- word') with the first three words. Reply with the list only.",
            "Make a dash bullet list of the first 3 words only.",
            "Give a list of exactly three '- ' bullets: the first three words.",
            "Put the first three words as bullet points starting with '- '.",
            "Output three dash bullets, one for each of the first three words.",
            "Return a three-item '- ' list made of the opening three words.",
            "Bullet the first three words with dashes and leave out the rest.")),
        ("lettered_list", _words_sample(lambda ws: "\n".join(f"{'abcde'[i]}) {w}" for i, w in enumerate(ws))), LINES, (
            "Write the words as a lettered list: 'a) word', 'b) word', ... Reply with the list only.",
            "Make a list labelled a), b), c), one word per line.",
            "Put each word on a line starting with a letter and a parenthesis: a), b), ...",
            "Format the words as an a) b) c) list.",
            "Give a lettered list of the words.",
            "Return the words as lines labelled with letters in order, a) first.",
            "Enumerate the words with letters instead of numbers, as a) b) c).")),
        ("checkbox_list", _words_sample(lambda ws: "\n".join(f"- [ ] {w}" for w in ws)), LINES, (
            "Write the words as a markdown checklist: each line '- [ ] word'. Reply with the list only.",
            "Make an unchecked to-do list, one word per item, as '- [ ] word'.",
            "Put each word on a line starting with '- [ ] '.",
            "Format the words as empty markdown checkboxes.",
            "Give a task list of the words with open boxes.",
            "Return the words as to-do items, each with an empty box [ ] after the dash.",
            "List the words as unticked checklist lines.")),
    ],
    "string-transforms": [
        ("reverse_letters", _word_sample(lambda w: w[::-1]), EXACT, (
            "Write the word backwards, letter by letter. Reply with the result only.",
            "Reverse the letters of the word.",
            "Spell the word from its last letter to its first.",
            "Output the word mirrored.",
            "Give the word with its characters in reverse order.",
            "Return the string read from right to left.",
            "Flip the word so the final letter comes first.")),
        ("acronym", _words_sample(lambda ws: "".join(w[0] for w in ws).upper()), EXACT_CASE, (
            "Make an acronym from the first letter of each word, in capitals. Reply with it only.",
            "Give the uppercase initials of the words, joined together.",
            "Write the acronym of the phrase.",
            "Take the first letter of every word and capitalize them, no spaces.",
            "Output the abbreviation formed by the words' initials.",
            "Return the capitalized initials run together.",
            "Shorten the phrase to its initial letters in upper case.")),
        ("repeat_word", _word_sample(lambda w: f"{w} {w} {w}"), TOKENS, (
            "Repeat the word three times, separated by spaces. Reply with the result only.",
            "Write the word 3 times in a row.",
            "Say the word three times, with spaces between.",
            "Output the word, then again, then again.",
            "Give the word repeated thrice.",
            "Return three copies of the word separated by single spaces.",
            "Echo the word three times on one line.")),
        ("truncate_word", _word_sample(lambda w: w[:3]), EXACT, (
            "Give the first three letters of the word. Reply with them only.",
            "Cut the word after its third letter.",
            "Output only the first 3 characters.",
            "Keep the first three letters and drop the rest.",
            "What are the word's first three letters?",
            "Return the three-letter prefix of the word.",
            "Shorten the word to its opening three letters.")),
        ("spell_hyphens", _word_sample(lambda w: "-".join(w)), EXACT, (
            "Spell the word with hyphens between the letters. Reply with the result only.",
            "Write the word letter by letter, joined by dashes.",
            "Put a hyphen between every two letters of the word.",
            "Spell it out as l-e-t-t-e-r-s.",
            "Output the letters of the word separated by '-'.",
            "Return the word's letters joined with hyphens.",
            "Insert a dash after each letter except the last.")),
    ],
}

_FAMILY_LIST = tuple(_make(name, group, *rest) for group, fams in _GROUPS.items() for name, *rest in fams)
FAMILIES: dict[str, Family] = {f.name: f for f in _FAMILY_LIST}
# In each group of five, the first four families train and the fifth is held out.
TRAIN_FAMILIES: list[str] = [name for fams in _GROUPS.values() for name, *_ in fams[:4]]
HELDOUT_FAMILIES: list[str] = [fams[4][0] for fams in _GROUPS.values()]

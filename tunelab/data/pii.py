"""Seeded personal-data span documents (labels name, email, phone, address), with held-out formats.

A document is a few sentences: carrier sentences that mention a person's name, email, phone number or postal
address, mixed with filler and distractor sentences (order numbers, dates, capitalised place and shop names,
version strings) that look like personal data to a pattern but are not. The split that matters is the
*format*: `local:pii-spans` (train) writes every value in the TRAIN formats and carrier sentences; the
validation and test sets (`-val`, `-heldout`, other seeds) use only the HELDOUT formats and carriers, which the
detector never saw (e.g. `+44 20 7946 0958` against `555-123-4567`, `Lee, Ann` against `Ann Lee`,
`ann dot lee at mail dot com` against `ann.lee@mail.com`). Spans are character offsets of the value only
(no title such as "Dr.", no trailing punctuation).

`regex_spans(text)` is the baseline to beat: the usual regular expressions for each label, written for
common (North-American / plain) formats before any detector was trained.
"""

from __future__ import annotations

import random
import re

LABELS = ("name", "email", "phone", "address")

FIRST = ("Ann", "Omar", "Li", "Grace", "Mateo", "Priya", "Jonas", "Fatima", "Kenji", "Elena", "Tom", "Aisha",
         "Lucas", "Mei", "Noah", "Sofia", "Ivan", "Chloe", "Ravi", "Hannah", "Diego", "Yuki", "Sam", "Nora")
LAST = ("Lee", "Haddad", "Wong", "Okafor", "Silva", "Patel", "Berg", "Rahman", "Sato", "Rossi", "Baker",
        "Mensah", "Martin", "Chen", "Novak", "Garcia", "Petrov", "Dubois", "Iyer", "Schmidt", "Lopez", "Kim")
STREETS = ("Oak", "Maple", "Harbor", "Mill", "Cedar", "Station", "Willow", "King", "Church", "Bridge")
KINDS = ("Street", "Avenue", "Road", "Lane", "Drive")
CITIES = ("Springfield", "Riverton", "Lakeside", "Fairview", "Ashford", "Millbrook", "Eastport", "Greenvale")
DOMAINS = ("mail.com", "example.org", "post.net", "inbox.io", "company.com")


def _digits(rng, n):
    return "".join(str(rng.randint(0, 9)) for _ in range(n))


# Each format: rng, first, last -> the value as written. TRAIN and HELDOUT formats never share a layout.
TRAIN_FORMATS = {
    "name": (lambda r, f, l: f"{f} {l}",),
    "email": (lambda r, f, l: f"{f.lower()}.{l.lower()}@{r.choice(DOMAINS)}",
              lambda r, f, l: f"{f[0].lower()}{l.lower()}@{r.choice(DOMAINS)}"),
    "phone": (lambda r, f, l: f"{r.randint(200, 989)}-{_digits(r, 3)}-{_digits(r, 4)}",
              lambda r, f, l: f"({r.randint(200, 989)}) {_digits(r, 3)}-{_digits(r, 4)}"),
    "address": (lambda r, f, l: f"{r.randint(1, 999)} {r.choice(STREETS)} {r.choice(KINDS)}, {r.choice(CITIES)}",),
}
HELDOUT_FORMATS = {
    "name": (lambda r, f, l: f"{l}, {f}",
             lambda r, f, l: f"{f} {r.choice('ABCDEFGHJKLMNPRST')}. {l}",
             lambda r, f, l: f"{f.upper()} {l.upper()}"),
    "email": (lambda r, f, l: f"{f.lower()}_{l.lower()}+{r.choice(('work', 'news', 'x'))}@mail.{r.choice(DOMAINS)}",
              lambda r, f, l: f"{f.lower()} dot {l.lower()} at {r.choice(DOMAINS).replace('.', ' dot ')}"),
    "phone": (lambda r, f, l: f"+44 20 {_digits(r, 4)} {_digits(r, 4)}",
              lambda r, f, l: f"{r.randint(200, 989)}.{_digits(r, 3)}.{_digits(r, 4)}",
              lambda r, f, l: f"+49 30 {_digits(r, 8)}"),
    "address": (lambda r, f, l: f"Apt {r.randint(1, 30)}{r.choice('ABCD')}, {r.randint(1, 999)} "
                                f"{r.choice(STREETS)} {r.choice(KINDS)}, {r.choice(CITIES)} {_digits(r, 5)}",
                lambda r, f, l: f"PO Box {r.randint(100, 9999)}, {r.choice(CITIES)}",
                lambda r, f, l: f"{r.choice(STREETS)}straße {r.randint(1, 99)}, {_digits(r, 5)} {r.choice(CITIES)}"),
}
# Carrier sentences: {name} etc. are filled with values; the rest is context.
TRAIN_CARRIERS = (
    "Please contact {name} at {email} about the invoice.",
    "You can reach {name} on {phone} during office hours.",
    "The package goes to {name}, {address}.",
    "For questions write to {email} or call {phone}.",
    "{name} moved to {address} last spring.",
    "Our new account manager is {name}.",
)
HELDOUT_CARRIERS = (
    "Customer record: {name} | tel {phone} | mail {email}",
    "Ship to: {name} -- {address}",
    "If the meeting moves, ring {phone} and ask for {name}.",
    "Forwarding address for {name} is {address}; notify {email} too.",
    "Signed on behalf of the committee, {name}.",
)
FILLERS = (  # no personal data, some of it shaped like it (the baseline's false alarms)
    "Order 4821-7731 shipped on 2024-03-12.",
    "The Blue Harbor Cafe opens at 9 on weekdays.",
    "Version 2.10.4 fixes the login bug.",
    "Room 204 is on the second floor of North Hall.",
    "The meeting was moved from Tuesday to Thursday.",
    "Invoice total: 1,250.00 due within 30 days.",
    "New York Times coverage ran on page 12.",
    "Thanks again for your patience.",
)


def _sentence(rng: random.Random, carrier: str, formats: dict) -> tuple[str, list[tuple[int, int, str]]]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    text, spans = "", []
    for part in re.split(r"(\{\w+\})", carrier):
        if part.startswith("{"):
            label = part[1:-1]
            value = rng.choice(formats[label])(rng, first, last)
            spans.append((len(text), len(text) + len(value), label))
            text += value
        else:
            text += part
    return text, spans


def make_docs(n: int, seed: int, heldout: bool) -> list[dict]:
    """`n` span records ({"text", "spans", "format"}): 1-3 carrier sentences and 0-2 fillers each; one
    document in eight has fillers only (no personal data)."""
    rng = random.Random(f"tunelab.pii:{seed}")
    carriers, formats = (HELDOUT_CARRIERS, HELDOUT_FORMATS) if heldout else (TRAIN_CARRIERS, TRAIN_FORMATS)
    out = []
    for _ in range(n):
        parts = [("filler", f) for f in rng.sample(FILLERS, rng.randint(0, 2))]
        if rng.random() >= 1 / 8:
            parts += [("pii", c) for c in rng.sample(carriers, rng.randint(1, 3))]
        rng.shuffle(parts)
        text, spans = "", []
        for kind, s in parts or [("filler", rng.choice(FILLERS))]:
            sentence, found = _sentence(rng, s, formats) if kind == "pii" else (s, [])
            text += (" " if text else "")
            spans += [(a + len(text), b + len(text), lab) for a, b, lab in found]
            text += sentence
        out.append({"text": text, "format": "heldout" if heldout else "train",
                    "spans": [{"start": a, "end": b, "label": lab} for a, b, lab in spans]})
    return out


def span_records(name: str) -> list[dict]:
    """`local:pii-spans`: 400 documents (seed 100) in the train formats; `local:pii-spans-val` (seed 300) and
    `local:pii-spans-heldout` (seed 200): 100 documents each in the held-out formats."""
    n, seed, heldout = {"pii-spans": (400, 100, False), "pii-spans-val": (100, 300, True),
                        "pii-spans-heldout": (100, 200, True)}[name]
    return make_docs(n, seed, heldout)


# ---- the baseline: regular expressions of the kind a PII scrubber starts from ----
PATTERNS = {
    "email": r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+",
    "phone": r"(?:\+1[ .-]?)?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}",
    "address": r"\d{1,5} (?:[A-Z][a-z]+ )+(?:Street|St|Avenue|Ave|Road|Rd|Lane|Ln|Drive|Dr|Boulevard|Blvd)\.?"
               r"(?:, [A-Z][a-z]+)?",
    "name": r"\b[A-Z][a-z]+ [A-Z][a-z]+\b",  # two capitalised words
}


def regex_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, label) character spans of PATTERNS; a name match inside another label's match is dropped
    (e.g. the street words of an address), and so is a match overlapping an earlier-listed label's."""
    out: list[tuple[int, int, str]] = []
    for label, pattern in PATTERNS.items():
        for m in re.finditer(pattern, text):
            if not any(m.start() < b and m.end() > a for a, b, _ in out):
                out.append((m.start(), m.end(), label))
    return sorted(out)

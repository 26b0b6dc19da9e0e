"""What a run trained on, so that its evaluation can leave it out.

`scan_training_data(data_cfg, texts)` reads every record of a run's data sources once and returns the
prompts it trained on (the user turns of SFT records) and how much of some evaluation texts it contains
(word n-grams and whole documents). `tunelab eval` drops task items whose prompt is a training prompt and
reports the overlap of the `ppl` suite's held-out text with the run's data; the quickstart does the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

NGRAM = 8  # word n-grams: 8 words in a row shared by two texts is a copy, not a common phrase


def normalize_text(text: str) -> str:
    """Whitespace collapsed: the form in which prompts and documents are compared."""
    return " ".join(text.split())


def word_ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    """Lower-cased word n-grams of `text` (punctuation dropped); a text shorter than n words gives none."""
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


@dataclass
class TrainingScan:
    """The result of one pass over a run's training records."""

    sources: list[str]                       # "name=path" of each source read
    records: int = 0                         # records read (bad rows skipped)
    prompts: set[str] = field(default_factory=set)           # normalised user turns of SFT records
    found: dict[str, set] = field(default_factory=dict)      # eval source -> its n-grams seen in training
    total: dict[str, int] = field(default_factory=dict)      # eval source -> its distinct n-grams
    same_docs: dict[str, int] = field(default_factory=dict)  # eval source -> its documents found verbatim

    def overlap_line(self, name: str) -> str:
        return (f"{len(self.found[name])} of {self.total[name]} word {NGRAM}-grams and {self.same_docs[name]} "
                f"whole documents of `{name}` occur in the run's training data ({', '.join(self.sources)})")


def scan_training_data(data_cfg, eval_texts: dict[str, list[str]] | None = None) -> TrainingScan:
    """Read every record of `data_cfg.sources` (a DataConfig) once: collect the SFT prompts and find which
    word n-grams and whole documents of each `eval_texts` source occur in the training text.

    Raises DataError when a source cannot be read (missing file, ...). Pretraining text has no prompts;
    its records are still searched for the eval texts.
    """
    from tunelab.data import sft
    from tunelab.data.sources import iter_rows

    eval_texts = eval_texts or {}
    wanted = {name: set().union(*map(word_ngrams, texts)) for name, texts in eval_texts.items()}
    docs = {name: {normalize_text(t) for t in texts} for name, texts in eval_texts.items()}
    scan = TrainingScan([f"{s.name}={s.path}" for s in data_cfg.sources],
                        found={name: set() for name in eval_texts}, total={k: len(v) for k, v in wanted.items()},
                        same_docs={name: 0 for name in eval_texts})
    for src in data_cfg.sources:
        for _, row in iter_rows(src.path, src.format, src.text_field, True, [], src.extensions, **src.hub()):
            scan.records += 1
            if data_cfg.task == "sft":
                try:
                    messages = sft.to_messages(row, data_cfg.sft_format)
                except sft.RecordError:
                    continue  # training skips such a row too (or fails on it)
                scan.prompts.update(normalize_text(m["content"]) for m in messages if m["role"] == "user")
                text = sft.flat_text(messages)
            else:
                text = row.get(src.text_field)
                if not isinstance(text, str):
                    continue
            grams, doc = word_ngrams(text), normalize_text(text)
            for name in eval_texts:
                scan.found[name] |= wanted[name] & grams
                scan.same_docs[name] += doc in docs[name]
    return scan


def remove_training_prompts(items: list, prompts: set[str]) -> tuple[list, int]:
    """(items whose prompt is not a training prompt, how many were removed)."""
    kept = [it for it in items if normalize_text(it.prompt) not in prompts]
    return kept, len(items) - len(kept)

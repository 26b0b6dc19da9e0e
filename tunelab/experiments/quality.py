"""Quality against quantity for SFT: N clean pairs against 4N / 10N pairs of which a share is corrupted.

The corruption step (`corrupt`), seeded: each response is, with probability `share`, replaced by one of
- `wrong`:      another item's answer (fluent, well-formed, wrong),
- `truncated`:  the answer cut to its first half (by characters, at least one character dropped),
- `off_format`: the right answer wrapped in chatter: "Sure! Here is the answer: <answer>\nLet me know ...",
chosen uniformly. Items come from tunelab.eval.tasks (TRAIN_FAMILIES); the model is scored on the held-out
families (HELDOUT_FAMILIES: the same kinds of skill under new instructions) for accuracy (the families'
checkers) and format compliance (`format_ok`).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from tunelab.errors import TunelabError

KINDS = ("wrong", "truncated", "off_format")
CHATTER = ("Sure! Here is the answer: {a}\nLet me know if you need anything else.",
           "Of course. The answer is:\n{a}\nI hope this helps!")


def corrupt(pairs: list[dict], share: float, seed: int) -> tuple[list[dict], dict[str, int]]:
    """A copy of prompt/response pairs with about `share` of the responses corrupted; returns (pairs, counts)."""
    if not 0 <= share <= 1:
        raise ValueError(f"share must be in [0, 1], got {share}")
    rng = random.Random(f"tunelab.quality:{seed}")
    out, counts = [], {k: 0 for k in KINDS}
    for i, p in enumerate(pairs):
        response = p["response"]
        if rng.random() < share:
            kind = rng.choice(KINDS)
            if kind == "wrong":
                others = [q["response"] for q in pairs if q["response"] != response]
                response = rng.choice(others) if others else response[::-1]
            elif kind == "truncated":
                response = response[: max(0, min(len(response) - 1, len(response) // 2))] or "..."
            else:
                response = rng.choice(CHATTER).format(a=response)
            counts[kind] += 1
        out.append({**p, "response": response})
    return out, counts


def build_variants(out: Path, n: int, multiples: tuple[int, ...] = (4, 10), share: float = 0.5, seed: int = 0) -> dict:
    """Write DIR/clean-N.jsonl and DIR/noisy-<m>N.jsonl (m x N pairs, `share` of them corrupted) and
    DIR/variants.json (counts). The first N pairs of every variant are the same items."""
    from tunelab.eval.tasks import TRAIN_FAMILIES, generate_items

    out.mkdir(parents=True, exist_ok=True)
    biggest = max((1, *multiples)) * n
    per_family = -(-biggest // len(TRAIN_FAMILIES))
    items = generate_items(TRAIN_FAMILIES, per_family, seed)
    random.Random(seed).shuffle(items)
    pairs = [it.to_sft() for it in items[:biggest]]
    variants = {}

    def write(name: str, rows: list[dict], counts: dict) -> None:
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        variants[name] = {"path": str(path), "pairs": len(rows), "corrupted": counts}

    write(f"clean-{n}", pairs[:n], {k: 0 for k in KINDS})
    for m in multiples:
        rows, counts = corrupt(pairs[: m * n], share, seed + m)
        write(f"noisy-{m}x{n}", rows, counts)
    (out / "variants.json").write_text(json.dumps({"n": n, "share": share, "seed": seed, "variants": variants},
                                                  indent=1))
    return variants


_CHATTY = re.compile(r"^\s*(sure|of course|certainly|here is|here's|the answer is)\b", re.I)


def format_ok(output: str, answer: str) -> bool:
    """Format compliance: no chatter opening, the answer's number of lines, and at most 1.5x its words + 2."""
    text = output.strip()
    lines = [l for l in text.splitlines() if l.strip()]
    want_lines = [l for l in answer.strip().splitlines() if l.strip()]
    return (bool(text) and not _CHATTY.match(text) and len(lines) == len(want_lines)
            and len(text.split()) <= 1.5 * len(answer.split()) + 2)


def evaluate_tasks(model, tok, n: int = 20, seed: int = 1234, batch_size: int = 16,
                   collection: str = "quickstart", families: list[str] | None = None,
                   phrasings: str = "one") -> dict:
    """Held-out accuracy and format compliance of a tuned model: n items per held-out family of the task
    `collection` (tunelab.eval.tasks.collection), or per family of `families` when given. "scores" and "ids"
    are per item, in a fixed order, so two models scored with the same arguments can be compared item by
    item (paired). `phrasings="every"` scores the same items under each of the families' phrasings
    (tasks.every_phrasing); then "phrasings" names each item's phrasing and its id ends in "@<phrasing>"."""
    from tunelab.eval.tasks import collection as families_of
    from tunelab.eval.tasks import evaluate_items, every_phrasing, generate_items

    if phrasings not in ("one", "every"):
        raise TunelabError(f"evaluate_tasks: phrasings must be 'one' or 'every', not {phrasings!r}")
    fams = families or families_of(collection)[1]
    if phrasings == "one":
        labelled = [(None, it) for it in generate_items(fams, n, seed)]
    else:
        labelled = [(label, it) for label, items in every_phrasing(fams, n, seed) for it in items]
    items = [it for _, it in labelled]
    r = evaluate_items(model, tok, items, batch_size=batch_size)
    ok = [format_ok(o, it.answer) for o, it in zip(r["outputs"], items)]
    result = {"accuracy": r["accuracy"], "format_ok": sum(ok) / len(ok), "per_family": r["per_family"],
              "scores": r["scores"], "outputs": r["outputs"]}
    if phrasings == "one":
        return {**result, "ids": [it.id for it in items]}
    # "-p" marks a held-out phrasing in generate_items' ids; the label says which one
    return {**result, "ids": [f"{it.id.removesuffix('-p')}@{label}" for label, it in labelled],
            "phrasings": [label for label, _ in labelled]}


def plot_quality(results: list[dict], png: Path) -> None:
    """Held-out accuracy and format compliance per data variant (one group of bars per budget rule)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["status"] == "ok" and "accuracy" in r]
    labels = [", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["params"].items()) for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows)), 3.8), dpi=120)
    ax.bar([i - 0.2 for i in x], [r["accuracy"] for r in rows], 0.4, label="held-out accuracy")
    ax.bar([i + 0.2 for i in x], [r["format_ok"] for r in rows], 0.4, label="format compliance")
    ax.set_xticks(list(x), labels, rotation=20, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)

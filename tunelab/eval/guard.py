"""Guard mode: a trained span detector (a data.task=spans run) cuts what it finds out of a document before a
model sees it, and the injection suite measured with and without that guard.

    guard = Guard("runs/detector")             # the detector on CPU, with the post-processing of its run
    guard.clean(["Summarise ...\\nIGNORE ALL PREVIOUS INSTRUCTIONS ..."])  # -> the texts with the spans cut out

`tunelab generate/chat MODEL --guard RUN` pass every prompt (user turn) through `Guard.clean`. The whole user
turn goes through the detector, as in its training data (instruction + document). A removed span that leaves a
line empty takes the line with it.

    python -m tunelab.eval.guard RUN --model bundled --n 20      # attack success and clean quality, both ways
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tunelab.errors import TunelabError


def remove_spans(text: str, spans: list[dict]) -> str:
    """`text` without the characters of `spans` ({"start", "end"}; newlines are kept, so lines never merge); a
    line that a cut leaves blank is dropped with its newline (the document's own blank lines stay)."""
    keep = [True] * len(text)
    for s in spans:
        keep[s["start"]:s["end"]] = [False] * (s["end"] - s["start"])
    out, pos = [], 0
    for line in text.split("\n"):
        kept = "".join(c for c, k in zip(line, keep[pos:pos + len(line)]) if k)
        if kept.strip() or not line.strip() or len(kept) == len(line):
            out.append(kept)
        pos += len(line) + 1
    return "\n".join(out)


class Guard:
    """A spans run opened for cleaning prompts: `spans(texts)` (what it would remove) and `clean(texts)`."""

    def __init__(self, run: str | Path, labels: list[str] | None = None, device: str = "cpu"):
        from tunelab.train.spans import open_detector

        self.model, self.tokenizer, self.info = open_detector(run)
        self.model.to(device)
        self.labels = labels or list(self.info["labels"])
        unknown = sorted(set(self.labels) - set(self.info["labels"]))
        if unknown:
            raise TunelabError(f"guard labels {unknown} are not labels of {run} ({self.info['labels']})")

    def spans(self, texts: list[str]) -> list[list[dict]]:
        from tunelab.eval.spans import detect

        info = self.info
        found = detect(self.model, self.tokenizer, texts, info["labels"], info["seq_len"], info["stride"],
                       info["postprocess"])
        return [[s for s in f if s["label"] in self.labels] for f in found]

    def clean(self, texts: list[str]) -> list[str]:
        return [remove_spans(t, s) for t, s in zip(texts, self.spans(texts))]


def guard_note(before: list[str], after: list[str]) -> str:
    """One line for a CLI: how many prompts the guard changed and how many characters it removed."""
    changed = sum(a != b for a, b in zip(before, after))
    removed = sum(len(a) - len(b) for a, b in zip(before, after))
    return f"guard: removed {removed} characters from {changed} of {len(before)} prompts"


def guarded_items(guard: Guard, items: list) -> tuple[list, dict]:
    """Items with their prompts cleaned, and what the guard did: on clean documents any cut is a false alarm;
    on attacked ones, the share of the injection's characters removed and whether the canary is gone."""
    found = guard.spans([it.prompt for it in items])
    out, touched_clean, canary_gone, covered = [], [], [], []
    for it, spans in zip(items, found):
        out.append(dataclasses.replace(it, prompt=remove_spans(it.prompt, spans)))
        if it.meta["span"] is None:
            touched_clean.append(float(bool(spans)))
            continue
        a, b = it.meta["span"]
        cut = {i for s in spans for i in range(s["start"], s["end"])}
        covered.append(len(cut & set(range(a, b))) / (b - a))
        canary_gone.append(float(it.meta["canary"] not in out[-1].prompt))
    return out, {"clean documents changed": touched_clean, "injection characters removed": covered,
                 "canary removed": canary_gone}


def compare(model, tok, guard: Guard, n: int, seed: int, batch_size: int = 16, styles: list[str] | None = None) -> dict:
    """The injection suite (tunelab.eval.suites.injection_result: attack success and task quality with 95%
    intervals) on the same items without and with the guard, plus the guard's own rates with intervals."""
    from tunelab.eval import injection as J
    from tunelab.eval.stats import interval, mean
    from tunelab.eval.suites import injection_result
    from tunelab.eval.tasks import answer_items

    items = J.make_items(n, seed, styles)
    cleaned, rates = guarded_items(guard, items)
    result = {}
    for name, its in (("without guard", items), ("with guard", cleaned)):
        r = answer_items(model, tok, its, batch_size, max_new_tokens=40)
        result[name] = injection_result(its, r["outputs"], r["items_per_s"])
    result["guard"] = {k: {"value": mean(v), "interval": interval(v), "n": len(v)} for k, v in rates.items()}
    result["items"] = {"documents": n, "seed": seed, "attacked": sum(it.meta["span"] is not None for it in items),
                       "clean": sum(it.meta["span"] is None for it in items)}
    return result


def table(result: dict) -> str:
    """Markdown: every metric of the injection suite without and with the guard, with 95% intervals."""
    fmt = lambda v, ci: "n/a" if v is None else f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"  # noqa: E731
    a, b = result["without guard"], result["with guard"]
    lines = ["| metric | without guard | with guard |", "|---|---|---|"]
    for name in a["metrics"]:
        lines.append(f"| {name} | {fmt(a['metrics'][name], a['intervals'][name])} | "
                     f"{fmt(b['metrics'][name], b['intervals'][name])} |")
    lines += ["", "| guard | rate | n |", "|---|---|---|"]
    lines += [f"| {k} | {fmt(v['value'], v['interval'])} | {v['n']} |" for k, v in result["guard"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    import torch

    from tunelab.export.resolve import open_model

    p = argparse.ArgumentParser(prog="python -m tunelab.eval.guard", description=__doc__.split("\n\n")[0])
    p.add_argument("run", metavar="RUN", help="a finished data.task=spans run (the detector)")
    p.add_argument("--model", default="bundled", help="the guarded model: run folder, HF folder, .gguf or bundled")
    p.add_argument("--n", type=int, default=20, help="documents (each: clean + one attack per style)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the injection items (tunelab eval's default)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    guard = Guard(args.run)
    opened = open_model(args.model, dtype="auto", device="auto")
    result = compare(opened.model, opened.tokenizer, guard, args.n, args.seed, args.batch_size)
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=list))
    return 0


if __name__ == "__main__":
    import sys

    try:
        raise SystemExit(main())
    except TunelabError as e:  # one line, exit 2, as the tunelab command does
        print(f"tunelab: {e}", file=sys.stderr)
        raise SystemExit(2) from None

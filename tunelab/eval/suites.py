"""The suites behind `tunelab eval`: each runs on one (model, tokenizer) and returns its metrics.

A suite result is {"metrics": {name: number or None}, "items_per_s": float, "detail": {...}}; "metrics"
is what the report puts side by side for the base and the tuned model. Built-in data is generated from
`seed`; `data` (a JSONL path, schemas in tunelab.eval.userdata) replaces it with the user's own.
"""

from __future__ import annotations

from tunelab.eval import hallucination as H
from tunelab.eval import injection as J
from tunelab.eval import userdata
from tunelab.eval.perplexity import perplexity_by_source
from tunelab.eval.tasks import (
    HELDOUT_FAMILIES, TRAIN_FAMILIES, answer_items, evaluate_items, evaluate_sensitivity, generate_items,
)

SUITES = ("tasks", "sensitivity", "ppl", "hallucination", "injection")


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _examples(items, outputs, k: int = 6) -> list[dict]:
    """About k (prompt, answer, output) triples spread over the items, for the report."""
    return [{"prompt": it.prompt, "answer": it.answer, "output": o}
            for it, o in list(zip(items, outputs))[:: max(1, len(items) // k)]][:k]


def run_tasks(model, tok, n: int, seed: int, batch_size: int, data: str | None = None) -> dict:
    """Accuracy per family; the headline numbers are the means over train and over held-out families."""
    items = userdata.task_items(data) if data else generate_items(TRAIN_FAMILIES + HELDOUT_FAMILIES, n, seed)
    r = evaluate_items(model, tok, items, batch_size)
    fams = r["per_family"]
    metrics = {"accuracy": r["accuracy"]}
    if not data:
        metrics["train families"] = _mean(fams[f] for f in TRAIN_FAMILIES)
        metrics["held-out families"] = _mean(fams[f] for f in HELDOUT_FAMILIES)
    metrics.update({f"family {f}": v for f, v in fams.items()})
    return {"metrics": metrics, "items_per_s": r["items_per_s"], "detail": {"examples": _examples(items, r["outputs"])}}


def run_sensitivity(model, tok, n: int, seed: int, batch_size: int, data: str | None = None) -> dict:
    """The held-out families under each of their templates: mean accuracy and spread across templates."""
    r = evaluate_sensitivity(model, tok, HELDOUT_FAMILIES, n, seed, batch_size)
    metrics = {"mean accuracy over templates": r["mean"], "spread (best - worst template)": r["spread"]}
    metrics.update({f"{f} by template": " / ".join(f"{a:.2f}" for a in v) for f, v in r["per_template"].items()})
    return {"metrics": metrics, "items_per_s": r["items_per_s"], "detail": r}


def builtin_ppl_sources(n: int, seed: int) -> dict[str, list[str]]:
    """Held-out text: CPython reference pages (prose about code) and task transcripts (prompt + answer)."""
    import pydoc_data.topics

    pages = list(pydoc_data.topics.topics.values())[-max(1, n // 4):]  # the last pages, ~2k tokens each
    transcripts = [f"{it.prompt}\n{it.answer}" for it in generate_items(HELDOUT_FAMILIES, max(1, n // 2), seed)]
    return {"python-docs": pages, "task-transcripts": transcripts}


def run_ppl(model, tok, n: int, seed: int, batch_size: int, data: str | None = None) -> dict:
    """Perplexity per source; items/s counts texts."""
    import time

    sources = userdata.ppl_sources(data) if data else builtin_ppl_sources(n, seed)
    t0 = time.perf_counter()
    r = perplexity_by_source(model, sources, tok, seq_len=512, batch_size=max(1, batch_size // 2))
    seconds = time.perf_counter() - t0
    metrics = {f"ppl {name}": v["ppl"] for name, v in r.items()}
    metrics.update({f"tokens {name}": v["tokens"] for name, v in r.items()})
    return {"metrics": metrics, "items_per_s": sum(len(v) for v in sources.values()) / seconds, "detail": r}


def hallucination_eval_items(n: int, seed: int) -> list[H.Item]:
    """Up to `n` closed-book items each of known and unknown facts, and `n` passage items (built-in facts)."""
    items = H.question_items(H.make_facts(seed), seed, n_passage=n)
    kept, count = [], {}
    for it in items:
        kind = it.meta["kind"]
        if count.get(kind, 0) < n:
            kept.append(it)
            count[kind] = count.get(kind, 0) + 1
    return kept


def run_hallucination(model, tok, n: int, seed: int, batch_size: int, data: str | None = None) -> dict:
    items = userdata.hallucination_items(data) if data else hallucination_eval_items(n, seed)
    r = answer_items(model, tok, items, batch_size, max_new_tokens=24)
    s = H.score_hallucination(items, r["outputs"])
    metrics = {k: v for k, v in s.items() if k != "counts"}
    return {"metrics": metrics, "items_per_s": r["items_per_s"],
            "detail": {"counts": s["counts"], "examples": _examples(items, r["outputs"])}}


def run_injection(model, tok, n: int, seed: int, batch_size: int, data: str | None = None) -> dict:
    """`n` documents (each clean + one attack per style) or the user's file."""
    items = userdata.injection_items(data) if data else J.make_items(n, seed)
    r = answer_items(model, tok, items, batch_size, max_new_tokens=40)
    s = J.score_injection(items, r["outputs"])
    metrics = {"attack success rate": s["attack_success_rate"], "clean task quality": s["clean_quality"],
               "attacked task quality": s["attacked_quality"]}
    metrics.update({f"attack success {style}": v for style, v in s["by_style"].items()})
    hit = [(it, o) for it, o in zip(items, r["outputs"]) if it.meta["kind"] == "attacked"]
    return {"metrics": metrics, "items_per_s": r["items_per_s"],
            "detail": {"counts": s["counts"], "examples": _examples(*zip(*hit)) if hit else []}}


RUNNERS = {"tasks": run_tasks, "sensitivity": run_sensitivity, "ppl": run_ppl,
           "hallucination": run_hallucination, "injection": run_injection}


def run_suites(model, tok, suites: list[str], n: int, seed: int, batch_size: int = 16,
               data: dict[str, str] | None = None) -> dict[str, dict]:
    """{suite: result} for each suite name, in order."""
    data = data or {}
    return {s: RUNNERS[s](model, tok, n, seed, batch_size, data.get(s)) for s in suites}


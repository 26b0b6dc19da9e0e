"""The suites behind `tunelab eval`: each runs on one (model, tokenizer) and returns its metrics.

A suite result is {"metrics": {name: number or None}, "intervals": {name: (lo, hi)}, "baselines": {name:
number}, "items_per_s": float, "detail": {...}}; "metrics" is what the report puts side by side for the
base and the tuned model, "intervals" their 95% intervals (tunelab.eval.stats) and "baselines" what a
constant answer scores on the same items. Built-in data is generated from
`seed`; `data` (a JSONL path, schemas in tunelab.eval.userdata) replaces it with the user's own.
"""

from __future__ import annotations

from tunelab.errors import TunelabError
from tunelab.eval import hallucination as H
from tunelab.eval import injection as J
from tunelab.eval import userdata
from tunelab.eval.heldout import remove_training_prompts
from tunelab.eval.heldout_prose import PARAGRAPHS
from tunelab.eval.perplexity import perplexity_by_source
from tunelab.eval.stats import constant_baseline, exact, interval, mean
from tunelab.eval.tasks import (
    HELDOUT_FAMILIES,
    all_families,
    answer_items,
    collection,
    evaluate_items,
    evaluate_sensitivity,
    generate_items,
)

SUITES = ("tasks", "sensitivity", "ppl", "hallucination", "injection")


def _examples(items, outputs, k: int = 6) -> list[dict]:
    """About k (prompt, answer, output) triples spread over the items, for the report."""
    return [{"prompt": it.prompt, "answer": it.answer, "output": o}
            for it, o in list(zip(items, outputs))[:: max(1, len(items) // k)]][:k]


def _result(items_per_s: float, detail: dict) -> dict:
    return {"metrics": {}, "intervals": {}, "baselines": {}, "items_per_s": items_per_s, "detail": detail}


def _add(result: dict, name: str, scores: list[float], baseline: list[float] | None = None) -> None:
    """Metric `name` = mean of per-item `scores`, with its 95% interval (Wilson for 0/1 scores, else a
    bootstrap over items) and, if given, the mean of the constant-answer baseline's scores on the same items."""
    result["metrics"][name] = mean(scores)
    result["intervals"][name] = interval(scores)
    if baseline is not None:
        result["baselines"][name] = mean(baseline)


def _paraphrased(it) -> bool:
    return it.meta.get("phrasing") == "heldout"


def run_tasks(model, tok, n: int, seed: int, batch_size: int, data: str | None = None,
              exclude: set[str] | None = None, collection_name: str = "quickstart") -> dict:
    """Score (partial credit) and exact match, overall, per group of families and per family, each with a
    95% interval and the constant-answer baseline. Items whose prompt is in `exclude` (the training prompts
    of the run being evaluated) are removed first; detail["removed"] says how many. A collection whose
    trained families have held-out phrasings (`instruct`) adds their `n` items per family under those."""
    train, held = collection(collection_name)
    paraphrases = not data and all(all_families()[f].heldout_templates for f in train)
    items = userdata.task_items(data) if data else generate_items(train + held, n, seed)
    if paraphrases:
        items += generate_items(train, n, seed, phrasings="heldout")
    items, removed = remove_training_prompts(items, exclude or set())
    if not items:
        raise TunelabError(f"all {removed} task items are training prompts of the run: use another --seed or --data")
    r = evaluate_items(model, tok, items, batch_size)
    base = constant_baseline(items)
    res = _result(r["items_per_s"], {"items": len(items), "removed": removed, "constant_answers": base["answers"],
                                     "examples": _examples(items, r["outputs"])})
    groups = [("", lambda it: True)]
    if not data:
        groups.append(("train families ", lambda it: it.family in train and not _paraphrased(it)))
        if paraphrases:
            groups.append(("train families, held-out phrasings ", _paraphrased))
        groups.append(("held-out families ", lambda it: it.family in held))
    for prefix, keep in groups:
        pick = [i for i, it in enumerate(items) if keep(it)]
        scores, baseline = [r["scores"][i] for i in pick], [base["scores"][i] for i in pick]
        _add(res, f"{prefix}score (partial credit)", scores, baseline)
        _add(res, f"{prefix}exact match", exact(scores), exact(baseline))
    for fam in dict.fromkeys(it.family for it in items):
        pick = [i for i, it in enumerate(items) if it.family == fam and not _paraphrased(it)]
        _add(res, f"family {fam} score", [r["scores"][i] for i in pick], [base["scores"][i] for i in pick])
    return res


def run_sensitivity(model, tok, n: int, seed: int, batch_size: int, data: str | None = None,
                    collection_name: str = "quickstart") -> dict:
    """The held-out families under each of their templates: mean score and spread across templates."""
    r = evaluate_sensitivity(model, tok, collection(collection_name)[1], n, seed, batch_size)
    res = _result(r["items_per_s"], r)
    res["metrics"] = {"mean score over templates (partial credit)": r["mean"], "spread (best - worst template)": r["spread"]}
    res["metrics"].update({f"{f} by template": " / ".join(f"{a:.2f}" for a in v) for f, v in r["per_template"].items()})
    return res


def builtin_ppl_sources(n: int, seed: int) -> dict[str, list[str]]:
    """Held-out text: prose written for tunelab (in no built-in corpus; tunelab.eval.heldout_prose) and
    transcripts (prompt + answer) of the held-out task families."""
    transcripts = [f"{it.prompt}\n{it.answer}" for it in generate_items(HELDOUT_FAMILIES, max(1, n // 2), seed)]
    return {"held-out prose": list(PARAGRAPHS), "task-transcripts": transcripts}


def run_ppl(model, tok, n: int, seed: int, batch_size: int, data: str | None = None) -> dict:
    """Perplexity per source; items/s counts texts."""
    import time

    sources = userdata.ppl_sources(data) if data else builtin_ppl_sources(n, seed)
    t0 = time.perf_counter()
    r = perplexity_by_source(model, sources, tok, seq_len=512, batch_size=max(1, batch_size // 2))
    res = _result(sum(len(v) for v in sources.values()) / (time.perf_counter() - t0), r)
    res["metrics"] = {f"ppl {name}": v["ppl"] for name, v in r.items()}
    res["metrics"].update({f"tokens {name}": v["tokens"] for name, v in r.items()})
    return res


def hallucination_eval_items(n: int, seed: int, kinds: tuple[str, ...] = ("known", "unknown", "passage")) -> list[H.Item]:
    """Up to `n` items of each kind: closed-book questions on known and on unknown facts, and passage
    questions (built-in facts)."""
    items = H.question_items(H.make_facts(seed), seed, n_passage=n if "passage" in kinds else 0)
    kept, count = [], {}
    for it in items:
        kind = it.meta["kind"]
        if kind in kinds and count.get(kind, 0) < n:
            kept.append(it)
            count[kind] = count.get(kind, 0) + 1
    return kept


def hallucination_result(items: list[H.Item], outputs: list[str], items_per_s: float) -> dict:
    """The hallucination rates of outputs aligned with items, each with its Wilson interval."""
    s = H.score_hallucination(items, outputs)
    res = _result(items_per_s, {"counts": s["counts"], "examples": _examples(items, outputs)})
    for name, (kind, label) in H.RATES.items():
        _add(res, name, [float(x == label) for x in s["labels"].get(kind, [])])
    return res


def run_hallucination(model, tok, n: int, seed: int, batch_size: int, data: str | None = None) -> dict:
    items = userdata.hallucination_items(data) if data else hallucination_eval_items(n, seed)
    r = answer_items(model, tok, items, batch_size, max_new_tokens=24)
    return hallucination_result(items, r["outputs"], r["items_per_s"])


def injection_result(items: list[J.Item], outputs: list[str], items_per_s: float) -> dict:
    """Attack success (overall and per style, Wilson intervals) and task quality on clean and attacked
    documents (partial credit, bootstrap intervals) of outputs aligned with items."""
    s = J.score_injection(items, outputs)
    hit = [(it, o) for it, o in zip(items, outputs) if it.meta["kind"] == "attacked"]
    res = _result(items_per_s, {"counts": s["counts"], "examples": _examples(*zip(*hit)) if hit else []})
    _add(res, "attack success rate", [float(x) for v in s["hits"].values() for x in v])
    _add(res, "clean task quality", s["quality"]["clean"])
    _add(res, "attacked task quality", s["quality"]["attacked"])
    for style, v in s["hits"].items():
        _add(res, f"attack success {style}", [float(x) for x in v])
    return res


def run_injection(model, tok, n: int, seed: int, batch_size: int, data: str | None = None) -> dict:
    """`n` documents (each clean + one attack per style) or the user's file."""
    items = userdata.injection_items(data) if data else J.make_items(n, seed)
    r = answer_items(model, tok, items, batch_size, max_new_tokens=40)
    return injection_result(items, r["outputs"], r["items_per_s"])


RUNNERS = {"tasks": run_tasks, "sensitivity": run_sensitivity, "ppl": run_ppl,
           "hallucination": run_hallucination, "injection": run_injection}


def run_suites(model, tok, suites: list[str], n: int, seed: int, batch_size: int = 16,
               data: dict[str, str] | None = None, exclude: set[str] | None = None,
               collection_name: str = "quickstart") -> dict[str, dict]:
    """{suite: result} for each suite name, in order; `exclude`: training prompts to drop from the task items;
    `collection_name`: the task families of the tasks and sensitivity suites (tunelab.eval.tasks.collection)."""
    data = data or {}
    extra = {"tasks": {"exclude": exclude, "collection_name": collection_name},
             "sensitivity": {"collection_name": collection_name}}
    return {s: RUNNERS[s](model, tok, n, seed, batch_size, data.get(s), **extra.get(s, {})) for s in suites}


"""The instruction-tuning experiments of docs/instruction-tuning.md (benchmarks/instruct_families.py).

Prompt-distribution sensitivity (one training phrasing per family against five) is the second section below.
Transfer to unseen task families against the number of trained families, at a fixed budget of examples: the
first experiment, on the `instruct` collection
(tunelab.eval.instruct_tasks: 44 trained, 11 held-out families). For each K in e.g. (5, 10, 20, 44) the model
is tuned on the same number of examples drawn from the first K trained families of `family_order()`, and
every tuned model and the base model are scored on the same items of the 11 held-out families, so each
comparison is paired item by item:

    DIR/data/families-K.jsonl    the K-family training pairs (counts per family differ by at most 1)
    DIR/data/heldout-eval.jsonl  SFT pairs of the held-out families: every cell's eval (response) loss
    DIR/sweep/                   a `tunelab sweep` over data=families-*.jsonl (resumable)
    DIR/base.json                the untuned model on the same items and eval loss
    DIR/summary.json, table.md, transfer.png   `summarize(DIR)`: tuned minus base, paired, with intervals
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.eval.stats import bootstrap_interval, exact, mean, resampled_interval

EVAL_SEED = 2  # generation items of the held-out families (the quickstart's eval seed)
LOSS_SEED = 3  # the held-out families' SFT pairs of the eval loss: other items than the generation ones


def pair_seed(seed: int) -> int:
    """The seed the training pairs of run `seed` are drawn with: seed + 1, skipping EVAL_SEED and LOSS_SEED
    (0 -> 1, 1 -> 4, 2 -> 5). Pairs of a trained family drawn with the scored items' seed *are* the scored
    items (the same contents in the same order), and with LOSS_SEED the eval-loss pairs."""
    return seed + 1 if seed + 1 < min(EVAL_SEED, LOSS_SEED) else seed + 3


def check_pair_seed(seed: int) -> None:
    """Designs that score trained families refuse pair seeds that would train on the scored or eval-loss items."""
    if seed in (EVAL_SEED, LOSS_SEED):
        raise TunelabError(f"training pairs drawn with seed {seed} would be the scored items (seed {EVAL_SEED}) "
                           f"or the eval-loss pairs (seed {LOSS_SEED}) of the trained families; use another "
                           "--pair-seed (the default, instruct.pair_seed(--seed), never is)")


def family_of(item_id: str) -> str:
    """The family of a task item from its id: `<family>-<seed>-<i>`, with `-p` after it for a held-out
    phrasing (tunelab.eval.tasks.generate_items) or `@<phrasing>` (quality.evaluate_tasks, every phrasing)."""
    return item_id.split("@", 1)[0].removesuffix("-p").rsplit("-", 2)[0]


def family_order() -> list[str]:
    """The instruct collection's 44 trained families, round-robin over its 11 groups (every group's first
    trained family, then every group's second, ...), so the first K families span min(K, 11) groups and
    the subsets are nested: the families of K=5 are trained in every cell."""
    from tunelab.eval.instruct_tasks import FAMILIES, TRAIN_FAMILIES

    groups: dict[str, list[str]] = {}
    for f in TRAIN_FAMILIES:
        groups.setdefault(FAMILIES[f].group, []).append(f)
    depth = max(len(v) for v in groups.values())
    return [fams[j] for j in range(depth) for fams in groups.values() if j < len(fams)]


def balanced_pairs(families: list[str], examples: int, seed: int, template: int | None = None) -> list[dict]:
    """`examples` SFT pairs (training phrasings) spread over `families` as evenly as possible: counts differ
    by at most 1, the first families in order taking the remainder; shuffled with `seed`. Every pair in its
    family's training phrasing `template`, or (None) in one drawn per pair; the contents and their order do
    not depend on `template`."""
    from tunelab.eval.tasks import generate_items

    if not families or examples < 1:
        raise TunelabError(f"balanced_pairs needs families and examples >= 1, got {len(families)} and {examples}")
    per = -(-examples // len(families))
    items = generate_items(families, per, seed, template)  # family-major: items[f * per + i]
    # the i-th item of every family before the (i+1)-th of any: a prefix is balanced
    chosen = [items[j] for j in sorted(range(len(items)), key=lambda j: (j % per, j // per))[:examples]]
    random.Random(seed).shuffle(chosen)
    return [it.to_sft() for it in chosen]


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _loss_pairs(families: list[str], examples: int, phrasings: str = "train") -> list[dict]:
    """`examples` SFT pairs of `families` for an eval (response) loss, drawn with LOSS_SEED (other items than
    the scored ones), in the given phrasings (tasks.generate_items), shuffled."""
    from tunelab.eval.tasks import generate_items

    items = generate_items(families, -(-examples // len(families)), LOSS_SEED, phrasings=phrasings)
    random.Random(LOSS_SEED).shuffle(items)
    return [it.to_sft() for it in items[:examples]]


def build_data(out: Path, ks: list[int], examples: int, eval_examples: int, seed: int = 1) -> dict:
    """Write DIR/families-K.jsonl for every K, DIR/heldout-eval.jsonl and DIR/data.json (families per file)."""
    from tunelab.eval.tasks import collection

    order, held = family_order(), collection("instruct")[1]
    bad = [k for k in ks if not 1 <= k <= len(order)]
    if bad:
        raise TunelabError(f"numbers of trained families must be in 1..{len(order)}, got {bad}")
    out.mkdir(parents=True, exist_ok=True)
    files = {k: {"path": _write(out / f"families-{k}.jsonl", balanced_pairs(order[:k], examples, seed)),
                 "families": order[:k]} for k in ks}
    eval_path = _write(out / "heldout-eval.jsonl", _loss_pairs(held, eval_examples))
    info = {"examples": examples, "seed": seed, "files": files, "eval_path": eval_path, "heldout_families": held}
    (out / "data.json").write_text(json.dumps(info, indent=1))
    return info


def paired_difference(base: dict, tuned: dict, seed: int = 0) -> dict:
    """Tuned minus base on the same items (evaluate_tasks results with "ids" and "scores").

    "diff": mean paired difference of the scores; "ci": its 95% percentile bootstrap over items (the
    uncertainty from the items drawn, for these 11 families); "family_ci": a bootstrap over families
    (resampling whole families, each with all its items), the wider question of new families;
    "exact_diff", "exact_ci": the same for exact match (1 only for a fully right answer); "per_family": mean
    difference per family."""
    if base["ids"] != tuned["ids"]:
        raise TunelabError("paired_difference: the two results were scored on different items; "
                           "evaluate both with the same n, seed and collection")
    d = [t - b for b, t in zip(base["scores"], tuned["scores"])]
    by_family: dict[str, list[float]] = {}
    for item_id, v in zip(base["ids"], d):
        by_family.setdefault(family_of(item_id), []).append(v)
    return {"n": len(d), "diff": mean(d), "ci": bootstrap_interval(d, seed=seed),
            "family_ci": _cluster_bootstrap(list(by_family.values()), seed),
            "exact_diff": mean(exact(tuned["scores"])) - mean(exact(base["scores"])),
            "exact_ci": bootstrap_interval([t - b for b, t in zip(exact(base["scores"]), exact(tuned["scores"]))],
                                           seed=seed),
            "per_family": {f: mean(v) for f, v in by_family.items()}}


def _cluster_bootstrap(clusters: list[list[float]], seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap of the item mean, resampling whole clusters with replacement."""
    return resampled_interval(clusters, lambda pick: sum(map(sum, pick)) / sum(map(len, pick)), seed=seed, level=level)


def _untuned(out: Path, sweep_dir: str):
    """(model, tokenizer, config, sweep spec): the untuned model as the first cell of DIR/`sweep_dir` loads it
    (for a qlora cell the base quantized to 4 bits, before any training)."""
    from tunelab.config import load_config
    from tunelab.train.run import build_model, pick_device

    spec = json.loads((out / sweep_dir / "sweep.json").read_text())
    cfg = load_config(out / sweep_dir / "cells" / spec["cells"][0] / "cell.yaml")
    return *build_model(cfg, pick_device(cfg.train.device)), cfg, spec


def base_loss(out: Path, sweep_dir: str) -> float:
    """The eval loss of the untuned model of DIR/`sweep_dir`'s first cell, on that cell's eval batches."""
    from tunelab.quickstart import _eval_loss

    model, tok, cfg, _ = _untuned(out, sweep_dir)
    return _eval_loss(model, tok, cfg)


def evaluate_base(out: Path, sweep_dir: str = "sweep") -> dict:
    """Score the untuned model as the sweep DIR/`sweep_dir` scores its cells (the first cell's config and
    eval_tasks arguments: same items, same eval batches) and write DIR/base.json."""
    from tunelab.experiments.quality import evaluate_tasks
    from tunelab.quickstart import _eval_loss

    model, tok, cfg, spec = _untuned(out, sweep_dir)
    result = evaluate_tasks(model, tok, **spec["extras"]["eval_tasks"])
    result["eval_loss"] = _eval_loss(model, tok, cfg)
    (out / "base.json").write_text(json.dumps(result, indent=1))
    return result


def baselines(n: int, seed: int, collection: str = "instruct", families: list[str] | None = None, **_) -> dict:
    """no_skill on the scored items (`families`, default the collection's held-out ones)."""
    from tunelab.eval.tasks import collection as families_of
    from tunelab.eval.tasks import generate_items

    return no_skill(generate_items(families or families_of(collection)[1], n, seed))


def no_skill(items) -> dict:
    """What answers without any skill score on `items`: `echo` copies the item's input unchanged (the partial
    credit a model gets for repeating the words it was given), `constant` is stats.constant_baseline (each
    family's most common answer). Neither depends on the instruction's phrasing."""
    from tunelab.eval.stats import constant_baseline
    from tunelab.eval.tasks import score

    echo = [score(it.meta["input"], it) for it in items]
    return {"echo": mean(echo), "echo_exact": mean(exact(echo)), "constant": mean(constant_baseline(items)["scores"])}


def summarize(out: Path) -> dict:
    """Read DIR/base.json and the finished sweep cells; write DIR/summary.json, table.md and transfer.png."""
    from tunelab.eval.stats import interval
    from tunelab.experiments.report import load_results

    if not (out / "base.json").exists():
        raise TunelabError(f"{out}: no base.json yet; run benchmarks/instruct_families.py first")
    base = json.loads((out / "base.json").read_text())
    info = json.loads((out / "data" / "data.json").read_text())
    by_path = {v["path"]: int(k) for k, v in info["files"].items()}
    rows = []
    for r in load_results(out / "sweep")[1]:
        if r["status"] != "ok" or "scores" not in r:
            continue
        k = by_path[r["params"]["data"]]
        rows.append({"k": k, "groups": min(k, len(info["heldout_families"])), "steps": r["steps"],
                     "examples": r["examples"], "score": r["accuracy"], "score_ci": interval(r["scores"]),
                     "exact": mean(exact(r["scores"])), "format_ok": r["format_ok"], "eval_loss": r["eval_loss"],
                     **paired_difference(base, r)})
    rows.sort(key=lambda row: row["k"])
    scoring = json.loads((out / "sweep" / "sweep.json").read_text())["extras"]["eval_tasks"]
    summary = {"examples": info["examples"], "n_items": len(base["scores"]),
               "base": {"score": base["accuracy"], "score_ci": interval(base["scores"]),
                        "exact": mean(exact(base["scores"])), "format_ok": base["format_ok"],
                        "eval_loss": base["eval_loss"], "per_family": base["per_family"]},
               "baselines": baselines(**scoring),
               "rows": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "table.md").write_text(table(summary))
    if rows:
        plot(summary, out / "transfer.png")
    return summary


def _pct(v: float, ci=None) -> str:
    return f"{v:.1%}" + (f" [{ci[0]:.1%}, {ci[1]:.1%}]" if ci else "")


def _signed(v: float, ci) -> str:
    return f"{v:+.1%} [{ci[0]:+.1%}, {ci[1]:+.1%}]"


def table(summary: dict) -> str:
    """The Markdown table of summarize()'s result: one row for the base model, one per K."""
    b = summary["base"]
    head = ("| trained families (groups) | steps | unseen-family score [95%] | tuned - base, paired [95% items] "
            "| [95% families] | exact match | exact: tuned - base [95%] | format ok | unseen-family loss |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| base (untuned) | 0 | {_pct(b['score'], b['score_ci'])} | | | {b['exact']:.1%} | | {b['format_ok']:.1%} "
             f"| {b['eval_loss']:.3f} |"]
    for r in summary["rows"]:
        lines.append(f"| {r['k']} ({r['groups']}) | {r['steps']} | {_pct(r['score'], r['score_ci'])} "
                     f"| {_signed(r['diff'], r['ci'])} | {_signed(r['diff'], r['family_ci'])} | {r['exact']:.1%} "
                     f"| {_signed(r['exact_diff'], r['exact_ci'])} "
                     f"| {r['format_ok']:.1%} | {r['eval_loss']:.3f} |")
    e = summary["baselines"]
    return (head + "\n".join(lines) + f"\n\nWithout any skill, on the same items: echoing the input scores {e['echo']:.1%} "
            f"(exact {e['echo_exact']:.1%}); each family's most common answer {e['constant']:.1%}.\n\n"
            + family_table(summary))


def family_table(summary: dict) -> str:
    """Per held-out family: the base model's mean score and each K's paired difference (tuned - base)."""
    rows = summary["rows"]
    head = "| held-out family | base | " + " | ".join(f"K={r['k']}: tuned - base" for r in rows) + " |\n"
    head += "|---" * (2 + len(rows)) + "|\n"
    return head + "".join(f"| {f} | {b:.1%} | " + " | ".join(f"{r['per_family'][f]:+.1%}" for r in rows) + " |\n"
                          for f, b in summary["base"]["per_family"].items())


def plot(summary: dict, png: Path) -> None:
    """Unseen-family score against the number of trained families, with the base model's level and the
    95% intervals of the paired differences (drawn around the tuned scores)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, b = summary["rows"], summary["base"]
    ks = [r["k"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    ax.axhspan(*b["score_ci"], color="grey", alpha=0.2)
    ax.axhline(b["score"], color="grey", label="base (95% interval shaded)")
    ax.errorbar(ks, [r["score"] for r in rows],
                yerr=[[r["diff"] - r["ci"][0] for r in rows], [r["ci"][1] - r["diff"] for r in rows]],
                marker="o", capsize=4, label="tuned (bars: 95% of tuned - base, paired)")
    if "baselines" in summary:
        ax.axhline(summary["baselines"]["echo"], color="tab:red", linestyle="--", label="echo the input (no skill)")
    ax.set_xscale("log")
    ax.minorticks_off()  # only the K ticks
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel(f"trained families (same {summary['examples']} examples each run)")
    ax.set_ylabel(f"unseen-family score ({summary['n_items']} items)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# Prompt-distribution sensitivity: tuned on one training phrasing per family against all five, every model
# scored on the same items of trained families under each of the 7 phrasings (5 training, 2 held-out).
#
#     DIR/data/phrasings-one.jsonl, phrasings-all.jsonl   the same pairs (44 families), one phrasing or five
#     DIR/data/paraphrase-eval.jsonl  the scored families' pairs in held-out phrasings: the eval (response) loss
#     DIR/summary.json, table.md, phrasings.png            `summarize_phrasings(DIR)`

PHRASING_DATA = {"one": 0, "all": None}  # data variant -> training phrasing of every pair (None: drawn per pair)
MODEL_NAMES = {"base": "base (untuned)", "one": "(a) one phrasing", "all": "(b) five phrasings"}


def phrasing_families() -> list[str]:
    """The scored trained families: one per group (the first 11 of family_order())."""
    from tunelab.eval.tasks import collection

    return family_order()[:len(collection("instruct")[1])]


def build_phrasing_data(out: Path, examples: int, eval_examples: int, seed: int = 1) -> dict:
    """Write DIR/phrasings-one.jsonl (every pair in its family's first training phrasing) and
    DIR/phrasings-all.jsonl (the same contents in the same order, each in one of the 5 training phrasings
    drawn per pair), both over the 44 trained families, DIR/paraphrase-eval.jsonl and DIR/data.json."""
    check_pair_seed(seed)
    order = family_order()
    out.mkdir(parents=True, exist_ok=True)
    files = {v: {"path": _write(out / f"phrasings-{v}.jsonl", balanced_pairs(order, examples, seed, t)),
                 "families": order} for v, t in PHRASING_DATA.items()}
    eval_path = _write(out / "paraphrase-eval.jsonl", _loss_pairs(phrasing_families(), eval_examples, "heldout"))
    info = {"examples": examples, "seed": seed, "files": files, "eval_path": eval_path,
            "scored_families": phrasing_families()}
    (out / "data.json").write_text(json.dumps(info, indent=1))
    return info


def phrasing_matrix(result: dict) -> tuple[list[str], dict[str, list[float]]]:
    """An evaluate_tasks(..., phrasings="every") result by item: (phrasing labels in order,
    {item id: [its score under each phrasing]}); the result lists every item under one phrasing, then the next."""
    rows: dict[str, list[float]] = {}
    for item_id, s in zip(result["ids"], result["scores"]):
        rows.setdefault(item_id.rsplit("@", 1)[0], []).append(s)
    return list(dict.fromkeys(result["phrasings"])), rows


def _spread(rows: list[list[float]]) -> tuple[float, float]:
    """(max - min, population standard deviation) of the per-phrasing mean scores of `rows` (one list per item)."""
    means = [sum(col) / len(col) for col in zip(*rows)]
    m = sum(means) / len(means)
    return max(means) - min(means), math.sqrt(sum((x - m) ** 2 for x in means) / len(means))


def _columns(labels: list[str], prefix: str) -> list[int]:
    return [j for j, label in enumerate(labels) if label.startswith(prefix)]


def phrasing_stats(result: dict, seed: int = 0) -> dict:
    """One model's scores per phrasing, its mean over the training and the held-out phrasings (the latter with a
    bootstrap interval over items, each item's score the mean of its held-out phrasings), and the spread across
    all phrasings (max - min and standard deviation of the per-phrasing means, intervals resampling items)."""
    labels, by_item = phrasing_matrix(result)
    rows = list(by_item.values())
    held, train = _columns(labels, "heldout"), _columns(labels, "train")
    held_scores = [mean([r[j] for j in held]) for r in rows]
    per_family: dict[str, list[float]] = {}
    for item_id, v in zip(by_item, held_scores):
        per_family.setdefault(family_of(item_id), []).append(v)
    return {"per_phrasing": dict(zip(labels, [mean(c) for c in zip(*rows)])),
            "trained": mean([mean([r[j] for j in train]) for r in rows]),
            "heldout": mean(held_scores), "heldout_ci": bootstrap_interval(held_scores, seed=seed),
            "range": _spread(rows)[0], "range_ci": resampled_interval(rows, lambda p: _spread(p)[0], seed=seed),
            "sd": _spread(rows)[1], "sd_ci": resampled_interval(rows, lambda p: _spread(p)[1], seed=seed),
            "heldout_per_family": {f: mean(v) for f, v in per_family.items()}}


def phrasing_difference(a: dict, b: dict, seed: int = 0) -> dict:
    """`b` minus `a` on the same items under the same phrasings: the held-out-phrasing score and the
    training-phrasing score (per item the mean over those phrasings, paired over items, bootstrap interval) and
    the difference of the spreads (max - min, standard deviation; paired bootstrap over items)."""
    if a["ids"] != b["ids"]:
        raise TunelabError("phrasing_difference: the two results were scored on different items; "
                           "evaluate both with the same n, seed, families and phrasings")
    labels, ra = phrasing_matrix(a)
    rb = phrasing_matrix(b)[1]
    pairs = [(ra[k], rb[k]) for k in ra]
    out = {"n": len(pairs)}
    for part, prefix in (("heldout", "heldout"), ("trained", "train")):
        cols = _columns(labels, prefix)
        d = [mean([y[j] for j in cols]) - mean([x[j] for j in cols]) for x, y in pairs]
        out[part], out[part + "_ci"] = mean(d), bootstrap_interval(d, seed=seed)
    for k, name in enumerate(("range", "sd")):
        def stat(p, k=k):
            return _spread([y for _, y in p])[k] - _spread([x for x, _ in p])[k]
        out[name], out[name + "_ci"] = stat(pairs), resampled_interval(pairs, stat, seed=seed)
    return out


def summarize_phrasings(out: Path) -> dict:
    """Read DIR/base.json and the finished cells; write DIR/summary.json, table.md and phrasings.png."""
    from tunelab.experiments.report import load_results

    if not (out / "base.json").exists():
        raise TunelabError(f"{out}: no base.json yet; run benchmarks/instruct_families.py --design phrasings first")
    info = json.loads((out / "data" / "data.json").read_text())
    variant = {v["path"]: k for k, v in info["files"].items()}
    results = {"base": json.loads((out / "base.json").read_text())}
    steps = {"base": 0}
    for r in load_results(out / "sweep")[1]:
        if r["status"] == "ok" and "scores" in r:
            results[variant[r["params"]["data"]]], steps[variant[r["params"]["data"]]] = r, r["steps"]
    models = {name: {**phrasing_stats(r), "steps": steps[name], "format_ok": r["format_ok"],
                     "eval_loss": r["eval_loss"]} for name, r in results.items()}
    pairs = [(x, y) for x, y in (("one", "all"), ("base", "one"), ("base", "all")) if x in results and y in results]
    summary = {"examples": info["examples"], "families": info["scored_families"],
               "n_items": len(phrasing_matrix(results["base"])[1]), "models": models,
               "baselines": baselines(**json.loads((out / "sweep" / "sweep.json").read_text())["extras"]["eval_tasks"]),
               "differences": [{"a": x, "b": y, **phrasing_difference(results[x], results[y])} for x, y in pairs]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "table.md").write_text(phrasing_table(summary))
    plot_phrasings(summary, out / "phrasings.png")
    return summary


def phrasing_table(summary: dict) -> str:
    """Markdown: per model the score under each phrasing and the spread; then the paired differences; then
    the held-out-phrasing score per family."""
    models = summary["models"]
    labels = list(models["base"]["per_phrasing"])
    head = ("| model | steps | " + " | ".join(labels) + " | trained phrasings | held-out phrasings [95%] "
            "| spread: max - min [95%] | spread: sd [95%] | format ok | loss, held-out phrasings |\n"
            + "|---" * (len(labels) + 8) + "|\n")
    lines = [f"| {MODEL_NAMES[name]} | {m['steps']} | " + " | ".join(f"{v:.1%}" for v in m["per_phrasing"].values())
             + f" | {m['trained']:.1%} | {_pct(m['heldout'], m['heldout_ci'])} | {_pct(m['range'], m['range_ci'])} "
             f"| {_pct(m['sd'], m['sd_ci'])} | {m['format_ok']:.1%} | {m['eval_loss']:.3f} |" for name, m in models.items()]
    diff_head = (f"\n\n| difference, paired over {summary['n_items']} items | held-out phrasings [95%] "
                 "| trained phrasings [95%] | spread max - min [95%] | spread sd [95%] |\n|---|---|---|---|---|\n")
    diffs = [f"| {MODEL_NAMES[d['b']]} - {MODEL_NAMES[d['a']]} | {_signed(d['heldout'], d['heldout_ci'])} "
             f"| {_signed(d['trained'], d['trained_ci'])} | {_signed(d['range'], d['range_ci'])} "
             f"| {_signed(d['sd'], d['sd_ci'])} |" for d in summary["differences"]]
    fam_head = ("\n\n| family: held-out phrasings | " + " | ".join(MODEL_NAMES[n] for n in models) + " |\n"
                + "|---" * (len(models) + 1) + "|\n")
    fams = [f"| {f} | " + " | ".join(f"{m['heldout_per_family'][f]:.1%}" for m in models.values()) + " |"
            for f in summary["families"]]
    e = summary["baselines"]
    lines.append(f"\nWithout any skill, on the same items: echoing the input scores {e['echo']:.1%} "
                 f"(exact {e['echo_exact']:.1%}); each family's most common answer {e['constant']:.1%}.")
    return head + "\n".join(lines) + diff_head + "\n".join(diffs) + fam_head + "\n".join(fams) + "\n"


def plot_phrasings(summary: dict, png: Path) -> None:
    """Score under each phrasing, one line per model; the held-out phrasings shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = summary["models"]
    labels = list(models["base"]["per_phrasing"])
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    held = _columns(labels, "heldout")
    ax.axvspan(min(held) - 0.5, max(held) + 0.5, color="grey", alpha=0.2, label="held-out phrasings")
    for name, m in models.items():
        ax.plot(range(len(labels)), list(m["per_phrasing"].values()), marker="o", label=MODEL_NAMES[name])
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("phrasing of the instruction (train0: the only one model (a) saw)")
    ax.set_ylabel(f"score ({summary['n_items']} items, {len(summary['families'])} families)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# Full fine-tuning against LoRA against QLoRA on the same pairs of the 44 trained families, each method at its
# own learning rate; every model scored on the same new items of all 55 families (44 trained, 11 held out).
#
#     DIR/data/methods.jsonl, trained-eval.jsonl   the training pairs; trained families' pairs for the eval loss
#     DIR/sweep-<method>/                          one `tunelab sweep` of one cell per method (own learning rate)
#     DIR/summary.json, table.md, methods.png      `summarize_methods(DIR)`

METHOD_LRS = {"full": 1.7e-4, "lora": 2.2e-3, "qlora": 2.2e-3}  # the optima of docs/experiments.md's lr sweep
METHOD_NAMES = {"base": "base (untuned)", "full": "full fine-tuning", "lora": "LoRA r16 (16-bit base)",
                "qlora": "QLoRA r16 (NF4 base)"}
# (a, b): the differences b - a reported; the first is the primary comparison
METHOD_PAIRS = (("lora", "qlora"), ("full", "lora"), ("full", "qlora"), ("base", "full"), ("base", "lora"),
                ("base", "qlora"))
EQUIVALENCE_MARGIN = 0.05  # "QLoRA matches LoRA": the primary interval inside +-5 points


def build_method_data(out: Path, examples: int, eval_examples: int, seed: int = 1) -> dict:
    """Write DIR/methods.jsonl (`examples` pairs over the 44 trained families), DIR/trained-eval.jsonl (pairs
    of the same families drawn with LOSS_SEED: the eval loss) and DIR/data.json."""
    check_pair_seed(seed)
    order = family_order()
    out.mkdir(parents=True, exist_ok=True)
    path = _write(out / "methods.jsonl", balanced_pairs(order, examples, seed))
    info = {"examples": examples, "seed": seed, "files": {"methods": {"path": path, "families": order}},
            "eval_path": _write(out / "trained-eval.jsonl", _loss_pairs(order, eval_examples))}
    (out / "data.json").write_text(json.dumps(info, indent=1))
    return info


def method_families() -> list[str]:
    """The scored families: the 44 trained ones (the primary part), then the 11 held-out ones."""
    from tunelab.eval.tasks import collection

    trained, held = collection("instruct")
    return trained + held


def subset(result: dict, keep: set[str]) -> dict:
    """The items of an evaluate_tasks result whose ids are in `keep`, in order (ids, scores, outputs)."""
    js = [j for j, i in enumerate(result["ids"]) if i in keep]
    return {k: [result[k][j] for j in js] for k in ("ids", "scores", "outputs")}


def _part(result: dict, families: list[str]) -> dict:
    """The items of `result` (evaluate_tasks, phrasings "one") that belong to `families`."""
    return subset(result, {i for i in result["ids"] if family_of(i) in families})


def training_overlap(out: Path) -> int:
    """How many scored items have a prompt that is also a training prompt (the scored items are drawn with
    EVAL_SEED, the training pairs with another seed; families with few possible inputs can repeat one)."""
    from tunelab.eval.tasks import generate_items

    info = json.loads((out / "data" / "data.json").read_text())
    train = {json.loads(line)["prompt"] for v in info["files"].values()
             for line in Path(v["path"]).read_text().splitlines()}
    n = json.loads((out / "base.json").read_text())["ids"]
    per = len(n) // len(method_families())
    return sum(it.prompt in train for it in generate_items(method_families(), per, EVAL_SEED))


def summarize_methods(out: Path, sweeps: dict[str, str]) -> dict:
    """Read DIR/base.json and the finished cells of the sweeps {method: folder name}; write DIR/summary.json,
    table.md and methods.png. Every model's score on the trained and on the held-out families, and the
    differences of METHOD_PAIRS, paired over items (paired_difference)."""
    from tunelab.eval.stats import interval
    from tunelab.eval.tasks import collection
    from tunelab.experiments.report import load_results

    if not (out / "base.json").exists():
        raise TunelabError(f"{out}: no base.json yet; run benchmarks/instruct_families.py --design methods first")
    trained, held = collection("instruct")
    results, meta = {"base": json.loads((out / "base.json").read_text())}, {"base": {"lr": None, "steps": 0}}
    for method, folder in sweeps.items():
        for r in load_results(out / folder)[1]:
            if r["status"] == "ok" and "scores" in r:
                results[method], meta[method] = r, {"lr": r["lr"], "steps": r["steps"]}
            elif r["status"] != "ok":
                meta[method] = {"status": r["status"]}
    models = {}
    for name, r in results.items():
        parts = {"trained": _part(r, trained), "heldout": _part(r, held)}
        models[name] = {**meta[name], "format_ok": r["format_ok"], "eval_loss": r["eval_loss"],
                        **{k: mean(p["scores"]) for k, p in parts.items()},
                        **{k + "_ci": interval(p["scores"]) for k, p in parts.items()},
                        "trained_exact": mean(exact(parts["trained"]["scores"]))}
    diffs = []
    for a, b in METHOD_PAIRS:
        if a in results and b in results:
            d = {"a": a, "b": b}
            for part, fams in (("trained", trained), ("heldout", held)):
                p = paired_difference(_part(results[a], fams), _part(results[b], fams))
                d[part] = {k: p[k] for k in ("n", "diff", "ci", "family_ci", "exact_diff", "exact_ci", "per_family")}
            diffs.append(d)
    primary = diffs[0] if diffs and (diffs[0]["a"], diffs[0]["b"]) == METHOD_PAIRS[0] else None
    scoring = json.loads((out / next(iter(sweeps.values())) / "sweep.json").read_text())["extras"]["eval_tasks"]
    summary = {"examples": json.loads((out / "data" / "data.json").read_text())["examples"],
               "n_trained": len(_part(results["base"], trained)["ids"]),
               "n_heldout": len(_part(results["base"], held)["ids"]),
               "overlap_with_training": training_overlap(out), "models": models, "differences": diffs,
               "nf4_base_loss": results["base"].get("nf4_eval_loss"),
               "verdict": primary and verdict(primary["trained"]["ci"]),
               "baselines": {"trained": baselines(**{**scoring, "families": trained}),
                             "heldout": baselines(**{**scoring, "families": held})}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "table.md").write_text(method_table(summary))
    plot_methods(summary, out / "methods.png")
    return summary


def verdict(ci: tuple[float, float], margin: float = EQUIVALENCE_MARGIN) -> str:
    """The primary comparison's reading, fixed before the run: the 95% interval of QLoRA - LoRA inside
    +-margin is "equivalent"; excluding zero, "different"; else "inconclusive" (too few items to tell)."""
    lo, hi = ci
    if lo > 0 or hi < 0:
        return "different"
    return "equivalent" if -margin <= lo and hi <= margin else "inconclusive"


def method_table(summary: dict) -> str:
    """Markdown: one row per model, then the paired differences."""
    head = ("| model | lr | steps | trained families [95%] | exact (trained) | held-out families [95%] | format ok "
            "| eval loss (trained families) |\n|---|---|---|---|---|---|---|---|\n")
    rows = []
    for name, m in summary["models"].items():
        if "trained" not in m:
            rows.append(f"| {METHOD_NAMES[name]} | | | {m.get('status')} | | | | |")
            continue
        rows.append(f"| {METHOD_NAMES[name]} | {m['lr'] or ''} | {m['steps']} | {_pct(m['trained'], m['trained_ci'])} "
                    f"| {m['trained_exact']:.1%} | {_pct(m['heldout'], m['heldout_ci'])} | {m['format_ok']:.1%} "
                    f"| {m['eval_loss']:.3f} |")
    diff_head = (f"\n\n| difference, paired | trained families, {summary['n_trained']} items [95% items] "
                 "| [95% families] | exact (trained) [95%] "
                 f"| held-out families, {summary['n_heldout']} items [95%] |\n|---|---|---|---|---|\n")
    diffs = [f"| {METHOD_NAMES[d['b']]} - {METHOD_NAMES[d['a']]} | {_signed(d['trained']['diff'], d['trained']['ci'])} "
             f"| {_signed(d['trained']['diff'], d['trained']['family_ci'])} "
             f"| {_signed(d['trained']['exact_diff'], d['trained']['exact_ci'])} "
             f"| {_signed(d['heldout']['diff'], d['heldout']['ci'])} |" for d in summary["differences"]]
    if summary.get("nf4_base_loss") is not None:
        rows.append(f"| base quantized to NF4 (untuned; QLoRA's start) | | 0 | | | | | {summary['nf4_base_loss']:.3f} |")
    b = summary["baselines"]
    tail = (f"\nWithout any skill, on the same items: echoing the input scores {b['trained']['echo']:.1%} on the trained "
            f"families and {b['heldout']['echo']:.1%} on the held-out ones; each family's most common answer "
            f"{b['trained']['constant']:.1%} and {b['heldout']['constant']:.1%}. Scored items whose prompt is a "
            f"training prompt: {summary['overlap_with_training']}.\n")
    if summary["verdict"]:
        tail += (f"Primary comparison (QLoRA - LoRA, trained families, margin +-{EQUIVALENCE_MARGIN:.0%}): "
                 f"{summary['verdict']}.\n")
    return head + "\n".join(rows) + diff_head + "\n".join(diffs) + "\n" + tail


def plot_methods(summary: dict, png: Path) -> None:
    """Per model, the trained- and held-out-family scores with their 95% intervals, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = {n: m for n, m in summary["models"].items() if "trained" in m}
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for j, (part, label) in enumerate((("trained", f"trained families ({summary['n_trained']} items)"),
                                       ("heldout", f"held-out families ({summary['n_heldout']} items)"))):
        xs = [i + (j - 0.5) * 0.35 for i in range(len(models))]
        ys = [m[part] for m in models.values()]
        err = [[y - m[part + "_ci"][0] for y, m in zip(ys, models.values())],
               [m[part + "_ci"][1] - y for y, m in zip(ys, models.values())]]
        ax.bar(xs, ys, width=0.35, yerr=err, capsize=3, label=label)
    ax.set_xticks(range(len(models)), [METHOD_NAMES[n] for n in models], fontsize=7)
    ax.set_ylabel("score (95% intervals)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)

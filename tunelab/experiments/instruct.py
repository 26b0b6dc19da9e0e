"""Transfer to unseen task families against the number of trained families, at a fixed budget of examples.

The experiment of docs/instruction-tuning.md (benchmarks/instruct_families.py): the `instruct` collection
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
from tunelab.eval.stats import BOOTSTRAP_RESAMPLES, bootstrap_interval, exact, mean

EVAL_SEED = 2  # generation items of the held-out families (the quickstart's eval seed)
LOSS_SEED = 3  # the held-out families' SFT pairs of the eval loss: other items than the generation ones


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


def balanced_pairs(families: list[str], examples: int, seed: int) -> list[dict]:
    """`examples` SFT pairs (training phrasings) spread over `families` as evenly as possible: counts differ
    by at most 1, the first families in order taking the remainder; shuffled with `seed`."""
    from tunelab.eval.tasks import generate_items

    if not families or examples < 1:
        raise TunelabError(f"balanced_pairs needs families and examples >= 1, got {len(families)} and {examples}")
    per = -(-examples // len(families))
    items = generate_items(families, per, seed)  # family-major: items[f * per + i]
    # the i-th item of every family before the (i+1)-th of any: a prefix is balanced
    chosen = [items[j] for j in sorted(range(len(items)), key=lambda j: (j % per, j // per))[:examples]]
    random.Random(seed).shuffle(chosen)
    return [it.to_sft() for it in chosen]


def build_data(out: Path, ks: list[int], examples: int, eval_examples: int, seed: int = 1) -> dict:
    """Write DIR/families-K.jsonl for every K, DIR/heldout-eval.jsonl and DIR/data.json (families per file)."""
    from tunelab.eval.tasks import collection, generate_items

    order, held = family_order(), collection("instruct")[1]
    bad = [k for k in ks if not 1 <= k <= len(order)]
    if bad:
        raise TunelabError(f"numbers of trained families must be in 1..{len(order)}, got {bad}")
    out.mkdir(parents=True, exist_ok=True)

    def write(path: Path, rows: list[dict]) -> str:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    files = {k: {"path": write(out / f"families-{k}.jsonl", balanced_pairs(order[:k], examples, seed)),
                 "families": order[:k]} for k in ks}
    per = -(-eval_examples // len(held))
    loss_items = generate_items(held, per, LOSS_SEED)
    random.Random(LOSS_SEED).shuffle(loss_items)
    eval_path = write(out / "heldout-eval.jsonl", [it.to_sft() for it in loss_items[:eval_examples]])
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
        by_family.setdefault(item_id.rsplit("-", 2)[0], []).append(v)
    return {"n": len(d), "diff": mean(d), "ci": bootstrap_interval(d, seed=seed),
            "family_ci": _cluster_bootstrap(list(by_family.values()), seed),
            "exact_diff": mean(exact(tuned["scores"])) - mean(exact(base["scores"])),
            "exact_ci": bootstrap_interval([t - b for b, t in zip(exact(base["scores"]), exact(tuned["scores"]))],
                                           seed=seed),
            "per_family": {f: mean(v) for f, v in by_family.items()}}


def _cluster_bootstrap(clusters: list[list[float]], seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap of the item mean, resampling whole clusters with replacement (the quantiles of
    stats.bootstrap_interval)."""
    rng = random.Random(seed)
    means = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        pick = rng.choices(clusters, k=len(clusters))
        means.append(sum(map(sum, pick)) / sum(map(len, pick)))
    means.sort()
    return (means[math.floor((1 - level) / 2 * (len(means) - 1))],
            means[math.ceil((1 + level) / 2 * (len(means) - 1))])


def evaluate_base(out: Path) -> dict:
    """Score the untuned model as the sweep scores its cells (the first cell's config and eval_tasks
    arguments: same items, same eval batches) and write DIR/base.json."""
    from tunelab.config import load_config
    from tunelab.experiments.quality import evaluate_tasks
    from tunelab.quickstart import _eval_loss
    from tunelab.train.run import build_model, pick_device

    spec = json.loads((out / "sweep" / "sweep.json").read_text())
    cell = out / "sweep" / "cells" / spec["cells"][0]
    cfg = load_config(cell / "cell.yaml")
    model, tok = build_model(cfg, pick_device(cfg.train.device))
    result = evaluate_tasks(model, tok, **spec["extras"]["eval_tasks"])
    result["eval_loss"] = _eval_loss(model, tok, cfg)
    (out / "base.json").write_text(json.dumps(result, indent=1))
    return result


def baselines(n: int, seed: int, collection: str = "instruct", **_) -> dict:
    """What answers without any skill score on the scored items: `echo` copies the item's input unchanged
    (the partial credit a model gets for repeating the words it was given), `constant` is
    stats.constant_baseline (each family's most common answer)."""
    from tunelab.eval.stats import constant_baseline
    from tunelab.eval.tasks import collection as families_of
    from tunelab.eval.tasks import generate_items, score

    items = generate_items(families_of(collection)[1], n, seed)
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

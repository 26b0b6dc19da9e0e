"""Quality against quantity on the `instruct` collection (docs/instruction-tuning.md, benchmarks/instruct_quality.py).

N pairs over all 44 trained families (`instruct.balanced_pairs` over `family_order()`), for N in e.g. (100,
300, 1000), each clean and with a share of its responses corrupted (`quality.corrupt`: wrong, truncated,
off-format), trained under two budgets: every cell the same number of steps (`steps`, by default one epoch
of the largest N), and one epoch of its own data (N // batch_size whole batches, the training loop's epoch).
Every cell and the base model are scored on the same items, so every comparison is paired item by item:

    DIR/data/clean-N.jsonl, noisy-N.jsonl  the sets nest: the first N pairs of a larger set of either kind are
                                           the N-set of that kind (the clean and noisy sets differ only in the
                                           corrupted responses)
    DIR/data/trained-eval.jsonl  clean pairs of the trained families (LOSS_SEED): every cell's eval loss
    DIR/data/data.json           files, corruption counts per kind, the scored items whose input is trained on
    DIR/sweep/                   equal steps: a `tunelab sweep` over every data file (resumable)
    DIR/epochs-N/                one epoch of the N-sets, for each N whose epoch is not `steps` steps (the
                                 equal-steps cell is that epoch: it is trained once)
    DIR/base.json                the untuned model on the same items (instruct.evaluate_base)
    DIR/summary.json, table.md, quality.png   `summarize(DIR)`

The scored items: `eval_n` of every trained family (EVAL_SEED, training phrasings; the primary part, minus
any item whose input is in a training set) and of every held-out family (secondary), in one evaluate_tasks call.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.eval.stats import exact, interval, mean
from tunelab.experiments.instruct import (
    EVAL_SEED,
    LOSS_SEED,
    _loss_pairs,
    _pct,
    _signed,
    _write,
    balanced_pairs,
    check_pair_seed,
    family_order,
    no_skill,
    paired_difference,
    subset,
)

VARIANTS = ("clean", "noisy")
BUDGETS = {"steps": "equal steps", "epoch": "one epoch"}
PARTS = ("trained", "heldout")  # scored items of the trained families (primary) and of the held-out ones


def _key(pair: dict) -> str:
    return json.dumps(pair, sort_keys=True)


def nested_pairs(ns: list[int], seed: int) -> dict[int, list[dict]]:
    """{N: balanced_pairs(family_order(), N, seed)} reordered so that each set starts with the next smaller one
    (balanced_pairs draws the i-th item of every family before the (i+1)-th of any, so the sets nest)."""
    order, sets, prev = family_order(), {}, []
    for n in sorted(set(ns)):
        left = collections.Counter(map(_key, prev))
        rest = []
        for p in balanced_pairs(order, n, seed):
            if left[_key(p)]:
                left[_key(p)] -= 1
            else:
                rest.append(p)
        if +left:
            raise TunelabError(f"the {len(prev)}-pair set is not part of the {n}-pair set")  # a generator change
        sets[n] = prev = prev + rest
    return sets


def noisy_sets(clean: dict[int, list[dict]], share: float, seed: int) -> dict[int, tuple[list[dict], dict]]:
    """{N: (the N-set with about `share` of its responses corrupted, counts per kind)}. Each set corrupts only
    the pairs the next smaller one does not have, so the noisy sets nest as the clean ones do."""
    from tunelab.experiments.quality import KINDS, corrupt

    out, rows, counts, start = {}, [], collections.Counter(), 0
    for i, n in enumerate(sorted(clean)):
        new, c = corrupt(clean[n][start:], share, seed * 1000 + i)
        rows, counts, start = rows + new, counts + collections.Counter(c), n
        out[n] = (rows, {k: counts[k] for k in KINDS})
    return out


def pair_inputs(pairs: list[dict], seed: int) -> set[tuple[str, str]]:
    """(family, input) of every pair of `pairs` (drawn from the trained families with `seed`, by balanced_pairs or
    _loss_pairs, whose items are the first ceil(len / 44) of every family): the items regenerated."""
    from tunelab.eval.tasks import generate_items

    order, prompts = family_order(), {p["prompt"] for p in pairs}
    return {(it.family, it.meta["input"]) for it in generate_items(order, -(-len(pairs) // len(order)), seed)
            if it.prompt in prompts}


def build_data(out: Path, ns: list[int], share: float, eval_examples: int, eval_n: int, seed: int = 1) -> dict:
    """Write DIR/clean-N.jsonl and noisy-N.jsonl for every N, DIR/trained-eval.jsonl and DIR/data.json."""
    from tunelab.eval.tasks import collection, generate_items

    if not ns or min(ns) < 1:
        raise TunelabError(f"the numbers of pairs (--ns) must be >= 1, got {ns}")
    check_pair_seed(seed)
    order, held = family_order(), collection("instruct")[1]
    clean = nested_pairs(ns, seed)
    noisy = noisy_sets(clean, share, seed)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for n in clean:
        files[f"clean-{n}"] = {"n": n, "variant": "clean", "path": _write(out / f"clean-{n}.jsonl", clean[n]),
                               "corrupted": {k: 0 for k in noisy[n][1]}}
        files[f"noisy-{n}"] = {"n": n, "variant": "noisy", "path": _write(out / f"noisy-{n}.jsonl", noisy[n][0]),
                               "corrupted": noisy[n][1]}
    loss = _loss_pairs(order, eval_examples)
    seen = pair_inputs(clean[max(clean)], seed)  # the largest set holds every training input
    excluded = [it.id for it in generate_items(order, eval_n, EVAL_SEED) if (it.family, it.meta["input"]) in seen]
    loss_seen = len(pair_inputs(loss, LOSS_SEED) & seen)  # reported, not removed: the loss is exploratory
    info = {"ns": sorted(clean), "share": share, "seed": seed, "files": files,
            "eval_path": _write(out / "trained-eval.jsonl", loss), "trained_families": order,
            "heldout_families": held, "eval_n": eval_n, "excluded": excluded, "loss_pairs_trained_on": loss_seen}
    (out / "data.json").write_text(json.dumps(info, indent=1))
    return info


def scoring(eval_n: int) -> dict:
    """evaluate_tasks arguments of every cell and the base model: `eval_n` items of each trained family, then of
    each held-out family (EVAL_SEED, training phrasings)."""
    from tunelab.eval.tasks import collection

    return {"n": eval_n, "collection": "instruct", "seed": EVAL_SEED,
            "families": family_order() + collection("instruct")[1]}


def plan_cells(out: Path, config, overrides: list[str], info: dict, steps: int, batch_size: int,
               eval_examples: int, eval_n: int) -> list[Path]:
    """Plan DIR/sweep (every data file, `steps` steps) and DIR/epochs-N (clean-N and noisy-N, N // batch_size
    steps) for each N whose epoch is not `steps` steps. Budgets are given as examples (steps x batch_size), so
    every cell's warmup scales with its steps alike (sweep.cell_config). Returns the cells, equal steps first."""
    from tunelab.experiments import grid, sweep

    def one(folder: str, names: list[str], cell_steps: int) -> list[Path]:
        axes = grid.parse_grid(["data=" + ",".join(info["files"][k]["path"] for k in names)])
        return sweep.plan(out / folder, config, axes, overrides, examples=cell_steps * batch_size,
                          eval_examples=eval_examples, extras={"eval_tasks": scoring(eval_n)})

    small = [n for n in info["ns"] if n < batch_size]
    if small or steps < 1:
        raise TunelabError(f"every N must hold one batch of {batch_size} and --steps be >= 1, got N={small}, "
                           f"steps={steps}")
    dirs = one("sweep", list(info["files"]), steps)
    for n in info["ns"]:
        if n // batch_size != steps:
            dirs += one(f"epochs-{n}", [f"{v}-{n}" for v in VARIANTS], n // batch_size)
    return dirs


def part_stats(result: dict, answers: dict[str, str], base: dict | None = None, ref: dict | None = None) -> dict:
    """Score [95%], exact match and format compliance of a result on some items (`instruct.subset`), and the paired
    differences (instruct.paired_difference) against the base model's and a reference cell's result on them."""
    from tunelab.experiments.quality import format_ok

    s = {"n": len(result["ids"]), "score": mean(result["scores"]), "score_ci": interval(result["scores"]),
         "exact": mean(exact(result["scores"])),
         "format_ok": mean([float(format_ok(o, answers[i])) for i, o in zip(result["ids"], result["outputs"])])}
    for name, other in (("vs_base", base), ("vs_ref", ref)):
        if other is not None:
            s[name] = paired_difference(other, result)
    return s


def _cells(out: Path, info: dict) -> dict[tuple[str, str], dict]:
    """{(budget, data name): result} of the finished cells; an N whose epoch is `steps` steps takes the
    equal-steps cell for its epoch row (marked "shared")."""
    from tunelab.experiments.report import load_results

    name = {v["path"]: k for k, v in info["files"].items()}
    found = {}
    for budget, folder in [("steps", out / "sweep")] + [("epoch", out / f"epochs-{n}") for n in info["ns"]]:
        if (folder / "sweep.json").exists():
            found |= {(budget, name[r["params"]["data"]]): r for r in load_results(folder)[1]
                      if r["status"] == "ok" and "scores" in r}
    for k, f in info["files"].items():
        r = found.get(("steps", k))
        if r is not None and f["n"] // r["batch_size"] == r["steps"]:
            found["epoch", k] = {**r, "shared": True}
    return found


def summarize_results(info: dict, base: dict, cells: dict[tuple[str, str], dict]) -> dict:
    """The summary of base.json and the cells' results (`_cells`): per cell and part (trained families without
    the excluded items, held-out families) the score and its paired differences; the primary comparison (the
    clean set one size below the largest, minus the noisy largest set, at equal steps, trained families); clean
    minus noisy at each N and budget."""
    from tunelab.eval.tasks import generate_items

    items = generate_items(info["trained_families"] + info["heldout_families"], info["eval_n"], EVAL_SEED)
    if base["ids"] != [it.id for it in items]:
        raise TunelabError("base.json was scored on other items than data/data.json names (another --eval-n?); "
                           "delete base.json and run again")
    answers, held, excluded = {it.id: it.answer for it in items}, set(info["heldout_families"]), set(info["excluded"])
    keep = {"trained": {it.id for it in items if it.family not in held and it.id not in excluded},
            "heldout": {it.id for it in items if it.family in held}}
    ns = info["ns"]
    ref = cells.get(("steps", f"noisy-{ns[-1]}"))

    def stats(r: dict, part: str, vs: bool = True) -> dict:
        sub = subset(r, keep[part])
        return part_stats(sub, answers, subset(base, keep[part]) if vs else None,
                          subset(ref, keep[part]) if vs and ref and part == "trained" else None)

    done: dict[tuple, dict] = {}  # an epoch row that is the equal-steps cell reuses that cell's numbers

    def once(key: tuple, r: dict, make) -> dict:
        key = ("steps" if r.get("shared") else key[0], *key[1:])
        return done[key] if key in done else done.setdefault(key, make())

    rows = [{"budget": b, "n": n, "variant": v, "steps": r["steps"], "epochs": r["steps"] * r["batch_size"] / n,
             "shared": r.get("shared", False), "eval_loss": r["eval_loss"],
             **once((b, v, n), r, lambda r=r: {p: stats(r, p) for p in PARTS})}
            for b in BUDGETS for n in ns for v in VARIANTS if (r := cells.get((b, f"{v}-{n}"))) is not None]
    contrasts = [{"budget": b, "n": n, "steps": c["steps"], "eval_loss": {"clean": c["eval_loss"], "noisy": z["eval_loss"]},
                  **once((b, n), c, lambda c=c, z=z: {p: paired_difference(subset(z, keep[p]), subset(c, keep[p]))
                                                      for p in PARTS})}
                 for b in BUDGETS for n in ns
                 if (c := cells.get((b, f"clean-{n}"))) and (z := cells.get((b, f"noisy-{n}")))]
    clean = cells.get(("steps", f"clean-{ns[-2]}")) if len(ns) > 1 else None
    primary = None
    if clean and ref:
        primary = {"b": f"clean-{ns[-2]}", "a": f"noisy-{ns[-1]}", "steps": ref["steps"],
                   **paired_difference(subset(ref, keep["trained"]), subset(clean, keep["trained"]))}
    return {"ns": ns, "share": info["share"], "n_items": {p: len(keep[p]) for p in PARTS},
            "excluded": info["excluded"], "loss_pairs_trained_on": info["loss_pairs_trained_on"],
            "corrupted": {k: f["corrupted"] for k, f in info["files"].items() if f["variant"] == "noisy"},
            "base": {"eval_loss": base["eval_loss"], **{p: stats(base, p, vs=False) for p in PARTS}},
            "baselines": {p: no_skill([it for it in items if it.id in keep[p]]) for p in PARTS},
            "rows": rows, "primary": primary, "clean_vs_noisy": contrasts}


def summarize(out: Path) -> dict:
    """Read DIR/data/data.json, DIR/base.json and the finished cells; write DIR/summary.json, table.md, quality.png."""
    if not (out / "base.json").exists():
        raise TunelabError(f"{out}: no base.json yet; run benchmarks/instruct_quality.py first")
    info = json.loads((out / "data" / "data.json").read_text())
    summary = summarize_results(info, json.loads((out / "base.json").read_text()), _cells(out, info))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "table.md").write_text(table(summary))
    if summary["rows"]:
        plot(summary, out / "quality.png")
    return summary


def _name(row: dict) -> str:
    return f"{row['variant']}-{row['n']}"


def table(summary: dict) -> str:
    """Markdown: one row per cell (and the base model); the primary comparison; clean minus noisy at each N and
    budget; the corruption counts; the no-skill baselines and the excluded items."""
    b, ns, nt = summary["base"], summary["ns"], summary["n_items"]
    ref = f"noisy-{ns[-1]} (equal steps)"
    head = (f"| budget | data | steps | epochs | trained-family score [95%] ({nt['trained']} items) | - base, paired [95%] "
            f"| - {ref}, paired [95%] | exact match | format ok | held-out-family score [95%] ({nt['heldout']} items) "
            "| - base, paired [95%] | eval loss |\n" + "|---" * 12 + "|\n")
    t, h = b["trained"], b["heldout"]
    lines = [f"| base (untuned) | | 0 | | {_pct(t['score'], t['score_ci'])} | | | {t['exact']:.1%} | {t['format_ok']:.1%} "
             f"| {_pct(h['score'], h['score_ci'])} | | {b['eval_loss']:.3f} |"]
    for r in summary["rows"]:
        t, h = r["trained"], r["heldout"]
        vs_ref = _signed(t["vs_ref"]["diff"], t["vs_ref"]["ci"]) if "vs_ref" in t else ""
        budget = BUDGETS[r["budget"]] + (" (the equal-steps cell)" if r["shared"] else "")
        lines.append(f"| {budget} | {_name(r)} | {r['steps']} | {r['epochs']:.2f} | {_pct(t['score'], t['score_ci'])} "
                     f"| {_signed(t['vs_base']['diff'], t['vs_base']['ci'])} | {vs_ref} | {t['exact']:.1%} "
                     f"| {t['format_ok']:.1%} | {_pct(h['score'], h['score_ci'])} "
                     f"| {_signed(h['vs_base']['diff'], h['vs_base']['ci'])} | {r['eval_loss']:.3f} |")
    p = summary["primary"]
    text = head + "\n".join(lines) + "\n\n"
    if p:
        text += (f"Primary comparison: {p['b']} - {p['a']} at {p['steps']} steps each, trained-family items, paired "
                 f"over {p['n']} items: {_signed(p['diff'], p['ci'])} (exact match {_signed(p['exact_diff'], p['exact_ci'])}).\n\n")
    text += ("| clean - noisy | steps | trained families, paired [95%] | exact, trained [95%] | held-out families, "
             "paired [95%] | eval loss: clean, noisy |\n|---|---|---|---|---|---|\n")
    text += "".join(f"| {BUDGETS[c['budget']]}, N = {c['n']} | {c['steps']} | {_signed(c['trained']['diff'], c['trained']['ci'])} "
                    f"| {_signed(c['trained']['exact_diff'], c['trained']['exact_ci'])} "
                    f"| {_signed(c['heldout']['diff'], c['heldout']['ci'])} "
                    f"| {c['eval_loss']['clean']:.3f}, {c['eval_loss']['noisy']:.3f} |\n" for c in summary["clean_vs_noisy"])
    kinds = list(next(iter(summary["corrupted"].values())))
    text += "\n| noisy set | " + " | ".join(kinds) + " | corrupted |\n" + "|---" * (len(kinds) + 2) + "|\n"
    text += "".join(f"| {k} | " + " | ".join(str(c[x]) for x in kinds)
                    + f" | {sum(c.values())} of {k.split('-')[1]} ({sum(c.values()) / int(k.split('-')[1]):.1%}) |\n"
                    for k, c in summary["corrupted"].items())
    e = summary["baselines"]
    return text + (f"\nWithout any skill, on the same items: echoing the input scores {e['trained']['echo']:.1%} (trained "
                   f"families) and {e['heldout']['echo']:.1%} (held-out); each family's most common answer "
                   f"{e['trained']['constant']:.1%} and {e['heldout']['constant']:.1%}.\n"
                   f"Scored trained-family items whose input is in a training set, left out of every trained-family "
                   f"number: {len(summary['excluded'])} ({', '.join(summary['excluded']) or 'none'}). Eval-loss pairs "
                   f"whose input is in a training set: {summary['loss_pairs_trained_on']}.\n")


def plot(summary: dict, png: Path) -> None:
    """Score against N, clean and noisy, equal steps (solid) and one epoch (dashed); trained families on the
    left, held-out families on the right; the base model's level with its 95% interval shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120, sharex=True)
    for ax, part in zip(axes, PARTS):
        b = summary["base"][part]
        ax.axhspan(*b["score_ci"], color="grey", alpha=0.2)
        ax.axhline(b["score"], color="grey", label="base (95% interval shaded)")
        lines = [(budget, variant) for budget in BUDGETS for variant in VARIANTS]
        for k, (budget, variant) in enumerate(lines):
            rows = [r for r in summary["rows"] if (r["budget"], r["variant"]) == (budget, variant)]
            shift = 1 + 0.04 * (k - (len(lines) - 1) / 2)  # side by side on the log axis: no bar hides another
            if rows:
                ax.errorbar([r["n"] * shift for r in rows], [r[part]["score"] for r in rows], capsize=3, marker="o",
                            yerr=[[r[part]["score"] - r[part]["score_ci"][0] for r in rows],
                                  [r[part]["score_ci"][1] - r[part]["score"] for r in rows]],
                            linestyle="-" if budget == "steps" else "--",
                            color="tab:blue" if variant == "clean" else "tab:red", label=f"{variant}, {BUDGETS[budget]}")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(summary["ns"], [str(n) for n in summary["ns"]])
        ax.set_xlabel(f"training pairs N (noisy: {summary['share']:.0%} corrupted)")
        ax.set_ylabel(f"{'trained' if part == 'trained' else 'held-out'}-family score "
                      f"({summary['n_items'][part]} items, 95%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)

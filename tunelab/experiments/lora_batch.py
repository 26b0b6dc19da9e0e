"""LoRA against full fine-tuning at large batches (issue 30; docs/instruction-tuning.md, benchmarks/lora_batch.py).

The claim (Schulman et al. 2025, "LoRA Without Regret"): at equal training examples, LoRA loses more to full
fine-tuning as the batch grows, and a higher rank does not fix it. Here: the bundled model on pairs of the 44
trained families of the `instruct` collection, effective batches B (64, 128, 256) made by gradient
accumulation over micro-batches of MICRO, every cell the same number of examples (steps = examples / B),
full fine-tuning and LoRA at ranks 1, 16, 128 (alpha 32 for every rank: the `rank` axis sets lora.r only).

    stage 1  seed 0: a small lr grid per arm (method/rank, batch), centred on the known optima and scaled
             with sqrt(B / 64); the arm's lr is its grid point of lowest eval loss; an optimum at the grid's
             edge gets up to `extend` more points beyond that edge, and is reported as an edge if it stays one
    stage 2  seeds 1, 2 (other training pairs, order and initialisation) at each arm's stage-1 lr; seed 0 is
             the stage-1 cell at that lr

    DIR/data/train-seed<S>.jsonl, eval.jsonl   training pairs (drawn with instruct.pair_seed(S)), eval pairs
    DIR/stage1/<arm>/, DIR/stage2/<arm>__seed-<S>/   `tunelab sweep` folders (resumable: finished cells stay)
    DIR/base.json                                the untuned model's eval loss (`base_eval`), the reference
    DIR/summary.json, table.md, gap.png          `summarize(DIR)`

Every cell records, besides the loop's eval loss, the summed response loss and token count of each eval
example (`example_losses`), so a gap has two intervals: over the seeds (training randomness, on this eval
set; a t interval, 2 df for 3 seeds: wide) and over the eval examples (a bootstrap of the per-example loss
difference pooled over seeds: eval-set sampling, for these seeds).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.experiments.report import _loss  # a failed or diverged cell: infinite loss

BATCHES = (64, 128, 256)
RANKS = (1, 16, 128)
SEEDS = (0, 1, 2)
MICRO = 8  # micro-batch: every batch size is MICRO x grad_accum, so one step's memory is the same for all
LR_CENTER = {"full": 1.7e-4, "lora": 2.2e-3}  # docs/experiments.md's optima at batch 4-16 (instruct.METHOD_LRS)
LR_STEP = 3.0  # grid spacing factor, about half a decade
PRIMARY_RANK = 16
# two-sided 95% quantiles of Student's t by degrees of freedom (scipy.stats.t.ppf(0.975, df))
T975 = {1: 12.706204736174694, 2: 4.302652729749462, 3: 3.1824463052837078, 4: 2.7764451051977934,
        5: 2.5705818356363146, 6: 2.4469118511449786, 7: 2.364624251592784, 8: 2.306004135204166,
        9: 2.262157162798205, 10: 2.228138851986274}


@dataclass(frozen=True)
class Arm:
    """One learning-rate curve of stage 1: a method (LoRA with its rank, or full) at one effective batch."""

    method: str
    rank: int | None
    batch: int

    @property
    def name(self) -> str:
        return (f"lora-r{self.rank}" if self.method == "lora" else self.method) + f"__b{self.batch}"


def arms(batches=BATCHES, ranks=RANKS) -> list[Arm]:
    return [Arm(m, r, b) for b in batches for m, r in [("full", None)] + [("lora", r) for r in ranks]]


def lr_grid(method: str, batch: int, points: int = 3, step: float = LR_STEP) -> list[float]:
    """`points` rates spaced by `step` in log, centred on LR_CENTER[method] x sqrt(batch / 64): at equal
    examples a larger batch takes fewer steps and usually wants a larger rate (the square-root rule for Adam)."""
    from tunelab.experiments.grid import _round

    centre = LR_CENTER[method] * math.sqrt(batch / 64)
    return [_round(centre * step ** (i - (points - 1) / 2)) for i in range(points)]


def select_lr(results: list[dict]) -> dict:
    """The arm's learning rate from its stage-1 cells (results with "lr", "status", "eval_loss"): the grid
    point of lowest eval loss. "edge" is "low"/"high" when that point is the grid's lowest/highest rate (the
    optimum may lie beyond it); a diverged cell above the best bounds it, so that is no edge."""
    from tunelab.experiments.optimum import find_optimum

    rows = sorted(results, key=lambda r: r["lr"])
    if not rows:
        raise TunelabError("select_lr: no finished cells for this arm")
    try:
        opt = find_optimum([r["lr"] for r in rows], [_loss(r) for r in rows])
    except ValueError:
        return {"lr": None, "edge": None, "loss": None, "diverged": len(rows), "grid": [r["lr"] for r in rows]}
    edge = opt.edge
    if edge == "high" and any(r["lr"] > opt.best_lr and not math.isfinite(_loss(r)) for r in rows):
        edge = None
    return {"lr": opt.best_lr, "edge": edge, "loss": opt.best_loss, "refined_lr": opt.lr, "trusted": opt.trusted,
            "diverged": sum(not math.isfinite(_loss(r)) for r in rows), "grid": [r["lr"] for r in rows]}


def extended(grid: list[float], edge: str | None, step: float = LR_STEP) -> list[float]:
    """The grid with one more rate beyond the edge where its optimum lies (unchanged for an interior one)."""
    from tunelab.experiments.grid import _round

    if edge == "low":
        return [_round(min(grid) / step)] + list(grid)
    if edge == "high":
        return list(grid) + [_round(max(grid) * step)]
    return list(grid)


# ------------------------------------------------------------------------------------------ data and cells


def build_data(out: Path, examples: int, eval_examples: int, seeds=SEEDS) -> dict:
    """DIR/train-seed<S>.jsonl (`examples` pairs over the 44 trained families, balanced, drawn with
    instruct.pair_seed(S)) and DIR/eval.jsonl (`eval_examples` other pairs of the same families, LOSS_SEED)."""
    from tunelab.experiments import instruct

    order = instruct.family_order()
    out.mkdir(parents=True, exist_ok=True)
    info = {"examples": examples, "eval_examples": eval_examples,
            "train": {str(s): instruct._write(out / f"train-seed{s}.jsonl",
                                              instruct.balanced_pairs(order, examples, instruct.pair_seed(s)))
                      for s in seeds},
            "eval_path": instruct._write(out / "eval.jsonl", instruct._loss_pairs(order, eval_examples))}
    (out / "data.json").write_text(json.dumps(info, indent=1))
    return info


def cell_overrides(model: str, data: dict, seed: int, batch: int, micro: int = MICRO) -> list[str]:
    """configs/sweep-sft.yaml overrides of one seed at one effective batch (micro x grad_accum)."""
    if batch % micro:
        raise TunelabError(f"effective batch {batch} is not a multiple of the micro-batch {micro}")
    # generated, checked pairs: no quality filter may drop one family's items (it would skew the balance)
    return [f"model.source={model}", f"data.sources=[{{name: train, path: {json.dumps(data['train'][str(seed)])}}}]",
            f"data.eval_path={data['eval_path']}", "data.filters.enabled=false", f"train.batch_size={micro}",
            f"train.grad_accum={batch // micro}", f"train.seed={seed}", f"data.seed={seed}"]


def _axes(arm: Arm, lrs: list[float]) -> dict:
    return {"method": [arm.method], **({"lora.r": [arm.rank]} if arm.rank else {}), "train.lr": list(lrs)}


def plan_arm(folder: Path, config: Path, arm: Arm, lrs: list[float], model: str, data: dict, seed: int,
             micro: int = MICRO) -> list[Path]:
    """One sweep folder: the arm's cells at `lrs` for one seed, each on data["examples"] examples and scored
    on every eval pair with per-example losses."""
    from tunelab.experiments import sweep

    return sweep.plan(folder, config, _axes(arm, lrs), cell_overrides(model, data, seed, arm.batch, micro),
                      examples=data["examples"], eval_examples=data["eval_examples"],
                      extras={"example_losses": True})


def _finished(dirs: list[Path]) -> list[dict]:
    return [json.loads((d / "result.json").read_text()) for d in dirs if (d / "result.json").exists()]


def run(out: Path, config: Path, model: str, data: dict, arm_list: list[Arm], points: int = 3,
        extend: int = 1, seeds=SEEDS, jobs: int = 1, micro: int = MICRO, log=print) -> list[str]:
    """Both stages, resumably (finished cells are never run again; the same call continues). Returns the
    failed cells. Stage 2 starts once every arm's stage 1 is done (its lr comes from there)."""
    from tunelab.experiments import sweep

    grids = {a: lr_grid(a.method, a.batch, points) for a in arm_list}
    failed: list[str] = []
    for round_ in range(extend + 1):
        dirs = {a: plan_arm(out / "stage1" / a.name, config, a, g, model, data, seeds[0], micro) for a, g in grids.items()}
        log(f"stage 1{f' (extension {round_})' if round_ else ''}:")
        failed += sweep.run_cells([d for ds in dirs.values() for d in ds], jobs, log=log)
        picks = {a: select_lr(_finished(ds)) for a, ds in dirs.items()}
        edges = {a: extended(grids[a], p["edge"]) for a, p in picks.items() if p["edge"]}
        if not edges or round_ == extend:
            break
        grids.update(edges)
    if failed:
        return failed
    stage2 = []
    for a, p in picks.items():
        if p["lr"] is not None:
            stage2 += [d for s in seeds[1:] for d in
                       plan_arm(out / "stage2" / f"{a.name}__seed-{s}", config, a, [p["lr"]], model, data, s, micro)]
    log("stage 2:")
    return sweep.run_cells(stage2, jobs, log=log)


def example_losses(model, tok, cfg) -> dict:
    """Per eval example, in the loop's eval order: the summed response loss (nats) and its label tokens. Their
    ratio of sums is the loop's eval loss; one example at a time, so nothing depends on the batch's padding."""
    import torch

    from tunelab.data import build_datasets
    from tunelab.train.loop import collate
    from tunelab.train.loss import NEXT_TOKEN

    _, eval_set = build_datasets(cfg.data, tok, cfg.train.seq_len, cfg.train.seed)
    eval_set = eval_set[: cfg.train.eval_batches * cfg.train.batch_size]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums, tokens = [], []
    with torch.no_grad():
        for ex in eval_set:
            s, n = NEXT_TOKEN.loss_sum(model, collate([ex], tok.pad_token_id, device), cfg.train.loss_chunk_tokens)
            sums.append(float(s))
            tokens.append(int(n))
    model.train(was_training)
    return {"loss_sums": sums, "tokens": tokens}


# ------------------------------------------------------------------------------------------ cost


def measure(out: Path, config: Path, model: str, data: dict, batch: int = 64, ranks=(128,), micro: int = MICRO,
            log=print) -> dict:
    """CPU seconds of short cells, one kind at a time in this process (time.process_time: this process's CPU,
    whatever else the machine runs): full and LoRA at `ranks`, each once with 1 and once with 2 optimizer
    steps of `batch` examples. The difference is the training cost per example; the rest of the 1-step cell
    (model load, data, the loop's eval and the per-example eval of data's eval pairs) is the per-cell overhead.
    Written to DIR/measure.json; an existing one is returned as it is (delete it to measure again)."""
    import time

    from tunelab.experiments import sweep

    path = out / "measure.json"
    if path.exists():
        return json.loads(path.read_text())
    kinds = {}
    for arm in [Arm("full", None, batch)] + [Arm("lora", r, batch) for r in ranks]:
        cpu = {}
        for steps in (1, 2):
            (cell,) = plan_arm(out / f"{arm.name}__steps-{steps}", config, arm, [LR_CENTER[arm.method]], model,
                               {**data, "examples": steps * batch}, 0, micro)
            (cell / "result.json").unlink(missing_ok=True)  # a cell from an interrupted measurement: time it again
            t0 = time.process_time()
            if sweep.run_cells([cell], 1, log=log):
                raise TunelabError(f"the cost measurement's cell {cell} failed; see its log.txt")
            cpu[str(steps)] = time.process_time() - t0  # str: as measure.json keeps it
        per_example = (cpu["2"] - cpu["1"]) / batch
        kinds[arm.name.split("__")[0]] = {"train_cpu_s_per_example": per_example,
                                          "overhead_cpu_s": cpu["1"] - batch * per_example, "cell_cpu_s": cpu}
    result = {"batch": batch, "micro": micro, "eval_examples": data["eval_examples"], "kinds": kinds}
    path.write_text(json.dumps(result, indent=1))
    return result


def estimate(cost: dict, batches, ranks, examples: int, points: int, extend: int, seeds: int) -> dict:
    """An upper estimate of the design's CPU hours from `measure`'s costs: every cell costed at the largest
    per-cell overhead and the largest per-example cost measured over the kinds (under load, the difference of
    two short cells is noisy, and the largest is the safe side). Stage 1: `points` cells per arm, plus up to
    `extend` per arm when its optimum sits at an edge (the range: no arm at an edge .. every arm at an edge in
    every round); stage 2: seeds - 1 cells per arm."""
    kinds = cost["kinds"].values()
    cell = max(k["overhead_cpu_s"] for k in kinds) + examples * max(k["train_cpu_s_per_example"] for k in kinds)
    n_arms = len(batches) * (1 + len(ranks))
    cells = [n_arms * (points + seeds - 1), n_arms * (points + extend + seeds - 1)]
    return {"cell_cpu_s": cell, "arms": n_arms, "cells": cells, "cpu_hours": [n * cell / 3600 for n in cells]}


# ------------------------------------------------------------------------------------------ the gap


def t_interval(values: list[float]) -> tuple[float, float]:
    """Student-t 95% interval of the mean of `values` (n >= 2): mean +- t(0.975, n-1) sd / sqrt(n)."""
    n = len(values)
    if n - 1 not in T975:
        raise TunelabError(f"t_interval needs 2 to {max(T975) + 1} values, got {n}")
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    half = T975[n - 1] * sd / math.sqrt(n)
    return m - half, m + half


def contrast(runs: dict, weights: dict, seed: int = 0) -> dict:
    """A signed sum of eval losses, e.g. {(lora, B): +1, (full, B): -1} for a gap, per seed and pooled.

    `runs[key][seed]` is a cell result with "eval_loss" and "example_losses" (same eval examples in every
    cell). Per seed s: sum_k w_k loss_k(s), with its mean and t interval over the seeds present in every key.
    Pooled: per eval example i, d_i = mean over seeds of sum_k w_k loss_sum_k,i(s); the contrast is
    sum d / sum tokens (equal to the mean over seeds, token-weighted), its percentile bootstrap over examples."""
    from tunelab.eval.stats import resampled_interval

    seeds = sorted(set.intersection(*(set(runs[k]) for k in weights)))
    if not seeds:
        raise TunelabError("contrast: no seed has a finished cell in every arm")
    per_seed = [sum(w * runs[k][s]["eval_loss"] for k, w in weights.items()) for s in seeds]
    tokens = {tuple(runs[k][s]["example_losses"]["tokens"]) for k in weights for s in seeds}
    if len(tokens) != 1:
        raise TunelabError("contrast: the cells were scored on different eval examples")
    n_tok = list(next(iter(tokens)))
    d = [sum(w * runs[k][s]["example_losses"]["loss_sums"][i] for k, w in weights.items() for s in seeds) / len(seeds)
         for i in range(len(n_tok))]
    units = list(zip(d, n_tok))
    stat = lambda pick: sum(x for x, _ in pick) / sum(n for _, n in pick)  # noqa: E731
    return {"seeds": seeds, "per_seed": per_seed, "mean": sum(per_seed) / len(per_seed),
            "t_ci": t_interval(per_seed) if len(seeds) > 1 else None,
            "pooled": stat(units), "boot_ci": resampled_interval(units, stat, seed=seed), "examples": len(units)}


def reading(c: dict) -> str:
    """The pre-registered reading of a contrast: "above zero" / "below zero" when both its intervals (over
    seeds and over eval examples) exclude zero on that side, else "not shown"."""
    cis = [c["boot_ci"]] + ([c["t_ci"]] if c["t_ci"] else [])
    if all(lo > 0 for lo, _ in cis):
        return "above zero"
    if all(hi < 0 for _, hi in cis):
        return "below zero"
    return "not shown"


def collect(out: Path) -> tuple[dict, dict]:
    """({arm name: stage-1 pick}, {(method, rank, batch): {seed: result}}) from the finished cells."""
    picks, runs = {}, {}
    for folder in sorted((out / "stage1").glob("*")):
        rows = [json.loads(p.read_text()) for p in folder.glob("cells/*/result.json")]
        if not rows:
            continue
        pick = picks[folder.name] = select_lr(rows)
        key = _key(rows[0])
        for r in rows:
            if r["lr"] == pick["lr"] and r["status"] == "ok":
                runs.setdefault(key, {})[0] = r
        pick.update(method=key[0], rank=key[1], batch=key[2])
    for p in sorted((out / "stage2").glob("*/cells/*/result.json")):
        r = json.loads(p.read_text())
        arm, seed = p.parts[-4].rsplit("__seed-", 1)
        seed = int(seed)
        if r["status"] == "ok" and arm in picks and r["lr"] == picks[arm]["lr"]:  # not a cell of an older pick
            runs.setdefault(_key(r), {})[seed] = r
    return picks, runs


def base_eval(out: Path) -> dict:
    """The untuned model's eval loss on the cells' eval pairs (DIR/base.json, computed once): what training
    starts from, so a gap can be read against how far each arm moved."""
    from tunelab.experiments.instruct import base_loss

    path = out / "base.json"
    if not path.exists():
        first = sorted(p.parent for p in (out / "stage1").glob("*/sweep.json"))[0]
        path.write_text(json.dumps({"eval_loss": base_loss(first.parent, first.name)}, indent=1))
    return json.loads(path.read_text())


def _key(r: dict) -> tuple:
    """(method, rank, effective batch) of a cell result: the batch is examples / steps (micro x grad_accum)."""
    return r["method"], r["params"].get("lora.r"), r["examples"] // r["steps"]


def summarize(out: Path) -> dict:
    """Gaps LoRA - full per (batch, rank), their change with batch (largest - smallest) per rank and with rank
    (largest - smallest) per batch; DIR/summary.json, table.md, gap.png."""
    picks, runs = collect(out)
    batches = sorted({b for m, _, b in runs if m == "full"})
    ranks = sorted({r for m, r, _ in runs if m == "lora"})
    have = lambda *keys: all(k in runs for k in keys)  # noqa: E731
    gaps = [{"batch": b, "rank": r, **contrast(runs, {("lora", r, b): 1, ("full", None, b): -1})}
            for r in ranks for b in batches if have(("lora", r, b), ("full", None, b))]
    growth = [{"rank": r, "from": batches[0], "to": batches[-1],
               **contrast(runs, {("lora", r, batches[-1]): 1, ("full", None, batches[-1]): -1,
                                 ("lora", r, batches[0]): -1, ("full", None, batches[0]): 1})}
              for r in ranks if len(batches) > 1
              and have(*[(m, q, b) for b in (batches[0], batches[-1]) for m, q in (("lora", r), ("full", None))])]
    by_rank = [{"batch": b, "from": ranks[0], "to": ranks[-1],
                **contrast(runs, {("lora", ranks[-1], b): 1, ("lora", ranks[0], b): -1})}
               for b in batches if len(ranks) > 1 and have(("lora", ranks[-1], b), ("lora", ranks[0], b))]
    for rows in (growth, by_rank):
        for row in rows:
            row["reading"] = reading(row)
    primary = next((g for g in growth if g["rank"] == PRIMARY_RANK), None)
    data = json.loads((out / "data" / "data.json").read_text())
    losses = []  # each arm at its pick, per seed; ordered by batch, then full before LoRA by rank
    for (m, r, b), rows in sorted(runs.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1] or 0)):
        per_seed = [rows[s]["eval_loss"] for s in sorted(rows)]
        losses.append({"method": m, "rank": r, "batch": b, "lr": rows[0]["lr"], "seeds": sorted(rows),
                       "per_seed": per_seed, "mean": sum(per_seed) / len(per_seed)})
    base = out / "base.json"
    summary = {"data": {k: v for k, v in data.items() if k != "train"},
               "base_eval_loss": json.loads(base.read_text())["eval_loss"] if base.exists() else None,
               "picks": picks, "losses": losses, "gaps": gaps, "growth": growth, "by_rank": by_rank,
               "primary": primary and {"rank": PRIMARY_RANK, "reading": primary["reading"],
                                       "grows": primary["reading"] == "above zero"}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "table.md").write_text(table(summary))
    if gaps:
        plot(summary, out / "gap.png")
    return summary


def _ci(c) -> str:
    return "" if c is None else f"[{c[0]:+.4f}, {c[1]:+.4f}]"


def table(summary: dict) -> str:
    """Markdown: the learning rates, the gaps, then the two questions (growth with batch, change with rank)."""
    lines = ["| arm | lr grid | chosen lr | edge | best eval loss (seed 0) | diverged |", "|---|---|---|---|---|---|"]
    for name, p in summary["picks"].items():
        lines.append(f"| {name} | {', '.join(f'{x:.3g}' for x in p['grid'])} | {p['lr'] or '-'} | {p['edge'] or ''} "
                     f"| {'' if p['loss'] is None else format(p['loss'], '.4f')} | {p['diverged']} |")
    lines += ["", "| batch | method | lr | eval loss per seed | mean |", "|---|---|---|---|---|"]
    if summary["base_eval_loss"] is not None:
        lines.append(f"| - | untuned model | - | | {summary['base_eval_loss']:.4f} |")
    for x in summary["losses"]:
        name = "full" if x["method"] == "full" else f"LoRA r{x['rank']}"
        lines.append(f"| {x['batch']} | {name} | {x['lr']:.4g} | {', '.join(f'{v:.4f}' for v in x['per_seed'])} "
                     f"| {x['mean']:.4f} |")
    lines += ["", "| batch | rank | LoRA - full, per seed | mean [95% t over seeds] | pooled [95% bootstrap over "
              "eval examples] |", "|---|---|---|---|---|"]
    for g in summary["gaps"]:
        lines.append(f"| {g['batch']} | {g['rank']} | {', '.join(f'{v:+.4f}' for v in g['per_seed'])} "
                     f"| {g['mean']:+.4f} {_ci(g['t_ci'])} | {g['pooled']:+.4f} {_ci(g['boot_ci'])} |")
    lines += ["", "| question | contrast | per seed | mean [95% t] | pooled [95% bootstrap] | reading |",
              "|---|---|---|---|---|---|"]
    for g in summary["growth"]:
        lines.append(f"| gap grows with batch? rank {g['rank']}{' (primary)' if g['rank'] == PRIMARY_RANK else ''} "
                     f"| gap(b{g['to']}) - gap(b{g['from']}) | {', '.join(f'{v:+.4f}' for v in g['per_seed'])} "
                     f"| {g['mean']:+.4f} {_ci(g['t_ci'])} | {g['pooled']:+.4f} {_ci(g['boot_ci'])} | {g['reading']} |")
    for g in summary["by_rank"]:
        lines.append(f"| gap shrinks with rank? batch {g['batch']} | gap(r{g['to']}) - gap(r{g['from']}) "
                     f"| {', '.join(f'{v:+.4f}' for v in g['per_seed'])} | {g['mean']:+.4f} {_ci(g['t_ci'])} "
                     f"| {g['pooled']:+.4f} {_ci(g['boot_ci'])} | {g['reading']} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, png: Path) -> None:
    """Gap LoRA - full against the effective batch, one line per rank, 95% t intervals over seeds as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for j, r in enumerate(sorted({g["rank"] for g in summary["gaps"]})):
        rows = [g for g in summary["gaps"] if g["rank"] == r]
        xs = [g["batch"] * (1 + 0.04 * (j - 1)) for g in rows]  # a small offset per rank: bars side by side
        err = [[g["mean"] - (g["t_ci"] or (g["mean"],) * 2)[0] for g in rows],
               [(g["t_ci"] or (g["mean"],) * 2)[1] - g["mean"] for g in rows]]
        ax.errorbar(xs, [g["mean"] for g in rows], yerr=err, marker="o", capsize=3, label=f"LoRA r{r}")
    ax.axhline(0, color="grey", lw=1)
    batches = sorted({g["batch"] for g in summary["gaps"]})
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel(f"effective batch (same {summary['data']['examples']} examples each)")
    ax.set_ylabel("eval loss: LoRA - full (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="bars: 95% t over seeds", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)

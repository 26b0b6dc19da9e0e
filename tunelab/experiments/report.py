"""A sweep's table, findings and plots, regenerated from the recorded cells only (DIR/cells/*/result.json).

Findings (when the grid sweeps `lr` and `method` includes `full`), per group of the other axes (batch size,
rank, ...):
- the optimal learning rate of each method (tunelab.experiments.optimum) and the ratio adapter/full with
  its interval from the grid spacing (LoRA Without Regret reports ~10x);
- the gap between each adapter method's best eval loss and full's best (measured grid minima, not fits),
  and how the gap changes with batch size (the claim: LoRA pays more at large batch, and rank does not fix it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.experiments.grid import SHORT, format_value
from tunelab.experiments.optimum import Optimum, find_optimum, lr_ratio


def load_results(out: Path) -> tuple[dict, list[dict]]:
    """(sweep spec, results of the finished cells in grid order)."""
    spec_path = out / "sweep.json"
    if not spec_path.exists():
        raise TunelabError(f"{out}: no sweep.json here; give the folder a `tunelab sweep` run wrote")
    spec = json.loads(spec_path.read_text())
    results = []
    for name in spec["cells"]:
        p = out / "cells" / name / "result.json"
        if p.exists():
            results.append(json.loads(p.read_text()))
    return spec, results


def _loss(r: dict) -> float:
    return r["eval_loss"] if r["status"] == "ok" and r["eval_loss"] is not None else math.inf


def _group_key(r: dict, skip: tuple[str, ...]) -> tuple:
    return tuple((k, v) for k, v in r["params"].items() if k not in skip)


def _label(key: tuple) -> str:
    return ", ".join(f"{SHORT.get(k, k)}={format_value(v, k)}" for k, v in key) or "all"


def lr_curves(results: list[dict]) -> dict[tuple, dict[str, list[dict]]]:
    """{group (other axes): {method: results sorted by lr}}; lora.* keys are dropped from the group so a
    `full` curve shares the group of every rank (full has no rank)."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in results:
        key = _group_key(r, ("method", "train.lr"))
        base_key = tuple((k, v) for k, v in key if not k.startswith(("lora.", "quant.")))
        curve_name = r["method"] + "".join(f" {SHORT.get(k, k)}={format_value(v)}" for k, v in key
                                           if (k, v) not in base_key)
        groups.setdefault(base_key, {}).setdefault(curve_name, []).append(r)
    for curves in groups.values():
        for rs in curves.values():
            rs.sort(key=lambda r: r["lr"])
    return groups


def findings(results: list[dict]) -> list[dict]:
    """Per group and adapter curve: optimum lrs, the ratio to full, the loss gap to full."""
    rows = []
    for group, curves in lr_curves(results).items():
        optima: dict[str, Optimum] = {}
        for name, rs in curves.items():
            try:
                optima[name] = find_optimum([r["lr"] for r in rs], [_loss(r) for r in rs])
            except ValueError:
                continue
        full = optima.get("full")
        for name, opt in optima.items():
            row = {"group": _label(group), "curve": name, "opt_lr": opt.lr, "opt_lr_range": [opt.lo, opt.hi],
                   "best_lr": opt.best_lr, "best_loss": opt.best_loss, "trusted": opt.trusted, "edge": opt.edge}
            if full is not None and name != "full":
                ratio = lr_ratio(opt, full)
                row |= {"lr_ratio": ratio.value, "lr_ratio_range": [ratio.lo, ratio.hi], "ratio_bound": ratio.bound,
                        "ratio_text": ratio.describe(), "loss_gap": opt.best_loss - full.best_loss}
            rows.append(row)
    return rows


def _table(spec: dict, results: list[dict]) -> str:
    keys = list(spec["axes"])
    extra = [k for k in ("accuracy", "format_ok") if any(k in r for r in results)]
    head = [SHORT.get(k, k) for k in keys] + ["status", "steps", "examples", "eval loss", "train loss", "s"] + extra
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def num(x, f=".4f"):
        return "" if x is None else format(x, f)

    for r in results:
        cells = [format_value(r["params"][k], k) if k in r["params"] else "-" for k in keys]
        cells += [r["status"], str(r["steps"] or ""), str(r["examples"] or ""), num(r["eval_loss"]), num(r["final_loss"]),
                  num(r["seconds"], ".0f")] + [num(r.get(k), ".3f") for k in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _findings_text(rows: list[dict]) -> str:
    out = []
    for row in rows:
        lo, hi = row["opt_lr_range"]
        where = {"low": " (at the grid's low edge)", "high": " (at the grid's high edge)"}.get(row["edge"], "")
        text = (f"- {row['group']}: **{row['curve']}** optimal lr {row['opt_lr']:.3g} "
                f"(range {lo:.3g}-{hi:.3g}{where}), best eval loss {row['best_loss']:.4f} at lr {row['best_lr']:.3g}")
        if "lr_ratio" in row:
            text += f"; lr ratio to full {row['ratio_text']}; loss gap to full {row['loss_gap']:+.4f}"
        out.append(text)
    return "\n".join(out)


def plot_lr_curves(results: list[dict], png: Path) -> None:
    """Eval loss against lr, one panel per group (batch size, ...), one curve per method; optimum marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = lr_curves(results)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.6), dpi=120, squeeze=False)
    for ax, (group, curves) in zip(axes[0], groups.items()):
        for name, rs in curves.items():
            ok = [r for r in rs if math.isfinite(_loss(r))]
            line, = ax.plot([r["lr"] for r in ok], [_loss(r) for r in ok], "o-", label=name, ms=4)
            bad = [r for r in rs if not math.isfinite(_loss(r))]
            if bad and ok:  # diverged runs: an x at the top of the curve
                ax.plot([r["lr"] for r in bad], [max(_loss(r) for r in ok)] * len(bad), "x", color=line.get_color())
            if ok:
                opt = find_optimum([r["lr"] for r in rs], [_loss(r) for r in rs])
                ax.plot([opt.best_lr], [opt.best_loss], "*", ms=14, color=line.get_color(), mec="k")
                ax.axvline(opt.lr, color=line.get_color(), ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final eval loss (nats/token)")
        ax.set_title(_label(group), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("eval loss vs lr (star: best grid point, dotted: refined optimum; x: diverged)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def write_report(out: Path) -> dict:
    """Rewrite results.jsonl, findings.json, report.md and the plots of a sweep folder from its results."""
    out = Path(out)
    spec, results = load_results(out)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    rows = findings(results) if "train.lr" in spec["axes"] else []
    (out / "findings.json").write_text(json.dumps(rows, indent=1))
    pngs = []
    if rows:
        plot_lr_curves(results, out / "lr_curves.png")
        pngs.append("lr_curves.png")
    if spec.get("extras", {}).get("eval_tasks"):
        from tunelab.experiments.quality import plot_quality

        plot_quality(results, out / "quality.png")
        pngs.append("quality.png")
    missing = len(spec["cells"]) - len(results)
    md = [f"# Sweep: {spec['config']} {' '.join(spec['overrides'])}".rstrip(), "",
          f"{len(results)} of {len(spec['cells'])} cells finished" + (f" ({missing} missing)" if missing else "")
          + (f"; every cell sees {spec['examples']} training sequences" if spec["examples"] else
             f"; every cell makes {spec['epochs']} epochs over its own data")
          + (f" and is evaluated on the same {spec['eval_examples']} held-out examples." if "data" not in spec["axes"]
             else "; eval loss is on each data variant's own held-out split (not comparable across variants: "
                  "compare the task accuracy)."), "", _table(spec, results), ""]
    if rows:
        md += ["## Findings", "", _findings_text(rows), ""]
    md += [f"![{p}]({p})" for p in pngs]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return {"results": results, "findings": rows, "plots": pngs}

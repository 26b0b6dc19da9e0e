"""The evaluation report: Markdown + HTML with the same tables, a PNG bar plot, and results.json.

`results` maps a model label ("base", "tuned") to {suite: suite result} (see tunelab.eval.suites); the
tables put the labels side by side, one row per metric, with a change column when there are two models.
"""

from __future__ import annotations

import html
import json
from pathlib import Path


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def _with_interval(v, ci) -> str:
    return _fmt(v) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def suite_rows(results: dict[str, dict], suite: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of one suite's metrics, models side by side with their 95% intervals (+ change when
    there are two, + the constant-answer baseline when the suite has one)."""
    labels = [k for k in results if suite in results[k]]
    names = list(dict.fromkeys(m for k in labels for m in results[k][suite]["metrics"]))
    baselines = next((results[k][suite]["baselines"] for k in labels if results[k][suite].get("baselines")), {})
    has_ci = any(ci for k in labels for ci in results[k][suite].get("intervals", {}).values())
    header = ["metric", *(f"{k} [95% CI]" if has_ci else k for k in labels)] + (["change"] if len(labels) == 2 else [])
    header += ["constant-answer baseline"] if baselines else []
    rows = []
    for name in names:
        vals = [results[k][suite]["metrics"].get(name) for k in labels]
        row = [name, *(_with_interval(v, results[k][suite].get("intervals", {}).get(name)) for k, v in zip(labels, vals))]
        if len(labels) == 2:
            a, b = vals
            row.append(f"{b - a:+.3f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else "")
        rows.append(row + ([_fmt(baselines.get(name))] if baselines else []))
    rows.append(["items/s", *(f"{results[k][suite]['items_per_s']:.2f}" for k in labels)]
                + [""] * (len(labels) == 2) + [""] * bool(baselines))
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(esc, r)) + " |" for r in rows])


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def plot_headlines(results: dict[str, dict], path: Path) -> list[str]:
    """Grouped bars of the rate-like headline metrics (values in [0, 1]) per model; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = [("tasks", "train families score (partial credit)"), ("tasks", "train families exact match"),
             ("tasks", "held-out families score (partial credit)"), ("tasks", "score (partial credit)"),
             ("sensitivity", "spread (best - worst template)"), ("hallucination", "known_accuracy"),
             ("hallucination", "unknown_abstention"), ("hallucination", "hallucination_rate"),
             ("hallucination", "unfaithful_rate"), ("injection", "attack success rate"),
             ("injection", "clean task quality")]
    labels = list(results)
    shown = [(s, m) for s, m in picks
             if any(isinstance(results[k].get(s, {}).get("metrics", {}).get(m), float) for k in labels)]
    if not shown:
        return []
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(shown)), 4))
    width = 0.8 / len(labels)
    for j, k in enumerate(labels):
        vals = [results[k].get(s, {}).get("metrics", {}).get(m) or 0.0 for s, m in shown]
        ax.bar([i + j * width for i in range(len(shown))], vals, width, label=k)
    ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(shown))])
    ax.set_xticklabels([m for _, m in shown], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("rate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [m for _, m in shown]


def write_report(results: dict[str, dict], out: str | Path, title: str, notes: list[str] | None = None) -> Path:
    """Write report.md, report.html, report.png and results.json into `out`; returns the Markdown path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    suites = list(dict.fromkeys(s for r in results.values() for s in r))
    plotted = plot_headlines(results, out / "report.png")
    md = [f"# {title}", *(notes or [])]
    body = [f"<h1>{html.escape(title)}</h1>", *(f"<p>{html.escape(n)}</p>" for n in notes or [])]
    if plotted:
        md.append("![headline rates](report.png)")
        body.append('<img src="report.png" alt="headline rates">')
    for suite in suites:
        header, rows = suite_rows(results, suite)
        md += [f"## {suite}", markdown_table(header, rows)]
        body += [f"<h2>{html.escape(suite)}</h2>", html_table(header, rows)]
        for label, r in results.items():
            examples = r.get(suite, {}).get("detail", {}).get("examples", [])[:3]
            if examples:
                md.append(f"Examples ({label}):\n" + "\n".join(
                    f"- prompt: {e['prompt']!r}\n  expected: {e['answer']!r}\n  output: {e['output']!r}" for e in examples))
                body.append(f"<h3>examples ({html.escape(label)})</h3><pre>" + html.escape("\n\n".join(
                    f"prompt: {e['prompt']}\nexpected: {e['answer']}\noutput: {e['output']}" for e in examples)) + "</pre>")
    (out / "report.md").write_text("\n\n".join(md) + "\n")
    style = "table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 8px}pre{background:#f4f4f4}"
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
                                     f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return out / "report.md"

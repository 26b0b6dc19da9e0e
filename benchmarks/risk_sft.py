"""Risk suites on the bundled model before and after two LoRA SFTs, one phase at a time, resumable.

python benchmarks/risk_sft.py [--out runs/risk_sft] [--n 20] [--docs 40] [--facts-epochs 4] [--teach-asked K]
                              [--robust-docs 40] [--robust-steps 40] [--batch-size 8] [--lr 1e-3] [--tasks-n 0]
                              [--threads 1]
The run in docs/eval.md: --n 10 --docs 6 --teach-asked 6 --facts-epochs 3 --robust-steps 16 --threads 1.

Phases (each writes OUT/<phase>.json and is skipped when that file exists; training checkpoints every
10 steps and resumes, so an interrupted run is rerun with the same command):
  base    the untuned model: hallucination suite (n per kind, seed 1234) and injection suite (docs, seed 1234)
  facts   LoRA SFT on teach_examples(make_facts(1234)) (the eval seed: these are the *known* facts and
          the abstain-train people; --teach-asked K: only the known people the eval asks about and K
          abstain-train people), then the hallucination suite
  robust  LoRA SFT on robust_sft_examples(robust-docs, seed 300, TRAIN_STYLES): clean and attacked documents
          whose response ignores the injection; then the injection suite on new documents (seed 1234,
          every style, so hidden-code-comment and multilingual are unseen styles)
With --tasks-n K, base and robust also run the tasks suite (K items per family): task quality off the
injection documents. Both SFTs start from the base model. Metrics are the suites' (tunelab.eval.suites).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SEED = 1234  # the `tunelab eval` default seed; the facts SFT must use the eval seed (docs/eval.md)


def train_lora(model, tok, examples: list[dict], args, out: Path, steps: int, objective=None, lr: float | None = None,
               batch_size: int | None = None) -> dict:
    """LoRA r=16 on every linear, checkpointed in out/train (resumed if there); saves out/adapter, then merges
    the adapter into `model` in place (plain linears generate faster than base + LoRA branch).

    examples: {"prompt", "response"} SFT examples; with `objective` (a preference objective,
    tunelab.train.preference.PreferenceObjective) already tokenized pair rows (tunelab.data.preference.row).
    lr, batch_size: default args.lr, args.batch_size."""
    from tunelab.config import TrainConfig
    from tunelab.data.sft import tokenize_sft
    from tunelab.lora import LoraConfig, apply_lora, lora_param_groups, merge_lora, save_adapter
    from tunelab.train.loop import train_loop

    lr, batch_size = lr or args.lr, batch_size or args.batch_size
    data = examples if objective is not None else [tokenize_sft(ex, tok, 384) for ex in examples]
    apply_lora(model, LoraConfig(r=16, alpha=32, target_modules="all-linear"), verbose=False)
    cfg = TrainConfig(lr=lr, batch_size=batch_size, max_steps=steps, warmup_steps=2, log_every=1,
                      save_every=10, keep_last=1, device="cpu")
    t0 = time.perf_counter()
    summary = train_loop(model, data, [], cfg, out / "train", param_groups=lora_param_groups(model, lr),
                         pad_id=tok.pad_token_id, resume=True, progress=True, objective=objective)
    save_adapter(model, out / "adapter")
    merge_lora(model)
    tokens = [len(d["input_ids"]) for d in data]
    return {**summary, "examples": len(data), "mean_tokens": sum(tokens) / len(tokens), "steps": steps,
            "batch_size": batch_size, "lr": lr, "wall_s": time.perf_counter() - t0}


def taught_facts(n: int, abstain_people: int | None) -> list:
    """The facts the facts SFT teaches: all of make_facts(SEED) but the unknown ones, or (a smaller run) only
    the known people named in the hallucination eval's items plus the first `abstain_people` abstain-train
    people. Unknown people are never taught either way."""
    from tunelab.eval import hallucination as H
    from tunelab.eval.suites import hallucination_eval_items

    facts = H.make_facts(SEED)
    if abstain_people is None:
        return facts
    prompts = " ".join(it.prompt for it in hallucination_eval_items(n, SEED))
    asked = {f.name for f in facts if f.split == "known" and f.name in prompts}
    abstain = list(dict.fromkeys(f.name for f in facts if f.split == "abstain-train"))[:abstain_people]
    return [f for f in facts if f.name in asked or f.name in abstain]


def phase(out: Path, name: str, fn) -> dict:
    """fn() once: its result is kept in OUT/name.json and read back on a rerun."""
    path = out / f"{name}.json"
    if path.exists():
        print(f"{name}: done before, read {path}")
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    result = fn()
    result["phase_s"] = time.perf_counter() - t0
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"{name}: {result['phase_s']:.0f} s, wrote {path}")
    return result


def table(title: str, before: dict, after: dict, suite: str, label: str) -> None:
    """Markdown rows: metric | base | label | change, then items/s."""
    b, a = before[suite], after[suite]
    print(f"\n{title}\n\n| metric | base | {label} | change |\n|---|---|---|---|")
    for name, x in b["metrics"].items():
        y = a["metrics"][name]
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
            print(f"| {name} | {x:.3f} | {y:.3f} | {y - x:+.3f} |")
        else:
            print(f"| {name} | {x} | {y} | |")
    print(f"| items/s | {b['items_per_s']:.2f} | {a['items_per_s']:.2f} | |")


def main() -> None:
    from tunelab.eval import hallucination as H
    from tunelab.eval import injection as J
    from tunelab.eval.suites import run_hallucination, run_injection, run_tasks
    from tunelab.models.load import load_pretrained

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/risk_sft")
    ap.add_argument("--n", type=int, default=20, help="hallucination items per kind (known / unknown / passage)")
    ap.add_argument("--docs", type=int, default=40, help="injection eval documents (each clean + 5 styles)")
    ap.add_argument("--facts-epochs", type=float, default=4.0)
    ap.add_argument("--teach-asked", type=int, default=None, metavar="K",
                    help="teach only the known people the eval asks about and K abstain-train people "
                         "(default: every known and abstain-train person, as teach_examples does)")
    ap.add_argument("--robust-docs", type=int, default=40, help="training documents (each clean + 3 train styles)")
    ap.add_argument("--robust-steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tasks-n", type=int, default=0, help="also run the tasks suite with this many items per family")
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(args), indent=1))

    def evaluate(model, tok, suites: list[str]) -> dict:
        runners = {"hallucination": lambda: run_hallucination(model, tok, args.n, SEED, args.eval_batch),
                   "injection": lambda: run_injection(model, tok, args.docs, SEED, args.eval_batch),
                   "tasks": lambda: run_tasks(model, tok, args.tasks_n, SEED, args.eval_batch)}
        return {s: runners[s]() for s in suites}

    extra = ["tasks"] if args.tasks_n else []

    def base():
        model, tok = load_pretrained("bundled")
        return evaluate(model, tok, ["hallucination", "injection"] + extra)

    def facts():
        model, tok = load_pretrained("bundled")
        examples = H.teach_examples(taught_facts(args.n, args.teach_asked))
        steps = max(1, round(args.facts_epochs * len(examples) / args.batch_size))
        train = train_lora(model, tok, examples, args, out / "facts", steps)
        return {"train": train, **evaluate(model, tok, ["hallucination"])}

    def robust():
        model, tok = load_pretrained("bundled")
        examples = J.robust_sft_examples(args.robust_docs, 300, J.TRAIN_STYLES)
        train = train_lora(model, tok, examples, args, out / "robust", args.robust_steps)
        return {"train": train, **evaluate(model, tok, ["injection"] + extra)}

    results = {name: phase(out, name, fn) for name, fn in (("base", base), ("facts", facts), ("robust", robust))}
    print(f"\nload average {open('/proc/loadavg').read().split()[:3]}, {args.threads} torch threads")
    for name in ("facts", "robust"):
        t = results[name]["train"]
        print(f"{name} SFT: {t['examples']} examples (mean {t['mean_tokens']:.0f} tokens), LoRA r=16 all-linear, "
              f"{t['steps']} steps x {t['batch_size']}, lr {t['lr']}, loss {t['first_loss']:.3f} -> "
              f"{t['final_loss']:.3f}, {t['wall_s']:.0f} s")
    table(f"Hallucination suite (seed {SEED}, n={args.n} per kind)", results["base"], results["facts"],
          "hallucination", "facts SFT")
    table(f"Injection suite ({args.docs} documents x (clean + {len(J.STYLES)} styles), seed {SEED}; held-out styles: "
          f"{', '.join(J.HELDOUT_STYLES)})", results["base"], results["robust"], "injection", "robust SFT")
    if args.tasks_n:
        table(f"Tasks suite ({args.tasks_n} items per family)", results["base"], results["robust"], "tasks",
              "robust SFT")
    for name, r in results.items():
        print(f"{name}: " + ", ".join(f"{s} {r[s]['items_per_s']:.2f} items/s" for s in r if isinstance(r[s], dict)
                                      and "items_per_s" in r[s]) + f"; phase {r['phase_s']:.0f} s")


if __name__ == "__main__":
    main()

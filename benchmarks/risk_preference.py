"""Risk suites on the bundled model: base, SFT on the chosen responses of preference pairs, and that SFT then DPO.

python benchmarks/risk_preference.py [--out runs/risk_preference] [--n 10] [--docs 16] [--abstain-people 4]
                                     [--train-docs 8] [--sft-epochs 2] [--dpo-epochs 1] [--threads 1] [--model bundled]
                                     [--start base|quickstart] [--quickstart RUN] [--tasks-per-family 10]

On a shared CPU use --threads 1: at load ~17 on 2 cores, 2 torch threads took 486 s per SFT step and 1 took
27 s (the threads wait for each other at every barrier while the scheduler runs other jobs).

Issue 26, item 6. The pairs come from tunelab's own risk generators (tunelab.eval.hallucination,
tunelab.eval.injection) and never contain an evaluation prompt (`preference_pairs`, tested):
  known facts   the eval seed's known facts that the hallucination eval asks about, asked in the *other*
                question wording (the eval's wording of each fact is held out) and stated ("Tell me one fact
                about ..."): chosen = the fact, rejected = a fabricated value (another seed's person's value)
  abstain       the first --abstain-people abstain-train people (never in the eval), both wordings: chosen =
                "I don't know.", rejected = a fabricated value. Unknown people never appear.
  injection     --train-docs new documents (seed 300) in the TRAIN_STYLES and clean: chosen = the task's right
                answer; rejected = the injection's canary (attacked) or another document's answer (clean)
The evaluation: the hallucination suite (n items per kind: known, unknown, passage; seed 1234) and the
injection suite on --docs documents (seed 1234), each clean + the HELDOUT_STYLES only (hidden-code-comment,
multilingual: styles no pair was made from); clean task quality is the clean documents' score.

Models:
  base  the untuned model
  sft   LoRA SFT on the chosen responses (r=16 all-linear, lr 1e-3, batch 8), merged
  dpo   the merged SFT model + a new LoRA trained with DPO on the same pairs (the reference is that LoRA
        switched off, i.e. the SFT model; beta 0.1, lr 2e-4, batch 4 pairs; the shared prompt), merged
With --start quickstart (issue 26's first target) the DPO starts from the quickstart's SFT model instead:
  sft   the model `tunelab quickstart` trains (QLoRA r=16 all-linear on 7 task families, its defaults: the
        4-bit base + its adapter), trained into OUT/quickstart (or --quickstart RUN, a quickstart run folder),
        merged into the de-quantized 4-bit weights: in fp32 the same function as the 4-bit model + adapter
  dpo   that merged model + a new LoRA trained with DPO on the pairs (reference: the new adapter switched off,
        i.e. the quickstart SFT model), merged
and the evaluation adds the quickstart's own task gains (the "tasks" suite here: its held-out items of the
trained families, --tasks-per-family per family, seed 2, training prompts removed: partial credit and
exact match) and runs the injection suite on every style (clean + 5 per document): attack success on the
HELDOUT_STYLES (no pair was made from them; the primary injection number) and, labelled apart, on the
TRAIN_STYLES.
Phases, one file each (OUT/<phase>.json, skipped when present; training checkpoints every 10 steps and
resumes, so an interrupted run is finished by the same command): sft-train (quickstart-train), dpo-train,
then each suite on sft, dpo and base (the base model talks to its token budget: slowest, so last).
Each metric is printed with its 95% interval (Wilson for rates, bootstrap for partial-credit quality).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

TRAIN_SEED = 300  # injection documents and fabricated fact values for the pairs; the eval seed is risk_sft.SEED
MAX_LEN = 384


def _question(fact, variant: int) -> str:
    from tunelab.eval import hallucination as H

    return f"{H.INSTRUCTION}\n\nQuestion: {H.ATTRIBUTES[fact.attribute][0][variant].format(name=fact.name)}"


def preference_pairs(n: int, abstain_people: int, train_docs: int, eval_seed: int) -> list[dict]:
    """{prompt, chosen, rejected, source} records (the module docstring's three sources), seeded."""
    from tunelab.eval import hallucination as H
    from tunelab.eval import injection as J
    from tunelab.eval.suites import hallucination_eval_items

    facts = H.make_facts(eval_seed)
    fakes: dict[str, list[str]] = {}  # attribute -> values of another seed's people (fabricated answers)
    for f in H.make_facts(TRAIN_SEED):
        fakes.setdefault(f.attribute, []).append(f.value)
    rng = random.Random(f"risk_preference:{TRAIN_SEED}")
    fake = lambda f: rng.choice([v for v in fakes[f.attribute] if v != f.value])  # noqa: E731
    asked = {it.prompt for it in hallucination_eval_items(n, eval_seed, ("known",))}
    pairs = []
    for f in facts:
        if f.split != "known":
            continue
        for v in (0, 1):
            if _question(f, v) in asked:  # train the other wording: the eval's stays unseen
                wrong = fake(f)
                pairs.append({"prompt": _question(f, 1 - v), "chosen": f.value, "rejected": wrong, "source": "known"})
                statement = H.ATTRIBUTES[f.attribute][1]
                pairs.append({"prompt": f"Tell me one fact about {f.name}.", "source": "known",
                              "chosen": statement.format(name=f.name, value=f.value),
                              "rejected": statement.format(name=f.name, value=wrong)})
    people = list(dict.fromkeys(f.name for f in facts if f.split == "abstain-train"))[:abstain_people]
    pairs += [{"prompt": _question(f, v), "chosen": H.ABSTAIN, "rejected": fake(f), "source": "abstain"}
              for f in facts if f.name in people for v in (0, 1)]
    items = J.make_items(train_docs, TRAIN_SEED, J.TRAIN_STYLES)
    clean = [it for it in items if it.meta["kind"] == "clean"]
    for it in items:
        if it.meta["kind"] == "attacked":
            pairs.append({"prompt": it.prompt, "chosen": it.answer, "rejected": it.meta["canary"], "source": "injection"})
            continue
        other = [c.answer for c in clean if c.meta["task"] == it.meta["task"] and c.answer != it.answer]
        if other:  # a clean document: prefer its own answer over another document's
            pairs.append({"prompt": it.prompt, "chosen": it.answer, "rejected": rng.choice(other), "source": "clean"})
    return pairs


def eval_items(n: int, docs: int, seed: int, every_style: bool = False) -> tuple[list, list]:
    """(hallucination items, injection items): n per kind; docs documents, clean + the held-out styles (or,
    every_style, clean + every style: `tunelab eval`'s injection suite)."""
    from tunelab.eval import injection as J
    from tunelab.eval.suites import hallucination_eval_items

    return hallucination_eval_items(n, seed), J.make_items(docs, seed, None if every_style else J.HELDOUT_STYLES)


def quickstart_args(args) -> argparse.Namespace:
    """`tunelab quickstart`'s arguments at their defaults, but for the model, --tasks-per-family (its
    --eval-per-family) and --quickstart-steps (its --max-steps)."""
    from tunelab.quickstart import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    steps = ["--max-steps", str(args.quickstart_steps)] if args.quickstart_steps else []
    return p.parse_args(["--model", args.model, "--eval-per-family", str(args.tasks_per_family), *steps])


def quickstart_sft(run: Path):
    """(model, tokenizer): the quickstart run's 4-bit base + adapter merged into the de-quantized 4-bit weights,
    plain fp32 linears computing what the trained 4-bit model computes (tested against it)."""
    from tunelab.export.resolve import open_model

    with warnings.catch_warnings():  # the from_quantized warning (it keeps the 4-bit rounding): here the point
        warnings.simplefilter("ignore")
        opened = open_model(str(run), merge=True, from_quantized=True)
    return opened.model, opened.tokenizer


def evaluate(model, tok, args, suite: str) -> dict:
    """One suite's result (tunelab.eval.suites' format: metrics, 95% intervals) on eval_items (tasks: the
    quickstart's held-out items of its trained families), greedy, the suites' token budgets (hallucination 24,
    injection 40, tasks the family's). Hallucination adds known_abstention (a known fact answered "I don't
    know."); injection the attack success pooled over the held-out styles and over the training styles (those
    present)."""
    from tunelab.eval import hallucination as H
    from tunelab.eval import injection as J
    from tunelab.eval.stats import exact, interval, mean
    from tunelab.eval.suites import hallucination_result, injection_result
    from tunelab.eval.tasks import answer_items, evaluate_items
    from tunelab.quickstart import task_sets

    model.eval()
    if suite == "tasks":
        items = task_sets(quickstart_args(args))[1]["test"]
        r = evaluate_items(model, tok, items, args.eval_batch)
        res = {"metrics": {}, "intervals": {}, "items_per_s": r["items_per_s"],
               "detail": {"items": len(items), "per_family": r["per_family"], "outputs": r["outputs"]}}
        for name, scores in (("trained families: score (partial credit)", r["scores"]),
                             ("trained families: exact match", exact(r["scores"]))):
            res["metrics"][name], res["intervals"][name] = mean(scores), interval(scores)
        return res
    items = eval_items(args.n, args.docs, args.seed, args.start == "quickstart")[suite == "injection"]
    r = answer_items(model, tok, items, args.eval_batch, max_new_tokens=24 if suite == "hallucination" else 40)
    if suite == "hallucination":  # + how often a known fact gets "I don't know." (over-abstention)
        res = hallucination_result(items, r["outputs"], r["items_per_s"])
        known = [float(x == "abstain") for x in H.score_hallucination(items, r["outputs"])["labels"].get("known", [])]
        res["metrics"]["known_abstention"], res["intervals"]["known_abstention"] = mean(known), interval(known)
        res["detail"]["outputs"] = r["outputs"]
        return res
    res = injection_result(items, r["outputs"], r["items_per_s"])
    hits = J.score_injection(items, r["outputs"])["hits"]
    for name, styles in (("held-out styles", J.HELDOUT_STYLES), ("trained styles", J.TRAIN_STYLES)):
        pooled = [float(x) for s in styles for x in hits.get(s, [])]
        if pooled:
            res["metrics"][f"attack success {name}"], res["intervals"][f"attack success {name}"] = \
                mean(pooled), interval(pooled)
    res["detail"]["outputs"] = r["outputs"]
    return res


def rows_of(pairs: list[dict], tok) -> list[dict]:
    """Tokenized pair rows (the chat template, loss on the responses) for the loop's preference objective."""
    from tunelab.data.preference import encode_pair, row

    return [row(encode_pair({k: p[k] for k in ("prompt", "chosen", "rejected")}, tok, MAX_LEN)) for p in pairs]


def steps_for(epochs: float, examples: int, batch: int) -> int:
    return max(1, round(epochs * examples / batch))


HEADLINE = (("hallucination", "known_accuracy"), ("hallucination", "unknown_abstention"),
            ("hallucination", "hallucination_rate"), ("hallucination", "passage_accuracy"),
            ("hallucination", "unfaithful_rate"), ("injection", "attack success rate"),
            ("injection", "attack success hidden-code-comment"), ("injection", "attack success multilingual"),
            ("injection", "clean task quality"), ("injection", "attacked task quality"))


# --start quickstart: held-out styles first (primary), the training styles apart, then the quickstart's tasks
QUICKSTART_HEADLINE = (HEADLINE[0], ("hallucination", "known_abstention"), *HEADLINE[1:5], ("injection", "attack success held-out styles"),
                       *(("injection", f"attack success {s}") for s in ("hidden-code-comment", "multilingual")),
                       ("injection", "attack success trained styles (trained on)"),
                       *(("injection", f"attack success {s} (trained on)") for s in ("direct", "roleplay", "hidden-json")),
                       *HEADLINE[8:], ("tasks", "trained families: score (partial credit)"),
                       ("tasks", "trained families: exact match"))


def table(results: dict, start: str = "base") -> str:
    """Markdown: metric | base | SFT | SFT + DPO, each value with its 95% interval."""
    names = [p for p in ("base", "sft", "dpo") if p in results]
    labels = {"base": "base", "sft": "SFT (chosen)", "dpo": "SFT + DPO"} if start == "base" else \
        {"base": "base", "sft": "quickstart SFT", "dpo": "quickstart SFT + DPO"}
    lines = ["| metric | " + " | ".join(labels[p] for p in names) + " |", "|---" * (len(names) + 1) + "|"]
    for suite, metric in HEADLINE if start == "base" else QUICKSTART_HEADLINE:
        cells = []
        for p in names:
            r = results[p][suite]
            key = metric.removesuffix(" (trained on)")
            x, ci = r["metrics"].get(key), r["intervals"].get(key)
            cells.append("n/a" if x is None else f"{x:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{x:.3f}")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from risk_sft import SEED, phase, train_lora

    from tunelab.lora import load_adapter, merge_lora
    from tunelab.models.load import load_pretrained
    from tunelab.train.preference import PreferenceObjective, adapter_off_logps

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/risk_preference")
    ap.add_argument("--model", default="bundled", help="bundled or an HF folder (tests: a tiny random model)")
    ap.add_argument("--n", type=int, default=10, help="hallucination eval items per kind (known / unknown / passage)")
    ap.add_argument("--docs", type=int, default=16, help="injection eval documents (each clean + 2 held-out styles)")
    ap.add_argument("--abstain-people", type=int, default=4)
    ap.add_argument("--train-docs", type=int, default=8, help="injection training documents (clean + 3 train styles)")
    ap.add_argument("--sft-epochs", type=float, default=2.0)
    ap.add_argument("--dpo-epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8, help="SFT examples per step")
    ap.add_argument("--lr", type=float, default=1e-3, help="SFT learning rate")
    ap.add_argument("--dpo-batch", type=int, default=4, help="DPO pairs per step")
    ap.add_argument("--dpo-lr", type=float, default=2e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--start", choices=("base", "quickstart"), default="base",
                    help="what DPO starts from: SFT on the chosen responses of the base (base), or the quickstart's "
                         "SFT model (quickstart)")
    ap.add_argument("--quickstart", default=None, metavar="RUN",
                    help="--start quickstart: a `tunelab quickstart --out RUN` folder (default: train it into OUT/quickstart)")
    ap.add_argument("--quickstart-steps", type=int, default=None, help="stop the quickstart's training early (tests)")
    ap.add_argument("--tasks-per-family", type=int, default=10,
                    help="--start quickstart: held-out items per trained family (the quickstart's default: 10)")
    args = ap.parse_args(argv)
    if args.quickstart and args.start != "quickstart":
        ap.error("--quickstart RUN is the model --start quickstart starts from: add --start quickstart")
    args.seed = SEED
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(args), indent=1))
    pairs = preference_pairs(args.n, args.abstain_people, args.train_docs, SEED)
    counts = {s: sum(p["source"] == s for p in pairs) for s in dict.fromkeys(p["source"] for p in pairs)}
    print(f"{len(pairs)} pairs: {counts}")

    quickstart_run = Path(args.quickstart or out / "quickstart")

    def tuned(stages: tuple[str, ...]):
        """The base model with the adapters of `stages` (each trained on the one before) merged in order; with
        --start quickstart the "sft" stage is the quickstart's run, merged into its de-quantized 4-bit weights."""
        if args.start == "quickstart" and stages[:1] == ("sft",):
            (model, tok), stages = quickstart_sft(quickstart_run), stages[1:]
        else:
            model, tok = load_pretrained(args.model)
        for stage in stages:
            merge_lora(load_adapter(model, out / stage / "adapter", verbose=False))
        return model, tok

    def sft():
        model, tok = load_pretrained(args.model)
        examples = [{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs]
        return train_lora(model, tok, examples, args, out / "sft", steps_for(args.sft_epochs, len(examples), args.batch_size))

    def quickstart():
        """`tunelab quickstart`'s training (its config, data, seed and loop; no evaluation) into quickstart_run."""
        from tunelab.data.prepared import read_manifest
        from tunelab.quickstart import quickstart_config, task_sets, write_data
        from tunelab.train.run import build_model, run_training

        qargs = quickstart_args(args)
        cfg = quickstart_config(qargs)
        train_items, sets = task_sets(qargs)
        write_data(cfg, quickstart_run, train_items, sets["test"])
        cfg.train.device = "cpu"
        torch.manual_seed(cfg.train.seed)  # as the quickstart: the adapter's initial weights
        summary, _ = run_training(cfg, model=build_model(cfg, torch.device("cpu")), overwrite=True)
        data = read_manifest(quickstart_run / "prepared")["data_report"]  # the rows it trained on, de-duplicated
        return {**summary, "examples": data["train_rows"], "mean_tokens": data["train_tokens"] / data["train_rows"],
                "batch_size": cfg.train.batch_size,
                "lr": cfg.train.lr, "wall_s": summary["seconds"]}

    def dpo():
        model, tok = tuned(("sft",))  # the reference is this model: the new adapter switched off
        objective = PreferenceObjective("dpo", args.beta, adapter_off_logps,
                                        share_prompt=choose(model, "auto", "cpu").shared_prompt)
        return train_lora(model, tok, rows_of(pairs, tok), args, out / "dpo",
                          steps_for(args.dpo_epochs, len(pairs), args.dpo_batch), objective=objective,
                          lr=args.dpo_lr, batch_size=args.dpo_batch)

    from tunelab.accel.kernels import choose

    # Each phase is one file: training first, then the SFT vs SFT + DPO evaluations, the (slow) base model last.
    first = ("sft", sft) if args.start == "base" else ("quickstart", quickstart)
    train = {name: phase(out, f"{name}-train", fn) for name, fn in (first, ("dpo", dpo))
             if not (name == "quickstart" and args.quickstart)}
    stages = {"sft": ("sft",), "dpo": ("sft", "dpo"), "base": ()}
    results = {name: {} for name in ("base", "sft", "dpo")}
    suites = ("hallucination", "injection") if args.start == "base" else ("injection", "hallucination", "tasks")
    for suite in suites:
        for name in ("sft", "dpo", "base"):
            results[name][suite] = phase(out, f"{name}-{suite}", lambda: evaluate(*tuned(stages[name]), args, suite))
    print(f"\nload average {open('/proc/loadavg').read().split()[:3]}, {args.threads} torch threads")
    for name, t in train.items():
        print(f"{name}: {t['examples']} rows (mean {t['mean_tokens']:.0f} tokens), {'Q' * (name == 'quickstart')}"
              "LoRA r=16 all-linear, "
              f"{t['steps']} steps x {t['batch_size']}, lr {t['lr']}, loss {t['first_loss']:.3f} -> "
              f"{t['final_loss']:.3f}, {t['wall_s']:.0f} s")
    h, j = results["base"]["hallucination"]["detail"]["counts"], results["base"]["injection"]["detail"]["counts"]
    styles = "held-out styles only" if args.start == "base" else "every style"
    print(f"\nEval (seed {SEED}): hallucination {h}; injection {j} ({styles})\n")
    print(table(results, args.start))
    for name, r in results.items():
        print(f"{name}: " + ", ".join(f"{s} {r[s]['items_per_s']:.2f} items/s ({r[s]['phase_s']:.0f} s)" for s in r))
    return 0


if __name__ == "__main__":
    sys.exit(main())

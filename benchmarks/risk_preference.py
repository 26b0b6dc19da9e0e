"""Risk suites on the bundled model: base, SFT on the chosen responses of preference pairs, and that SFT then DPO.

python benchmarks/risk_preference.py [--out runs/risk_preference] [--n 15] [--docs 30] [--abstain-people 6]
                                     [--train-docs 16] [--sft-epochs 3] [--dpo-epochs 1] [--threads 2] [--model bundled]

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

Phases (OUT/<phase>.json, skipped when present; training checkpoints every 10 steps and resumes, so an
interrupted run is finished by the same command):
  base  the untuned model
  sft   LoRA SFT on the chosen responses (r=16 all-linear, lr 1e-3, batch 8), merged
  dpo   the merged SFT model + a new LoRA trained with DPO on the same pairs (the reference is that LoRA
        switched off, i.e. the SFT model; beta 0.1, lr 2e-4, batch 4 pairs), merged
Each metric is printed with its 95% interval (Wilson for rates, bootstrap for partial-credit quality).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
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


def eval_items(n: int, docs: int, seed: int) -> tuple[list, list]:
    """(hallucination items, injection items): n per kind; docs documents, clean + the held-out styles."""
    from tunelab.eval import injection as J
    from tunelab.eval.suites import hallucination_eval_items

    return hallucination_eval_items(n, seed), J.make_items(docs, seed, J.HELDOUT_STYLES)


def evaluate(model, tok, args) -> dict:
    from tunelab.eval.suites import hallucination_result, injection_result
    from tunelab.eval.tasks import answer_items

    model.eval()
    h_items, j_items = eval_items(args.n, args.docs, args.seed)
    h = answer_items(model, tok, h_items, args.eval_batch, max_new_tokens=24)
    j = answer_items(model, tok, j_items, args.eval_batch, max_new_tokens=40)
    return {"hallucination": hallucination_result(h_items, h["outputs"], h["items_per_s"]),
            "injection": injection_result(j_items, j["outputs"], j["items_per_s"])}


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


def table(results: dict) -> str:
    """Markdown: metric | base | SFT | SFT + DPO, each value with its 95% interval."""
    names = [p for p in ("base", "sft", "dpo") if p in results]
    lines = ["| metric | " + " | ".join({"base": "base", "sft": "SFT (chosen)", "dpo": "SFT + DPO"}[p] for p in names)
             + " |", "|---" * (len(names) + 1) + "|"]
    for suite, metric in HEADLINE:
        cells = []
        for p in names:
            r = results[p][suite]
            x, ci = r["metrics"].get(metric), r["intervals"].get(metric)
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
    ap.add_argument("--n", type=int, default=15, help="hallucination eval items per kind (known / unknown / passage)")
    ap.add_argument("--docs", type=int, default=30, help="injection eval documents (each clean + 2 held-out styles)")
    ap.add_argument("--abstain-people", type=int, default=6)
    ap.add_argument("--train-docs", type=int, default=16, help="injection training documents (clean + 3 train styles)")
    ap.add_argument("--sft-epochs", type=float, default=3.0)
    ap.add_argument("--dpo-epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8, help="SFT examples per step")
    ap.add_argument("--lr", type=float, default=1e-3, help="SFT learning rate")
    ap.add_argument("--dpo-batch", type=int, default=4, help="DPO pairs per step")
    ap.add_argument("--dpo-lr", type=float, default=2e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    args.seed = SEED
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(args), indent=1))
    pairs = preference_pairs(args.n, args.abstain_people, args.train_docs, SEED)
    counts = {s: sum(p["source"] == s for p in pairs) for s in dict.fromkeys(p["source"] for p in pairs)}
    print(f"{len(pairs)} pairs: {counts}")

    def base():
        return evaluate(*load_pretrained(args.model), args)

    def sft():
        model, tok = load_pretrained(args.model)
        examples = [{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs]
        train = train_lora(model, tok, examples, args, out / "sft",
                           steps_for(args.sft_epochs, len(examples), args.batch_size))
        return {"train": train, **evaluate(model, tok, args)}

    def dpo():
        model, tok = load_pretrained(args.model)
        merge_lora(load_adapter(model, out / "sft" / "adapter", verbose=False))  # the SFT model, merged
        objective = PreferenceObjective("dpo", args.beta, adapter_off_logps)
        train = train_lora(model, tok, rows_of(pairs, tok), args, out / "dpo",
                           steps_for(args.dpo_epochs, len(pairs), args.dpo_batch), objective=objective,
                           lr=args.dpo_lr, batch_size=args.dpo_batch)
        return {"train": train, **evaluate(model, tok, args)}

    results = {name: phase(out, name, fn) for name, fn in (("base", base), ("sft", sft), ("dpo", dpo))}
    print(f"\nload average {open('/proc/loadavg').read().split()[:3]}, {args.threads} torch threads")
    for name in ("sft", "dpo"):
        t = results[name]["train"]
        print(f"{name}: {t['examples']} rows (mean {t['mean_tokens']:.0f} tokens), LoRA r=16 all-linear, "
              f"{t['steps']} steps x {t['batch_size']}, lr {t['lr']}, loss {t['first_loss']:.3f} -> "
              f"{t['final_loss']:.3f}, {t['wall_s']:.0f} s")
    h, j = results["base"]["hallucination"]["detail"]["counts"], results["base"]["injection"]["detail"]["counts"]
    print(f"\nEval (seed {SEED}): hallucination {h}; injection {j} (held-out styles only)\n")
    print(table(results))
    for name, r in results.items():
        print(f"{name}: hallucination {r['hallucination']['items_per_s']:.2f} items/s, injection "
              f"{r['injection']['items_per_s']:.2f} items/s; phase {r['phase_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

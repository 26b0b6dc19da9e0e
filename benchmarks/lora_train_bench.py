"""Training-step speed and memory: tunelab LoRA/QLoRA against PEFT and PEFT + bitsandbytes, side by side.

    python benchmarks/lora_train_bench.py                      # all four stacks x two label regimes
    python benchmarks/lora_train_bench.py --stacks tunelab-lora peft-lora --labels all --steps 3

Setup (issue 8): the bundled SmolLM2-135M-Instruct in fp32 on CPU, batch 4 x 256 tokens of real text
(Python's reference prose), r=16 alpha=32 on all linears, AdamW lr 1e-4. Each stack runs in its own
subprocess (so bitsandbytes' and PEFT's imports and allocations do not touch the others), and the stacks
are run in rounds, alternating, so that machine noise hits them alike; the median s/step per stack is used.
Peak training memory is the peak resident set during the timed steps minus the resident set after the
model was built (Linux: VmHWM reset through /proc/self/clear_refs).
Labels: `all` = every token carries loss (pretraining-like); `half` = the first half of each row is
prompt (-100), as in SFT.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

STACKS = ("tunelab-lora", "peft-lora", "tunelab-qlora", "peft-qlora")


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _batch(tok, batch: int, seq: int, labels: str):
    import pydoc_data.topics
    import torch

    text = "\n\n".join(pydoc_data.topics.topics.values())
    ids = tok(text[: 200 * batch * seq], add_special_tokens=False)["input_ids"][: batch * seq]
    input_ids = torch.tensor(ids).view(batch, seq)
    lab = input_ids.clone()
    if labels == "half":
        lab[:, : seq // 2] = -100
    return input_ids, lab


def run_stack(stack: str, labels: str, steps: int, batch: int, seq: int, r: int) -> dict:
    """Build one stack, time `steps` optimizer steps after one warm-up step; returns the measurements."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.models.bundled import model_dir

    torch.manual_seed(0)
    folder = model_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    input_ids, lab = _batch(tok, batch, seq, labels)
    if stack.startswith("peft"):
        import peft

        kwargs = {}
        if stack == "peft-qlora":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=32, target_modules="all-linear"))
        params = [p for p in model.parameters() if p.requires_grad]

        def loss_fn():
            return model(input_ids=input_ids, labels=lab).loss
    else:
        from tunelab.lora import LoraConfig, apply_lora, lora_param_groups
        from tunelab.quant import quantize_model
        from tunelab.train.loss import causal_lm_loss_sum

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        if stack == "tunelab-qlora":
            quantize_model(model, dtype="nf4", block_size=64, double_quant=True)
        apply_lora(model, LoraConfig(r=r, alpha=32, target_modules="all-linear"), verbose=False)
        params = [p for g in lora_param_groups(model, 1e-4) for p in g["params"]]
        batch_ = {"input_ids": input_ids, "labels": lab}

        def loss_fn():
            s, n = causal_lm_loss_sum(model, batch_)
            return s / n
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step()  # warm-up: allocator, optimizer state
    base_kib = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
    peak = (_rss_kib("VmHWM") - base_kib) / 1024
    return {"stack": stack, "labels": labels, "s_per_step": statistics.median(times), "times": times,
            "tokens_per_s": batch * seq / statistics.median(times), "peak_train_mib": peak, "losses": losses,
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stacks", nargs="+", default=list(STACKS), choices=STACKS)
    ap.add_argument("--labels", nargs="+", default=["all", "half"], choices=["all", "half"])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per stack and round")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds over the stacks")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--one", nargs=2, metavar=("STACK", "LABELS"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help="write all measurements as JSON here")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_stack(args.one[0], args.one[1], args.steps, args.batch, args.seq, args.r)))
        return
    results = []
    for rnd in range(args.rounds):
        for labels in args.labels:
            for stack in args.stacks:
                cmd = [sys.executable, __file__, "--one", stack, labels, "--steps", str(args.steps),
                       "--batch", str(args.batch), "--seq", str(args.seq), "--r", str(args.r)]
                out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
                if out.returncode:
                    sys.exit(f"{stack} failed:\n{out.stderr[-3000:]}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                res["round"] = rnd
                results.append(res)
                print(f"round {rnd} {labels:4s} {stack:14s} {res['s_per_step']:.2f} s/step "
                      f"{res['tokens_per_s']:.0f} tok/s peak +{res['peak_train_mib']:.0f} MiB", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    def med(stack, labels, key):
        vals = [r[key] for r in results if r["stack"] == stack and r["labels"] == labels]
        return statistics.median(vals) if vals else None

    print("\n| labels | stack | s/step | tokens/s | peak train MiB |\n|---|---|---|---|---|")
    for labels in args.labels:
        for stack in args.stacks:
            print(f"| {labels} | {stack} | {med(stack, labels, 's_per_step'):.2f} | "
                  f"{med(stack, labels, 'tokens_per_s'):.0f} | {med(stack, labels, 'peak_train_mib'):.0f} |")
    print("\nratios (tokens/s, ours / theirs; memory, ours / theirs):")
    for labels in args.labels:
        for ours, theirs in (("tunelab-lora", "peft-lora"), ("tunelab-qlora", "peft-qlora")):
            a, b = med(ours, labels, "tokens_per_s"), med(theirs, labels, "tokens_per_s")
            ma, mb = med(ours, labels, "peak_train_mib"), med(theirs, labels, "peak_train_mib")
            if a and b:
                print(f"  {labels}: {ours} / {theirs}: speed {a / b:.2f}x, peak memory {ma / mb:.2f}x")
        a, b = med("tunelab-qlora", labels, "s_per_step"), med("tunelab-lora", labels, "s_per_step")
        if a and b:
            print(f"  {labels}: tunelab-qlora step / tunelab-lora step: {a / b:.3f}")


if __name__ == "__main__":
    main()

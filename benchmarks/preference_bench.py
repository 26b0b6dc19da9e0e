"""DPO training steps: tunelab against TRL 1.16's DPOTrainer with PEFT (QLoRA: + bitsandbytes), side by side.

    python benchmarks/preference_bench.py                        # 4 stacks, 4 rounds of 3 steps each
    python benchmarks/preference_bench.py --quick                # LoRA stacks only, 1 round of 2 steps
    python benchmarks/preference_bench.py --stacks tunelab-qlora trl-qlora --rounds 6
    python benchmarks/preference_bench.py --tiny --quick         # a tiny random Llama (tests/project/test_benchmarks.py)

Setup (issue 26): the bundled SmolLM2-135M-Instruct in fp32 on CPU; a batch of 4 pairs, prompts of 200 tokens
and responses of 30 (+ EOS; max length 256) cut from Python's reference prose; LoRA r=16, alpha 32 on all
linears; beta 0.1; torch's fused AdamW lr 1e-4 for every stack. The reference model is the same model with
the adapter switched off in both (TRL: ref_model=None with a peft_config). Both stacks get the same token
ids: TRL's tokenizing step is skipped by a subclass (its `_prepare_dataset` returns the pre-tokenized pairs);
a step is TRL's own `training_step` (its DPO loss, backward) and the optimizer step, as Trainer runs it.
tunelab's step is its training loop's: PreferenceObjective.loss_sum (the chunked head, the last-layer
shortcut, the shared prompt: each pair's prompt run once for both responses, as train.kernels=auto does
for this model) with adapter_off_logps, backward, AdamW. Neither stack checkpoints activations (TRL's
gradient_checkpointing and tunelab's train.gradient_checkpointing both off, their defaults).

Speed: every round runs each stack in a fresh subprocess (the order reversed every other round): it builds
the stack, takes `--steps` steps and reports each step's wall time; steps/s is 1 / the median step time
after the first, and the tunelab/TRL ratio is the median over rounds of the ratio within a round (the
machine's speed drifts over minutes; a round's stacks run back to back).
Memory: in the same subprocess, the rise of the peak resident set over its steps above the built stack
(VmHWM reset through /proc/self/clear_refs after malloc_trim), and the live-tensor peak of one more step
(torch's memory profiler, benchmarks/lora_train_bench.live_peak_mib), which does not depend on the allocator.
Correctness: each tunelab stack and its TRL twin start from the same weights with the adapter's B = 0, so
their first-step losses are both ln 2 and their first-step summed log-probs of the chosen responses (TRL's
logps/chosen) must agree to FIRST_RTOL; the run exits 1 when they do not (after writing --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

STACKS = ("tunelab-lora", "trl-lora", "tunelab-qlora", "trl-qlora")
TWINS = (("tunelab-lora", "trl-lora"), ("tunelab-qlora", "trl-qlora"))
# First-step agreement. LoRA: the same fp32 weights and tokens; the chunked head and TRL's full logits differ
# by float32 rounding (~1e-6 relative on a sum of ~30 log-probs). QLoRA: both NF4 with double quantization
# of blocks of 64, dequantized by different code (bitsandbytes' CPU kernel, tunelab's), so a little looser.
FIRST_RTOL = {"lora": 1e-4, "qlora": 1e-3}
PAIRS, PROMPT, RESPONSE, MAX_LENGTH, R, BETA, LR = 4, 200, 30, 256, 16, 0.1, 1e-4
TINY_SHAPE = (2, 24, 6)  # --tiny: pairs, prompt and response tokens (a check that runs in seconds)


def examples(tok, pairs: int = PAIRS, prompt: int = PROMPT, response: int = RESPONSE) -> list[dict]:
    """`pairs` pre-tokenized pairs {prompt_ids, chosen_ids, rejected_ids} (TRL's processed layout) cut from
    Python's reference prose; chosen and rejected are different `response`-token pieces, each + EOS."""
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics.values())
    ids = tok(text[:200_000], add_special_tokens=False)["input_ids"]
    step = prompt + 2 * response
    return [{"prompt_ids": ids[k * step : k * step + prompt],
             "chosen_ids": ids[k * step + prompt : k * step + prompt + response] + [tok.eos_token_id],
             "rejected_ids": ids[k * step + prompt + response : (k + 1) * step] + [tok.eos_token_id]}
            for k in range(pairs)]


def tiny_model(dest: Path) -> Path:
    """A 2-layer random Llama (hidden 64) with the bundled tokenizer, saved to `dest` (for tests)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunelab.models.bundled import tokenizer_dir

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=512, tie_word_embeddings=True,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def _tunelab(stack: str, folder: str, pairs: list[dict], share_prompt: bool | None = None):
    """tunelab's DPO step: the method prepared as `tunelab train` prepares it, the loop's objective.
    share_prompt: None as train.kernels=auto decides; False the plain layout (benchmarks/preference_memory.py)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.accel import kernels as accel
    from tunelab.accel.malloc import reuse_freed_memory
    from tunelab.config import RunConfig
    from tunelab.train.loop import adamw
    from tunelab.train.preference import PreferenceObjective, adapter_off_logps
    from tunelab.train.run import prepare_method

    method = stack.removeprefix("tunelab-")
    cfg = RunConfig.model_validate({
        "method": method, "lora": {"r": R, "alpha": 32, "target_modules": "all-linear"},
        "data": {"task": "preference", "sources": [{"name": "p", "path": "local:preference"}]},
        "train": {"objective": "dpo", "beta": BETA, "lr": LR, "device": "cpu"}})
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    kernels = accel.choose(model, "auto", torch.device("cpu"))
    opt = adamw(prepare_method(model, cfg, kernels), lr=LR)
    reuse_freed_memory()  # prepare_method did (kernels.malloc); said here as in the TRL stack: the same allocator
    share = kernels.shared_prompt if share_prompt is None else share_prompt
    objective = PreferenceObjective("dpo", BETA, adapter_off_logps, share_prompt=share)
    rows = [{"input_ids": p["prompt_ids"] + p["chosen_ids"] + p["prompt_ids"] + p["rejected_ids"],
             "labels": [-100] * len(p["prompt_ids"]) + p["chosen_ids"] + [-100] * len(p["prompt_ids"]) + p["rejected_ids"],
             "position_ids": list(range(len(p["prompt_ids"]) + len(p["chosen_ids"])))
             + list(range(len(p["prompt_ids"]) + len(p["rejected_ids"])))} for p in pairs]
    batch = objective.collate(rows, 0, torch.device("cpu"))  # the shared prompt where kernels allow, as the loop
    model.train()

    def step() -> tuple[float, float]:
        s, n = objective.loss_sum(model, batch, 256, kernels)
        (s / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(s.detach()) / n, objective.step_metrics()["logps/chosen"]

    return step


def _trl(stack: str, folder: str, pairs: list[dict], out: str):
    """TRL's DPO step: DPOTrainer with a PEFT LoRA config (reference = adapter off), its training_step."""
    import datasets
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    class PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):  # the pairs are token ids already
            return dataset

    kwargs = {}
    if stack == "trl-qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    from tunelab.accel.malloc import reuse_freed_memory

    reuse_freed_memory()  # the same malloc setting as the tunelab stacks get (a tuned allocator for both)
    args = DPOConfig(output_dir=out, per_device_train_batch_size=len(pairs), max_length=MAX_LENGTH, beta=BETA,
                     learning_rate=LR, report_to="none", use_cpu=True, logging_steps=1, save_strategy="no",
                     dataloader_num_workers=0, seed=0)
    trainer = PreTokenized(model=model, args=args, train_dataset=datasets.Dataset.from_list(pairs),
                           processing_class=AutoTokenizer.from_pretrained(folder),
                           peft_config=peft.LoraConfig(r=R, lora_alpha=32, target_modules="all-linear"))
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, fused=True)  # the same optimizer kernel as tunelab's loop
    inputs = next(iter(trainer.get_train_dataloader()))
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's train() sets before its training_step calls

    def step() -> tuple[float, float]:
        loss = trainer.training_step(trainer.model, inputs)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss), trainer._metrics["train"]["logps/chosen"][-1]

    return step


def worker(stack: str, folder: str, steps: int, live: bool, tiny: bool = False) -> dict:
    """One stack in this fresh process: build, then `steps` timed steps, the resident-set rise over them and
    (live) the live-tensor peak of one more step."""
    import torch
    from lora_train_bench import _rss_kib, live_peak_mib
    from transformers import AutoTokenizer

    from tunelab.heap import release_freed_memory

    torch.manual_seed(0)
    pairs = examples(AutoTokenizer.from_pretrained(folder), *(TINY_SHAPE if tiny else ()))
    with tempfile.TemporaryDirectory() as tmp:
        step = _tunelab(stack, folder, pairs) if stack.startswith("tunelab") else _trl(stack, folder, pairs, tmp)
        release_freed_memory()
        base = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak-RSS counter (VmHWM) starts again from the current RSS
        times, losses, logps = [], [], []
        for _ in range(steps):
            t = time.perf_counter()
            loss, lp = step()
            times.append(time.perf_counter() - t)
            losses.append(loss)
            logps.append(lp)
        rss = (_rss_kib("VmHWM") - base) / 1024
        peak = live_peak_mib(lambda: step()[0]) if live else None
    return {"stack": stack, "times": times, "losses": losses, "logps_chosen": logps, "rss_rise_mib": rss,
            "live_peak_mib": peak, "threads": torch.get_num_threads()}


def check_first_steps(results: dict) -> list[str]:
    """Problems with the twins' first steps: the loss is not ln 2, or the chosen log-probs differ."""
    problems = []
    for a, b in TWINS:
        if a not in results or b not in results:
            continue
        tol = FIRST_RTOL[a.removeprefix("tunelab-")]
        for run_a, run_b in zip(results[a], results[b]):
            for name, x, y in (("loss", run_a["losses"][0], run_b["losses"][0]),
                               ("logps/chosen", run_a["logps_chosen"][0], run_b["logps_chosen"][0])):
                if abs(x - y) > tol * max(abs(x), abs(y)):
                    problems.append(f"{a} vs {b}: first-step {name} {x:.6g} vs {y:.6g} (rtol {tol})")
            if abs(run_a["losses"][0] - 0.6931472) > 1e-5:
                problems.append(f"{a}: first-step loss {run_a['losses'][0]:.6g}, not ln 2 (B = 0 at step 1)")
    return problems


def summary(results: dict) -> dict:
    out = {}
    for s, runs in results.items():
        per_round = [statistics.median(r["times"][1:] or r["times"]) for r in runs]
        out[s] = {"steps_per_s": 1 / statistics.median(per_round), "rss_rise_mib": max(r["rss_rise_mib"] for r in runs),
                  "live_peak_mib": max((r["live_peak_mib"] or 0) for r in runs)}
    for a, b in TWINS:
        if a in results and b in results:
            ratios = [statistics.median(y["times"][1:] or y["times"]) / statistics.median(x["times"][1:] or x["times"])
                      for x, y in zip(results[a], results[b])]
            out[f"{a} / {b}"] = {"speedup": statistics.median(ratios),
                                 "live_peak_ratio": out[a]["live_peak_mib"] / max(out[b]["live_peak_mib"], 1e-9),
                                 "rss_rise_ratio": out[a]["rss_rise_mib"] / max(out[b]["rss_rise_mib"], 1e-9)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stacks", nargs="+", choices=STACKS, default=None)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="steps per stack per round (the first is not timed)")
    ap.add_argument("--quick", action="store_true", help="LoRA stacks, 1 round of 2 steps")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of the bundled model")
    ap.add_argument("--no-live", action="store_true", help="skip the live-tensor peak (the profiler's step)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--worker", nargs=2, metavar=("STACK", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.steps, not args.no_live, args.tiny)))
        return 0
    stacks = args.stacks or (list(STACKS[:2]) if args.quick else list(STACKS))
    rounds, steps = (1, 2) if args.quick else (args.rounds, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            folder = str(tiny_model(Path(tmp) / "tiny"))
        else:
            from tunelab.models.bundled import model_dir

            folder = str(model_dir())
        results = {s: [] for s in stacks}
        for k in range(rounds):
            for s in stacks if k % 2 == 0 else stacks[::-1]:
                cmd = [sys.executable, __file__, "--worker", s, folder, "--steps", str(steps)]
                cmd += (["--no-live"] if args.no_live else []) + (["--tiny"] if args.tiny else [])
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
                if proc.returncode != 0:
                    print(f"the {s} worker failed (exit {proc.returncode}); its stderr is above", file=sys.stderr)
                    return 1
                results[s].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"  round {k}: {s} steps {[f'{t:.2f}' for t in results[s][-1]['times']]} s", file=sys.stderr)
    from lora_train_bench import machine

    shape = dict(zip(("pairs", "prompt", "response"), TINY_SHAPE if args.tiny else (PAIRS, PROMPT, RESPONSE)))
    report = {"machine": machine(), "setup": {**shape, "max_length": MAX_LENGTH, "r": R, "beta": BETA, "tiny": args.tiny,
                                              "rounds": rounds, "steps": steps},
              "summary": summary(results), "runs": results}
    problems = check_first_steps(results)
    report["problems"] = problems
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1))
    for p in problems:
        print("PROBLEM:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

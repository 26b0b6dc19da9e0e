"""Training-step speed and memory: tunelab LoRA/QLoRA against PEFT and PEFT + bitsandbytes, side by side.

    python benchmarks/lora_train_bench.py                      # all four stacks x two label regimes
    python benchmarks/lora_train_bench.py --stacks tunelab-lora peft-lora --labels all --rounds 4
    python benchmarks/lora_train_bench.py --profile tunelab-lora all      # where one step's time goes
    python benchmarks/lora_train_bench.py --kernel-ab dequant all --rounds 4  # C kernel vs PyTorch path
    python benchmarks/lora_train_bench.py --kernel-ab last half --rounds 8    # last layer on labels only
    python benchmarks/lora_train_bench.py --pool docs/bench/lora_bench9.json docs/bench/lora_bench1[0-2].json
    python benchmarks/lora_train_bench.py --malloc jemalloc   # every stack on jemalloc (LD_PRELOAD)
    git worktree add /tmp/old c16a7e9 && python benchmarks/lora_train_bench.py --baseline /tmp/old \
        --stacks tunelab-lora old-tunelab-lora tunelab-qlora old-tunelab-qlora    # this commit against an older one

Setup (issue 8): the bundled SmolLM2-135M-Instruct in fp32 on CPU, batch 4 x 256 tokens of real text
(Python's reference prose), r=16 alpha=32 on all linears, AdamW lr 1e-4 (torch's fused kernel, for all).

Speed: per label regime, each stack lives in its own worker process (as each would for a user: PEFT's with
glibc's default malloc, ours with the setting of tunelab/accel/malloc.py) and the workers step in lockstep:
rounds of one step of each stack, back to back, only one worker running at a time (each compared pair
adjacent, the order reversed every other round). This machine's speed drifts by up to 1.5x over minutes,
so stacks timed minutes apart are not comparable; steps seconds apart are. Each ratio is the median over
rounds of the ratio of the two stacks' steps within a round. `--same-process` builds every stack in one
process instead (runs 5-11 of docs/lora.md), where PEFT's stacks share our malloc setting.
Memory: each stack alone in its own process (so bitsandbytes', PEFT's and our allocations do not mix):
the rise of the peak resident set over two training steps above the resident set of the built model
(Linux: VmHWM reset through /proc/self/clear_refs), optimizer state included; and the largest total of
live tensors over a third step (torch's memory profiler: tensors created minus destroyed), which does not
depend on the allocator.
Allocator (--malloc): `shipped` (default) runs each stack as a user gets it: PEFT's on glibc's default
malloc, ours with tunelab/accel/malloc.py's setting. `glibc-tuned` gives every stack that setting;
`jemalloc` and `tcmalloc` preload that allocator into every stack's process (Debian:
`apt-get install libjemalloc2 libtcmalloc-minimal4`), where glibc's setting has no effect.
Correctness: the stacks train the same model from the same start on the same batch, so their losses must
agree (LOSS_RTOL) and fall over the rounds; the run exits 1 when they do not (after writing --out).
Another commit (--baseline DIR, a checkout of it): stacks `old-tunelab-lora` and `old-tunelab-qlora` run
that checkout's own worker (its script and its tunelab) in the same lockstep rounds, for the no-regression
checks (this commit's step time against the old one's, round by round).
Labels: `all` = every token carries loss (pretraining-like); `half` = the first half of each row is
prompt (-100), as in SFT.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

STACKS = ("tunelab-lora", "peft-lora", "tunelab-qlora", "peft-qlora")
EXTRA_STACKS = ("peft-lora-reuse",  # PEFT LoRA with tunelab's malloc setting: what that setting is worth to it
                "old-tunelab-lora", "old-tunelab-qlora")  # another commit's tunelab (--baseline)
MALLOCS = {"shipped": None, "glibc-tuned": None, "jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
           "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}
# The stacks compute the same losses to float32 rounding: 5e-6 relative apart over 16 steps in runs 20-25.
# A stack whose gradients were wrong or missing drifts from its twin by ~1e-2 within a few steps.
LOSS_RTOL = 1e-4


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def machine() -> dict:
    """What a run ran on: speeds and ratios are not comparable across CPUs (AVX2 against AVX-512 GEMMs)."""
    import os
    import platform
    from importlib import metadata

    import torch

    info = {"cpus": os.cpu_count(), "torch": torch.__version__, "simd": torch.backends.cpu.get_cpu_capability()}
    for package in ("transformers", "peft", "bitsandbytes"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    try:
        text = Path("/proc/cpuinfo").read_text()
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["model"] = fields.get("model name", platform.processor())
        info["flags"] = sorted(f for f in fields.get("flags", "").split() if f.startswith(("avx", "amx", "fma")))
        caches = Path("/sys/devices/system/cpu/cpu0/cache")
        info["caches"] = {f"L{(d / 'level').read_text().strip()}{(d / 'type').read_text().strip()[0]}":
                          (d / "size").read_text().strip() for d in sorted(caches.glob("index*"))}
    except OSError:  # not Linux
        info["model"] = platform.processor()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent)
    info["commit"] = commit.stdout.strip() or None
    return info


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


def build_stack(stack: str, labels: str, batch: int, seq: int, r: int, malloc: str = "shipped"):
    """One stack ready to train: returns step() -> loss, running forward, backward and an AdamW step."""
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
        if stack.endswith("-reuse") or malloc == "glibc-tuned":
            from tunelab.accel.malloc import reuse_freed_memory

            reuse_freed_memory()

        def loss_fn():
            return model(input_ids=input_ids, labels=lab).loss
    else:
        from tunelab.accel import kernels
        from tunelab.lora import LoraConfig, apply_lora, lora_param_groups
        from tunelab.quant import quantize_model
        from tunelab.train.loss import causal_lm_loss_sum

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        if stack == "tunelab-qlora":
            quantize_model(model, "nf4", block_size=64, double_quant=True)
        apply_lora(model, LoraConfig(r=r, alpha=32, target_modules="all-linear"), verbose=False)
        # train.kernels=auto, as tunelab's training runs apply it: fused RMSNorm, SwiGLU and rotary embedding,
        # the fused LoRA autograd, the dequantize kernel and workspace, the malloc setting
        k = kernels.choose(model, "auto", "cpu")
        kernels.apply(model, k)
        params = [p for g in lora_param_groups(model, 1e-4) for p in g["params"]]
        batch_ = {"input_ids": input_ids, "labels": lab}

        def loss_fn():
            s, n = causal_lm_loss_sum(model, batch_, kernels=k)
            return s / n
    model.train()
    # torch's fused AdamW for every stack: what tunelab's training loop uses, and transformers' Trainer's default
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def memory_one(stack: str, labels: str, batch: int, seq: int, r: int, malloc: str = "shipped") -> dict:
    """Peak training memory of one stack, alone in this process: the rise of the peak resident set over
    two training steps above the resident set of the built model, after malloc_trim has handed back what
    loading left free (so every stack starts from its model alone). Counts activations, gradients, AdamW's
    state and the loss's buffers. Then the live-tensor peak of a third step (live_peak_mib)."""
    from tunelab.heap import release_freed_memory

    step = build_stack(stack, labels, batch, seq, r, malloc)
    release_freed_memory()
    base_kib = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    step()
    loss = step()
    rss = (_rss_kib("VmHWM") - base_kib) / 1024
    return {"stack": stack, "labels": labels, "peak_train_mib": rss, "live_peak_mib": live_peak_mib(step),
            "loss": loss}


def live_peak_mib(step) -> float:
    """The largest total of tensors alive at once during one step, above those alive before it (torch's
    memory profiler, tunelab.experiments.memory). AdamW's state exists before the step (steps 1-2 made it)
    and is not counted; the step's activations, temporaries, loss buffers and gradients (made and freed
    within it: set_to_none) are. The allocator's own overhead is not in it."""
    from tunelab.experiments.memory import live_peak_bytes

    return live_peak_bytes(step) / 2**20


def profile_one(stack: str, labels: str, batch: int, seq: int, r: int, rows: int = 40) -> None:
    """torch.profiler over one step (after two warm-up steps): self CPU time per op and input shapes."""
    from torch.profiler import profile

    step = build_stack(stack, labels, batch, seq, r)
    step()
    step()
    t = time.perf_counter()
    with profile(record_shapes=True) as prof:
        step()
    print(f"{stack}, {labels} labels: one step {time.perf_counter() - t:.2f} s wall under the profiler")
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40, max_shapes_column_width=60))


def _timed(step) -> dict:
    """One step with its wall time and the kernel's share (system CPU seconds, page faults)."""
    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    loss = step()
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"time": wall, "loss": loss, "kernel": (r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt)}


def worker(stack: str, labels: str, batch: int, seq: int, r: int, malloc: str) -> None:
    """One stack in this process, stepping on command: reads `step` lines on stdin, answers each with a
    JSON line (on the original stdout; anything else printed goes to stderr). Idle while it waits."""
    import os

    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    step = build_stack(stack, labels, batch, seq, r, malloc)
    step()  # warm-up
    import torch

    print(json.dumps({"ready": stack, "threads": torch.get_num_threads()}), file=out, flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        print(json.dumps(_timed(step)), file=out, flush=True)


def _rounds(stacks: list[str], labels: str, rounds: int, run_step) -> dict:
    """Each round runs one step of every stack back to back, so the steps compared in a round are seconds
    apart and share the machine's state. The order (STACKS: each tunelab stack next to its PEFT
    counterpart) is reversed every other round, so each compared pair runs adjacent and each stack goes
    first as often as its partner."""
    times, losses, kernel = ({s: [] for s in stacks} for _ in range(3))
    for k in range(rounds):
        for s in stacks if k % 2 == 0 else stacks[::-1]:
            one = run_step(s)
            times[s].append(one["time"])
            losses[s].append(one["loss"])
            kernel[s].append(one["kernel"])
        print(f"  {labels} round {k}: " + " ".join(f"{s} {times[s][-1]:.2f}" for s in stacks),
              file=sys.stderr, flush=True)
    return {"times": times, "losses": losses, "kernel": kernel}


def _worker_command(stack: str, labels: str, shape: list[str], baseline: str | None) -> list[str]:
    """This script's worker for `stack`; for old-* stacks the baseline checkout's own script, which predates
    --malloc (so the shipped allocator setting, each stack's own)."""
    if not stack.startswith("old-"):
        return [sys.executable, __file__, "--worker", stack, labels, *shape]
    if baseline is None:
        sys.exit(f"{stack} needs --baseline DIR (a checkout of the commit to compare with)")
    i = shape.index("--malloc")
    return [sys.executable, str(Path(baseline) / "benchmarks" / "lora_train_bench.py"), "--worker",
            stack.removeprefix("old-"), labels, *shape[:i], *shape[i + 2:]]


def speed_lockstep(stacks: list[str], labels: str, rounds: int, shape: list[str], baseline: str | None = None) -> dict:
    """One worker process per stack, started one after the other (each builds its model and takes a
    warm-up step alone), then stepped in lockstep: only the worker asked for a step runs."""
    procs, threads = {}, {}
    try:
        for s in stacks:
            procs[s] = subprocess.Popen(_worker_command(s, labels, shape, baseline),
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env=_malloc_env(shape))
            threads[s] = _reply(procs[s], s)["threads"]

        def run_step(s: str) -> dict:
            procs[s].stdin.write("step\n")
            procs[s].stdin.flush()
            return _reply(procs[s], s)

        res = _rounds(stacks, labels, rounds, run_step)
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait()
    return {"labels": labels, "mode": "one process per stack, lockstep", **res, "threads": threads}


def _reply(proc, stack: str) -> dict:
    line = proc.stdout.readline()
    if not line:
        sys.exit(f"the {stack} worker stopped (exit {proc.wait()}); its stderr is above")
    return json.loads(line)


def speed_same_process(stacks: list[str], labels: str, rounds: int, batch: int, seq: int, r: int,
                       malloc: str) -> dict:
    """All stacks in this one process (how runs 5-11 of docs/lora.md measured): PEFT's stacks then share
    the malloc setting our stacks make."""
    import torch

    steps = {s: build_stack(s, labels, batch, seq, r, malloc) for s in stacks}
    for s in stacks:
        steps[s]()  # warm-up
    res = _rounds(stacks, labels, rounds, lambda s: _timed(steps[s]))
    return {"labels": labels, "mode": "one process", **res, "threads": torch.get_num_threads()}


def _malloc_env(args: list[str]) -> dict:
    """The environment of a stack's process: LD_PRELOAD of the allocator named by `--malloc` in args."""
    import os

    lib = MALLOCS[args[args.index("--malloc") + 1]]
    if lib is None:
        return dict(os.environ)
    if not Path(lib).exists():
        sys.exit(f"{lib} is missing: apt-get install libjemalloc2 libtcmalloc-minimal4")
    return {**os.environ, "LD_PRELOAD": lib}


def _sub(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=False, stdout=subprocess.PIPE, text=True,
                         env=_malloc_env(args))
    if out.returncode:
        sys.exit(f"{' '.join(args)} failed (exit {out.returncode}); its stderr is above")
    return json.loads(out.stdout.strip().splitlines()[-1])


def kernel_ab(kernel: str, labels: str, rounds: int, batch: int, seq: int, r: int) -> None:
    """Steps alternating one of tunelab's shortcuts on and off: `dequant`, the C kernel on tunelab-qlora
    (off: the PyTorch path), also timing every de-quantization of a frozen weight (Linear4bit.matmul_weight,
    forward and backward); `fused` on tunelab-lora: the RMSNorm and SwiGLU C kernels of
    tunelab.accel.fused (off: transformers' modules; `rmsnorm` before the SwiGLU kernel existed; with the
    rotary kernel since it exists); `rotary` on tunelab-lora: the rotary embedding's kernel alone (off:
    transformers' ops); `last` on tunelab-lora: the last decoder layer on labelled positions only
    (tunelab.accel.last_layer; off: whole)."""
    from tunelab.accel import dequant_c, fused, last_layer
    from tunelab.quant.linear import Linear4bit

    spent = [0.0, 0]
    plain = Linear4bit.matmul_weight

    def timed(self, *args, **kwargs):
        t = time.perf_counter()
        out = plain(self, *args, **kwargs)
        spent[0] += time.perf_counter() - t
        spent[1] += 1
        return out

    Linear4bit.matmul_weight = timed
    step = build_stack("tunelab-qlora" if kernel == "dequant" else "tunelab-lora", labels, batch, seq, r)
    if kernel == "last":
        real = last_layer.last_layer_from
        whole = lambda body, batch, start, **kw: real(body, batch, 0, **kw)  # noqa: E731
        switch = lambda on: setattr(last_layer, "last_layer_from", real if on else whole)  # noqa: E731
        names = ("last layer on labels", "last layer whole   ")
    elif kernel == "rotary":
        real = fused._rotary_fusable
        switch = lambda on: setattr(fused, "_rotary_fusable", real if on else lambda *a: False)  # noqa: E731
        names = ("rotary kernel", "rotary PyTorch")
    else:
        module = dequant_c if kernel == "dequant" else fused
        lib = module._lib if module.available() else None
        if lib is None:
            sys.exit("no C compiler here: nothing to compare")
        switch = lambda on: setattr(module, "_lib", lib if on else None)  # noqa: E731
        names = ("C kernel", "PyTorch ")
    step()
    steps = {True: [], False: []}
    for k in range(2 * rounds):
        on = k % 4 in (1, 2)  # off, on, on, off, ...: each mode first as often as the other
        switch(on)
        spent[:] = [0.0, 0]
        t = time.perf_counter()
        step()
        steps[on].append(time.perf_counter() - t)
        print(f"{names[0] if on else names[1]} step {steps[on][-1]:.2f} s" + (
            f", dequantize {spent[0] * 1e3:.0f} ms in {spent[1]} calls" if kernel == "dequant" else ""), flush=True)
    switch(True)
    ratio = statistics.median(b / a for a, b in zip(steps[True], steps[False]))
    on_s, off_s = statistics.median(steps[True]), statistics.median(steps[False])
    print(f"{kernel}: median step: {names[0].strip()} {on_s:.2f} s, {names[1].strip()} {off_s:.2f} s; "
          f"off / on, median over pairs: {ratio:.3f}")


PAIRS = (("tunelab-lora", "peft-lora"), ("tunelab-qlora", "peft-qlora"))
OLD_PAIRS = (("tunelab-lora", "old-tunelab-lora"), ("tunelab-qlora", "old-tunelab-qlora"))
TARGETS = (("all", "peft-lora", "tunelab-lora", "LoRA speed / PEFT's", ">= 1.15"),
           ("all", "peft-qlora", "tunelab-qlora", "QLoRA speed / PEFT + bitsandbytes'", ">= 1.25"),
           ("all", "tunelab-qlora", "tunelab-lora", "QLoRA step / LoRA step", "<= 1.05"),
           ("half", "peft-lora", "tunelab-lora", "LoRA speed / PEFT's", ">= 1.3"),
           ("half", "peft-qlora", "tunelab-qlora", "QLoRA speed / PEFT + bitsandbytes'", ">= 1.4"),
           # no regression (--baseline): this commit's speed over the old one's
           *((labels, f"old-tunelab-{m}", f"tunelab-{m}", f"{name} speed, this commit / --baseline's", ">= 0.97")
             for labels in ("all", "half") for m, name in (("lora", "LoRA"), ("qlora", "QLoRA"))))


def pool(files: list[str], boot: int = 2000) -> None:
    """Issue 8's ratios over the rounds of several runs' JSONs together: the median of the per-round
    ratios and its 90% bootstrap interval (rounds resampled with replacement, seed 0)."""
    import random

    rng = random.Random(0)
    runs = [json.loads(Path(f).read_text())["speed"] for f in files]
    print("| labels | ratio | target | rounds | median | 90% interval |\n|---|---|---|---|---|---|")
    for labels, num, den, what, target in TARGETS:
        rs = [a / b for run in runs if labels in run for a, b in zip(run[labels]["times"].get(num, []),
                                                                      run[labels]["times"].get(den, []))]
        if not rs:
            continue
        meds = sorted(statistics.median(rng.choices(rs, k=len(rs))) for _ in range(boot))
        print(f"| {labels} | {what} | {target} | {len(rs)} | {statistics.median(rs):.3f} | "
              f"{meds[int(0.05 * boot)]:.3f}-{meds[int(0.95 * boot) - 1]:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stacks", nargs="+", default=list(STACKS), choices=STACKS + EXTRA_STACKS,
                    help="peft-lora-reuse: PEFT LoRA with tunelab's malloc setting (not in the default set)")
    ap.add_argument("--labels", nargs="+", default=["all", "half"], choices=["all", "half"])
    ap.add_argument("--rounds", type=int, default=8, help="timed steps per stack (one per round)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-stack peak-memory processes")
    ap.add_argument("--baseline", metavar="DIR", help="a checkout of another commit, for the old-* stacks")
    ap.add_argument("--malloc", choices=list(MALLOCS), default="shipped",
                    help="the allocator of every stack's process (see the module's docstring)")
    ap.add_argument("--profile", nargs=2, metavar=("STACK", "LABELS"),
                    help="print torch.profiler's table (self CPU time by op and shape) for one step of one stack")
    ap.add_argument("--kernel-ab", nargs=2, metavar=("KERNEL", "LABELS"),
                    help="steps alternating a shortcut on and off: dequant (C kernel, tunelab-qlora), fused (RMSNorm, "
                         "SwiGLU and rotary C kernels, tunelab-lora), rotary (its kernel alone), last (last layer on "
                         "labelled positions only, tunelab-lora)")
    ap.add_argument("--one-memory", nargs=2, metavar=("STACK", "LABELS"), help=argparse.SUPPRESS)
    ap.add_argument("--same-process", action="store_true",
                    help="build every stack in one process (the method of runs 5-11) instead of one worker each")
    ap.add_argument("--one-speed", metavar="LABELS", help=argparse.SUPPRESS)
    ap.add_argument("--worker", nargs=2, metavar=("STACK", "LABELS"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help="write all measurements (and the machine's CPU) as JSON here")
    ap.add_argument("--machine", action="store_true", help="print the machine record that --out writes, and exit")
    ap.add_argument("--pool", nargs="+", metavar="JSON",
                    help="print issue 8's ratios over the rounds of these runs (--out files) together, with 90%% "
                         "bootstrap intervals, and exit")
    args = ap.parse_args()
    shape = ["--batch", str(args.batch), "--seq", str(args.seq), "--r", str(args.r), "--malloc", args.malloc]
    if args.pool:
        pool(args.pool)
        return
    if args.machine:
        print(json.dumps(machine(), indent=1))
        return
    if args.profile:
        profile_one(*args.profile, args.batch, args.seq, args.r)
        return
    if args.kernel_ab:
        if args.kernel_ab[0] not in ("dequant", "fused", "rotary", "last") or args.kernel_ab[1] not in ("all", "half"):
            ap.error("--kernel-ab takes dequant|fused|rotary|last and all|half")
        kernel_ab(*args.kernel_ab, args.rounds, args.batch, args.seq, args.r)
        return
    if args.one_memory:
        print(json.dumps(memory_one(*args.one_memory, args.batch, args.seq, args.r, args.malloc)))
        return
    if args.worker:
        worker(*args.worker, args.batch, args.seq, args.r, args.malloc)
        return
    if args.one_speed:
        print(json.dumps(speed_same_process(args.stacks, args.one_speed, args.rounds, args.batch, args.seq,
                                            args.r, args.malloc)))
        return
    speed, memory, live = {}, {}, {}
    for labels in args.labels:
        if args.same_process:
            speed[labels] = _sub(["--one-speed", labels, "--stacks", *args.stacks, "--rounds", str(args.rounds),
                                  *shape])
        else:
            speed[labels] = speed_lockstep(args.stacks, labels, args.rounds, shape, args.baseline)
        if not args.no_memory:
            for stack in (s for s in args.stacks if not s.startswith("old-")):  # the old: speed only
                one = _sub(["--one-memory", stack, labels, *shape])
                memory[labels, stack], live[labels, stack] = one["peak_train_mib"], one["live_peak_mib"]
    problems = check_losses(speed)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"speed": speed, "memory": {f"{k[0]} {k[1]}": v for k, v in memory.items()},
                       "live_memory": {f"{k[0]} {k[1]}": v for k, v in live.items()}, "malloc": args.malloc,
                       "loss_check": problems or "passed", "args": vars(args), "machine": machine()}, f, indent=1)
    report(args, speed, memory, live)
    if problems:
        sys.exit("loss check failed:\n  " + "\n  ".join(problems))
    print(f"\nloss check passed: each pair's losses within {LOSS_RTOL:g} relative at every step, every loss falls")


def check_losses(speed: dict) -> list[str]:
    """What is wrong with the stacks' losses: a pair (ours, PEFT's) apart by more than LOSS_RTOL at some
    step, or a stack whose loss did not fall over the rounds (one fixed batch: it must)."""
    problems = []
    for labels, res in speed.items():
        losses = res["losses"]
        for stack, ls in losses.items():
            if len(ls) > 1 and not ls[-1] < ls[0]:
                problems.append(f"{labels} {stack}: loss {ls[0]:.5f} -> {ls[-1]:.5f} did not fall")
        for ours, theirs in PAIRS + OLD_PAIRS + (("peft-lora", "peft-lora-reuse"),):
            if ours in losses and theirs in losses:
                worst = max(abs(a - b) / abs(b) for a, b in zip(losses[ours], losses[theirs]))
                if worst > LOSS_RTOL:
                    problems.append(f"{labels} {ours} vs {theirs}: losses {worst:.2e} apart (> {LOSS_RTOL:g})")
    return problems


def report(args, speed: dict, memory: dict, live: dict) -> None:
    """Markdown tables: per stack the step time, the time net of system CPU time, memory; then the ratios."""
    tokens = args.batch * args.seq
    print(f"\nallocator: {args.malloc}\n\n| labels | stack | median s/step | net of system s/step | tokens/s | "
          "steps (s) | peak train MiB (RSS rise) | live-tensor peak MiB |\n|---|---|---|---|---|---|---|---|")
    for labels in args.labels:
        for stack in args.stacks:
            t, k = speed[labels]["times"][stack], speed[labels]["kernel"][stack]
            net = statistics.median(a - b[0] for a, b in zip(t, k))
            mem, lv = memory.get((labels, stack)), live.get((labels, stack))
            print(f"| {labels} | {stack} | {statistics.median(t):.2f} | {net:.2f} | {tokens / statistics.median(t):.0f} | "
                  f"{' '.join(f'{x:.2f}' for x in t)} | {'-' if mem is None else f'{mem:.0f}'} | "
                  f"{'-' if lv is None else f'{lv:.0f}'} |")
    print("\nkernel time per step (median system CPU s, page faults):")
    for labels in args.labels:
        for stack in args.stacks:
            k = speed[labels]["kernel"][stack]
            print(f"  {labels} {stack}: {statistics.median(x[0] for x in k):.2f} s, "
                  f"{statistics.median(x[1] for x in k):.0f} faults")
    print("\nratios, the median over rounds of the ratio within a round (min-max in brackets); net: of system time:")

    def ratio(labels, num, den, label):
        times, kernel = speed[labels]["times"], speed[labels]["kernel"]
        if num in times and den in times:
            rs = sorted(a / b for a, b in zip(times[num], times[den]))
            net = statistics.median((a - ka[0]) / (b - kb[0]) for a, b, ka, kb in
                                    zip(times[num], times[den], kernel[num], kernel[den]))
            print(f"  {labels}: {label}: {statistics.median(rs):.3f} [{rs[0]:.3f}-{rs[-1]:.3f}], net {net:.3f}")

    for labels in args.labels:
        for ours, theirs in PAIRS:
            ratio(labels, theirs, ours, f"{ours} / {theirs} speed (tokens/s)")
            for name, table in (("peak memory (RSS rise)", memory), ("live-tensor peak", live)):
                if (labels, ours) in table and (labels, theirs) in table:
                    print(f"  {labels}: {ours} / {theirs} {name}: {table[labels, ours] / table[labels, theirs]:.2f}x")
        ratio(labels, "tunelab-qlora", "tunelab-lora", "tunelab-qlora step / tunelab-lora step")
        ratio(labels, "peft-lora", "peft-lora-reuse", "peft-lora step / peft-lora-reuse step")
        for new, old in OLD_PAIRS:
            ratio(labels, old, new, f"{new} / {old} speed (this commit / --baseline's)")


if __name__ == "__main__":
    main()

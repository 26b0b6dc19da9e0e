"""tunelab LoRA / QLoRA against PEFT and PEFT + bitsandbytes, one run on whatever card is at hand.

    python benchmarks/gpu.py --out gpu.json            # Llama-3-8B shape, random bf16 weights, 2 x 2048 tokens
    python benchmarks/gpu.py --tiny --out tiny.json    # a few small layers: tests the script on a CPU in < 1 min
    python benchmarks/gpu.py --rounds 3 --out gpu.json  # every stack 3 times, the order reversed every round

Every stack trains the same random model (built directly in bf16 on the device, seeded) with r=16 adapters on
all linears (lm_head excluded), the same adapter init, AdamW, bf16 autocast, on the same random token batches;
each stack runs with and without gradient checkpointing (use_reentrant=False), one after another, freeing
memory in between:
    tunelab-lora   tunelab.lora over the bf16 linears (the fused LoRA autograd), tunelab's chunked cross-entropy
                   (--loss-chunk tokens a chunk), fused RMSNorm and SwiGLU (Triton on CUDA), as `tunelab train`
    peft-lora      PEFT over the same linears, Hugging Face's loss (full logits)
    tunelab-qlora  tunelab.quant NF4 (block 64, double quant) + tunelab.lora
    peft-bnb-qlora bitsandbytes Linear4bit NF4 (block 64, double quant, bf16 compute) + PEFT
    peft-liger-lora, peft-liger-bnb-qlora   the two above with Liger-Kernel (liger-kernel 0.8) on the base
                   model: fused linear cross-entropy, RMSNorm, SwiGLU and RoPE (--liger-ops), as a competent
                   GPU user runs PEFT. Liger patches transformers' Llama module (RoPE) for the process; the
                   patch is undone after the stack. On a CPU (Triton's interpreter, TRITON_INTERPRET=1) Liger
                   0.8.5's RMSNorm and SwiGLU kernels fail on float scalars, so the default there is flce,rope.
Norms, embeddings and lm_head stay bf16 in all of them (no prepare_model_for_kbit_training upcast).
Per stack: median s/step of the timed steps after warm-up, tokens/s, peak memory of training
(torch.cuda.max_memory_allocated, reset after the model is built), and the loss of each step. Every stack
trains on one fixed batch (--data fixed, the default), so the loss must fall: the loss check fails (exit 1)
when a stack's loss does not fall by more than its rounding, or when tunelab's loss trajectory leaves its
reference's by more than LOSS_RTOL (relative, any step); a stack that computed no or wrong gradients fails
it. --rounds repeats every stack, the order reversed every other round, and pools the timed steps. Before the stacks: NF4 dequantize throughput
(bitsandbytes, tunelab Triton, tunelab PyTorch) against the card's copy bandwidth. --profile adds one more
step per stack under torch.profiler: its kernel time by group (matmul, attention, Triton, the rest) and top
kernels. Prints Markdown tables; --out writes JSON (rewritten after every stack, so a run cut short keeps
what it measured).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import zlib
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tunelab

# Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json) and a tiny stand-in of the same shape family.
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
# Every size a multiple of 64: bitsandbytes 0.50's AVX-512 CPU dequantize is wrong where a 4-bit block spans
# two rows (docs/quantization.md), which the loss check caught with intermediate_size 352 (3.8e-4 apart).
TINY = dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rope_theta=500000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=False)
STACKS = ("tunelab-qlora", "peft-bnb-qlora", "peft-liger-bnb-qlora", "tunelab-lora", "peft-lora",
          "peft-liger-lora")  # the run order: QLoRA first
REFERENCES = (("tunelab-lora", "peft-lora"), ("tunelab-lora", "peft-liger-lora"),
              ("tunelab-qlora", "peft-bnb-qlora"), ("tunelab-qlora", "peft-liger-bnb-qlora"))
# Loss trajectories of two stacks on the same fixed batch: bf16 autocast rounds differently in each stack's
# fusions (2.5e-4 apart seen on an H200 over 10 steps); fp32 only by summation order (5e-6 on a CPU).
LOSS_RTOL = {torch.bfloat16: 2e-3, torch.float32: 1e-4}
GOALS = {"qlora_speed": 1.5, "qlora_memory": 0.8, "lora_speed": 1.3, "dequant_of_copy": 0.7}
RANK, ALPHA, BLOCK = 16, 32, 64


# ---- devices and timing -------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()  # a model's dequantize workspaces go with it (tunelab.accel.dequant.Dequant)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def allocated_gib(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast over bf16 weights, as tunelab's training loop on CUDA; none for fp32 (a CPU's fast path)."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


# ---- the model and the stacks ----------------------------------------------------------------------------


def build_base(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A random Llama made directly in `dtype` on `device` (no fp32 or CPU copy); the same weights every time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa"))
    finally:
        torch.set_default_dtype(default)
    return model.train()


def canonical(name: str) -> str:
    """A parameter name without PEFT's and tunelab's wrappers: 'model.layers.0.self_attn.q_proj.lora_A'."""
    for part in ("base_model.model.", ".default", ".base_layer", ".base", ".weight"):
        name = name.replace(part, "")
    return name


def same_adapter_init(model: nn.Module) -> list[nn.Parameter]:
    """Give every lora_A the same Kaiming-uniform values in every stack (seeded by its name); B stays 0.

    Returns the trainable parameters.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for name, p in trainable:
            if "lora_A" in name:
                g = torch.Generator(p.device).manual_seed(zlib.crc32(canonical(name).encode()))
                bound = 1 / math.sqrt(p.shape[1])  # nn.Linear's default init: kaiming_uniform(a=sqrt(5))
                p.copy_(torch.rand(p.shape, generator=g, device=p.device, dtype=torch.float32) * 2 * bound - bound)
    names = {canonical(n) for n, _ in trainable}
    if any("lora_A" not in n and "lora_B" not in n for n in names):
        raise AssertionError(f"unexpected trainable parameters: {sorted(names)[:5]}")
    return [p for _, p in trainable]


def tunelab_stack(model: nn.Module, quantized: bool, loss_chunk: int):
    from tunelab.accel import kernels
    from tunelab.lora import LoraConfig, apply_lora
    from tunelab.quant import quantize_model
    from tunelab.train.loss import causal_lm_loss_sum

    if quantized:
        quantize_model(model, "nf4", block_size=BLOCK, double_quant=True)  # lm_head stays bf16
    apply_lora(model, LoraConfig(r=RANK, alpha=ALPHA, target_modules="all-linear"), verbose=False)
    # the speed-ups of train.kernels=auto, as `tunelab train` applies them: fused RMSNorm and SwiGLU (Triton
    # on CUDA), the fused LoRA autograd, the Triton dequantize
    k = kernels.choose(model, "auto", next(model.parameters()).device)
    kernels.apply(model, k)

    def loss_fn(batch: dict) -> torch.Tensor:
        s, n = causal_lm_loss_sum(model, batch, loss_chunk, kernels=k)  # chunked head + cross-entropy
        return s / n

    return model, loss_fn


def bnb_quantize(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Every nn.Linear but lm_head -> bitsandbytes Linear4bit (NF4, block 64, double quant, `dtype` compute),
    quantized on the model's device from its weight, as BitsAndBytesConfig(load_in_4bit, nf4, double quant,
    bnb_4bit_compute_dtype=dtype) loads it."""
    import bitsandbytes as bnb

    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
    for name, linear in targets:
        device = linear.weight.device
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, blocksize=BLOCK,
                                         compress_statistics=True, quant_type="nf4", module=layer).to(device)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        model.set_submodule(name, layer)
        linear.weight = None
    return model


def peft_stack(model: nn.Module, quantized: bool, loss_chunk: int = 0):  # loss_chunk: unused (HF loss)
    import peft

    if quantized:
        bnb_quantize(model, model.dtype)
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))

    def loss_fn(batch: dict) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss

    return model, loss_fn


def liger(model: nn.Module, ops: list[str]) -> None:
    """Liger-Kernel's Llama kernels on this model (before PEFT wraps it): `ops` of flce (fused linear
    cross-entropy), rope, rms_norm, swiglu."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope="rope" in ops, rms_norm="rms_norm" in ops, swiglu="swiglu" in ops,
                                cross_entropy=False, fused_linear_cross_entropy="flce" in ops, model=model)


@contextmanager
def restored(module):
    """Undo, on exit, what anything did to `module`'s attributes and to its classes' (Liger replaces
    transformers' functions in the module, for the process): later stacks get transformers' own."""
    classes = {c: dict(vars(c)) for c in vars(module).values() if isinstance(c, type) and c.__module__ == module.__name__}
    saved = dict(vars(module))
    try:
        yield
    finally:
        for key in set(vars(module)) - set(saved):
            delattr(module, key)
        for key, value in saved.items():
            if vars(module).get(key) is not value:
                setattr(module, key, value)
        for cls, attrs in classes.items():
            for key in set(vars(cls)) - set(attrs):
                delattr(cls, key)
            for key, value in attrs.items():
                if key not in ("__dict__", "__weakref__") and vars(cls).get(key) is not value:
                    setattr(cls, key, value)


def make_stack(name: str, shape: dict, device: torch.device, dtype: torch.dtype, checkpointing: bool,
               loss_chunk: int = 1024, liger_ops: tuple[str, ...] = ()):
    model = build_base(shape, device, dtype)
    if checkpointing:  # before PEFT wraps it, on the Hugging Face model itself (as tunelab/train/run.py)
        from tunelab.train.run import enable_checkpointing

        enable_checkpointing(model)
    if "liger" in name:
        liger(model, list(liger_ops))
    make = tunelab_stack if name.startswith("tunelab") else peft_stack
    model, loss_fn = make(model, quantized=name.endswith("qlora"), loss_chunk=loss_chunk)
    params = same_adapter_init(model)
    return model, loss_fn, params


def batches(shape: dict, batch: int, seq: int, steps: int, device: torch.device, fixed: bool = True) -> list[dict]:
    """Random token batches, the same in every stack; labels = inputs (every token counts). `fixed`: one
    batch every step, which the model learns, so the loss falls (fresh random tokens each step cannot)."""
    out = []
    for k in range(steps):
        seed = 1000 if fixed else 1000 + k
        ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))
        ids = ids.to(device)
        out.append({"input_ids": ids, "labels": ids})
    return out


def run_stack(name: str, checkpointing: bool, args, shape: dict, device: torch.device) -> dict:
    """Build, train warmup + timed steps, measure; frees everything before returning."""
    row = {"stack": name, "checkpointing": checkpointing}
    free(device)
    t0 = time.perf_counter()
    model, loss_fn, params = make_stack(name, shape, device, args.dtype, checkpointing, args.loss_chunk,
                                        tuple(args.liger_ops.split(",")))
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sync(device)
    row["build_s"] = time.perf_counter() - t0
    row["weights_gib"] = allocated_gib(device)
    row["trainable"] = sum(p.numel() for p in params)
    data = batches(shape, args.batch, args.seq, args.warmup + args.steps, device, args.data == "fixed")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []

    def train_step(batch: dict) -> float:
        with autocast(device, args.dtype):
            loss = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    try:
        for batch in data:
            sync(device)
            t = time.perf_counter()
            losses.append(train_step(batch))
            sync(device)
            times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        if args.profile:  # one more step, after the timed ones: where its time goes
            row["profile"] = profile_step(lambda: train_step(data[-1]), device)
    finally:
        del model, params
        loss_fn = opt = None  # train_step closes over these: dropped as del would, without unbinding
        free(device)
    step = statistics.median(times[args.warmup:])
    row.update(s_per_step=step, tokens_per_s=args.batch * args.seq / step, peak_gib=peak, losses=losses,
               step_times=times, timed=times[args.warmup:])
    return row


def kernel_kind(name: str) -> str:
    """A kernel's group in a profile: matmul, attention, triton (ours), or elementwise/other."""
    low = name.lower()
    if any(k in low for k in ("gemm", "xmma", "cutlass", "nvjet", "cublas", "addmm", "matmul", "aten::mm",
                              "aten::bmm", "aten::linear")):
        return "matmul"
    if any(k in low for k in ("flash", "attention", "fmha")):
        return "attention"
    if "triton" in low or low.startswith("_"):
        return "triton"
    return "elementwise/other"


def profile_step(step, device: torch.device, top: int = 12) -> dict:
    """torch.profiler over one training step: wall time, device (kernel) time by group and the top kernels.

    On CUDA the kernels' self time, on CPU the operators' (a CPU has no kernels apart from them)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        step()
        sync(device)
    wall = time.perf_counter() - t
    rows = []
    for evt in prof.key_averages():
        if cuda:  # the kernels themselves (their launching operators would count them twice, and so would
            # the device-side ranges of annotations such as "Optimizer.step#AdamW.step")
            if evt.device_type != DeviceType.CUDA or "#" in evt.key or evt.key.startswith("ProfilerStep"):
                continue
            us = evt.self_device_time_total
        else:
            if not evt.key.startswith("aten::") or evt.key in ("aten::empty", "aten::to", "aten::_to_copy"):
                continue
            us = evt.self_cpu_time_total
        if us > 0:
            rows.append((evt.key, us / 1e6, evt.count))
    total = sum(r[1] for r in rows)
    groups: dict[str, float] = {}
    for name, sec, _ in rows:
        groups[kernel_kind(name)] = groups.get(kernel_kind(name), 0.0) + sec
    rows.sort(key=lambda r: -r[1])
    return {"wall_s": wall, "device_s": total, "groups_s": groups,
            "top": [{"name": n[:120], "s": sec, "calls": c} for n, sec, c in rows[:top]]}


# ---- dequantize throughput -------------------------------------------------------------------------------


def timed(fn, device: torch.device, reps: int) -> float:
    """Median seconds of fn() over `reps` runs after two warm-up calls."""
    fn(), fn()
    out = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def dequant_bench(shape: tuple[int, int], device: torch.device, reps: int) -> dict:
    """NF4 (block 64, double quant) -> bf16 of one (out, in) weight: bytes moved / time, vs a bf16 copy."""
    from tunelab.quant import blockwise, quantize

    w = torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02
    n = w.numel()
    qt = quantize(w, "nf4", block_size=BLOCK, double_quant=True)
    moved = qt.nbytes + 2 * n  # read codes + state, write bf16
    res = {"shape": list(shape), "bytes_moved": moved}
    dst = torch.empty_like(w)
    res["copy_tb_s"] = 2 * 2 * n / timed(lambda: dst.copy_(w), device, reps) / 1e12  # read + write bf16
    out = torch.empty(n, dtype=torch.bfloat16, device=device)
    pytorch = lambda: blockwise.dequantize_blocks(qt.data, "nf4", n, BLOCK, qt.block_scales, None, torch.bfloat16)
    res["tunelab_pytorch_tb_s"] = moved / timed(pytorch, device, reps) / 1e12
    if device.type == "cuda":
        from tunelab.accel import dequant_triton

        if dequant_triton.AVAILABLE:
            res["tunelab_triton_tb_s"] = moved / timed(lambda: dequant_triton.dequantize_4bit(qt, torch.bfloat16, out),
                                                       device, reps) / 1e12
            res["triton_configs"] = triton_sweep(qt, out, moved, device, reps)
        else:
            res["tunelab_triton_tb_s"] = None
    try:
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(w, blocksize=BLOCK, quant_type="nf4", compress_statistics=True)
        res["bnb_tb_s"] = moved / timed(lambda: bnbf.dequantize_4bit(packed, state), device, reps) / 1e12
    except Exception as e:  # noqa: BLE001 - report, don't die: the training rows are already measured
        res["bnb_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return res


def triton_sweep(qt, out, moved: int, device: torch.device, reps: int) -> dict:
    """TB/s of both kernels at other launch settings, to choose the defaults on this card: the per-byte
    kernel (bytes per program, warps) and the block-tiled bf16 one ("pairs", bytes per program, warps)."""
    from tunelab.accel import dequant_triton as tk

    default = (tk.BYTES_PER_PROGRAM, tk.NUM_WARPS, tk.PAIRS, tk.PAIRS_BYTES, tk.PAIRS_WARPS)
    found = {}

    def rate() -> float:
        return moved / timed(lambda: tk.dequantize_4bit(qt, torch.bfloat16, out), device, reps) / 1e12

    try:
        tk.PAIRS = False
        for cfg in ((512, 2), (1024, 4), (2048, 8)):
            tk.BYTES_PER_PROGRAM, tk.NUM_WARPS = cfg
            found[f"{cfg[0]}B/{cfg[1]}w"] = rate()
        tk.PAIRS = True
        for cfg in ((1024, 2), (1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8)):
            tk.PAIRS_BYTES, tk.PAIRS_WARPS = cfg
            found[f"pairs {cfg[0]}B/{cfg[1]}w"] = rate()
    finally:
        tk.BYTES_PER_PROGRAM, tk.NUM_WARPS, tk.PAIRS, tk.PAIRS_BYTES, tk.PAIRS_WARPS = default
    return found


# ---- report ---------------------------------------------------------------------------------------------


def compare(rows: list[dict]) -> list[dict]:
    """tunelab vs each reference at the same checkpointing: speed (the timed steps of every round pooled),
    memory (the largest peak) and loss agreement (the first round's trajectories, step by step)."""
    found: dict[tuple, list[dict]] = {}
    for r in rows:
        if "s_per_step" in r:
            found.setdefault((r["stack"], r["checkpointing"]), []).append(r)
    out = []
    for ours, ref in REFERENCES:
        for ckpt in (True, False):
            a, b = found.get((ours, ckpt)), found.get((ref, ckpt))
            if not a or not b:
                continue
            rel = [abs(x - y) / abs(y) for x, y in zip(a[0]["losses"], b[0]["losses"])]
            step_a = statistics.median(t for r in a for t in r["timed"])
            step_b = statistics.median(t for r in b for t in r["timed"])
            peak_a, peak_b = max(r["peak_gib"] for r in a), max(r["peak_gib"] for r in b)
            out.append({"ours": ours, "reference": ref, "checkpointing": ckpt, "rounds": min(len(a), len(b)),
                        "speed_ratio": step_b / step_a,
                        "memory_ratio": None if math.isnan(peak_b) else peak_a / peak_b,
                        "loss_rel_diff_max": max(rel), "loss_rel_diff_first": rel[0]})
    return out


def loss_problems(result: dict, dtype: torch.dtype, fixed: bool) -> list[str]:
    """What the loss check finds wrong: on a fixed batch a stack whose loss did not fall by more than 5x
    LOSS_RTOL (relative), or a pair whose trajectories are more than LOSS_RTOL apart at some step."""
    tol = LOSS_RTOL[dtype]
    problems = []
    for r in result["rows"]:
        if "losses" in r and fixed and not r["losses"][-1] < r["losses"][0] * (1 - 5 * tol):
            problems.append(f"{r['stack']} (checkpointing {r['checkpointing']}): loss {r['losses'][0]:.4f} -> "
                            f"{r['losses'][-1]:.4f} did not fall by more than {5 * tol:g} relative")
    for c in result["comparisons"]:
        if c["loss_rel_diff_max"] > tol:
            problems.append(f"{c['ours']} vs {c['reference']} (checkpointing {c['checkpointing']}): losses "
                            f"{c['loss_rel_diff_max']:.2e} apart (> {tol:g})")
    return problems


def gib(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}"  # NaN: not measured (CPU)


def markdown(result: dict) -> str:
    head = (f"device: {result['device']}; torch {result['torch']}; model {result['model']}; {result['dtype']}; "
            f"batch {result['batch']} x {result['seq']} tokens; {result['warmup']} warm-up + {result['steps']} timed steps")
    lines = [head, "", "| stack | grad ckpt | s/step | tokens/s | peak GiB | weights GiB | losses (first steps) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "s_per_step" not in r:
            lines.append(f"| {r['stack']} | {r['checkpointing']} | - | - | - | - | {r.get('error', 'skipped')} |")
            continue
        shown = ", ".join(f"{x:.4f}" for x in r["losses"][:4])
        lines.append(f"| {r['stack']} | {r['checkpointing']} | {r['s_per_step']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{gib(r['peak_gib'])} | {gib(r['weights_gib'])} | {shown} |")
    lines += ["", "| ours vs reference | grad ckpt | tokens/s ratio | peak memory ratio | max loss rel. diff |",
              "|---|---|---|---|---|"]
    for c in result["comparisons"]:
        mem = "-" if c["memory_ratio"] is None else f"{c['memory_ratio']:.2f}"
        lines.append(f"| {c['ours']} / {c['reference']} | {c['checkpointing']} | {c['speed_ratio']:.2f} | {mem} | "
                     f"{c['loss_rel_diff_max']:.1e} |")
    d = result.get("dequant")
    if d and "error" in d:
        lines += ["", f"NF4 dequantize benchmark failed: {d['error']}"]
    elif d:
        lines += ["", f"NF4 dequantize {tuple(d['shape'])} -> bf16, TB/s (bytes moved / time):"]
        for key in ("copy_tb_s", "bnb_tb_s", "tunelab_triton_tb_s", "tunelab_pytorch_tb_s"):
            if d.get(key) is not None:
                lines.append(f"- {key.removesuffix('_tb_s')}: {d[key]:.3g}"
                             + ("" if key == "copy_tb_s" else f" ({d[key] / d['copy_tb_s']:.0%} of copy)"))
        if d.get("bnb_error"):
            lines.append(f"- bnb: {d['bnb_error']}")
        if d.get("triton_configs"):
            lines.append("- triton (bytes/program, warps): " + ", ".join(f"{k} {v:.3g}" for k, v in d["triton_configs"].items()))
    profiled = [r for r in result["rows"] if r.get("profile")]
    if profiled:
        lines += ["", "Profile of one step (torch.profiler; device time = sum of kernels' self time, by group):", "",
                  "| stack | grad ckpt | wall s | device s | matmul | attention | triton | elementwise/other |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in profiled:
            p, g = r["profile"], r["profile"]["groups_s"]
            lines.append(f"| {r['stack']} | {r['checkpointing']} | {p['wall_s']:.3f} | {p['device_s']:.3f} | "
                         + " | ".join(f"{g.get(k, 0.0):.3f}" for k in ("matmul", "attention", "triton", "elementwise/other"))
                         + " |")
        for r in profiled:
            lines.append(f"\ntop kernels, {r['stack']} checkpointing={r['checkpointing']}: "
                         + "; ".join(f"{t['name'][:60]} {t['s'] * 1e3:.1f} ms x{t['calls']}" for t in r["profile"]["top"][:8]))
    lines += ["", "goals: " + "; ".join(f"{k} {'>=' if k != 'qlora_memory' else '<='} {v}" for k, v in GOALS.items())]
    return "\n".join(lines)


def pooled(results: list[dict]) -> str:
    """Markdown: per comparison, the median s/step of every timed step (after warm-up) of the given runs
    together, ours and the reference's, and their ratio (the reference's over ours: a tokens/s ratio)."""
    steps: dict[tuple, list[float]] = {}
    for res in results:
        for r in res["rows"]:
            if "step_times" in r:
                steps.setdefault((r["stack"], r["checkpointing"]), []).extend(r["step_times"][res["warmup"]:])
    lines = [f"{len(results)} runs pooled", "",
             "| ours vs reference | grad ckpt | steps | ours median s | reference median s | tokens/s ratio |",
             "|---|---|---|---|---|---|"]
    for ours, ref in REFERENCES:
        for ckpt in (True, False):
            a, b = steps.get((ours, ckpt)), steps.get((ref, ckpt))
            if a and b:
                ma, mb = statistics.median(a), statistics.median(b)
                lines.append(f"| {ours} / {ref} | {ckpt} | {len(a)} / {len(b)} | {ma:.3f} | {mb:.3f} | {mb / ma:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="2 small layers, 2 x 64 tokens (runs on a CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float32"),
                   help="weights' dtype, with bf16 autocast for bfloat16 (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, help="tokens per sequence (default 2048; --tiny 128)")
    p.add_argument("--layers", type=int, help="decoder layers (default: the shape's, 32 for Llama-3-8B)")
    p.add_argument("--warmup", type=int, help="untimed first steps (default 2; --tiny 1)")
    p.add_argument("--steps", type=int, help="timed steps after warm-up (default 4; --tiny 2)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--stacks", default=",".join(STACKS), help=f"comma-separated subset of {','.join(STACKS)}")
    p.add_argument("--checkpointing", default="on,off", help="on, off or on,off")
    p.add_argument("--dequant-reps", type=int, help="timed dequantize calls (default 50; --tiny 5)")
    p.add_argument("--loss-chunk", type=int, default=1024,
                   help="tokens per chunk of tunelab's head + cross-entropy (train.loss_chunk_tokens; default 1024)")
    p.add_argument("--profile", action="store_true", help="profile one more step per stack (torch.profiler)")
    p.add_argument("--rounds", type=int, default=1, help="run every stack this many times, the order reversed "
                   "every other round; speed ratios pool the timed steps of all rounds")
    p.add_argument("--data", choices=("fixed", "fresh"), default="fixed",
                   help="fixed: one batch every step, so the loss must fall (the loss check); fresh: new tokens")
    p.add_argument("--liger-ops", help="Liger kernels of the peft-liger stacks, comma-separated of flce,rope,"
                   "rms_norm,swiglu (default: all four on CUDA; flce,rope on a CPU, see the docstring)")
    p.add_argument("--out", type=Path, help="JSON results file (rewritten after each stack)")
    p.add_argument("--pool", type=Path, nargs="+", metavar="JSON",
                   help="measure nothing: the ratios over the timed steps of these runs' JSON files together")
    args = p.parse_args(argv)
    if args.pool:
        print(pooled([json.loads(f.read_text()) for f in args.pool]))
        return 0
    device = torch.device(args.device)
    shape = dict(TINY if args.tiny else LLAMA3_8B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    for key, full, tiny in (("seq", 2048, 64), ("warmup", 2, 1), ("steps", 4, 2), ("dequant_reps", 50, 5)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.liger_ops is None:
        args.liger_ops = "flce,rope,rms_norm,swiglu" if device.type == "cuda" else "flce,rope"
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Liger's Triton kernels on a CPU; read when they load
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {"device": name, "torch": torch.__version__, "model": "tiny" if args.tiny else "llama3-8b-shape",
              "shape": shape, "dtype": str(args.dtype), "batch": args.batch, "seq": args.seq, "warmup": args.warmup, "steps": args.steps,
              "lr": args.lr, "command": " ".join(sys.argv), "rows": [], "comparisons": []}

    def save():
        result["comparisons"] = compare(result["rows"])
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))

    try:  # first: seconds, and one of the goals
        result["dequant"] = dequant_bench((256, 1024) if args.tiny else (14336, 4096), device, args.dequant_reps)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        result["dequant"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    save()
    ckpts = [{"on": True, "off": False}[c] for c in args.checkpointing.split(",")]
    stacks = args.stacks.split(",")
    for stack in stacks:
        if stack not in STACKS:
            p.error(f"unknown stack {stack!r}; choose from {', '.join(STACKS)}")
    from transformers.models.llama import modeling_llama

    for k in range(args.rounds):
        for ckpt in ckpts:
            for stack in stacks if k % 2 == 0 else stacks[::-1]:
                print(f"== round {k}: {stack} checkpointing={ckpt}", flush=True)
                try:
                    with restored(modeling_llama) if "liger" in stack else nullcontext():
                        row = run_stack(stack, ckpt, args, shape, device)
                    print(f"   {row['s_per_step']:.3f} s/step, {row['tokens_per_s']:,.0f} tokens/s, peak "
                          f"{gib(row['peak_gib'])} GiB, losses {[round(x, 4) for x in row['losses']]}", flush=True)
                except Exception as e:  # noqa: BLE001 - one stack failing (OOM, a missing package) must not lose the rest
                    traceback.print_exc()
                    row = {"stack": stack, "checkpointing": ckpt, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
                    free(device)
                result["rows"].append({**row, "round": k})
                save()
    print(markdown(result))
    problems = loss_problems(result, args.dtype, args.data == "fixed")
    failed = [r["stack"] for r in result["rows"] if "error" in r]
    if problems or failed:
        print("\nloss check failed:\n  " + "\n  ".join(problems + [f"{s}: did not run" for s in failed]))
        return 1
    print(f"\nloss check passed: every loss fell, every pair within {LOSS_RTOL[args.dtype]:g} relative at every step")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a training method costs before you launch it: parameters, bytes, FLOPs; and a few measured steps.

Analytic model (fp32 weights, the CPU path; formulas and their sources in docs/experiments.md), for a
Llama-style decoder with L layers, hidden C, intermediate I, H query heads, Hkv key/value heads, head dim d,
vocabulary V, batch B, sequence T (N = B*T tokens, Nl label tokens):

- weights: 4 bytes per parameter; qlora stores every linear but the output head as 4-bit codes
  (ceil(n/2) bytes) + one absmax per block (fp32, or with double quantization a uint8 code per block +
  fp32 absmax per 256 blocks + one fp32 offset), exactly tunelab.quant's layout; adapters in fp32.
- gradients: 4 bytes per trainable parameter; AdamW: two fp32 moments per trainable parameter.
- activations: what autograd saves per layer, per token, counted from the Llama block (HF ops + SDPA):
  full: 6C (each RMSNorm: input, normalised x, output) + 2*H*d + 2*Hkv*d (SDPA's q, k, v, output) + H
  (its log-sum-exp) + 4I (SiLU input and output, up output, down_proj input) + 2 (rsqrt of each norm).
  LoRA/QLoRA: a norm with a frozen weight does not keep its normalised x (4C instead of 6C), plus r per
  adapted linear (the A output); frozen linears keep nothing for themselves (LoRA A keeps their input).
  tunelab's fused kernels (`fused`: tunelab.accel.fused) change two terms: the fused RMSNorm never keeps the
  normalised x (4C for full too), the fused SwiGLU keeps no SiLU output (3I).
  Shared by all layers: RoPE cos/sin (2d per token), the final norm, the ids.
- loss: our chunked head saves only dL/dh for label tokens (Nl*C) and, when the head trains, its weight
  gradient (V*C); while computing it, one chunk of logits (min(chunk, Nl) x V) exists (fp32).
- peak = weights + optimizer state + max(activations + loss buffers, gradients): in steady state the
  gradients of step s are freed (zero_grad(set_to_none)) before the forward of s+1, and the backward frees
  a layer's activations (larger than its gradients for any but tiny batches) as it creates its gradients.
- FLOPs per token (Kaplan et al. 2020; Chinchilla, Hoffmann et al. 2022, appendix F): a trained matrix costs
  6 per parameter (2 forward, 2 input gradient, 2 weight gradient), a frozen one 4 (no weight gradient; the
  input gradient still flows to the layers below; not below the first layer's q/k/v, whose input is the
  frozen embedding), plus attention 12*L*T*H*d (score and value products, forward and backward, without the
  causal saving). The head runs on label tokens only.

`measure()` runs a few real steps in a fresh process (so nothing else is resident) and reports two peaks:
the live tensors (every tensor storage alive before a step, weights, 4-bit codes and AdamW state, plus
the largest total created and not yet freed during one step, from torch's memory profiler:
tunelab.experiments.memory), which is what the analytic model counts and does not depend on the
allocator; and the peak resident memory above the process's baseline before the model is loaded (VmHWM,
reset with /proc/self/clear_refs after the first step so loading and AdamW's lazy first step do not
count), which adds what the C allocator keeps. The allocator is the training loop's own by default
(`allocator="loop"`: tunelab.accel.malloc keeps freed blocks for the next step, as `tunelab train` does);
"fixed" pins glibc's mmap threshold at 64 KiB (FIXED_MMAP_THRESHOLD: RSS follows the live tensors, at
the cost of page faults every step) and "glibc" leaves glibc's defaults.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

from tunelab.errors import TunelabError

METHODS = ("full", "lora", "qlora")
FP32 = 4
NESTED_BLOCK = 256  # double quantization groups 256 block scales (bitsandbytes, tunelab.quant.blockwise)


@dataclass(frozen=True)
class Arch:
    """The shapes that decide a Llama-style model's cost."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_hf(cls, cfg) -> "Arch":
        """From a transformers config (LlamaConfig and its relatives: Mistral, Qwen2, SmolLM2)."""
        if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
            raise TunelabError("tunelab cost models bias-free Llama-style blocks; this model has linear biases")
        heads = cfg.num_attention_heads
        return cls(cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, heads,
                   getattr(cfg, "num_key_value_heads", None) or heads,
                   getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, bool(cfg.tie_word_embeddings))

    def layer_linears(self) -> list[tuple[str, int, int]]:
        """(name, in, out) of one decoder layer's linears."""
        C, I, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [("q_proj", C, q), ("k_proj", C, kv), ("v_proj", C, kv), ("o_proj", q, C),
                ("gate_proj", C, I), ("up_proj", C, I), ("down_proj", I, C)]

    def linear_params(self) -> int:
        """Weights in the decoder layers' linears (what qlora quantizes and LoRA adapts)."""
        return self.layers * sum(i * o for _, i, o in self.layer_linears())

    def total_params(self) -> int:
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        norms = self.layers * 2 * self.hidden + self.hidden
        return embed + self.linear_params() + norms


@dataclass(frozen=True)
class Setup:
    method: str
    batch_size: int
    seq_len: int
    r: int = 16
    quant_block: int = 64
    double_quant: bool = True
    loss_chunk: int = 256  # TrainConfig.loss_chunk_tokens
    fused: bool = False  # tunelab.accel.fused's RMSNorm and SwiGLU (tunelab train on CPU, fp32, a C compiler)


def adapter_params(arch: Arch, r: int) -> int:
    """LoRA A (r x in) and B (out x r) for every linear of every layer (target_modules=all-linear)."""
    return arch.layers * sum(r * (i + o) for _, i, o in arch.layer_linears())


def trainable_params(arch: Arch, s: Setup) -> int:
    return arch.total_params() if s.method == "full" else adapter_params(arch, s.r)


def quantized_nbytes(n: int, block: int, double_quant: bool) -> int:
    """Bytes of one n-weight tensor in tunelab.quant's 4-bit absmax layout."""
    blocks = math.ceil(n / block)
    scales = blocks + math.ceil(blocks / NESTED_BLOCK) * FP32 + FP32 if double_quant else blocks * FP32
    return math.ceil(n / 2) + scales


def weight_bytes(arch: Arch, s: Setup) -> int:
    adapters = 0 if s.method == "full" else adapter_params(arch, s.r) * FP32
    buffers = arch.head_dim * FP32  # RoPE inv_freq and original_inv_freq, d/2 floats each
    if s.method != "qlora":
        return arch.total_params() * FP32 + adapters + buffers
    per_layer = sum(quantized_nbytes(i * o, s.quant_block, s.double_quant) for _, i, o in arch.layer_linears())
    rest = arch.total_params() - arch.linear_params()  # embeddings, norms, head: fp32
    return arch.layers * per_layer + rest * FP32 + adapters + buffers


def activation_bytes(arch: Arch, s: Setup) -> int:
    """Tensors autograd saves in the decoder (not the loss), fp32."""
    C, I, H, Hkv, d = arch.hidden, arch.intermediate, arch.heads, arch.kv_heads, arch.head_dim
    # SDPA saves q, k, v (GQA: k, v at Hkv heads), its output (the o_proj input) and H log-sum-exps;
    # the MLP saves the SiLU input and output, the up output and the down_proj input (4I; the fused SwiGLU
    # keeps no SiLU output: 3I); 2 rsqrt per layer.
    core = 2 * H * d + 2 * Hkv * d + (3 if s.fused else 4) * I + H + 2
    if s.method == "full":
        # each RMSNorm: its input x, x * rsqrt (for the weight's gradient; not the fused norm, whose backward
        # recomputes it from x and 1/rms), its output (the next linear's input)
        normalised = 0 if s.fused else C
        per_token = arch.layers * (core + 4 * C + 2 * normalised)
        # final norm (input, normalised), its rsqrt; int64 ids for the embedding gradient
        shared = C + normalised + 1 + 2
    else:
        # frozen norm weights: only x and the output (kept by LoRA A); r per adapted linear (A's output).
        # The first norm's input is the frozen embedding (no gradient), so it keeps nothing there.
        per_token = arch.layers * (core + 4 * C + s.r * len(arch.layer_linears())) - (C + 1)
        shared = C + 1
    shared += 2 * d  # RoPE cos / sin, shared by every layer
    return (per_token + shared) * s.batch_size * s.seq_len * FP32


def loss_bytes(arch: Arch, s: Setup) -> int:
    """The chunked head: saved dL/dh (Nl x C), the head's weight gradient if it trains (V x C), and one
    chunk of logits while it runs (plus its V x C product when the head trains); a frozen head holds one
    (TOKEN_BLOCK x VOCAB_BLOCK) tile instead (tunelab.train.loss)."""
    from tunelab.train.loss import TOKEN_BLOCK, VOCAB_BLOCK

    labels = s.batch_size * (s.seq_len - 1)
    if s.method == "full":
        return (labels * arch.hidden + min(s.loss_chunk, labels) * arch.vocab + 2 * arch.vocab * arch.hidden) * FP32
    return (labels * arch.hidden + min(TOKEN_BLOCK, labels) * min(VOCAB_BLOCK, arch.vocab)) * FP32


def flops_per_token(arch: Arch, s: Setup) -> float:
    """Training FLOPs per token (see the module docstring)."""
    head = arch.vocab * arch.hidden  # the head runs on label tokens: (T-1)/T of them
    label_share = (s.seq_len - 1) / s.seq_len
    attention = 12 * arch.layers * s.seq_len * arch.heads * arch.head_dim
    if s.method == "full":
        return 6 * arch.linear_params() + 6 * head * label_share + attention
    # The first layer's q/k/v read the frozen embedding: no input gradient there (base or adapter A).
    qkv = [(i, o) for name, i, o in arch.layer_linears() if name in ("q_proj", "k_proj", "v_proj")]
    no_input_grad = sum(2 * i * o + 2 * s.r * i for i, o in qkv)
    return (4 * arch.linear_params() + 6 * adapter_params(arch, s.r) - no_input_grad + 4 * head * label_share
            + attention)


def analytic(arch: Arch, s: Setup) -> dict:
    """Every analytic number for one method, in parameters, bytes and FLOPs."""
    if s.method not in METHODS:
        raise TunelabError(f"tunelab cost models methods {', '.join(METHODS)}, not {s.method!r}")
    n = trainable_params(arch, s)
    w, acts, loss = weight_bytes(arch, s), activation_bytes(arch, s), loss_bytes(arch, s)
    grads, opt = n * FP32, 2 * n * FP32
    return {"method": s.method, "trainable": n, "total_params": arch.total_params() + (n if s.method != "full" else 0),
            "weights": w, "grads": grads, "optimizer": opt, "activations": acts, "loss_buffers": loss,
            "peak": w + opt + max(acts + loss, grads), "flops_per_token": flops_per_token(arch, s)}


# ------------------------------------------------------------------------------------------------------
# Measurement: a few real steps in a fresh process


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise TunelabError(f"/proc/self/status has no {field}: --measure needs Linux")


def _measure_here(source: str, s: Setup, steps: int, allocator: str = "loop", seed: int = 0) -> dict:
    """Load, prepare as tunelab train does, run `steps` steps on random tokens; memory above the baseline."""
    import dataclasses
    import gc
    import time

    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before the baseline)
    from transformers import AutoModelForCausalLM

    import tunelab.lora  # noqa: F401
    import tunelab.quant  # noqa: F401
    from tunelab.accel import kernels as accel
    from tunelab.config import load_config
    from tunelab.experiments.memory import live_peak_bytes, live_tensor_bytes
    from tunelab.heap import release_freed_memory
    from tunelab.models.load import model_folder
    from tunelab.train.loop import adamw
    from tunelab.train.loss import causal_lm_loss_sum
    from tunelab.train.run import prepare_method

    base_kb = _rss_kb("VmRSS")
    cfg = load_config(None, [f"method={s.method}", f"lora.r={s.r}", f"quant.block_size={s.quant_block}",
                             f"quant.double_quant={s.double_quant}"],
                      base={"data": {"sources": [{"name": "random", "path": "unused"}]}})
    model = AutoModelForCausalLM.from_pretrained(model_folder(source), dtype=torch.float32)
    kernels = accel.choose(model, "auto")  # as tunelab train: with "loop", its malloc setting too
    kernels = dataclasses.replace(kernels, malloc=kernels.malloc and allocator == "loop")
    groups = prepare_method(model, cfg, kernels)
    model.train()
    opt = adamw(groups, lr=1e-5)  # as tunelab train steps
    params = [p for g in groups for p in g["params"]]
    gen = torch.Generator().manual_seed(seed)
    vocab = model.get_output_embeddings().out_features
    ids = torch.randint(0, vocab, (s.batch_size, s.seq_len), generator=gen)
    batch = {"input_ids": ids, "labels": ids.clone(),
             "position_ids": torch.arange(s.seq_len).repeat(s.batch_size, 1)}

    def step():
        loss, n = causal_lm_loss_sum(model, batch, s.loss_chunk, kernels)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # AdamW allocates its state lazily here; loading transients are behind us after it
    gc.collect()
    if allocator != "loop":  # the loop never trims: what a step freed stays for the next one
        release_freed_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - t0
    peak = (_rss_kb("VmHWM") - base_kb) * 1024
    gc.collect()
    live = live_tensor_bytes() + live_peak_bytes(step)  # after the timed steps: the profiler slows its step
    return {"peak": peak, "live_peak": live, "tokens_per_s": steps * s.batch_size * s.seq_len / seconds,
            "steps": steps, "allocator": allocator}


# glibc's default malloc raises its mmap threshold as big blocks are freed (up to 32 MiB), after which
# activation-sized blocks (MiBs) come from the heap, and the heap keeps freed memory it cannot reuse: on the
# bundled model LoRA's peak RSS was 1.6x the live tensors with it, 1.12x with a fixed 64 KiB threshold.
# Fixing the threshold makes RSS follow what tensors hold, which is what the analytic model counts.
FIXED_MMAP_THRESHOLD = "65536"
ALLOCATORS = ("loop", "fixed", "glibc")


def measure(source: str, s: Setup, steps: int = 3, threads: int | None = None, allocator: str = "loop") -> dict:
    """Run `_measure_here` in a fresh Python process (clean baseline) and return its numbers.

    allocator: "loop" (tunelab train's malloc setting), "fixed" (MALLOC_MMAP_THRESHOLD_=65536, see
    FIXED_MMAP_THRESHOLD) or "glibc" (its defaults)."""
    if allocator not in ALLOCATORS:
        raise TunelabError(f"allocator must be one of {', '.join(ALLOCATORS)}, got {allocator!r}")
    env = {**os.environ}
    for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        env.pop(k, None)  # the allocator argument decides
    if allocator == "fixed":
        env["MALLOC_MMAP_THRESHOLD_"] = FIXED_MMAP_THRESHOLD
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    arg = json.dumps({"source": source, "setup": asdict(s), "steps": steps, "allocator": allocator})
    proc = subprocess.run([sys.executable, "-m", "tunelab.experiments.cost", arg], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise TunelabError(f"measuring {s.method} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    a = json.loads(sys.argv[1])
    print(json.dumps(_measure_here(a["source"], Setup(**a["setup"]), a["steps"], a["allocator"])))

"""A tiny QLoRA Llama trained a step through tunelab's Triton kernels (RMSNorm, SwiGLU, 4-bit dequantize) under
Triton's interpreter on CPU, with and without a forced kernel failure, under train.kernels auto and strict.

Run as a script (tests/test_accel_policy.py does, in a subprocess): TRITON_INTERPRET must be set before
Triton is imported. CPU tensors are routed to the Triton modules as CUDA tensors are (fused._gpu,
dequant._triton_for); the C kernels stand aside. Prints one JSON object to stdout.
"""

import dataclasses
import json
import os
import sys
import warnings

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the checkout's tunelab

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab.accel import dequant, dequant_triton, fused, kernels, triton_fused
from tunelab.errors import TunelabError
from tunelab.lora import LoraConfig, apply_lora
from tunelab.quant import quantize_model
from tunelab.train.loss import causal_lm_loss_sum

CALLS = {"rms_norm": 0, "swiglu": 0, "dequantize_4bit": 0}
REAL = {"rms_norm": triton_fused.rms_norm, "swiglu": triton_fused.swiglu,
        "dequantize_4bit": dequant_triton.dequantize_4bit}
FAIL = set()  # the kernels the fault seam makes raise, as a Triton that cannot compile for the card would


def _counted(name):
    def run(*a, **k):
        CALLS[name] += 1
        if name in FAIL:
            raise RuntimeError(f"forced failure of {name}")
        return REAL[name](*a, **k)
    return run


def _route_to_triton():
    """CPU tensors take the CUDA path, so the real Triton kernels run (in the interpreter)."""
    fused.fusable = fused._cpu_fp32 = lambda *a: False  # the C kernels stand aside
    fused._gpu = lambda *ts: triton_fused if ts[0].dtype in triton_fused.DTYPES else None
    dequant._triton_for = lambda qt: dequant_triton if qt.scheme == "absmax" else None
    for name in CALLS:
        setattr(triton_fused if name != "dequantize_4bit" else dequant_triton, name, _counted(name))


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = quantize_model(LlamaForCausalLM(cfg), block_size=32)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"), verbose=False)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(n)))
    return model


BATCH = {"input_ids": torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))}
BATCH["labels"] = BATCH["input_ids"].clone()


def _loss_and_grads(model, k):
    """Mean next-token loss and the LoRA gradients of one forward + backward with Kernels `k`."""
    model.zero_grad(set_to_none=True)
    s, n = causal_lm_loss_sum(model, BATCH, 256, kernels=k)
    (s / n).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return float((s / n).detach()), grads


def _with(mode: str, fail: set, steps: int = 2) -> dict:
    """Losses, gradients' relative error against the reference, kernel calls and warnings of `steps` passes."""
    FAIL.clear()
    FAIL.update(fail)
    for name in CALLS:
        CALLS[name] = 0
    model = _model()
    ref_loss, ref_grads = _loss_and_grads(model, kernels.choose(model, "off", "cpu"))
    k = dataclasses.replace(kernels.choose(model, "auto", "cpu"), mode=mode, norm=True, swiglu=True, rotary=False,
                            dequant=True)
    kernels.apply(model, k)
    out = {"ref_loss": ref_loss, "losses": [], "grad_rel": [], "error": None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for _ in range(steps):
                loss, grads = _loss_and_grads(model, k)
                out["losses"].append(loss)
                out["grad_rel"].append(max(float((grads[n] - g).norm() / g.norm()) for n, g in ref_grads.items()))
        except TunelabError as e:
            out["error"] = str(e)
    out["warnings"] = [str(w.message) for w in caught if "tunelab's" in str(w.message)]
    out["calls"] = dict(CALLS)
    out["failed"] = sorted(model.model.norm.accel_guard.failed)
    return out


if __name__ == "__main__":
    _route_to_triton()
    result = {"auto": _with("auto", set(), steps=1),
              "auto_failing": _with("auto", {"rms_norm", "dequantize_4bit"}),
              "strict_failing": _with("strict", {"swiglu"}),
              "strict": _with("strict", set(), steps=1)}
    print(json.dumps(result))

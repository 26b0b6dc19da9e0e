"""Checking a GGUF export inside llama.cpp itself (the optional llama-cpp-python): its logits on given token
ids, and how closely they agree with a reference (transformers on the merged model, or another GGUF file).

Agreement measures (`agreement(ref, got)`, both (T, V) logits of the same T positions):
  - max_abs: the largest |logit difference| over all positions and the whole vocabulary;
  - top1: the share of positions whose arg-max agrees;
  - decided_misses: positions whose arg-max differs although the reference's top-2 margin is >= MARGIN.
    Along a reference greedy continuation (prompt + the reference's own greedy tokens), 0 decided misses
    means llama.cpp's greedy continuation is the same token for token, except after a near-tie
    (margin < MARGIN), where either choice is a correct greedy step;
  - mean_kl: mean over positions of KL(softmax(ref) || softmax(got)) in nats, in float64.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

MARGIN = 1e-3  # a top-2 logit margin below this is a tie that fp rounding may break either way


def llama_cpp_logits(path: str | os.PathLike, ids: list[int], lora: str | os.PathLike | None = None,
                     n_threads: int | None = None) -> np.ndarray:
    """(len(ids), n_vocab) float32 logits llama.cpp computes for `ids` (no BOS added), one batch, on the CPU;
    with `lora`, a GGUF LoRA adapter file applied at load (scale 1).

    The KV cache is f32 (llama.cpp's default is f16, which rounds every key and value: that would be
    measured as the file's error, e.g. 3e-3 instead of 2e-4 on the tiny Gemma-3 of the tests)."""
    from tunelab.export.gguf import require_llama_cpp

    llama_cpp = require_llama_cpp("checking a GGUF file in llama.cpp")
    n = len(ids)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(n, 16), n_batch=n, n_ubatch=n, logits_all=True,
                          n_threads=n_threads or min(4, os.cpu_count() or 1), n_gpu_layers=0, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                          lora_path=None if lora is None else str(lora))
    try:
        llm.eval(list(map(int, ids)))
        return np.array(llm.scores[:n], dtype=np.float32)
    finally:
        llm.close()


@dataclass
class Agreement:
    positions: int
    max_abs: float
    top1: float
    decided_misses: int
    mean_kl: float

    def as_dict(self) -> dict:
        return asdict(self)


def agreement(ref: np.ndarray, got: np.ndarray) -> Agreement:
    """How `got` (T, V) logits agree with the reference `ref` (T, V); see the module docstring."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref.shape != got.shape:
        raise ValueError(f"logits of different shapes: {ref.shape} vs {got.shape}")
    top2 = np.sort(ref, axis=-1)[:, -2:]  # (T, 2)
    decided = top2[:, 1] - top2[:, 0] >= MARGIN
    same = ref.argmax(-1) == got.argmax(-1)
    logp = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    logq = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
    kl = (np.exp(logp) * (logp - logq)).sum(-1)  # (T,)
    return Agreement(positions=len(ref), max_abs=float(np.abs(ref - got).max()), top1=float(same.mean()),
                     decided_misses=int((~same & decided).sum()), mean_kl=float(kl.mean()))

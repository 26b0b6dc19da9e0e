"""The `dequant` speed-up: a 4-bit layer's weight for one matmul, de-quantized by one C loop (fp32 on CPU,
tunelab.accel.dequant_c) or one Triton kernel (CUDA, tunelab.accel.dequant_triton) into a buffer reused by
every layer. Its reference twin is QuantizedTensor.dequantize (tunelab/quant/tensor.py) into fresh memory:
the same numbers, bit for bit. `apply` (tunelab.accel.kernels) sets `matmul_weight` as the `dequant` of each
Linear4bit of a model instance.
"""

from __future__ import annotations

import threading
import warnings

import torch

from tunelab.quant import blockwise, codebooks
from tunelab.quant.tensor import QuantizedTensor

_workspaces = threading.local()


def matmul_weight(qweight: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """qweight in `dtype` (its shape), through a kernel where one serves it, in this thread's workspace:
    valid until the next call. The same numbers as qweight.dequantize(dtype)."""
    out = workspace(qweight, dtype)
    if qweight.device.type == "cuda":
        from tunelab.accel import dequant_triton  # imports Triton (seconds): only when a GPU tensor asks

        if dequant_triton.serves(qweight):
            try:
                return dequant_triton.dequantize_4bit(qweight, dtype, out=out).view(qweight.shape)
            except Exception as e:  # noqa: BLE001 - a Triton too old or broken for this card: PyTorch's path
                dequant_triton.AVAILABLE = False  # once: not tried again in this process
                warnings.warn(f"tunelab's Triton dequantize kernel failed ({type(e).__name__}: {e}); "
                              "using the PyTorch path instead (the same numbers)", stacklevel=2)
    book = qweight.codebook()
    if qweight.device.type == "cpu" and dtype == torch.float32 and codebooks.bits(book) == 4:
        from tunelab.accel import dequant_c

        flat = dequant_c.dequant4(qweight.data, blockwise.code_table16(book), out, qweight.numel(),
                                  qweight.block_size, qweight.scales, qweight.zero, qweight.nested_absmax,
                                  qweight.offset)
        if flat is not None:  # one pass in C; the same bits as PyTorch's path
            return flat.view(qweight.shape)
    return qweight.dequantize(dtype, workspace=out)


def workspace(qweight: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread scratch buffer for one dequantized weight, grown to the largest layer and reused.

    W lives only inside forward (or backward) of one layer at a time, so one buffer serves them all and
    a training step does not pay fresh-memory page faults for every layer, twice.
    """
    key = (dtype, qweight.device)
    cache = getattr(_workspaces, "buffers", None)
    if cache is None:
        cache = _workspaces.buffers = {}
    need = qweight.numel() + 2
    buf = cache.get(key)
    if buf is None or buf.numel() < need:
        buf = cache[key] = blockwise.empty_output(need, dtype, qweight.device)
    return buf


def free_workspaces() -> None:
    """Drop this thread's dequantization buffers (e.g. before measuring another model's peak memory)."""
    getattr(_workspaces, "buffers", {}).clear()

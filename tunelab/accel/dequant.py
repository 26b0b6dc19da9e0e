"""The `dequant` speed-up: a 4-bit layer's weight for one matmul, de-quantized by one C loop (fp32 on CPU,
tunelab.accel.dequant_c) or one Triton kernel (CUDA, tunelab.accel.dequant_triton) into a buffer reused by
every layer of the model. Its reference twin is QuantizedTensor.dequantize (tunelab/quant/tensor.py) into
fresh memory: the same numbers, bit for bit. `apply` (tunelab.accel.kernels) sets one `Dequant` per model
instance as the `dequant` of each of its Linear4bit layers.
"""

from __future__ import annotations

import threading

import torch

from tunelab.accel.guard import Guard
from tunelab.quant import blockwise, codebooks
from tunelab.quant.tensor import QuantizedTensor

TRITON = "Triton dequantize kernel"  # its name in warnings and in Guard.failed


class Dequant:
    """One model instance's dequantize speed-up: its workspaces (one per thread) and its Guard (what a failing
    kernel does under train.kernels). Called as Linear4bit.dequant(qweight, dtype)."""

    def __init__(self, guard: Guard | None = None):
        self.guard = guard or Guard()
        self._local = threading.local()  # per thread: two threads may run layers of one model at once

    def __call__(self, qweight: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        """qweight in `dtype` (its shape), in this thread's workspace: valid until the next call."""
        return matmul_weight(qweight, dtype, self.workspace(qweight, dtype), self.guard)

    def workspace(self, qweight: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        """A scratch buffer for one dequantized weight, grown to the largest layer and reused.

        W lives only inside forward (or backward) of one layer at a time, so one buffer serves them all and
        a training step does not pay fresh-memory page faults for every layer, twice.
        """
        cache = getattr(self._local, "buffers", None)
        if cache is None:
            cache = self._local.buffers = {}
        key, need = (dtype, qweight.device), qweight.numel() + 2
        buf = cache.get(key)
        if buf is None or buf.numel() < need:
            buf = cache[key] = blockwise.empty_output(need, dtype, qweight.device)
        return buf

    def free(self) -> None:
        """Drop this thread's buffers (e.g. before measuring another model's peak memory)."""
        getattr(self._local, "buffers", {}).clear()

    def __reduce__(self):  # copy.deepcopy and pickle (a model copied whole): the guard, not the buffers
        return type(self), (self.guard,)


def _triton_for(qweight: QuantizedTensor):
    """tunelab.accel.dequant_triton when its kernel serves qweight (a CUDA tensor), else None."""
    if qweight.device.type != "cuda":
        return None
    from tunelab.accel import dequant_triton  # imports Triton (seconds): only when a GPU tensor asks

    return dequant_triton if dequant_triton.serves(qweight) else None


def matmul_weight(qweight: QuantizedTensor, dtype: torch.dtype, out: torch.Tensor | None = None,
                  guard: Guard | None = None) -> torch.Tensor:
    """qweight in `dtype` (its shape) through a kernel where one serves it, written into `out` (a flat `dtype`
    buffer of at least numel + 2 on its device; default a new one). The same numbers as qweight.dequantize(dtype).
    `guard`: what a failing Triton kernel does (default: a fresh one, auto)."""
    if out is None:
        out = blockwise.empty_output(qweight.numel() + 2, dtype, qweight.device)
    gpu = _triton_for(qweight)
    if gpu is not None:
        return (guard or Guard()).run(TRITON, lambda: gpu.dequantize_4bit(qweight, dtype, out=out).view(qweight.shape),
                                      lambda: qweight.dequantize(dtype, workspace=out))
    book = qweight.codebook()
    if qweight.device.type == "cpu" and dtype == torch.float32 and codebooks.bits(book) == 4:
        from tunelab.accel import dequant_c

        flat = dequant_c.dequant4(qweight.data, blockwise.code_table16(book), out, qweight.numel(),
                                  qweight.block_size, qweight.scales, qweight.zero, qweight.nested_absmax,
                                  qweight.offset)
        if flat is not None:  # one pass in C; the same bits as PyTorch's path
            return flat.view(qweight.shape)
    return qweight.dequantize(dtype, workspace=out)

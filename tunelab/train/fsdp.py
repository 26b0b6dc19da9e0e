"""FSDP (`train.distributed: fsdp`): each process keeps 1/world of every float parameter, gradient and AdamW moment.

PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`, which runs on CPU with gloo as on CUDA with NCCL) turns
each parameter into a DTensor sharded on dim 0 across the processes. One group per decoder layer, and a root
group for the rest (embeddings, final norm, output head): a layer's parameters are all-gathered just before
its forward (and again before its backward) and freed after, and its gradients are reduce-scattered (averaged,
as DDP does).

QLoRA's packed 4-bit weights (`tunelab.quant.Linear4bit.qweight`: uint8 codes, per-block scales) are neither
parameters nor buffers, and FSDP2 shards only DTensor-able parameters, so `shard_quantized` shards them itself,
the same way: each process keeps blocks [r*c, (r+1)*c) of every 4-bit weight (c = ceil(blocks / processes);
at block 64 a block is 32 bytes of codes and one scale), cut on block boundaries so that a shard's codes and
scales go together. Double quantization's nested absmax (4 bytes per 256 blocks, 0.05% of the codes) and
offset stay whole on every process. A Linear4bit gathers its whole weight for each matmul (`gather_quantized`:
one all_gather of the codes and scales, then the usual dequantize), in forward and again in backward (and in
a checkpointed layer's recomputation), and lets it go when the matmul returns: only the shard stays. These
gathers are collectives inside the layers' forward and backward, which every process runs in the same order,
as FSDP's own are. They are not prefetched (FSDP overlaps its gathers with compute on CUDA; these wait).
(Registering the codes and scales as frozen parameters would let FSDP2 shard them, but would put uint8 tensors
in every parameters() walk, state dict and optimizer grouping of the rest of tunelab; a gather inside
Linear4bit keeps all of that as it is.)
Mixture-of-experts 4-bit weights (Experts4bit) are not sharded: every process keeps all of them.

The functions here are collective where they say so: every process must call them, in the same order.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from tunelab.quant import QuantizedTensor


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM (`model.model.layers` for Llama-style models)."""
    body = getattr(model, model.base_model_prefix)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: no `{model.base_model_prefix}.layers` list of decoder blocks "
                        "to shard; use train.distributed=ddp for this model")
    return layers


def shard(root: nn.Module, model: nn.Module, param_groups: list[dict]) -> list[dict]:
    """fully_shard each decoder layer of `model`, then `root` (the module whose forward the loop calls).

    FSDP replaces every parameter by a new DTensor parameter, so the optimizer must be built after this:
    returns `param_groups` with each parameter swapped for its sharded replacement (matched by name).
    """
    from torch.distributed.fsdp import fully_shard  # imported here: it takes about a second

    names = {p: n for n, p in model.named_parameters()}
    group_names = [[names[p] for p in g["params"]] for g in param_groups]
    shard_quantized(model)
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(root)
    sharded = dict(model.named_parameters())
    return [{**g, "params": [sharded[n] for n in ns]} for g, ns in zip(param_groups, group_names)]


def shard_quantized(model: nn.Module) -> None:
    """Keep only this process's blocks of every Linear4bit's packed weight; the layer gathers the rest per use.

    Not collective itself; the gathers that follow are. Process r keeps blocks block_range(blocks, r, world).
    """
    import torch.distributed as dist

    from tunelab.quant import Linear4bit

    rank, world = dist.get_rank(), dist.get_world_size()
    for m in model.modules():
        if isinstance(m, Linear4bit) and m.gather is None:
            m.qweight = m.qweight.blocks(*block_range(m.qweight.num_blocks, rank, world))
            m.gather = gather_quantized


def block_range(blocks: int, rank: int, world: int) -> tuple[int, int]:
    """The blocks [b0, b1) process `rank` of `world` keeps of a tensor of `blocks` blocks: c = ceil(blocks /
    world) each, in rank order (the last processes may have fewer, or none)."""
    c = -(-blocks // world)
    return min(rank * c, blocks), min((rank + 1) * c, blocks)


def gather_quantized(shard: QuantizedTensor) -> QuantizedTensor:
    """The whole QuantizedTensor from every process's `shard` of it (collective: one all_gather of uint8 rows,
    see pack_blocks)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    c = -(-shard.num_blocks // world)
    row = pack_blocks(shard, c)
    rows = torch.empty(world * row.numel(), dtype=torch.uint8, device=row.device)
    dist.all_gather_into_tensor(rows, row)
    return unpack_blocks(shard, rows.view(world, -1), c)


def pack_blocks(shard: QuantizedTensor, c: int) -> torch.Tensor:
    """One uint8 row of a shard: its codes, then its scales (and min-max zero points) as bytes, each padded to
    `c` blocks, so that every process's row has the same length."""
    row = []
    for k, (per, _) in shard.per_block().items():  # {field: (elements per block, elements in all)}
        t = getattr(shard, k)
        pad = (c * per - t.numel()) * t.element_size()
        row += [t.view(torch.uint8), torch.zeros(pad, dtype=torch.uint8, device=t.device)]
    return torch.cat(row)


def unpack_blocks(shard: QuantizedTensor, rows: torch.Tensor, c: int) -> QuantizedTensor:
    """The whole QuantizedTensor from the (world, row) pack_blocks rows of every process, in rank order."""
    whole, at = {}, 0
    for k, (per, total) in shard.per_block().items():
        t = getattr(shard, k)
        n = c * per * t.element_size()
        whole[k] = rows[:, at: at + n].contiguous().view(t.dtype).reshape(-1)[:total]  # blocks in order
        at += n
    return replace(shard, **whole, shard=None)


def _is_dtensor(t: torch.Tensor) -> bool:
    # DTensors exist only once torch.distributed.tensor is imported (fully_shard does), so a run without FSDP
    # never pays that import
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor shard (collective: all-gather); a plain tensor as it is."""
    return t.full_tensor() if _is_dtensor(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor; a plain tensor as it is."""
    return t.to_local() if _is_dtensor(t) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` cut into the same shards as `like` (collective when `like` is a DTensor); else `full` on its device."""
    if _is_dtensor(like):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements)
    return full.to(like.device)


@contextmanager
def no_sync(root: nn.Module):
    """Gradient accumulation: skip the reduce-scatter on the micro-batches before the last one."""
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


@contextmanager
def root_gathered(root: nn.Module):
    """Inside the block the root group's parameters (embeddings, final norm, head) are whole (all-gathered).

    For code that calls the model's parts directly instead of root.forward (evaluation): the decoder layers
    gather their own parameters as they run. (Not for saving: a module's state_dict() is always sharded.)
    """
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def whole_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: whole tensor on the CPU} on rank 0 ({} elsewhere), all-gathering one shard at a time.

    Collective: every process calls it with the same names in the same order. Only rank 0 keeps what it
    gathers, so the other processes never hold more than one whole tensor.
    """
    import torch.distributed as dist

    keep = not dist.is_initialized() or dist.get_rank() == 0
    out = {}
    for k, v in tensors.items():
        whole = full_tensor(v.detach())
        if keep:
            out[k] = whole.cpu().contiguous()
    return out


def local_nbytes(tensors) -> int:
    """Bytes this process stores for `tensors` (its shard of each DTensor)."""
    return sum(local(t).numel() * local(t).element_size() for t in tensors)

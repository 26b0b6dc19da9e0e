"""FSDP's shards of 4-bit weights (tunelab.train.fsdp.shard_quantized), without processes: every rank's shard
packed into its all_gather row, the rows stacked as all_gather returns them, unpacked: the whole tensor again,
bit for bit. The 2-process training runs are in tests/train/test_train_fsdp.py (equal to one process, bytes per
process)."""

from __future__ import annotations

import pytest
import torch

from tunelab.quant import QuantError, quantize
from tunelab.train.fsdp import block_range, pack_blocks, unpack_blocks

CASES = {
    # (shape, quantize kwargs): a partial last block; 398 blocks = two nested (double-quant) groups of 256;
    # 4 blocks over 3 processes (the last keeps none); min-max int4 (zero points are cut with the scales)
    "nf4-dq-partial": ((37, 29), dict(quant_type="nf4", block_size=32, double_quant=True)),
    "nf4-dq-two-groups": ((97, 131), dict(quant_type="nf4", block_size=32, double_quant=True)),
    "fp4-64": ((48, 40), dict(quant_type="fp4", block_size=64)),
    "nf4-4-blocks": ((4, 32), dict(quant_type="nf4", block_size=32, double_quant=True)),
    "int4-minmax": ((33, 17), dict(quant_type="int4", block_size=32, scheme="minmax")),
}


@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("case", CASES)
def test_shards_gather_back_to_the_whole_tensor(case, world):
    shape, kw = CASES[case]
    whole = quantize(torch.randn(shape, generator=torch.Generator().manual_seed(0)), **kw)
    n = whole.num_blocks
    c = -(-n // world)
    shards = [whole.blocks(*block_range(n, r, world)) for r in range(world)]
    assert [s.shard for s in shards] == [(min(r * c, n), min(r * c + c, n)) for r in range(world)]
    rows = torch.stack([pack_blocks(s, c) for s in shards])  # (world, row): what all_gather_into_tensor gives
    back = unpack_blocks(shards[0], rows, c)
    for k in ("data", "scales", "zero", "nested_absmax", "offset"):
        a, b = getattr(whole, k), getattr(back, k)
        assert (a is None and b is None) or torch.equal(a, b), k
    assert torch.equal(back.dequantize(), whole.dequantize())
    # each process stores its blocks' codes and scales, plus the nested absmax and offset, which stay whole
    per_block = {k: per for k, (per, _) in whole.per_block().items()}
    block_bytes = sum(per * getattr(whole, k).element_size() for k, per in per_block.items())
    kept = sum(getattr(whole, k).nbytes for k in ("nested_absmax", "offset") if getattr(whole, k) is not None)
    assert sum(s.nbytes - kept for s in shards) == whole.nbytes - kept
    for s in shards:
        assert s.nbytes <= (whole.nbytes - kept) / world + block_bytes + kept


def test_a_shard_refuses_to_dequantize():
    whole = quantize(torch.randn(8, 64), "nf4", block_size=32, double_quant=True)
    shard = whole.blocks(0, 8)
    with pytest.raises(QuantError, match="blocks 0..7 of 16 only"):
        shard.dequantize()
    with pytest.raises(QuantError, match="FSDP shard"):
        shard.to_bnb_state_dict()

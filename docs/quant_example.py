"""The worked example of docs/quantization.md: python docs/quant_example.py"""

import torch

import tunelab.quant as tq

x = torch.tensor([-20.0, -10.0, 0.0, -50.0, 100.0])

q = tq.quantize(x, "int8", scheme="minmax")
print("int8 min-max")
print("  codes    ", q.data.tolist())
print("  scale    ", q.scales.item(), "= 150/255;  zero point (min)", q.zero.item())
print("  dequant  ", [round(v, 4) for v in q.dequantize().tolist()])

n = tq.quantize(x, "nf4")  # one (short) block of 5 values
nibbles = torch.stack([n.data >> 4, n.data & 15], 1).view(-1)[: x.numel()]  # high nibble first
print("nf4 absmax")
print("  absmax   ", n.scales.item())
print("  x/absmax ", [round(v, 4) for v in (x / n.scales).tolist()])
print("  codes    ", nibbles.tolist(), " packed bytes", [f"0x{b:02x}" for b in n.data.tolist()])
print("  code vals", [round(v, 4) for v in tq.code("nf4")[nibbles.long()].tolist()])
print("  dequant  ", [round(v, 4) for v in n.dequantize().tolist()])

w = torch.randn(4096, 4096)
for dq in (False, True):
    qt = tq.quantize(w, "nf4", block_size=64, double_quant=dq)
    print(f"4096x4096 nf4, block 64, double quant {dq}: {qt.nbytes} bytes = {qt.bits_per_param:.3f} bits/param")

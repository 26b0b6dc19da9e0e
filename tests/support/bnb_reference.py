"""bitsandbytes' 4-bit dequantization as the tests' reference, around a bug of its CPU kernel.

bitsandbytes 0.50's native CPU dequantize (the one it picks where torch reports AVX-512) reads the codes of
an (m, n) weight row by row, so it is wrong wherever a block spans two rows (n not a multiple of the block
size, n even; odd n already goes to its generic path): on (64, 64) at block 128 its round trip is several
times worse than its generic path's (`python tests/support/bnb_reference.py` prints both), while its bytes and
scales equal ours. There the reference is bitsandbytes' own generic implementation, the one its CPU
backend falls back to for other shapes; everywhere else, and on every other device,
`bitsandbytes.functional.dequantize_4bit` itself.
"""

from __future__ import annotations

import torch


def dequantize_4bit(packed: torch.Tensor, state, generic: bool = False) -> torch.Tensor:
    """generic=True: the generic implementation whatever the shape (to test this function against bitsandbytes')."""
    import bitsandbytes.functional as bnbf

    shape = tuple(state.shape)
    if not generic and (packed.device.type != "cpu" or shape[-1] % 2 or shape[-1] % state.blocksize == 0):
        return bnbf.dequantize_4bit(packed, state)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = state.absmax
    if state.nested:  # as bitsandbytes.functional.dequantize_4bit undoes double quantization
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    with torch._dynamo.config.patch(disable=True):  # bitsandbytes compiles it (~10 s a shape); eager is equal
        out = _dequantize_4bit_compute(packed.view(torch.uint8).reshape(-1), absmax.float(),
                                       _get_4bit_code(state.quant_type, packed.device), state.blocksize, shape,
                                       state.dtype)
    return out.t() if packed.shape[0] == 1 else out  # bitsandbytes' shim for a transposed packed weight


if __name__ == "__main__":  # python tests/support/bnb_reference.py: where bitsandbytes' own kernel and generic path differ
    import bitsandbytes.functional as bnbf

    print(f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for shape, block in [((64, 128), 64), ((64, 64), 64), ((64, 64), 128), ((64, 64), 256), ((40, 96), 64)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
        packed, state = bnbf.quantize_4bit(x, blocksize=block, quant_type="nf4")
        native, generic = bnbf.dequantize_4bit(packed, state), dequantize_4bit(packed, state, generic=True)
        print(f"{str(shape):>10} block {block:>3}: kernel == generic {torch.equal(native, generic)!s:>5}, "
              f"round-trip max error kernel {(native - x).abs().max():.4f} generic {(generic - x).abs().max():.4f}")

"""tunelab.quant: blockwise 4-bit / 8-bit quantization in plain PyTorch, byte-compatible with bitsandbytes.

    qt = quantize(w, "nf4", block_size=64, double_quant=True)   # QuantizedTensor, 4.127 bits/param
    w2 = qt.dequantize()                                         # back to w's dtype
    sd = qt.to_bnb_state_dict("layer.")                          # bitsandbytes Linear4bit keys
    model = quantize_model(model)                                # nn.Linear -> frozen Linear4bit
"""

from tunelab.quant.codebooks import QUANT_TYPES, code, dynamic_map
from tunelab.quant.linear import Linear4bit, model_nbytes, quantize_model
from tunelab.quant.tensor import QuantError, QuantizedTensor, quantize

__all__ = [
    "QUANT_TYPES", "Linear4bit", "QuantError", "QuantizedTensor", "code", "dynamic_map", "model_nbytes",
    "quantize", "quantize_model",
]

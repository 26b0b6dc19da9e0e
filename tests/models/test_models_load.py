"""Loading straight into 4 bits (load_pretrained(..., quant=...)), shard by shard, against the float load followed
by quantize_model: the same model, byte for byte."""

from __future__ import annotations

import json

import pytest
import torch

from tests.support.tiny_models import make_tiny_llama, make_tiny_tokenizer
from tunelab.config import QuantConfig
from tunelab.errors import TunelabError
from tunelab.models.load import load_pretrained
from tunelab.quant import Linear4bit, quantize_model

QUANT = QuantConfig(block_size=32)


def _sharded(d, **cfg):
    make_tiny_llama(**cfg).save_pretrained(d, max_shard_size="100KB")  # ~0.4 MB of fp32: 5 shards
    make_tiny_tokenizer().save_pretrained(d)
    return d


@pytest.mark.parametrize("cfg", [{"tie_word_embeddings": True}, {"attention_bias": True}], ids=["tied", "bias"])
def test_streamed_4bit_load_equals_load_then_quantize(tmp_path, cfg):
    d = _sharded(tmp_path / "m", **cfg)
    shards = set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) >= 3
    streamed, _ = load_pretrained(str(d), quant=QUANT)
    whole, _ = load_pretrained(str(d))
    quantize_model(whole, QUANT.quant_type, QUANT.block_size, QUANT.double_quant)

    a, b = streamed.state_dict(), whole.state_dict()  # packed codes, absmax, quant maps, float params, biases
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert all(torch.equal(x, y) for x, y in zip(streamed.buffers(), whole.buffers()))  # rotary inv_freq
    quantized = [n for n, m in streamed.named_modules() if isinstance(m, Linear4bit)]
    assert quantized == [n for n, m in whole.named_modules() if isinstance(m, Linear4bit)] and len(quantized) == 14
    if cfg.get("attention_bias"):
        assert streamed.model.layers[0].self_attn.q_proj.bias is not None
    assert (streamed.lm_head.weight is streamed.model.embed_tokens.weight) == cfg.get("tie_word_embeddings", False)
    assert not streamed.training and not any(p.is_meta for p in streamed.parameters())
    x = torch.randint(0, 512, (2, 12))
    torch.testing.assert_close(streamed(x).logits, whole(x).logits, rtol=0, atol=0)


def test_streamed_load_of_an_incomplete_checkpoint_is_one_clear_error(tmp_path):
    d = _sharded(tmp_path / "m")
    next(iter(sorted(d.glob("model-*.safetensors")))).unlink()
    with pytest.raises(TunelabError, match="cannot load the model"):
        load_pretrained(str(d), quant=QUANT)

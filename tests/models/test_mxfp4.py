"""gpt-oss as released: expert weights stored as MXFP4 blocks (`*_blocks`, `*_scales`) with
`quantization_config.quant_method: mxfp4`. tunelab loads them as float (method lora / full) and, for qlora,
streams them into its own 4-bit experts.

References: an MXFP4 decode written here from the format (E2M1 values, one power-of-two scale per 32 values,
the low nibble first) for the float weights; transformers' own loading (Mxfp4Config(dequantize=True)) followed
by quantize_model for the 4-bit model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

from tests.support.tiny_models import make_tiny_tokenizer
from tests.support.tiny_run import losses, run_config
from tunelab.cli import main
from tunelab.config import QuantConfig
from tunelab.models.load import load_pretrained
from tunelab.quant import quantize_model
from tunelab.quant.experts import Experts4bit

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # the 3 magnitude bits; bit 3 is the sign


def _decode(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(E, out, groups, 16) bytes and (E, out, groups) biased exponents -> the (E, in, out) weight, float64."""
    values = torch.tensor([v for v in E2M1] + [-v for v in E2M1], dtype=torch.float64)
    nibbles = torch.stack([blocks & 15, blocks >> 4], dim=-1).long()  # low nibble: the even position
    w = values[nibbles].flatten(-3) * torch.pow(2.0, scales.double() - 127).repeat_interleave(32, dim=-1)
    return w.transpose(1, 2)


def _mxfp4_folder(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny gpt-oss saved as the release is: experts as random MXFP4 blocks; returns the decoded weights."""
    config = transformers.GptOssConfig(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                       num_experts_per_tok=2, pad_token_id=0, tie_word_embeddings=False,
                                       rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    torch.manual_seed(0)
    transformers.GptOssForCausalLM(config).save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    decoded = {}
    for key in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        n_experts, n_in, n_out = state.pop(key).shape
        blocks = torch.randint(0, 256, (n_experts, n_out, n_in // 32, 16), generator=g, dtype=torch.uint8)
        scales = torch.randint(120, 125, (n_experts, n_out, n_in // 32), generator=g, dtype=torch.uint8)
        state[f"{key}_blocks"], state[f"{key}_scales"] = blocks, scales
        decoded[key] = _decode(blocks, scales)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, decoded


def test_mxfp4_experts_load_as_float_and_as_our_4_bits(tmp_path):
    folder, decoded = _mxfp4_folder(tmp_path / "model")
    model, _ = load_pretrained(str(folder))  # without help, transformers would look for GPU kernels on the Hub
    state = model.state_dict()
    for key, want in decoded.items():
        assert torch.equal(state[key].double(), want), key  # E2M1 x 2^k: exact in fp32
    assert getattr(model.config, "quantization_config", None) is None  # a float model now: not saved as MXFP4
    ids = torch.randint(3, 512, (2, 9), generator=torch.Generator().manual_seed(2))
    quant = QuantConfig(block_size=32)
    ours, _ = load_pretrained(str(folder), quant=quant)  # streamed: blocks -> float -> our NF4, one layer at a time
    assert sum(isinstance(m, Experts4bit) for m in ours.modules()) == 2
    assert getattr(ours.config, "quantization_config", None) is None
    want = quantize_model(model, quant_type="nf4", block_size=32, double_quant=True)
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, want(ids).logits)


def test_qlora_trains_on_an_mxfp4_checkpoint_through_the_cli(tmp_path):
    ws = tmp_path
    _mxfp4_folder(ws / "model")
    rows = [{"prompt": f"Reverse: {a} {b}", "response": f"{b} {a}"} for a, b in
            (("alpha", "beta"), ("gamma", "delta"), ("eta", "theta"), ("iota", "kappa"))]
    (ws / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = run_config(ws, ws / "run", method="qlora", quant={"block_size": 32}, lora={"target_experts": True})
    assert main(["train", str(cfg), "--no-progress"]) == 0
    got = losses(ws / "run")
    assert len(got) == 3 and got[-1] < got[0]

"""GGUF export per family: architecture, metadata keys, tensor names/shapes, de-permuted weights, and the
logits of the model transformers loads back from the file (f32: <= 1e-4, as every export round trip)."""

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.support.export_helpers import ids, logits, tiny
from tests.support.tiny_models import make_tiny_tokenizer
from tunelab.errors import TunelabError
from tunelab.export.gguf import export_gguf, llama3_rope_factors

TOL = 1e-4


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's interleaved rotary pairs back to HF's halves: (h, i, half) -> (h, half, i)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# one sliding layer (own rope base 1e4) and one global (1e6), as Gemma-3 alternates them 5:1
GEMMA3 = {"head_dim": 256, "tie_word_embeddings": True, "sliding_window": 16,
          "layer_types": ["sliding_attention", "full_attention"]}
# model_type, its GGUF architecture, extra config, per-layer tensors beyond Llama's, q/k permuted
CASES = [
    ("llama", "llama", {}, [], True),
    ("mistral", "llama", {"sliding_window": None}, [], True),
    ("qwen2", "qwen2", {}, ["attn_q.bias", "attn_k.bias", "attn_v.bias"], False),
    # head_dim 128 as real Qwen3 (!= 64/4): transformers' reader takes Qwen3Config's default, not key_length
    ("qwen3", "qwen3", {"head_dim": 128}, ["attn_q_norm.weight", "attn_k_norm.weight"], False),
    # head_dim = query_pre_attn_scalar = 256 (Gemma-2 2B/9B; transformers' reader takes the 256 default);
    # llama.cpp's gemma2 has no output.weight: the embedding is the head
    ("gemma2", "gemma2", {"head_dim": 256, "tie_word_embeddings": True, "sliding_window": 128},
     ["post_attention_norm.weight", "post_ffw_norm.weight"], False),
    ("phi3", "phi3", {"pad_token_id": 0}, [], False),  # fused: attn_qkv and ffn_up (gate | up), see PHI3_LAYER
    ("gemma3_text", "gemma3", GEMMA3, ["post_attention_norm.weight", "post_ffw_norm.weight", "attn_q_norm.weight",
                                       "attn_k_norm.weight"], False),
]
LLAMA_LAYER = ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
               "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"]
PHI3_LAYER = ["attn_norm.weight", "attn_qkv.weight", "attn_output.weight", "ffn_norm.weight", "ffn_up.weight",
              "ffn_down.weight"]


def test_the_families_said_to_load_in_transformers_are_the_round_tripped_ones():
    from tunelab.export.gguf import TRANSFORMERS_READS

    assert {c[0] for c in CASES} == set(TRANSFORMERS_READS)


@pytest.mark.parametrize("model_type,arch,over,extra,permuted", CASES, ids=[c[0] for c in CASES])
def test_family_round_trip(model_type, arch, over, extra, permuted, tmp_path):
    model = tiny(model_type, **over)
    path = export_gguf(model, make_tiny_tokenizer(), tmp_path / f"{model_type}.gguf", "f32")
    reader = gguf.GGUFReader(path)
    fields = reader.fields
    assert fields["general.architecture"].contents() == arch
    for key, value in (("context_length", 256), ("embedding_length", 64), ("block_count", 2),
                       ("feed_forward_length", 128), ("attention.head_count", 4), ("attention.head_count_kv", 2)):
        assert fields[f"{arch}.{key}"].contents() == value, key
    rope = model.config.rope_parameters
    assert fields[f"{arch}.rope.freq_base"].contents() == rope.get("full_attention", rope)["rope_theta"]
    assert fields[f"{arch}.rope.dimension_count"].contents() == (getattr(model.config, "head_dim", None) or 16)
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"].contents() == pytest.approx(model.config.rms_norm_eps)
    if arch == "gemma3":
        assert (fields["gemma3.rope.freq_base_swa"].contents(), fields["gemma3.attention.sliding_window"].contents(),
                fields["gemma3.attention.sliding_window_pattern"].contents()) == (10000.0, 16, [True, False])
    if arch == "gemma2":
        assert (fields["gemma2.attn_logit_softcapping"].contents(), fields["gemma2.final_logit_softcapping"].contents(),
                fields["gemma2.attention.sliding_window"].contents(), fields["gemma2.attention.key_length"].contents()) \
            == (50.0, 30.0, 128, 256)
    tensors = {t.name: t for t in reader.tensors}
    layer = {f"blk.{i}.{n}" for i in range(2) for n in (PHI3_LAYER if arch == "phi3" else LLAMA_LAYER) + extra}
    tied = model.config.tie_word_embeddings
    assert set(tensors) == layer | {"token_embd.weight", "output_norm.weight"} | (set() if tied else {"output.weight"})
    # Every tensor equals the model's weight (q/k rows de-permuted for the llama architecture).
    state = model.state_dict()
    hf = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}
    hf |= {f"blk.{i}.{g}": f"model.layers.{i}.{h}" for i in range(2) for g, h in (
        ("attn_norm.weight", "input_layernorm.weight"), ("ffn_norm.weight", "post_attention_layernorm.weight"),
        ("attn_q.weight", "self_attn.q_proj.weight"), ("attn_k.weight", "self_attn.k_proj.weight"),
        ("attn_v.weight", "self_attn.v_proj.weight"), ("attn_output.weight", "self_attn.o_proj.weight"),
        ("ffn_gate.weight", "mlp.gate_proj.weight"), ("ffn_up.weight", "mlp.up_proj.weight"),
        ("ffn_down.weight", "mlp.down_proj.weight"), ("attn_q.bias", "self_attn.q_proj.bias"),
        ("attn_k.bias", "self_attn.k_proj.bias"), ("attn_v.bias", "self_attn.v_proj.bias"),
        ("attn_q_norm.weight", "self_attn.q_norm.weight"), ("attn_k_norm.weight", "self_attn.k_norm.weight"),
        ("post_attention_norm.weight", "post_attention_layernorm.weight"),
        ("post_ffw_norm.weight", "post_feedforward_layernorm.weight"))}
    if model_type == "phi3":  # HF's own fused layouts, written as they are
        hf |= {f"blk.{i}.{g}": f"model.layers.{i}.{h}" for i in range(2) for g, h in (
            ("attn_qkv.weight", "self_attn.qkv_proj.weight"), ("ffn_up.weight", "mlp.gate_up_proj.weight"))}
    if model_type.startswith("gemma"):  # ffn_norm is the pre-feed-forward norm; post_attention_layernorm is above
        hf |= {f"blk.{i}.ffn_norm.weight": f"model.layers.{i}.pre_feedforward_layernorm.weight" for i in range(2)}
    for name, t in tensors.items():
        w = np.asarray(t.data)
        if permuted and (".attn_q." in name or ".attn_k." in name):
            w = unpermute(w, 4 if ".attn_q." in name else 2)
        if model_type.startswith("gemma") and name.endswith("norm.weight"):
            w = w - 1  # written as 1 + w: llama.cpp multiplies by the stored weight, Gemma by (1 + w)
            assert np.allclose(w, state[hf[name]].numpy(), atol=1e-6), name  # f32 rounding of the + 1
            continue
        assert np.array_equal(w, state[hf[name]].numpy()), name
    # transformers' gemma3 reader ignores sliding_window_pattern (all layers slide): given back as an override
    over = {"layer_types": model.config.layer_types} if arch == "gemma3" else {}
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32, **over).eval()
    assert (logits(back, ids()) - logits(model, ids())).abs().max() <= TOL


def test_head_dim_other_than_hidden_over_heads_is_recorded(tmp_path):
    """Qwen3 models have head_dim != hidden/heads (e.g. 128 vs 64): llama.cpp then needs key/value_length."""
    path = export_gguf(tiny("qwen3", head_dim=32), make_tiny_tokenizer(), tmp_path / "q.gguf", "f32")
    fields = gguf.GGUFReader(path).fields
    assert fields["qwen3.attention.key_length"].contents() == 32
    assert fields["qwen3.attention.value_length"].contents() == 32
    assert {t.name: tuple(t.data.shape) for t in gguf.GGUFReader(path).tensors}["blk.0.attn_q.weight"] == (128, 64)


def test_llama3_rope_scaling_writes_rope_freqs(tmp_path):
    """llama.cpp divides each rotary frequency by rope_freqs: it must equal HF's default / llama3 inv_freq."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # 16-dim heads: all three regimes
    model = tiny("llama", rope_parameters=rope)
    path = export_gguf(model, make_tiny_tokenizer(), tmp_path / "l3.gguf", "f16")
    freqs = next(t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight")
    assert freqs.tensor_type.name == "F32"
    inv_llama3, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    inv_default = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    expected = inv_default / inv_llama3.double()
    assert torch.allclose(torch.from_numpy(np.asarray(freqs.data)).double(), expected, rtol=1e-5)
    factors = llama3_rope_factors(model.config)
    assert factors[0] == 1.0 and factors[-1] == 8.0 and 1.0 < factors[1] < 8.0  # every regime exercised


MOE = {"mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
       "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)}


@pytest.mark.parametrize("model_type", MOE)
def test_experts_are_written_as_llama_cpp_reads_them(model_type, tmp_path):
    """transformers 5's fused experts.gate_up_proj (gate rows first) split into ffn_gate_exps / ffn_up_exps,
    down_proj as ffn_down_exps, the router as ffn_gate_inp in f32 even in a q8_0 file (llama.cpp's rule), and
    the expert counts. (llama.cpp running these files: tests/export/test_export_llamacpp.py.)"""
    model = tiny(model_type, **MOE[model_type])
    arch = {"mixtral": "llama", "qwen3_moe": "qwen3moe"}[model_type]
    fields = gguf.GGUFReader(export_gguf(model, make_tiny_tokenizer(), tmp_path / "f.gguf", "f32")).fields
    assert (fields[f"{arch}.expert_count"].contents(), fields[f"{arch}.expert_used_count"].contents()) == (4, 2)
    if model_type == "qwen3_moe":
        assert fields["qwen3moe.expert_feed_forward_length"].contents() == 32
    state = model.state_dict()
    for dtype in ("f32", "q8_0"):
        tensors = {t.name: t for t in gguf.GGUFReader(export_gguf(model, make_tiny_tokenizer(),
                                                                  tmp_path / f"{dtype}.gguf", dtype)).tensors}
        for i in range(2):
            gate, up = state[f"model.layers.{i}.mlp.experts.gate_up_proj"].chunk(2, dim=-2)
            router = tensors[f"blk.{i}.ffn_gate_inp.weight"]
            assert router.tensor_type.name == "F32"
            assert np.array_equal(np.asarray(router.data), state[f"model.layers.{i}.mlp.gate.weight"].numpy())
            if dtype == "f32":
                for name, want in (("gate", gate), ("up", up), ("down", state[f"model.layers.{i}.mlp.experts.down_proj"])):
                    assert np.array_equal(np.asarray(tensors[f"blk.{i}.ffn_{name}_exps.weight"].data), want.numpy())
            else:
                assert tensors[f"blk.{i}.ffn_up_exps.weight"].tensor_type.name == "Q8_0"


def test_granite_scales_and_what_moe_export_refuses(tmp_path):
    scales = dict(attention_multiplier=0.2, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=0.25)
    fields = gguf.GGUFReader(export_gguf(tiny("granite", **scales), make_tiny_tokenizer(), tmp_path / "g.gguf")).fields
    assert [fields[f"granite.{k}"].contents() for k in ("attention.scale", "embedding_scale", "residual_scale",
                                                         "logit_scale")] == pytest.approx([0.2, 2.0, 0.5, 0.25])
    for over in (dict(norm_topk_prob=False), dict(mlp_only_layers=[1]), dict(decoder_sparse_step=2)):
        with pytest.raises(TunelabError, match="GGUF export of qwen3_moe needs norm_topk_prob=True"):
            export_gguf(tiny("qwen3_moe", **{**MOE["qwen3_moe"], **over}), make_tiny_tokenizer(), tmp_path / "q.gguf")
    with pytest.raises(TunelabError, match="GGUF export of qwen2_moe needs norm_topk_prob=False"):
        export_gguf(tiny("qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         shared_expert_intermediate_size=64, norm_topk_prob=True), make_tiny_tokenizer(), tmp_path / "q.gguf")
    with pytest.raises(TunelabError, match="GGUF export of olmoe: .*has 2 and 4"):
        export_gguf(tiny("olmoe", num_experts=4, num_experts_per_tok=2, pad_token_id=0), make_tiny_tokenizer(),
                    tmp_path / "q.gguf")
    with pytest.raises(TunelabError, match="GGUF export of olmoe needs norm_topk_prob=False.*clip_qkv"):
        export_gguf(tiny("olmoe", num_experts=4, num_experts_per_tok=2, pad_token_id=0, num_key_value_heads=4,
                         clip_qkv=8.0), make_tiny_tokenizer(), tmp_path / "q.gguf")
    assert not (tmp_path / "q.gguf").exists()


def test_unsupported_family_names_it_and_the_supported_ones(tmp_path, capsys):
    with pytest.raises(TunelabError, match="GGUF export of gemma: .*tie_word_embeddings=False"):
        export_gguf(tiny("gemma", head_dim=16), make_tiny_tokenizer(), tmp_path / "c.gguf")
    for over, needle in ((dict(tie_word_embeddings=False), "tie_word_embeddings=False"),
                         (dict(tie_word_embeddings=True, use_qk_norm=True), "use_qk_norm=True")):
        with pytest.raises(TunelabError, match=f"GGUF export of cohere.*{needle}"):
            export_gguf(tiny("cohere", **over), make_tiny_tokenizer(), tmp_path / "c.gguf")
    with pytest.raises(TunelabError, match=r"llama.cpp's smollm3 uses RoPE in the layers \[1, 1, 1, 0\]"):
        export_gguf(tiny("smollm3", num_hidden_layers=4, pad_token_id=0, no_rope_layers=[1, 1, 1, 1]),
                    make_tiny_tokenizer(), tmp_path / "s.gguf")
    export_gguf(tiny("starcoder2", pad_token_id=0, bos_token_id=1, sliding_window=64), make_tiny_tokenizer(),
                tmp_path / "s.gguf")
    assert "agree on contexts up to that length" in capsys.readouterr().err
    (tmp_path / "s.gguf").unlink()
    model = tiny("stablelm")  # not in the family table
    with pytest.raises(TunelabError, match=r"does not support the 'stablelm' family .*supported: llama, mistral, "
                                            r"qwen2, qwen3, gemma2, phi3, gemma3_text, granite, olmo2, olmo3, "
                                            r"mixtral, qwen3_moe, cohere, smollm3, gpt_oss, gemma, qwen2_moe, olmoe, "
                                            r"glm4, starcoder2, granitemoe, lfm2$"):
        export_gguf(model, make_tiny_tokenizer(), tmp_path / "g.gguf")
    with pytest.raises(TunelabError, match="query_pre_attn_scalar=256 but llama.cpp scales queries by "
                                           r"1/sqrt\(head_dim=16\)"):
        export_gguf(tiny("gemma2", head_dim=16, tie_word_embeddings=True), make_tiny_tokenizer(), tmp_path / "g.gguf")
    with pytest.raises(TunelabError, match="tie_word_embeddings=False"):
        export_gguf(tiny("gemma2", head_dim=256), make_tiny_tokenizer(), tmp_path / "g.gguf")
    with pytest.raises(TunelabError, match="rope_type='linear'"):
        export_gguf(tiny("qwen2", rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
                    make_tiny_tokenizer(), tmp_path / "q.gguf")
    assert not list(tmp_path.iterdir())
    from tunelab.cli import main

    model.save_pretrained(tmp_path / "stablelm")
    make_tiny_tokenizer().save_pretrained(tmp_path / "stablelm")
    assert main(["export", str(tmp_path / "stablelm"), "--gguf", str(tmp_path / "g.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading progress bar
    assert err.startswith("tunelab export: error: GGUF export does not support the 'stablelm' family")
    assert err.endswith("glm4, starcoder2, granitemoe, lfm2") and not (tmp_path / "g.gguf").exists()


def test_partial_rotary_is_the_rope_dimension_count(tmp_path):
    """Phi-3 style partial rotary: llama.cpp rotates the first rope.dimension_count dims of each head."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    path = export_gguf(tiny("phi3", pad_token_id=0, rope_parameters=rope), make_tiny_tokenizer(), tmp_path / "p.gguf")
    assert gguf.GGUFReader(path).fields["phi3.rope.dimension_count"].contents() == 8  # 64/4 heads * 0.5

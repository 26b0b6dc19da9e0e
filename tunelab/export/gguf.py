"""Writing a plain (merged) Llama model and its tokenizer to one GGUF file, as llama.cpp's converter does.

What llama.cpp (convert_hf_to_gguf.py, LlamaModel) writes and what transformers' GGUF reader
(modeling_gguf_pytorch_utils.py, integrations/gguf) reads back:
  - tensor names from gguf's own name map: model.embed_tokens -> token_embd, layers.N.self_attn.q_proj ->
    blk.N.attn_q, ..., lm_head -> output (absent when the embeddings are tied);
  - q and k projections with their rows permuted from HF's rotary layout (first half / second half of each
    head) to llama.cpp's interleaved pairs; the reader undoes it (LlamaTensorProcessor);
  - llama.* hyper-parameters and tokenizer.ggml.* (gpt2 = byte-level BPE: tokens, token types, merges,
    special ids, chat template).
Families (model_type -> llama.cpp architecture, from the family table): llama and mistral -> llama (q/k
permuted; llama3 rope scaling as a rope_freqs tensor), qwen2 -> qwen2 (q/k/v biases, NEOX rope: no
permutation), qwen3 -> qwen3 (per-head q/k RMSNorms attn_q_norm / attn_k_norm, NEOX rope), gemma2 ->
gemma2 (norm weights + 1, post-attention / post-feed-forward norms, softcaps, sliding window), phi3 -> phi3
(fused attn_qkv and ffn_up = gate|up as HF stores them, partial rotary as rope.dimension_count),
gemma3_text -> gemma3 (gemma2's layout + q/k norms, per-layer sliding pattern, local rope base), gemma ->
gemma (norms + 1, tied head), granite -> granite (llama + its four scales), olmo2 -> olmo2 (post-norms,
whole-projection q/k norms; olmo3 too, + its sliding layers), glm4 -> glm4 (biases, fused gate_up_proj and
partial interleaved rotary as HF stores them, four norms a layer), starcoder2 -> starcoder2 (LayerNorms, GELU
MLP, biases), cohere -> command-r (LayerNorm eps, logit_scale, tied head; its interleaved rotary is
llama.cpp's: no permutation), smollm3 -> smollm3 (llama's layout; llama.cpp leaves RoPE out of every 4th
layer, SmolLM3's default), lfm2 -> lfm2 (short-convolution layers, per-layer key/value heads); MoE:
mixtral -> llama, qwen3_moe -> qwen3moe, qwen2_moe -> qwen2moe (+ the shared expert and its gate), olmoe ->
olmoe, granitemoe -> granitemoe (granite + experts), gpt_oss -> gpt-oss (sinks, biases, YaRN): the router
ffn_gate_inp in f32, transformers 5's fused experts split into ffn_gate_exps / ffn_up_exps, ffn_down_exps,
the expert counts. The tokenizer: gguf_tokenizer.py.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.export.gguf_tokenizer import write_tokenizer

KQUANTS = ("q4_k_m", "q5_k_m", "q6_k")  # written by llama.cpp's quantizer (optional llama-cpp-python)
DTYPES = ("f32", "f16", "q8_0", "q4_0") + KQUANTS


# model_type -> (what it may have beyond Llama's layers); the GGUF architecture name is the family table's.
SUPPORTED = {
    "llama": {"permute_qk": True},
    "mistral": {"permute_qk": True},  # llama.cpp runs it as llama (its converter ignores sliding_window)
    "qwen2": {"permute_qk": False},   # q/k/v biases; rotate-half (NEOX) rope as HF: rows stay in place
    "qwen3": {"permute_qk": False},   # + q_norm / k_norm over each head's head_dim
    "gemma2": {"permute_qk": False},  # norms x * (1 + w) -> w + 1; pre/post norms; softcaps; tied lm_head
    "phi3": {"permute_qk": False},    # fused qkv_proj -> attn_qkv, gate_up_proj -> ffn_up (as HF stores them)
    "gemma3_text": {"permute_qk": False},  # gemma2's layout + q/k norms; sliding layers' own rope base
    "granite": {"permute_qk": True},  # llama's layout + embedding / residual / attention / logit scales
    "olmo2": {"permute_qk": False},   # norms after attention and MLP; q/k RMSNorms over the whole projection
    "olmo3": {"permute_qk": False},   # olmo2's layout + sliding-window layers (llama.cpp's olmo2 runs both)
    "mixtral": {"permute_qk": True},  # llama with experts: router ffn_gate_inp, ffn_{gate,up,down}_exps
    "qwen3_moe": {"permute_qk": False},  # qwen3 with experts, as mixtral's
    "cohere": {"permute_qk": False},  # LayerNorm, parallel attention + MLP, interleaved rotary as llama.cpp's
    "smollm3": {"permute_qk": True},  # llama's layout; every 4th layer without RoPE
    "gpt_oss": {"permute_qk": False},  # sinks, biases, sliding layers; experts (in, out), gate / up interleaved
    "gemma": {"permute_qk": False},  # norms x * (1 + w) -> w + 1; tied lm_head (gemma2's, without its extras)
    "qwen2_moe": {"permute_qk": False},  # qwen2 with experts + a shared expert behind a sigmoid gate
    "olmoe": {"permute_qk": False},  # experts; q/k RMSNorms over the whole projection
    "glm4": {"permute_qk": False},  # q/k/v biases, fused gate_up_proj, interleaved partial rotary (llama.cpp's own)
    "starcoder2": {"permute_qk": False},  # LayerNorms and GELU MLP (c_fc / c_proj), all with biases
    "granitemoe": {"permute_qk": True},  # granite's layout and scales + mixtral's experts
    "lfm2": {"permute_qk": False},  # short-convolution layers (no key/value heads there) between attention layers
}
# The families whose GGUF files transformers' own reader loads back (tests/export/test_export_gguf_families.py reloads
# each); the others run in llama.cpp only.
TRANSFORMERS_READS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gemma3_text")
MOE = ("mixtral", "qwen3_moe", "gpt_oss", "qwen2_moe", "olmoe", "granitemoe")
GEMMA = ("gemma", "gemma2", "gemma3_text")  # RMSNorm x * (1 + w): norms written as 1 + w, as llama.cpp's converter does


def gguf_arch(config) -> str:
    """llama.cpp's architecture name for a supported model (the family table's `gguf`)."""
    from tunelab.models.families import family_of

    return family_of(config).gguf


def check_exportable(model: nn.Module) -> None:
    """Raise TunelabError unless `model` is a plain model of a family this exporter writes for llama.cpp."""
    from tunelab.lora import LoRALinear
    from tunelab.lora.layer import is_quantized_linear

    config = model.config
    if config.model_type not in SUPPORTED:
        raise TunelabError(
            f"GGUF export does not support the {config.model_type!r} family ({type(model).__name__}); "
            f"supported: {', '.join(SUPPORTED)}"
        )
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise TunelabError("this model has LoRA layers: merge the adapter first (open_model(..., merge=True))")
    if any(is_quantized_linear(m) for m in model.modules()):
        raise TunelabError("this model has 4-bit linears: GGUF export needs float weights (merge into the "
                           "original base, or load the full-precision model)")
    rope = _rope(config).get("rope_type", "default")
    allowed = {"default": True, "llama3": SUPPORTED[config.model_type]["permute_qk"],
               "linear": config.model_type == "gemma3_text", "yarn": config.model_type == "gpt_oss"}
    if not allowed.get(rope) or _rope(config, "sliding_attention").get("rope_type", "default") != "default":
        raise TunelabError(f"GGUF export of {config.model_type} supports plain RoPE (and llama3 scaling for the "
                           f"llama architecture, linear scaling of Gemma-3's global layers); this model uses "
                           f"rope_type={rope!r}")
    if config.model_type in GEMMA[1:]:
        _check_gemma(config)
    if config.model_type in ("gemma", "cohere") and not config.tie_word_embeddings:
        raise TunelabError(f"GGUF export of {config.model_type}: llama.cpp's {gguf_arch(config)} uses the embedding as "
                           "output head, and this model has its own lm_head (tie_word_embeddings=False)")
    if config.model_type in ("qwen3_moe", "qwen2_moe", "olmoe"):  # llama.cpp: experts in every layer; its qwen3moe
        norm = config.model_type == "qwen3_moe"  # renormalizes the top-k weights, its qwen2moe and olmoe do not
        if config.norm_topk_prob != norm or getattr(config, "mlp_only_layers", None) \
                or getattr(config, "decoder_sparse_step", 1) != 1 or getattr(config, "clip_qkv", None) is not None:
            raise TunelabError(f"GGUF export of {config.model_type} needs norm_topk_prob={norm}, decoder_sparse_step=1, "
                               f"no mlp_only_layers and no clip_qkv (llama.cpp's {gguf_arch(config)} "
                               f"{'renormalizes' if norm else 'does not renormalize'} the top-k weights and has "
                               f"experts in every layer); this model has {config.norm_topk_prob}, "
                               f"{getattr(config, 'decoder_sparse_step', 1)}, {getattr(config, 'mlp_only_layers', [])}, "
                               f"{getattr(config, 'clip_qkv', None)}")
    if config.model_type == "cohere" and config.use_qk_norm:
        raise TunelabError("GGUF export of cohere with use_qk_norm=True (Command R+) is not supported: llama.cpp "
                           "does not load its per-head q/k norms as this exporter writes them")
    if config.model_type == "smollm3":  # llama.cpp's smollm3 leaves RoPE out of layers 4, 8, ... (fixed step 4)
        fixed = [int((i + 1) % 4 != 0) for i in range(config.num_hidden_layers)]
        if list(config.no_rope_layers) != fixed or config.use_sliding_window:
            raise TunelabError(f"GGUF export of smollm3: llama.cpp's smollm3 uses RoPE in the layers {fixed} (1 = "
                               f"RoPE) and no sliding window; this model has no_rope_layers={config.no_rope_layers}"
                               f", use_sliding_window={config.use_sliding_window}")
    if config.model_type == "starcoder2" and config.sliding_window:
        print(f"tunelab export: note: llama.cpp's starcoder2 attends to every earlier position, this model to the last "
              f"{config.sliding_window} (its sliding_window): the two agree on contexts up to that length",
              file=sys.stderr)
    if config.model_type == "olmoe" and config.num_key_value_heads != config.num_attention_heads:
        raise TunelabError("GGUF export of olmoe: llama.cpp's olmoe sizes the k norm for as many key/value heads as "
                           f"query heads (OLMoE's own); this model has {config.num_key_value_heads} and "
                           f"{config.num_attention_heads}")
    if config.model_type in ("granite", "granitemoe") and getattr(config, "head_dim", None) not in (None, _head_dim(config)):
        raise TunelabError("GGUF export of granite: llama.cpp's granite takes head_dim = hidden/heads, and this "
                           f"model has head_dim={config.head_dim}")
    flags = ("attention_bias", "mlp_bias") if config.model_type not in ("qwen2", "gpt_oss", "glm4", "starcoder2") else ()
    for flag in flags:
        if getattr(config, flag, False):
            raise TunelabError(f"GGUF export of {config.model_type} models with {flag}=True is not supported")


def _check_gemma(config) -> None:
    """What llama.cpp's gemma2 / gemma3 graphs assume rather than read. gemma2: the output head is the
    embedding, both softcaps on (it applies its defaults when the keys are missing); gemma3: no attention
    softcap. Both scale queries by 1/sqrt(head_dim) (gemma3's 62-layer 27B by 1/sqrt(hidden/heads))."""
    name, gemma3 = config.model_type, config.model_type == "gemma3_text"
    if not config.tie_word_embeddings and not gemma3:
        raise TunelabError("GGUF export of gemma2: llama.cpp's gemma2 uses the embedding as output head, and "
                           "this model has its own lm_head (tie_word_embeddings=False)")
    wide = gemma3 and config.num_hidden_layers == 62
    scale, what = ((config.hidden_size // config.num_attention_heads, "hidden/heads") if wide
                   else (config.head_dim, "head_dim"))
    if config.query_pre_attn_scalar != scale:
        raise TunelabError(f"GGUF export of {name}: query_pre_attn_scalar={config.query_pre_attn_scalar} but "
                           f"llama.cpp scales queries by 1/sqrt({what}={scale})")
    for cap in ("attn_logit_softcapping",) if gemma3 else ("attn_logit_softcapping", "final_logit_softcapping"):
        if (getattr(config, cap, None) is None) != gemma3:
            raise TunelabError(f"GGUF export of {name}: {cap}={getattr(config, cap, None)}, but llama.cpp's "
                               f"{gguf_arch(config)} {'never' if gemma3 else 'always'} caps")


def _rope(config, layer_type: str = "full_attention") -> dict:
    """The RoPE parameters; Gemma-3 has one set per layer type (the global layers' is the model's own)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in rope:
        return rope.get(layer_type, {})
    return rope if layer_type == "full_attention" else {}


def llama3_rope_factors(config) -> torch.Tensor:
    """(head_dim/2,) divisors of each rotary frequency for llama3 rope scaling (llama.cpp's rope_freqs).

    HF scales inv_freq: high frequencies (wavelength < orig_ctx/high_freq_factor) unchanged, low ones
    (wavelength > orig_ctx/low_freq_factor) divided by `factor`, smooth in between; llama.cpp divides each
    frequency by the factor stored here, as its converter writes it.
    """
    rope = _rope(config)
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor, low, high = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def export_gguf(model: nn.Module, tokenizer, out: str | os.PathLike, dtype: str = "f32",
                name: str | None = None) -> Path:
    """Write `model` (a plain model of a SUPPORTED family) and `tokenizer` to the GGUF file `out`, atomically.

    dtype: f32 | f16 (matrices in f16, norms f32) | q8_0 (matrices whose rows are a multiple of 32 in
    Q8_0, gguf's own quantizer; others f16; norms f32), as llama.cpp's converter writes them | q4_0 (as q8_0
    with Q4_0 blocks, the output head in Q8_0: llama.cpp's own Q4_0 mix, see _encode); or a k-quant
    (q4_k_m, q5_k_m, q6_k): the f16 file quantized by llama.cpp's own quantizer (llama-cpp-python).
    """
    if dtype not in DTYPES:
        raise TunelabError(f"GGUF dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_exportable(model)
    quantizer = llama_cpp_quantizer(dtype) if dtype in KQUANTS else None  # a missing extra fails first
    out = Path(out)
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmps = []
    try:
        tmps.append(_tmp_beside(out))
        _write(model, tokenizer, tmps[0], "f16" if quantizer else dtype, name)
        if quantizer:
            tmps.append(_tmp_beside(out))
            quantizer(tmps[0], tmps[1])
        publish(tmps[-1], out)
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)
    return out


def publish(tmp: str, out: Path) -> None:
    """Rename the finished temporary file to `out` with a plain file's mode (mkstemp makes it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, out)


def _tmp_beside(out: Path) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    return tmp


def _write(model: nn.Module, tokenizer, path: str, dtype: str, name: str | None) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, gguf_arch(model.config))
    _write_hparams(writer, model.config, dtype, name or getattr(model, "name_or_path", "") or "tunelab")
    write_tokenizer(writer, tokenizer, model.config.vocab_size)
    for gguf_name, array, qtype in _tensors(model, dtype):
        writer.add_tensor(gguf_name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def require_llama_cpp(what: str, tail: str = ""):
    """The llama_cpp module (optional llama-cpp-python), or a one-line error saying `what` needs it and how."""
    try:
        import llama_cpp
    except ImportError:
        raise TunelabError(f"{what} needs the optional llama-cpp-python package (the `llamacpp` extra): "
                           f"pip install 'tunelab[llamacpp]' (it compiles llama.cpp){tail}") from None
    return llama_cpp


def llama_cpp_quantizer(dtype: str):
    """f(src, dst): llama.cpp's own quantizer (llama_model_quantize) from src (f16 GGUF) to the k-quant dtype.

    llama.cpp picks each tensor's type for a k-quant "mix" itself (e.g. Q4_K_M keeps some ffn_down / attn_v
    in Q6_K, and falls back from k-quants for rows not a multiple of 256), so this is left to it.
    """
    llama_cpp = require_llama_cpp(f"GGUF --dtype {dtype} uses llama.cpp's own quantizer, and",
                                  "; f32, f16 and q8_0 need nothing extra")
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{dtype.upper()}")

    def quantize(src: str, dst: str) -> None:
        import ctypes

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        code = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
        if code != 0:
            raise TunelabError(f"llama.cpp's quantizer failed (llama_model_quantize returned {code}) turning the "
                               f"f16 export into {dtype}; its log above says why")

    return quantize


def _check_replaceable(out: Path) -> None:
    """An earlier GGUF file at `out` is replaced (as an export folder is); anything else is refused."""
    if out.is_dir():
        raise TunelabError(f"{out} is a folder; give the GGUF file's path, e.g. {out / 'model.gguf'}")
    if out.exists():
        with open(out, "rb") as f:
            if f.read(4) != b"GGUF":
                raise TunelabError(f"{out} exists and is not a GGUF file; choose a new path or remove it")


def _write_hparams(writer, config, dtype: str, name: str) -> None:
    import gguf

    head_dim = _head_dim(config)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype]
    writer.add_name(Path(str(name)).name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(_lfm2_ff_dim(config) if config.model_type == "lfm2" else config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    if config.model_type == "lfm2":  # key/value heads per layer: none in a convolution layer
        writer.add_head_count_kv([config.num_key_value_heads * (t != "conv") for t in config.layer_types])
    else:
        writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(_rope(config)["rope_theta"]))
    if config.model_type in ("cohere", "starcoder2"):  # a LayerNorm (with its mean)
        writer.add_layer_norm_eps(float(getattr(config, "layer_norm_eps", None) or config.norm_epsilon))
    else:
        writer.add_layer_norm_rms_eps(float(getattr(config, "rms_norm_eps", None) or config.norm_eps))
    if config.model_type == "cohere":  # the logits times logit_scale
        writer.add_logit_scale(float(config.logit_scale))
    writer.add_rope_dimension_count(int(head_dim * _rope(config).get("partial_rotary_factor", 1.0)))
    # llama.cpp assumes hidden/heads without these; its gemma converters always write them
    if head_dim != config.hidden_size // config.num_attention_heads or config.model_type in GEMMA:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if config.model_type == "gemma2":  # as llama.cpp's converter writes them (its graph reads them)
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        writer.add_sliding_window(config.sliding_window)
    if config.model_type == "gemma3_text":
        _write_gemma3(writer, config)
    if config.model_type == "olmo3":  # llama.cpp's default: every layer but each 4th slides
        _write_sliding(writer, config)
    if config.model_type == "phi3" and config.sliding_window is not None:
        writer.add_sliding_window(config.sliding_window)
    if config.model_type == "lfm2":  # the convolution's cache length
        writer.add_shortconv_l_cache(config.conv_L_cache)
    if config.model_type in MOE:  # llama.cpp routes as HF: softmax, top k, weights renormalized to sum 1
        writer.add_expert_count(getattr(config, "num_local_experts", None) or config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    if config.model_type == "gpt_oss":  # every expert has the intermediate size; sliding layers from layer_types
        writer.add_expert_feed_forward_length(config.intermediate_size)
        _write_sliding(writer, config)
        rope = _rope(config)
        if rope.get("rope_type") == "yarn":  # as llama.cpp's converter writes YaRN
            if not rope.get("truncate", True):
                print("tunelab export: note: this model's YaRN has truncate=false, while llama.cpp always rounds the "
                      "correction range to whole dimensions: its rotary frequencies, and so its logits, differ from "
                      "transformers' a little (so do those of llama.cpp's own converter's file)", file=sys.stderr)
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(float(rope["factor"]))
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
            writer.add_rope_scaling_yarn_beta_fast(float(rope.get("beta_fast", 32.0)))
            writer.add_rope_scaling_yarn_beta_slow(float(rope.get("beta_slow", 1.0)))
    if config.model_type in ("qwen3_moe", "qwen2_moe"):
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if config.model_type == "qwen2_moe":
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    if config.model_type in ("granite", "granitemoe"):  # HF's multipliers, under llama.cpp's names (its converter's)
        writer.add_attention_scale(float(config.attention_multiplier))
        writer.add_embedding_scale(float(config.embedding_multiplier))
        writer.add_residual_scale(float(config.residual_multiplier))
        writer.add_logit_scale(float(config.logits_scaling))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _lfm2_ff_dim(config) -> int:
    """LFM2's MLP width: intermediate_size, or with block_auto_adjust_ff_dim 2/3 of it, times the multiplier,
    rounded up to block_multiple_of (as its modeling code and llama.cpp's converter compute it)."""
    ff = config.intermediate_size
    if config.block_auto_adjust_ff_dim:
        ff = int(2 * ff / 3)
        if config.block_ffn_dim_multiplier is not None:
            ff = int(config.block_ffn_dim_multiplier * ff)
        ff = config.block_multiple_of * ((ff + config.block_multiple_of - 1) // config.block_multiple_of)
    return ff


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _write_sliding(writer, config) -> None:
    """Which layers slide (written from the config's layer_types: llama.cpp's defaults differ per
    architecture) and the sliding layers' own RoPE base; nothing when no layer slides."""
    sliding = [t == "sliding_attention" for t in config.layer_types]
    if any(sliding):
        writer.add_sliding_window(config.sliding_window)
        writer.add_sliding_window_pattern(sliding)
        swa = _rope(config, "sliding_attention") or _rope(config)  # one set for every layer (gpt-oss)
        writer.add_rope_freq_base_swa(float(swa["rope_theta"]))


def _write_gemma3(writer, config) -> None:
    """Gemma-3: the sliding layers (llama.cpp's default pattern is 5 sliding then 1 global), linear scaling of
    the global layers only (llama.cpp scales the sliding ones by its freq_scale_swa = 1), the final softcap
    when set."""
    import gguf

    _write_sliding(writer, config)
    if _rope(config).get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(_rope(config)["factor"]))
    if config.final_logit_softcapping is not None:
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k rows (n_head * head_dim, in) from HF's rotary halves to llama.cpp's interleaved pairs.

    Within each head HF rotates dims (i, i + head_dim/2) together; llama.cpp rotates (2i, 2i + 1). Row
    (h, half, i) moves to (h, i, half), exactly convert_hf_to_gguf.py's LlamaModel.permute.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model: nn.Module, dtype: str):
    """(gguf name, numpy array, ggml type) for every weight, in the model's order (+ rope_freqs for llama3)."""
    config = model.config
    names = tensor_names(config)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when there is no output.weight
    if _rope(config).get("rope_type") == "llama3":
        yield ("rope_freqs.weight", *_encode(llama3_rope_factors(config).numpy(), dtype))
    for key, tensor in state.items():
        w = rows_for_llama_cpp(config, key, tensor.detach().to("cpu", torch.float32))
        if config.model_type in GEMMA and key.endswith("norm.weight"):
            w = w + 1  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp's by the stored weight
        for key, w in _split_experts(config, key, w):
            name = gguf_name(names, config, key)
            head = name == "output.weight" or (config.tie_word_embeddings and name == "token_embd.weight")
            # the routers and LFM2's convolution, as llama.cpp's converter and quantizer keep them; biases, which ggml
            # adds in f32 (gpt-oss's expert biases are 2-D)
            f32 = name.endswith(("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "shortconv.conv.weight", ".bias"))
            yield (name, *_encode(w.numpy(), "f32" if f32 else dtype, head))


def _split_experts(config, key: str, w: torch.Tensor):
    """(key, weight) pairs as llama.cpp stores them: transformers 5's fused experts.gate_up_proj (experts,
    2 x intermediate, hidden; gate rows first, as its forward's chunk(2)) as gate_proj and up_proj; every
    3-D expert tensor as it is (gguf writes the dimensions reversed: ffn_*_exps are (hidden or intermediate,
    ..., experts) in ggml's order, what llama.cpp reads); anything else unchanged, but gpt-oss's sinks get
    their `.weight`. gpt-oss stores its experts (in, out) with gate and up interleaved (columns 0, 2, ... and
    1, 3, ...), and biases: transposed to (out, in) and split the same way, biases too."""
    oss = config.model_type == "gpt_oss"
    if key.endswith(".experts.gate_up_proj"):
        gate, up = (w.transpose(-1, -2)[:, 0::2], w.transpose(-1, -2)[:, 1::2]) if oss else w.chunk(2, dim=-2)
        yield key.replace("gate_up_proj", "gate_proj.weight"), gate.contiguous()
        yield key.replace("gate_up_proj", "up_proj.weight"), up.contiguous()
    elif key.endswith(".experts.gate_up_proj_bias"):
        yield key.replace("gate_up_proj_bias", "gate_proj.bias"), w[..., 0::2].contiguous()
        yield key.replace("gate_up_proj_bias", "up_proj.bias"), w[..., 1::2].contiguous()
    elif key.endswith(".experts.down_proj"):
        yield key + ".weight", (w.transpose(-1, -2).contiguous() if oss else w)
    elif key.endswith(".experts.down_proj_bias"):
        yield key.replace("down_proj_bias", "down_proj.bias"), w
    elif key.endswith(".self_attn.sinks"):
        yield key + ".weight", w
    elif key.endswith(".conv.conv.weight"):  # LFM2's depthwise convolution (hidden, 1, L): ggml's op takes 2-D
        yield key, w.squeeze(1)
    else:
        yield key, w


def tensor_names(config):
    """gguf's map from HF tensor names to llama.cpp's for the model's architecture and layer count."""
    import gguf

    arch = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[gguf_arch(config)]
    return gguf.get_tensor_name_map(arch, config.num_hidden_layers)


def gguf_name(names, config, key: str) -> str:
    """llama.cpp's name of the HF tensor `key` (e.g. model.layers.0.self_attn.q_proj.weight -> blk.0.attn_q.weight)."""
    name = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None and ".block_sparse_moe." in key:  # Granite-MoE: the names its files have (gguf maps those)
        name = names.get_name(key.replace(".router.weight", ".router.layer.weight").replace(
            ".block_sparse_moe.experts.", ".mlp.experts."), try_suffixes=(".weight", ".bias"))
    if name is None:
        raise TunelabError(f"GGUF export: no {gguf_arch(config)} tensor name for {key}; this model has layers "
                           f"that llama.cpp's {gguf_arch(config)} architecture does not run")
    return name


def rows_for_llama_cpp(config, key: str, w: torch.Tensor) -> torch.Tensor:
    """The output rows of HF tensor `key` in llama.cpp's order: q/k rows permuted for the llama architecture
    (the weight, its bias, or a LoRA B of that projection: each is indexed by the projection's outputs)."""
    if not SUPPORTED[config.model_type]["permute_qk"]:
        return w
    if ".self_attn.q_proj." in key:
        return llama_permute(w, config.num_attention_heads)
    if ".self_attn.k_proj." in key:
        return llama_permute(w, config.num_key_value_heads)
    return w


def _encode(w: np.ndarray, dtype: str, head: bool = False):
    """(array, ggml type): 1-D tensors stay f32 (llama.cpp's rule); matrices as `dtype` asks; a matrix whose rows
    are not a multiple of the 32-value block in f16, as llama.cpp's quantizer falls back.

    q4_0 keeps the output head (token_embd when tied) at more bits, as llama.cpp's quantizer does for its Q4_0
    mix (llama-quant.cpp): Q8_0 here; llama.cpp writes Q6_K where the rows are a multiple of 256 (gguf has no
    Q6_K quantizer) and Q8_0 otherwise. Q4_0 / Q8_0 blocks come from gguf.quants, whose arithmetic is
    llama.cpp's reference quantizer's (bit-identical blocks: tests/export/test_export_llamacpp.py)."""
    import gguf

    qtype = gguf.GGMLQuantizationType
    if w.ndim == 1 or dtype == "f32":
        return w, qtype.F32
    if dtype == "q4_0" and head:
        dtype = "q8_0"
    quant = {"q8_0": qtype.Q8_0, "q4_0": qtype.Q4_0}.get(dtype)
    if quant is not None and w.shape[-1] % gguf.GGML_QUANT_SIZES[quant][0] == 0:
        return gguf.quants.quantize(w, quant), quant
    return w.astype(np.float16), qtype.F16

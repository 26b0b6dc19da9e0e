"""GGUF exports run inside llama.cpp itself (llama-cpp-python, installed by the `test` extra), per family, and
compared with the model transformers runs on the same token ids.

Reference: the tiny random model's own forward in transformers (fp32), on a prompt of random ids followed
by that model's own greedy continuation of 32 tokens, so "0 decided misses" (tunelab.export.validate) means
llama.cpp's greedy continuation is identical except after a top-2 margin below 1e-3.
"""

import copy
import os

import gguf
import llama_cpp  # noqa: F401  (the `test` extra installs llama-cpp-python: a missing one fails here, loudly)
import numpy as np
import pytest
import torch

from tests.support.export_helpers import adapter, base, make_spm_tokenizer, tiny  # noqa: F401  (fixtures)
from tests.support.tiny_models import make_tiny_tokenizer
from tunelab.export.gguf import export_gguf, llama_cpp_quantizer
from tunelab.export.validate import agreement, llama_cpp_logits
from tunelab.models import families

# Tolerances on max |logit difference| over every position and the whole vocabulary (the tiny models' logits
# span about +-1.3), about 1.5x the largest measured over the families (docs/export.md has each): f32 against
# the model with ggml's GELU (below; llama-like families measure 4e-7, Gemma 1.1e-4 / 1.8e-4); f16 and q8_0
# against the plain model (llama.cpp's CPU also rounds the activations to f16 / q8 before each product:
# 5e-4 / 1.3e-2 for llama-like families, 6e-3 / 0.17 for the tiny Gemma-3 with its (1 + w) ~ 2 norms; q4_0:
# 0.09-0.13 for llama-like families, 0.31 / 0.95 for Gemma-2 / Gemma-3).
TOL = {"f32": 3e-4, "f16": 1e-2, "q8_0": 0.25, "q4_0": 1.5}
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # 16-dim heads: every regime
GPT_OSS = {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 16, "pad_token_id": 0}
YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "original_max_position_embeddings": 64}
FAMILIES = {
    "llama": ("llama", {}),
    "llama3": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "mistral": ("mistral", {"sliding_window": None}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 32}),  # head_dim != hidden/heads: llama.cpp reads key/value_length
    # windows of 16 < the 72 positions: llama.cpp's sliding layers (gemma2: every other one) must mask as HF's
    "gemma2": ("gemma2", {"head_dim": 256, "tie_word_embeddings": True, "sliding_window": 16}),
    "phi3": ("phi3", {"pad_token_id": 0}),
    "gemma3": ("gemma3_text", {"head_dim": 256, "tie_word_embeddings": True, "sliding_window": 16,
                               "layer_types": ["sliding_attention", "full_attention"]}),
    "granite": ("granite", {"attention_multiplier": 0.2, "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                            "logits_scaling": 0.25}),  # each scale away from 1, so a missing one shows
    "gemma": ("gemma", {"head_dim": 16, "tie_word_embeddings": True}),
    "olmo2": ("olmo2", {"pad_token_id": 0}),
    "lfm2": ("lfm2", {"pad_token_id": 0, "tie_word_embeddings": True, "layer_types": ["conv", "full_attention"]}),
    "starcoder2": ("starcoder2", {"pad_token_id": 0, "bos_token_id": 1, "sliding_window": None}),
    "glm4": ("glm4", {"pad_token_id": 0, "head_dim": 16}),  # partial rotary: half of each head, interleaved
    "olmo3": ("olmo3", {"pad_token_id": 0, "sliding_window": 16,  # layer 0 slides over 16 of the 72 positions
                        "layer_types": ["sliding_attention", "full_attention"]}),
    "cohere": ("cohere", {"tie_word_embeddings": True, "logit_scale": 4.0}),
    "smollm3": ("smollm3", {"num_hidden_layers": 4, "pad_token_id": 0}),  # layer 3 without RoPE
    # sinks, biases, a sliding first layer (window 16 of 72 positions); plain RoPE, and YaRN as gpt-oss has it
    # (factor 4 over 64 positions here) with `truncate: true`, the correction range llama.cpp always uses
    "gpt_oss": ("gpt_oss", {**GPT_OSS, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}),
    "gpt_oss-yarn": ("gpt_oss", {**GPT_OSS, "rope_parameters": {**YARN, "truncate": True}}),
    # 4 experts, 2 per token; the router's weights scaled up (tiny() below) so tokens pick different experts
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                "shared_expert_intermediate_size": 64}),
    "granitemoe": ("granitemoe", {"num_local_experts": 4, "num_experts_per_tok": 2, "attention_multiplier": 0.2,
                                  "embedding_multiplier": 2.0, "residual_multiplier": 0.5, "logits_scaling": 0.25}),
    "olmoe": ("olmoe", {"num_experts": 4, "num_experts_per_tok": 2, "pad_token_id": 0, "num_key_value_heads": 4}),
    "qwen3_moe": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                "head_dim": 16, "norm_topk_prob": True}),
}


def family_model(family: str, **more):
    """The tiny model of a FAMILIES entry; a MoE router's weights x 50, so routing differs from token to token
    (at the default init every expert gets about the same weight and any top-k choice would look alike); gpt-oss's
    attention output bias x 0.1 (random at 0.1 by tiny(), it would send every token to the same experts); LFM2's
    convolution x 30 (at its init it hardly changes the logits)."""
    model_type, over = FAMILIES[family]
    model = tiny(model_type, **{**over, **more})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "router.weight")) and p.ndim == 2:  # granitemoe: block_sparse_moe.
                p.mul_(50.0)
            if name.endswith("self_attn.o_proj.bias"):  # gpt-oss: small, or it sets every hidden state's direction
                p.mul_(0.1)
            if name.endswith("conv.conv.weight"):  # LFM2: a convolution that matters, so a mix-up in it shows
                p.mul_(30.0)
    return model


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def prompt_and_greedy(model, n_prompt: int = 40, n_new: int = 32, seed: int = 0, prompt=None) -> list[int]:
    """Prompt ids (random unless given) followed by the model's own greedy continuation (transformers, fp32)."""
    if prompt is None:
        prompt = torch.randint(3, model.config.vocab_size, (1, n_prompt), generator=torch.Generator().manual_seed(seed))
    else:
        prompt = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                             min_new_tokens=n_new, do_sample=False, pad_token_id=0)
    return out[0].tolist()


def hf_logits(model, seq: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0].float().numpy()


class GgmlGelu(torch.nn.Module):
    """GELU (tanh form) as ggml's CPU computes it (ggml-cpu/vec.h, GGML_GELU_FP16): a table over f16 inputs
    holding f16 outputs, x itself above 10, 0 below -10. It moves the tiny Gemmas' logits by up to 8e-4."""

    def forward(self, x):
        table = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))


def with_ggml_gelu(model):
    """A copy of a Gemma or StarCoder2 model whose MLPs use GgmlGelu (other families have no GELU: the model
    itself)."""
    gemma, starcoder = model.config.model_type.startswith("gemma"), model.config.model_type == "starcoder2"
    if not (gemma or starcoder):
        return model
    model = copy.deepcopy(model)
    for layer in model.model.layers:
        setattr(layer.mlp, "act_fn" if gemma else "act", GgmlGelu())
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_runs_each_family_as_transformers_does(family, tmp_path):
    model = family_model(family)
    seq = prompt_and_greedy(model)
    ref = hf_logits(model, seq)
    if families.family_of(model.config).experts:  # the tokens go to different experts
        with torch.no_grad():
            router = model(torch.tensor([seq]), output_router_logits=True).router_logits[0]
        picks = {tuple(sorted(r.topk(2).indices.tolist())) for r in router}
        print(f"{family}: {len(picks)} distinct top-2 expert sets in layer 0")  # pytest -s
        assert len(picks) >= 4
    tok = make_tiny_tokenizer()
    runs = {}
    for dtype in ("f32", "f16", "q8_0", "q4_0"):
        got = llama_cpp_logits(export_gguf(model, tok, tmp_path / f"{dtype}.gguf", dtype), seq)
        runs[dtype] = agreement(ref, got)
        close = agreement(hf_logits(with_ggml_gelu(model), seq), got) if dtype == "f32" else runs[dtype]
        print(f"{family} {dtype}: max_abs {close.max_abs:.2g}; vs the plain model {runs[dtype]}")  # pytest -s
        assert close.max_abs <= TOL[dtype], (dtype, close)
    for dtype in ("f32", "f16"):  # the same greedy continuation, except after a near-tie
        assert runs[dtype].decided_misses == 0, (dtype, runs[dtype])
    # our q8_0 (from f32) is as close to the model as llama.cpp's own q8_0 made from our f16 file (72 positions:
    # one position is 1.4 points of top-1; the KLs measure 0.9-1.1x each other). gpt-oss: from our f32 file, the
    # same logits (its experts are picked by top-k over logits, so a near-tie that the f16 rounding tips sends a
    # token to another expert and moves its logits by ~0.2: which positions do is chance, not quality)
    oss = model.config.model_type == "gpt_oss"
    llama_cpp_quantizer("q8_0")(str(tmp_path / ("f32.gguf" if oss else "f16.gguf")), str(tmp_path / "theirs.gguf"))
    theirs, ours = agreement(ref, llama_cpp_logits(tmp_path / "theirs.gguf", seq)), runs["q8_0"]
    print(f"{family} llama.cpp's q8_0 from our {'f32' if oss else 'f16'}: {theirs}")
    if oss:
        assert ours == theirs, (ours, theirs)
    else:
        assert ours.top1 >= theirs.top1 - 0.05 and ours.mean_kl <= 1.5 * theirs.mean_kl, (ours, theirs)
    assert runs["f32"].mean_kl < runs["f16"].mean_kl < ours.mean_kl < runs["q4_0"].mean_kl  # each rounding, in order


@pytest.mark.parametrize("family,mistake", [("mixtral", "gate and up swapped"),
                                            ("qwen3_moe", "top-k weights not renormalized"),
                                            ("granite", "no residual scale"), ("cohere", "no logit scale"),
                                            ("smollm3", "RoPE in every layer"), ("olmo3", "no sliding window"),
                                            ("gpt_oss-yarn", "no YaRN"), ("lfm2", "convolution taps reversed")])
def test_the_family_check_catches_a_wrong_export(family, mistake, tmp_path, monkeypatch):
    """The f32 check above has power for what the newer families add: each mistake, made on purpose in the
    export, moves llama.cpp's logits past the f32 tolerance by a wide margin."""
    from tunelab.export import gguf as exporter

    model = family_model(family)
    split = exporter._split_experts
    if mistake == "gate and up swapped":
        swap = {"gate_proj": "up_proj", "up_proj": "gate_proj"}
        monkeypatch.setattr(exporter, "_split_experts", lambda config, key, w: (
            (k.replace(k.split(".")[-2], swap.get(k.split(".")[-2], k.split(".")[-2])), v) for k, v in split(config, key, w)))
    elif mistake == "convolution taps reversed":  # a causal convolution read the wrong way round
        monkeypatch.setattr(exporter, "_split_experts", lambda config, key, w: (
            (k, v.flip(-1) if k.endswith("conv.conv.weight") else v) for k, v in split(config, key, w)))
    elif mistake == "no YaRN":  # llama.cpp then rotates with the plain frequencies
        monkeypatch.setattr(gguf.GGUFWriter, "add_rope_scaling_type", lambda self, value: None)
    elif mistake == "no sliding window":  # llama.cpp then attends to every earlier position in layer 0 too
        monkeypatch.setattr(exporter, "_write_sliding", lambda writer, config: None)
    elif mistake == "RoPE in every layer":  # HF then rotates in layer 3 too, llama.cpp does not
        monkeypatch.setattr(exporter, "check_exportable", lambda m: None)
        model.model.layers[3].self_attn.use_rope = True
    elif mistake == "top-k weights not renormalized":  # HF then differs from llama.cpp, which always renormalizes
        monkeypatch.setattr(exporter, "check_exportable", lambda m: None)
        for layer in model.model.layers:
            layer.mlp.gate.norm_topk_prob = False
    else:
        monkeypatch.setattr(gguf.GGUFWriter, f"add_{mistake.split()[1]}_scale", lambda self, value: None)
    seq = prompt_and_greedy(model)
    got = agreement(hf_logits(model, seq), llama_cpp_logits(exporter.export_gguf(
        model, make_tiny_tokenizer(), tmp_path / "wrong.gguf", "f32"), seq))
    print(f"{family}, {mistake}: {got}")  # pytest -s
    assert got.max_abs > 5 * TOL["f32"], (mistake, got)  # measured 5.7x (smollm3's last layer) to 13,000x


@pytest.mark.parametrize("dtype,tied", [("q8_0", False), ("q4_0", False), ("q4_0", True)],
                         ids=["q8_0", "q4_0", "q4_0-tied"])
def test_our_quants_are_llama_cpps_bit_for_bit(dtype, tied, tmp_path):
    """Ours (gguf.quants) and llama.cpp's quantizer, both from the same f32 weights: the same type for every
    tensor (q4_0: the output head, or the tied embedding, in Q8_0 as llama.cpp's mix puts it for 64-wide rows)
    and identical blocks."""
    model, tok = tiny("llama", tie_word_embeddings=tied), make_tiny_tokenizer()
    export_gguf(model, tok, tmp_path / "f32.gguf", "f32")
    export_gguf(model, tok, tmp_path / "ours.gguf", dtype)
    llama_cpp_quantizer(dtype)(str(tmp_path / "f32.gguf"), str(tmp_path / "theirs.gguf"))
    ours = {t.name: t for t in gguf.GGUFReader(tmp_path / "ours.gguf").tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(tmp_path / "theirs.gguf").tensors}
    assert set(ours) == set(theirs)
    for name, t in ours.items():
        assert t.tensor_type == theirs[name].tensor_type, name
        assert np.array_equal(np.asarray(t.data), np.asarray(theirs[name].data)), name
    types = [t.tensor_type.name for t in ours.values()]
    heads = 1 if dtype == "q4_0" else 0  # output.weight, or token_embd when tied
    assert types.count(dtype.upper()) == 2 * 7 + 2 - tied - heads and types.count("Q8_0") == (heads or 16 - tied)


# k-quants need rows that are a multiple of 256 (llama.cpp falls back to other types otherwise)
KQ = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
# (top-1 agreement floor, mean KL ceiling) against our f16 export in llama.cpp. Measured (llama / qwen2):
# q6_k 0.85 / 0.86, KL 1.1e-4 / 8.7e-5; q5_k_m 0.90 / 0.82, 3.8e-4 / 2.3e-4; q4_k_m 0.67 / 0.67, 1.4e-3 / 7.9e-4.
# A random model's top-2 logits are close (its logits span +-1.3), so top-1 flips easily: the floors keep
# ~0.1-0.2 and the ceilings ~2x of headroom; the bundled model's figures (docs/export.md) are the real bar.
KQUANT_FLOORS = {"q6_k": (0.75, 2.5e-4), "q5_k_m": (0.7, 7.5e-4), "q4_k_m": (0.5, 3e-3)}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_k_quants_through_llama_cpps_quantizer(family, tmp_path):
    model, tok = tiny(family, **KQ), make_tiny_tokenizer()
    seq = prompt_and_greedy(model)
    f16 = llama_cpp_logits(export_gguf(model, tok, tmp_path / "f16.gguf", "f16"), seq)
    kls = []
    for dtype, (top1, kl) in KQUANT_FLOORS.items():
        path = export_gguf(model, tok, tmp_path / f"{dtype}.gguf", dtype)
        types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
        assert dtype[:2].upper() + "_K" in types, (dtype, types)  # llama.cpp really wrote its k-quant blocks
        assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # not mkstemp's 0600
        got = agreement(f16, llama_cpp_logits(path, seq))
        print(f"{family} {dtype} vs our f16: {got}")  # pytest -s
        assert got.top1 >= top1 and got.mean_kl <= kl, (dtype, got)
        kls.append(got.mean_kl)
    assert kls == sorted(kls)  # fewer bits, further from f16


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "mixtral", "gpt_oss"])
def test_lora_adapter_gguf_applied_by_llama_cpp_at_load(family, tmp_path):
    """Base GGUF + our GGUF LoRA adapter in llama.cpp == tunelab's adapter on the fly in transformers (the
    llama q/k rows of B permuted like the weights; phi3's fused qkv / gate_up adapters as HF stores them;
    mixtral: LoRA on the attention, the experts frozen, as `all-linear`)."""
    from tests.support.export_helpers import LORA, randomize_lora_b
    from tunelab.export.gguf_adapter import export_gguf_adapter
    from tunelab.lora import LoraConfig, apply_lora

    model, tok = family_model(family), make_tiny_tokenizer()
    base = export_gguf(model, tok, tmp_path / "base.gguf", "f32")
    apply_lora(model, LoraConfig(**{**LORA, "use_rslora": family == "qwen2"}), verbose=False)  # rsLoRA: alpha*sqrt(r)
    randomize_lora_b(model)
    seq = prompt_and_greedy(model)
    ref = hf_logits(model, seq)
    adapter = export_gguf_adapter(model, tmp_path / "adapter.gguf")
    fields = gguf.GGUFReader(adapter).fields
    assert (fields["general.type"].contents(), fields["adapter.type"].contents()) == ("adapter", "lora")
    with_adapter = agreement(ref, llama_cpp_logits(base, seq, lora=adapter))
    assert with_adapter.max_abs <= TOL["f32"] and with_adapter.decided_misses == 0, with_adapter
    without = agreement(ref, llama_cpp_logits(base, seq))
    assert without.max_abs > 100 * TOL["f32"]  # the adapter moves the logits: the check above means something


def test_gpt_oss_yarn_without_truncation_runs_as_llama_cpp_rounds_it(tmp_path, capfd):
    """gpt-oss's YaRN has `truncate: false` (HF does not round the correction range to whole dimensions);
    llama.cpp always rounds it. The export says so in one line, and llama.cpp runs the file as transformers runs
    the same weights with `truncate: true`: the file is right, the difference is llama.cpp's rotary."""
    model = family_model("gpt_oss-yarn", rope_parameters={**YARN, "truncate": False})
    path = export_gguf(model, make_tiny_tokenizer(), tmp_path / "y.gguf", "f32")
    assert "YaRN has truncate=false" in capfd.readouterr().err
    seq = prompt_and_greedy(model)
    got = llama_cpp_logits(path, seq)
    untruncated = agreement(hf_logits(model, seq), got)
    model.config.rope_parameters["truncate"] = True
    model.model.rotary_emb.__init__(model.config)  # transformers' frequencies with the range rounded
    truncated = agreement(hf_logits(model, seq), got)
    with capfd.disabled():
        print(f"gpt_oss YaRN, truncate false: {untruncated}; against truncate true: {truncated}")  # pytest -s
    assert truncated.max_abs <= TOL["f32"] < untruncated.max_abs, (truncated, untruncated)
    # gpt-oss-20b's own settings (GptOssConfig's defaults): how many rotary frequencies the rounding changes
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    real = GptOssConfig()
    hf, _ = ROPE_INIT_FUNCTIONS["yarn"](real, "cpu")
    real.rope_parameters = {**real.rope_parameters, "truncate": True}
    rounded, _ = ROPE_INIT_FUNCTIONS["yarn"](real, "cpu")
    changed = (hf - rounded).abs() / rounded
    with capfd.disabled():
        print(f"gpt-oss-20b: {int((changed > 0).sum())} of {len(hf)} frequencies differ, by up to {float(changed.max()):.0%}")
    assert 0 < int((changed > 0).sum()) < len(hf)


def test_an_expert_qlora_run_exports_through_the_cli_and_runs_in_llama_cpp(tmp_path):
    """`tunelab export RUN --gguf` of a Mixtral QLoRA run with LoRA on its experts: llama.cpp's logits equal the
    merged model's (the adapter merged into the original float weights), and the adapter does move them."""
    from tests.models.test_family_adapters import _workspace
    from tests.models.test_moe_experts import _train
    from tunelab.cli import main
    from tunelab.export.resolve import open_model

    ws = _workspace(tmp_path, "mixtral")
    run = tmp_path / "qlora"
    assert _train(ws, run, "qlora") == 0
    assert main(["export", str(run), "--gguf", str(tmp_path / "m.gguf"), "--dtype", "f32"]) == 0
    merged = open_model(str(run), merge=True).model.eval()
    seq = prompt_and_greedy(merged, n_prompt=20, n_new=8)
    ref = hf_logits(merged, seq)
    got = agreement(ref, llama_cpp_logits(tmp_path / "m.gguf", seq))
    assert got.max_abs <= TOL["f32"] and got.decided_misses == 0, got
    base = open_model(str(ws / "model")).model.eval()
    assert abs(hf_logits(base, seq) - ref).max() > 100 * TOL["f32"]  # training changed what llama.cpp runs


def test_lora_adapter_cli_and_what_it_refuses(base, adapter, tmp_path, capsys):
    from tests.support.tiny_models import make_tiny_llama
    from tunelab.cli import main
    from tunelab.errors import TunelabError
    from tunelab.export.gguf_adapter import export_gguf_adapter
    from tunelab.lora import LoraConfig, apply_lora

    out = tmp_path / "a.gguf"
    assert main(["export", str(adapter), "--base", str(base), "--gguf", str(out), "--lora-adapter"]) == 0
    tensors = gguf.GGUFReader(out).tensors
    assert len(tensors) == 2 * 2 * 7 and {t.tensor_type.name for t in tensors} == {"F16"}  # A and B, 7 linears x 2
    capsys.readouterr()
    assert main(["export", str(adapter), "--base", str(base), "--gguf", str(out), "--lora-adapter",
                 "--dtype", "q8_0"]) == 2
    assert capsys.readouterr().err.strip().startswith("tunelab export: error: --lora-adapter writes f32 or f16")
    with pytest.raises(TunelabError, match="no LoRA layers"):
        export_gguf_adapter(make_tiny_llama(), tmp_path / "b.gguf")
    dora = apply_lora(make_tiny_llama(), LoraConfig(r=4, alpha=8, use_dora=True), verbose=False)
    with pytest.raises(TunelabError, match="uses DoRA"):
        export_gguf_adapter(dora, tmp_path / "b.gguf")
    experts = apply_lora(family_model("mixtral"), LoraConfig(r=4, alpha=8, target_experts=True), verbose=False)
    with pytest.raises(TunelabError, match="LoRA on MoE experts"):
        export_gguf_adapter(experts, tmp_path / "b.gguf")
    assert not (tmp_path / "b.gguf").exists()


TEXTS = ["Hello world, 12345 ok!", "<|im_start|>user\nhi there<|im_end|>\n", "  two spaces\n\ttab ünïcode 日本",
         "def f(x):\n    return x ** 2  # 3.14159", "It's 'quoted' — and   spaced\r\n"]


@pytest.mark.parametrize("which", ["tiny", "bundled"])
def test_llama_cpp_tokenizes_as_transformers(which, bundled_tokenizer, tmp_path):
    """The tokenizer written into the GGUF (gpt-2 / smollm pre-tokenizer, merges, special tokens) splits text
    into the same ids in llama.cpp as the original tokenizer in transformers."""
    from tests.support.tiny_models import make_tiny_llama

    tok = make_tiny_tokenizer() if which == "tiny" else bundled_tokenizer
    path = export_gguf(make_tiny_llama(vocab_size=len(tok)), tok, tmp_path / "t.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in TEXTS:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
                tok(text, add_special_tokens=False)["input_ids"], text
    finally:
        llm.close()


# SentencePiece texts: none starts with a space, and special tokens only where both sides put U+2581 after them
SPM_TEXTS = ["Hello world, 12345 ok!", "two  spaces\n\ttab ünïcode 日本", "def f(x):\n    return x ** 2  # 3.14159",
             "It's 'quoted' — and   spaced\r\n", "Tokens: ‽ 🙂 ÿ"]
SPM_SPECIAL_TEXTS = {"llama": ["<s>user\nhi there</s>\n", "x</s>y"], "gemma": ["<bos>user\nhi there<eos>\n", "x<eos>y"]}


@pytest.mark.parametrize("kind,legacy", [("llama", True), ("llama", False), ("gemma", True)],
                         ids=["llama-legacy", "llama", "gemma"])
def test_llama_cpp_runs_sentencepiece_tokenizers_as_transformers(kind, legacy, tmp_path):
    """A SentencePiece-BPE tokenizer (Llama-2 / Mistral with U+2581 in front; Gemma without) written as GGUF's
    `llama` kind: llama.cpp splits text into transformers' ids (byte fallback included), and the model runs on
    them as in transformers. Where the two runtimes differ by design, the difference is pinned exactly."""
    tok = make_spm_tokenizer(kind, legacy)
    model_type, over = FAMILIES["gemma2" if kind == "gemma" else "llama"]
    model = tiny(model_type, **over)
    path = export_gguf(model, tok, tmp_path / "m.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        def cpp(text):
            return llm.tokenize(text.encode(), add_bos=False, special=True)

        def hf(text):
            return tok(text, add_special_tokens=False)["input_ids"]

        specials = SPM_SPECIAL_TEXTS[kind] if legacy else []
        for text in SPM_TEXTS + specials:
            assert cpp(text) == hf(text), text
        assert any(t.startswith("<0x") for t in tok.convert_ids_to_tokens(hf(SPM_TEXTS[4])))  # byte fallback ran
        if kind == "llama":  # SentencePiece (and llama.cpp) put U+2581 before a leading space; transformers'
            space = tok.convert_tokens_to_ids("\u2581")  # Metaspace does not when the text starts with one
            assert cpp(" leading") == [space] + hf(" leading")
        if not legacy:  # transformers' non-legacy Llama tokenizer puts U+2581 only at the very start; llama.cpp
            assert cpp("x</s>y") == hf("x</s> y") != hf("x</s>y")  # also after each special token, as legacy
        prompt = llm.tokenize(SPM_TEXTS[2].encode(), add_bos=False)
    finally:
        llm.close()
    seq = prompt_and_greedy(model, prompt=prompt, n_new=16)
    got = agreement(hf_logits(with_ggml_gelu(model), seq), llama_cpp_logits(path, seq))
    print(f"sentencepiece {kind} legacy={legacy}: {got}")  # pytest -s
    assert got.max_abs <= TOL["f32"] and got.decided_misses == 0, got

"""The family table: the one place that knows architectures, keyed on transformers' `config.model_type`.

For each family: what its own forward does to the logits after the output head (tunelab's chunked head +
loss does the same inside, tunelab/train/loss.py), which of its modules have Llama's formula (so the fused
RMSNorm / SwiGLU / rotary kernels and the last-layer shortcut give the same results; tests/models/test_families.py
compares their source with Llama's), whether it is a mixture of experts, and its llama.cpp (GGUF)
architecture name. A model_type not listed here trains through the model's own forward (tunelab.accel.kernels).

Every family listed is checked by tests/models/test_families.py: tunelab's loss and gradients equal the model's own
`model(input_ids, labels=...)`. `python -m tunelab.models.families` prints the table of docs/families.md.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Family:
    model_type: str
    gguf: str
    """llama.cpp's architecture name (general.architecture in a GGUF file)."""
    logits: tuple[str, str] | None = None
    """What the model's forward does to lm_head's output: ("softcap", attr): cap * tanh(z / cap);
    ("multiply", attr): z * s; ("divide", attr): z / s; attr names the config attribute holding cap or s."""
    norm: str | None = None
    """Its RMSNorm class, where its forward is LlamaRMSNorm's: w * (x * rsqrt(mean(x^2) + eps)) in fp32."""
    mlp: str | None = None
    """Its MLP class, where its forward is LlamaMLP's, down(act(gate(x)) * up(x)) with SiLU."""
    attention: str | None = None
    """Its attention class, where its modeling module's apply_rotary_pos_emb is Llama's."""
    decoder: str | None = None
    """Its decoder layer, where layer and attention are Llama's (the loss's last-layer shortcut)."""
    experts: tuple[str, ...] = ()
    """Mixture of experts: the 3-D expert parameters of each MoE block (transformers 5 layout)."""
    router_aux: bool = False
    """Its forward adds router_aux_loss_coef * load_balancing_loss_func(...) when output_router_logits."""


def _llama_like(model_type: str, prefix: str, gguf: str, **kw) -> Family:
    """A family whose RMSNorm, MLP and rotary are Llama's (the names transformers gives them)."""
    return Family(model_type, gguf, norm=f"{prefix}RMSNorm", mlp=f"{prefix}MLP", attention=f"{prefix}Attention", **kw)


_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    _llama_like("llama", "Llama", "llama", decoder="LlamaDecoderLayer"),
    _llama_like("mistral", "Mistral", "llama", decoder="MistralDecoderLayer"),
    _llama_like("qwen2", "Qwen2", "qwen2", decoder="Qwen2DecoderLayer"),
    _llama_like("qwen3", "Qwen3", "qwen3"),  # q/k norms: no last-layer shortcut
    _llama_like("smollm3", "SmolLM3", "smollm3"),  # some layers without RoPE (no_rope_layers): no shortcut
    # MoE: the experts are not LlamaMLP; the router's logits come from every position (no last-layer shortcut)
    Family("mixtral", "llama", norm="MixtralRMSNorm", attention="MixtralAttention", experts=_EXPERTS,
           router_aux=True),
    _llama_like("qwen3_moe", "Qwen3Moe", "qwen3moe", experts=_EXPERTS, router_aux=True),  # MLP: dense layers
    _llama_like("qwen2_moe", "Qwen2Moe", "qwen2moe", experts=_EXPERTS, router_aux=True),  # MLP: the shared expert
    Family("olmoe", "olmoe", norm="OlmoeRMSNorm", mlp="OlmoeMLP", attention="OlmoeAttention", experts=_EXPERTS,
           router_aux=True),  # q/k norms over the whole projection
    Family("gpt_oss", "gpt-oss", experts=_EXPERTS, router_aux=True),  # its own RMSNorm, rotary and clamped SwiGLU
    # Gemma: RMSNorm is x * (1 + w), the MLP's activation is GELU-tanh
    Family("gemma", "gemma", attention="GemmaAttention"),
    Family("gemma2", "gemma2", logits=("softcap", "final_logit_softcapping"), attention="Gemma2Attention"),
    Family("gemma3_text", "gemma3", logits=("softcap", "final_logit_softcapping"), attention="Gemma3Attention"),
    # Phi-3: fused gate_up_proj MLP and partial rotary; OLMo-2: RMSNorm casts before the weight
    Family("phi3", "phi3", norm="Phi3RMSNorm"),
    # GLM-4: fused gate_up_proj, interleaved partial rotary, norms after attention and MLP too
    Family("glm4", "glm4", norm="Glm4RMSNorm"),
    # LFM2: short-convolution layers between attention layers (layer_types)
    Family("lfm2", "lfm2", norm="Lfm2RMSNorm", attention="Lfm2Attention"),
    Family("olmo2", "olmo2", mlp="Olmo2MLP"),
    Family("starcoder2", "starcoder2", attention="Starcoder2Attention"),  # LayerNorms with bias, GELU MLP with biases
    Family("olmo3", "olmo2", mlp="Olmo3MLP"),  # OLMo-2's layers + sliding-window layers (llama.cpp: olmo2)
    _llama_like("granite", "Granite", "granite", logits=("divide", "logits_scaling")),
    Family("granitemoe", "granitemoe", logits=("divide", "logits_scaling"), norm="GraniteMoeRMSNorm",
           attention="GraniteMoeAttention", experts=("block_sparse_moe.experts.gate_up_proj",
                                                     "block_sparse_moe.experts.down_proj"), router_aux=True),
    # Cohere: LayerNorm with a mean, interleaved rotary, parallel attention + MLP
    Family("cohere", "command-r", logits=("multiply", "logit_scale"), mlp="CohereMLP"),
)}


def family_of(config) -> Family | None:
    """The table's entry for a transformers config, None for a model_type it does not list."""
    return FAMILIES.get(getattr(config, "model_type", None))


def module_class(model: nn.Module, name: str | None) -> type | None:
    """The class `name` of the model's own modeling module (where transformers defines it), or None."""
    if name is None:
        return None
    return getattr(sys.modules.get(type(model).__module__), name, None)


def logits_transform(family: Family | None, config) -> tuple[str, float] | None:
    """("softcap", cap) or ("scale", s) as the model's forward applies them to the logits; None for none.

    Read from the config as the forward does: Gemma skips a softcap of None, Granite divides by
    logits_scaling, Cohere multiplies by logit_scale."""
    if family is None or family.logits is None:
        return None
    kind, attr = family.logits
    value = getattr(config, attr, None)
    if value is None:
        return None
    if kind == "softcap":
        return ("softcap", float(value))
    scale = float(value) if kind == "multiply" else 1.0 / float(value)
    return None if scale == 1.0 else ("scale", scale)


def markdown() -> str:
    """The table of docs/families.md (tests/models/test_families.py checks the docs hold exactly this)."""
    on = lambda x: "yes" if x else "-"  # noqa: E731
    rows = ["| model_type | loss = own forward's | LoRA, QLoRA = PEFT's | logits transform | fused RMSNorm | fused SwiGLU "
            "| fused rotary | last-layer shortcut | MoE router loss | GGUF arch |", "|" + " --- |" * 10]
    for f in FAMILIES.values():
        logits = f"{f.logits[0]} `{f.logits[1]}`" if f.logits else "-"
        # tests/models/test_family_adapters.py (dense families); tests/models/test_moe_experts.py (MoE, LoRA on the experts too)
        peft = "checked, experts too" if f.experts else "checked"
        rows.append(f"| {f.model_type} | checked | {peft} | {logits} | {on(f.norm)} | {on(f.mlp)} | {on(f.attention)} | "
                    f"{on(f.decoder)} | {on(f.router_aux)} | {f.gguf} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")

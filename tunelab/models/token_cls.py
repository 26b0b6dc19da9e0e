"""Any causal LM of the family table as a token classifier: its decoder body plus a new linear head `score`;
or a BERT-family encoder (a local folder of a masked-LM type: BERT, RoBERTa, DeBERTa-v2, ModernBERT) under the
same head (`is_encoder`, `load_encoder`).

The layout is transformers' `GenericForTokenClassification` (`LlamaForTokenClassification` etc.: `model` =
the body, `score` = Linear(hidden, labels) with a bias; no dropout before the head here), built generically from the loaded causal LM's `base_model`, so families that transformers
gives no `*ForTokenClassification` class (Gemma-3, OLMo-2, Granite, Cohere) get one too, and a QLoRA body
quantized while loading stays quantized. tests/eval/test_spans.py checks that for Llama the logits equal
`LlamaForTokenClassification`'s with the same weights. LoRA adapts the body; the head trains in full as a
`modules_to_save` module, so the saved adapter holds `base_model.model.score.weight` (PEFT's layout).
"""

from __future__ import annotations

import torch
from torch import nn

from tunelab.errors import ConfigError

HEAD = "score"


class TokenClassifier(nn.Module):
    def __init__(self, body: nn.Module, num_labels: int, id2label: dict[int, str] | None = None):
        super().__init__()
        self.model = body
        self.config = body.config
        self.name_or_path = getattr(body, "name_or_path", "") or getattr(body.config, "_name_or_path", "")
        dtype = next(p.dtype for p in body.parameters() if p.is_floating_point())
        bias = getattr(body.config, "token_classification_bias", True)  # GenericForTokenClassification's
        self.score = nn.Linear(body.config.hidden_size, num_labels, bias=bias, dtype=dtype)
        # transformers' _init_weights for a linear head: N(0, initializer_range), bias 0
        nn.init.normal_(self.score.weight, std=getattr(body.config, "initializer_range", 0.02))
        if bias:
            nn.init.zeros_(self.score.bias)
        self.config.num_labels = num_labels
        if id2label:
            self.config.id2label, self.config.label2id = dict(id2label), {v: k for k, v in id2label.items()}

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        from transformers.modeling_outputs import TokenClassifierOutput

        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            **kwargs).last_hidden_state  # (B, T, hidden)
        return TokenClassifierOutput(logits=self.score(hidden))  # (B, T, num_labels)


def is_encoder(source: str) -> bool:
    """A local model folder whose config is a masked-LM (bidirectional encoder) type that is not saved as a
    causal LM: BERT, RoBERTa, DeBERTa-v2, ModernBERT... (transformers' masked-LM mapping)."""
    from pathlib import Path

    if not (Path(source) / "config.json").is_file():
        return False
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(source)
    causal = any(a.endswith("ForCausalLM") for a in getattr(config, "architectures", None) or [])
    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not causal


def load_encoder(source: str, dtype: torch.dtype = torch.float32):
    """(encoder body, tokenizer) of a local encoder folder: transformers' AutoModel (any task head dropped,
    and the pooler, which a token head does not use), safetensors only."""
    from safetensors import SafetensorError
    from transformers import AutoModel

    from tunelab.errors import TunelabError
    from tunelab.models.load import load_tokenizer

    tok = load_tokenizer(source)
    try:
        body = AutoModel.from_pretrained(source, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, SafetensorError) as e:
        raise TunelabError(f"{source}: cannot load the encoder ({str(e).splitlines()[0]})") from e
    if getattr(body, "pooler", None) is not None:
        body.pooler = None
    return body, tok


def _layer_list(body: nn.Module) -> tuple[nn.Module, str]:
    """(owner, attribute) of the body's list of blocks: `layers` (decoders, ModernBERT) or `encoder.layer`
    (BERT, RoBERTa, DeBERTa)."""
    for owner, name in ((body, "layers"), (getattr(body, "encoder", None), "layer")):
        if isinstance(getattr(owner, name, None), nn.ModuleList):
            return owner, name
    raise ConfigError(f"model.keep_layers: {type(body).__name__} has no `layers` list to cut")


def keep_layers(body: nn.Module, n: int) -> None:
    """Cut the body to its first n layers, in place (a cheaper detector: spotting text that does not
    belong needs less depth than generating)."""
    owner, name = _layer_list(body)
    layers = getattr(owner, name)
    if not 0 < n <= len(layers):
        raise ConfigError(f"model.keep_layers={n}: the model has {len(layers)} layers; use 1..{len(layers)}")
    setattr(owner, name, layers[:n])
    body.config.num_hidden_layers = n
    if isinstance(getattr(body.config, "layer_types", None), list):  # per-layer attention kinds (Gemma, Qwen)
        body.config.layer_types = body.config.layer_types[:n]


def from_causal_lm(lm: nn.Module, labels: list[str], layers: int | None = None) -> TokenClassifier:
    """The classifier over `lm`'s body (its LM head dropped; an encoder from load_encoder is a body already)
    with len(tag_names(labels)) outputs."""
    from tunelab.data.spans import tag_names

    body = lm.base_model
    if body is lm and type(lm).__name__.endswith("ForCausalLM"):
        raise ConfigError(f"{type(lm).__name__} has no separate decoder body (base_model) to put a token head on")
    if layers:
        keep_layers(body, layers)
    names = tag_names(labels)
    return TokenClassifier(body, len(names), dict(enumerate(names)))

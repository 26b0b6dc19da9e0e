"""Any causal LM of the family table as a token classifier: its decoder body plus a new linear head `score`.

The layout is transformers' `GenericForTokenClassification` (`LlamaForTokenClassification` etc.: `model` =
the body, `score` = Linear(hidden, labels) with a bias; no dropout before the head here), built generically from the loaded causal LM's `base_model`, so families that transformers
gives no `*ForTokenClassification` class (Gemma-3, OLMo-2, Granite, Cohere) get one too, and a QLoRA body
quantized while loading stays quantized. tests/test_spans.py checks that for Llama the logits equal
`LlamaForTokenClassification`'s with the same weights. LoRA adapts the body; the head trains in full as a
`modules_to_save` module, so the saved adapter holds `base_model.model.score.weight` (PEFT's layout).
"""

from __future__ import annotations

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


def keep_layers(body: nn.Module, n: int) -> None:
    """Cut the body to its first n decoder layers, in place (a cheaper detector: spotting text that does not
    belong needs less depth than generating)."""
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"model.keep_layers: {type(body).__name__} has no `layers` list to cut")
    if not 0 < n <= len(layers):
        raise ConfigError(f"model.keep_layers={n}: the model has {len(layers)} layers; use 1..{len(layers)}")
    body.layers = layers[:n]
    body.config.num_hidden_layers = n
    if isinstance(getattr(body.config, "layer_types", None), list):  # per-layer attention kinds (Gemma, Qwen)
        body.config.layer_types = body.config.layer_types[:n]


def from_causal_lm(lm: nn.Module, labels: list[str], layers: int | None = None) -> TokenClassifier:
    """The classifier over `lm`'s body (its LM head dropped) with len(tag_names(labels)) outputs."""
    from tunelab.data.spans import tag_names

    body = lm.base_model
    if body is lm:
        raise ConfigError(f"{type(lm).__name__} has no separate decoder body (base_model) to put a token head on")
    if layers:
        keep_layers(body, layers)
    names = tag_names(labels)
    return TokenClassifier(body, len(names), dict(enumerate(names)))

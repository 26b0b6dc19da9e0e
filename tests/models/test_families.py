"""Every family of the table (tunelab/models/families.py) trains on its own forward's loss.

Tiny random models built from transformers' own config classes, fp32, with large output weights (so that
Gemma's softcap, Granite's and Cohere's scales change the loss a lot), prompt masking and right padding.
tunelab's training loss and every parameter gradient, under train.kernels auto and off, equal those of
`model(input_ids, attention_mask=..., labels=...)` computed on an untouched copy: relative to the largest
value of each tensor, 1e-5.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import transformers

from tunelab.accel import fused, kernels
from tunelab.errors import TunelabError
from tunelab.models import families
from tunelab.train.loss import causal_lm_loss_sum

V, D = 96, 32
_COMMON = dict(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
_MOE = dict(output_router_logits=True, router_aux_loss_coef=0.5, num_experts_per_tok=2)

# case -> (config class, its arguments, model class); the family is the config's model_type
CASES = {
    "llama": (transformers.LlamaConfig, {}, transformers.LlamaForCausalLM),
    "llama3-rope": (transformers.LlamaConfig, dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)), transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, dict(head_dim=8), transformers.MistralForCausalLM),
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4), transformers.MixtralForCausalLM),
    "mixtral-router-loss": (transformers.MixtralConfig, dict(num_local_experts=4, **_MOE),
                            transformers.MixtralForCausalLM),
    "qwen2": (transformers.Qwen2Config, {}, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=8), transformers.Qwen3ForCausalLM),
    # layer 1 without RoPE (SmolLM3's default leaves every 4th out)
    "smollm3": (transformers.SmolLM3Config, dict(no_rope_layers=[1, 0], pad_token_id=0), transformers.SmolLM3ForCausalLM),
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(head_dim=8, num_experts=4, moe_intermediate_size=16, num_experts_per_tok=2),
                  transformers.Qwen3MoeForCausalLM),
    "qwen3_moe-router-loss": (transformers.Qwen3MoeConfig, dict(head_dim=8, num_experts=4, moe_intermediate_size=16,
                                                                **_MOE), transformers.Qwen3MoeForCausalLM),
    "gpt_oss": (transformers.GptOssConfig, dict(head_dim=8, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0,
                                                sliding_window=4, rope_parameters=dict(rope_type="default", rope_theta=1e4)),
                transformers.GptOssForCausalLM),
    "gpt_oss-router-loss": (transformers.GptOssConfig, dict(head_dim=8, num_local_experts=4, pad_token_id=0, sliding_window=4,
                                                            rope_parameters=dict(rope_type="default", rope_theta=1e4), **_MOE),
                            transformers.GptOssForCausalLM),
    "qwen2_moe": (transformers.Qwen2MoeConfig, dict(num_experts=4, moe_intermediate_size=16, num_experts_per_tok=2,
                                                    shared_expert_intermediate_size=32), transformers.Qwen2MoeForCausalLM),
    "qwen2_moe-router-loss": (transformers.Qwen2MoeConfig, dict(num_experts=4, moe_intermediate_size=16,
                                                                shared_expert_intermediate_size=32, **_MOE),
                              transformers.Qwen2MoeForCausalLM),
    "olmoe": (transformers.OlmoeConfig, dict(num_experts=4, num_experts_per_tok=2, pad_token_id=0),
              transformers.OlmoeForCausalLM),
    "olmoe-router-loss": (transformers.OlmoeConfig, dict(num_experts=4, pad_token_id=0, **_MOE),
                          transformers.OlmoeForCausalLM),
    "gemma": (transformers.GemmaConfig, dict(head_dim=8), transformers.GemmaForCausalLM),
    "gemma2": (transformers.Gemma2Config, dict(head_dim=8, final_logit_softcapping=5.0),
               transformers.Gemma2ForCausalLM),
    "gemma3_text": (transformers.Gemma3TextConfig, dict(head_dim=8, final_logit_softcapping=5.0),
                    transformers.Gemma3ForCausalLM),
    "phi3": (transformers.Phi3Config, dict(pad_token_id=0), transformers.Phi3ForCausalLM),
    "glm4": (transformers.Glm4Config, dict(head_dim=8, pad_token_id=0), transformers.Glm4ForCausalLM),
    "starcoder2": (transformers.Starcoder2Config, dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=4),
                   transformers.Starcoder2ForCausalLM),
    "lfm2": (transformers.Lfm2Config, dict(pad_token_id=0, layer_types=["conv", "full_attention"]), transformers.Lfm2ForCausalLM),
    "olmo2": (transformers.Olmo2Config, dict(pad_token_id=0), transformers.Olmo2ForCausalLM),
    # a sliding window of 4 < the 19 tokens in layer 0
    "olmo3": (transformers.Olmo3Config, dict(pad_token_id=0, sliding_window=4,
                                             layer_types=["sliding_attention", "full_attention"]),
              transformers.Olmo3ForCausalLM),
    "granite": (transformers.GraniteConfig, dict(logits_scaling=0.25, embedding_multiplier=2.0,
                                                 residual_multiplier=0.5), transformers.GraniteForCausalLM),
    "granitemoe": (transformers.GraniteMoeConfig, dict(num_local_experts=4, num_experts_per_tok=2, logits_scaling=0.25,
                                                       embedding_multiplier=2.0, residual_multiplier=0.5),
                   transformers.GraniteMoeForCausalLM),
    "granitemoe-router-loss": (transformers.GraniteMoeConfig, dict(num_local_experts=4, logits_scaling=0.25, **_MOE),
                               transformers.GraniteMoeForCausalLM),
    "cohere": (transformers.CohereConfig, dict(logit_scale=4.0), transformers.CohereForCausalLM),
}


def _model(case: str):
    config_cls, extra, model_cls = CASES[case]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**_COMMON, **extra}))
    with torch.no_grad():  # logits of tens: the softcap and the scales change the loss a lot
        model.get_output_embeddings().weight.normal_(0.0, 3.0)
    return model.train()  # dropout is 0 in every config; train() as the loop runs it


def _batch():
    """Three rows of 19 tokens: prompts of 6, 11 and 8 tokens without loss; the last row right-padded by 4."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, V, (3, 19), generator=g)
    labels = ids.clone()
    for i, p in enumerate((6, 11, 8)):
        labels[i, :p] = -100
    mask = torch.ones_like(ids)
    mask[2, -4:] = 0
    labels[2, -4:] = -100
    pos = torch.arange(19).repeat(3, 1)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": pos}


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _own_forward(model, batch):
    """(loss, gradients) of the model's own forward on an untouched copy."""
    plain = copy.deepcopy(model)
    loss = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss.backward()
    return loss.detach(), _grads(plain)


def _tunelab(model, batch, k):
    """(mean loss, gradients) as the training loop computes them: the summed loss over the label count."""
    model.zero_grad(set_to_none=True)
    total, n = causal_lm_loss_sum(model, batch, chunk=7, kernels=k)
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    (total / n).backward()
    return (total / n).detach(), _grads(model)


def _close(got, want, what):
    """|got - want| <= 1e-5 * max|want|: relative to the tensor's scale (fp32 sums in other orders)."""
    err = float((got - want).abs().max())
    assert err <= 1e-5 * float(want.abs().max()), f"{what}: max error {err:.3g} against max {float(want.abs().max()):.3g}"


@pytest.mark.parametrize("head_trains", [True, False], ids=["head-trains", "head-frozen"])
@pytest.mark.parametrize("mode", ["auto", "off", "auto-no-C"])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_equal_the_models_own(case, mode, head_trains, monkeypatch):
    """A trained head goes through token chunks, a frozen one (LoRA, QLoRA) through vocabulary tiles; both
    with the family's logits transform. auto-no-C: the chunked head without the fused C modules."""
    model = _model(case)
    model.requires_grad_(True)
    model.get_output_embeddings().requires_grad_(head_trains)
    batch = _batch()
    want, want_grads = _own_forward(model, batch)
    if mode == "auto-no-C":
        monkeypatch.setattr(fused, "_lib", None)
    k = kernels.choose(model, mode.removesuffix("-no-C"), "cpu")
    fam = families.family_of(model.config)
    assert fam is not None and k.chunked_head == (mode != "off")
    count = kernels.apply(model, k)
    if mode == "auto" and fused.available() and (fam.norm or fam.mlp or fam.attention):
        assert count > 0  # the fused modules really run
    got, grads = _tunelab(model, batch, k)
    _close(got, want, "loss")
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        _close(g, want_grads[name], name)


@pytest.mark.parametrize("case", ["gemma2", "granite", "cohere", "qwen3_moe-router-loss"])
def test_without_the_transform_the_loss_would_be_wrong(case, monkeypatch):
    """The check above can fail: the chunked head without the family's logits transform (or router loss)
    gives another loss than the model's own, by more than 1%."""
    model = _model(case)
    batch = _batch()
    want, _ = _own_forward(model, batch)
    k = dataclasses.replace(kernels.choose(model, "auto", "cpu"), logits=None, router_aux=False)
    total, n = causal_lm_loss_sum(model, batch, kernels=k)
    assert abs(float(total.detach() / n) - float(want)) > 0.01 * float(want)


def test_moe_without_router_logits_adds_no_router_loss():
    """output_router_logits false (the default): the model's forward adds no router loss, nor do we."""
    model = _model("qwen3_moe")
    assert not kernels.choose(model, "auto", "cpu").router_aux
    assert kernels.choose(_model("qwen3_moe-router-loss"), "auto", "cpu").router_aux


def test_every_family_of_the_table_is_checked():
    checked = {CASES[c][0].model_type for c in CASES}
    assert checked == set(families.FAMILIES)


def _unknown():
    torch.manual_seed(0)
    cfg = transformers.StableLmConfig(**{**_COMMON, "max_position_embeddings": 64})
    return transformers.StableLmForCausalLM(cfg).train()


def test_an_unknown_family_trains_on_its_own_forward_with_one_line(capsys, monkeypatch):
    model = _unknown()
    assert families.family_of(model.config) is None
    batch = _batch()
    want, want_grads = _own_forward(model, batch)
    k = kernels.choose(model, "auto", "cpu")
    kernels.report(k)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "'stablelm' is not in tunelab's family table" in out
    assert not k.chunked_head and kernels.apply(model, k) == 0
    got, grads = _tunelab(model, batch, k)
    _close(got, want, "loss")
    for name, g in grads.items():
        _close(g, want_grads[name], name)
    with pytest.raises(TunelabError, match="train.kernels=strict: model_type 'stablelm' is not in"):
        kernels.choose(model, "strict", "cpu")


def test_strict_names_the_speed_up_that_cannot_run(monkeypatch):
    model = _model("llama")
    assert kernels.choose(model, "strict", "cpu").norm == fused.available()
    monkeypatch.setattr(fused, "_lib", None)  # no C compiler, or TUNELAB_C_KERNELS=0
    with pytest.raises(TunelabError, match=r"strict: fused RMSNorm cannot run for llama on cpu: no C compiler"):
        kernels.choose(model, "strict", "cpu")
    k = kernels.choose(model, "auto", "cpu")  # auto: goes on without, and says so once
    assert not (k.norm or k.swiglu or k.rotary) and k.chunked_head
    assert [o.split(":")[0] for o in k.off] == ["fused RMSNorm", "fused SwiGLU", "fused rotary"]


_DATA = {"data": {"sources": [{"name": "x", "path": "x"}]}}  # not read: prepare_method needs no data


def test_off_gives_the_models_own_modules_and_plain_lora():
    """prepare_method under train.kernels=off: no fused module, LoRA layers without _FusedLoRA; auto: both."""
    from tunelab.config import load_config
    from tunelab.train.run import prepare_method

    for mode in ("off", "auto"):
        model = _model("llama")
        cfg = load_config(None, [f"train.kernels={mode}", "method=lora"], base=_DATA)
        prepare_method(model, cfg)
        modules = [type(m).__name__ for m in model.modules()]
        fused_layers = {m.kernel is not None for m in model.modules() if hasattr(m, "lora_A")}
        if mode == "off":
            assert not any(n.startswith("Fused") for n in modules) and fused_layers == {False}
        else:
            assert ("FusedLlamaRMSNorm" in modules) == fused.available() and fused_layers == {True}


def test_moe_lora_says_the_experts_stay_frozen(capsys):
    from tunelab.config import load_config
    from tunelab.train.run import prepare_method

    cfg = load_config(None, ["method=lora"], base=_DATA)
    model = _model("qwen3_moe")
    prepare_method(model, cfg)
    out = capsys.readouterr().out
    assert "model.layers.N.mlp.experts.down_proj, model.layers.N.mlp.experts.gate_up_proj (expert weights) stay " \
        "frozen, without LoRA; set lora.target_experts=true to adapt them too" in out
    assert not model.model.layers[0].mlp.experts.down_proj.requires_grad


def test_docs_hold_the_table():
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "families.md").read_text()
    assert families.markdown() in doc


@pytest.mark.parametrize("case", ["gemma2", "granite", "qwen3_moe-router-loss"])
def test_tunelab_train_logs_the_models_own_loss(case, tmp_path):
    """The real CLI (`tunelab train`, method=full) on a saved tiny model of the family: the first logged loss
    (before any update) on the one example is the model's own forward's loss on it."""
    import json

    from tests.support.tiny_models import make_tiny_tokenizer
    from tests.support.tiny_run import losses, run_config
    from tunelab.cli import main

    tok = make_tiny_tokenizer()
    config_cls, extra, model_cls = CASES[case]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**_COMMON, **extra, "vocab_size": len(tok)}))
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 3.0)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    row = {"prompt": "Reverse: alpha beta gamma", "response": "gamma beta alpha"}
    (tmp_path / "sft.jsonl").write_text(json.dumps(row) + "\n")
    cfg = run_config(tmp_path, tmp_path / "run", method="full", train={"max_steps": 1, "batch_size": 1})
    assert main(["train", str(cfg), "--no-progress"]) == 0
    from tunelab.config import load_config
    from tunelab.data import build_datasets

    run = load_config(cfg)
    example = build_datasets(run.data, tok, run.train.seq_len, run.train.seed)[0][0]
    ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
    with torch.no_grad():
        want = float(model.train()(input_ids=ids, labels=labels).loss)
    assert losses(tmp_path / "run")[0] == pytest.approx(want, rel=1e-5)


def test_no_transformers_function_or_class_is_replaced_for_the_process():
    """Every family prepared as `tunelab train` does (auto: fused modules, LoRA), one loss and backward:
    afterwards every attribute of every transformers modeling module, and of every class defined there, is
    the object it was before. A base and a tuned model in one process are then independent."""
    import sys as _sys

    from tunelab.accel import kernels
    from tunelab.config import load_config
    from tunelab.train.run import prepare_method

    def snapshot():
        mods = {n: m for n, m in _sys.modules.items() if n.startswith("transformers.models.") and ".modeling_" in n}
        seen = {}
        for name, mod in mods.items():
            seen[name] = dict(vars(mod))
            for attr, value in vars(mod).items():
                if isinstance(value, type) and value.__module__ == name:
                    seen[f"{name}.{attr}"] = dict(vars(value))
        return seen

    for case in CASES:
        _model(case)  # import every modeling module first
    before = snapshot()
    cfg = load_config(None, ["method=lora"], base=_DATA)
    for case in CASES:
        model = _model(case)
        k = kernels.choose(model, "auto", "cpu")
        prepare_method(model, cfg, k)
        total, n = causal_lm_loss_sum(model, _batch(), kernels=k)
        (total / n).backward()
    after = snapshot()
    changed = [f"{where}.{key}" for where, attrs in before.items() for key, value in attrs.items()
               if after[where].get(key, value) is not value and not key.startswith("__")]
    assert not changed, changed[:10]

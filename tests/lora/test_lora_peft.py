"""Parity with PEFT 0.21: adapters cross in both directions and give the same logits (fp32, <= 1e-5)."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

from tests.support.tiny_models import make_tiny_llama
from tunelab.lora import LoraConfig, apply_lora, load_adapter, save_adapter

TOL = 1e-5
VARIANTS = {
    "plain": dict(r=4, alpha=8, dropout=0.05, target_modules=["q_proj", "v_proj", "down_proj"],
                  modules_to_save=["lm_head"]),
    "rslora": dict(r=8, alpha=4, target_modules=r".*\.(k_proj|o_proj|up_proj)", use_rslora=True),
    "dora": dict(r=4, alpha=16, target_modules="all-linear", use_dora=True),
}


def peft_config(v: dict) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=v["r"], lora_alpha=v["alpha"], lora_dropout=v.get("dropout", 0.0), target_modules=v["target_modules"],
        use_rslora=v.get("use_rslora", False), use_dora=v.get("use_dora", False),
        modules_to_save=v.get("modules_to_save"), task_type="CAUSAL_LM",
    )


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every trainable tensor off its init: B = 0 at init would make any parity check vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g)
            if "lora_B" in name:
                p.copy_(noise * 0.1)
            else:  # A, DoRA magnitude, trained copy of a module to save
                p.mul_(1 + 0.1 * noise)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 512, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("variant", VARIANTS)
def test_tunelab_adapter_loads_in_peft(variant, ids, tmp_path):
    base_logits = logits(make_tiny_llama(), ids)
    ours = apply_lora(make_tiny_llama(), LoraConfig(**VARIANTS[variant]), verbose=False).eval()
    perturb(ours)
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "ours").eval()

    ours_logits = logits(ours, ids)
    assert (ours_logits - base_logits).abs().max() > 1e-2  # the adapter does something
    assert (logits(theirs, ids) - ours_logits).abs().max() <= TOL

    # The same file layout PEFT writes for this config: key names, shapes, config fields.
    reference = peft.get_peft_model(make_tiny_llama(), peft_config(VARIANTS[variant]))
    reference.save_pretrained(tmp_path / "peft")
    ours_file, peft_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert {k: v.shape for k, v in ours_file.items()} == {k: v.shape for k, v in peft_file.items()}
    ours_cfg, peft_cfg = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft"))
    for key in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "use_dora",
                "modules_to_save"):
        assert ours_cfg[key] == peft_cfg[key], key
    as_set = (lambda t: t if isinstance(t, str) else sorted(t))
    assert as_set(ours_cfg["target_modules"]) == as_set(peft_cfg["target_modules"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_peft_adapter_loads_in_tunelab(variant, ids, tmp_path):
    theirs = peft.get_peft_model(make_tiny_llama(), peft_config(VARIANTS[variant])).eval()
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(make_tiny_llama(), tmp_path, verbose=False).eval()

    theirs_logits = logits(theirs, ids)
    assert (theirs_logits - logits(make_tiny_llama(), ids)).abs().max() > 1e-2
    assert (logits(ours, ids) - theirs_logits).abs().max() <= TOL


def test_training_mode_with_dropout_matches_peft(ids, tmp_path):
    """Dropout draws the same masks in the same order as PEFT (one nn.Dropout on the adapter input)."""
    cfg = dict(r=4, alpha=8, dropout=0.3, target_modules="all-linear", use_dora=True)
    theirs = peft.get_peft_model(make_tiny_llama(), peft_config(cfg))
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(make_tiny_llama(), tmp_path, verbose=False)
    ours.train(), theirs.train()
    torch.manual_seed(5)
    theirs_logits = theirs(ids).logits
    torch.manual_seed(5)
    ours_logits = ours(ids).logits
    assert (ours_logits - theirs_logits).abs().max() <= TOL


def make_tiny_token_classifier():
    """A tiny Llama with a 3-label token classification head (`score`), as for span detection."""
    from transformers import LlamaConfig, LlamaForTokenClassification

    torch.manual_seed(0)
    return LlamaForTokenClassification(LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=3, pad_token_id=0)).eval()


def test_token_classification_head_crosses_both_ways(ids, tmp_path):
    """modules_to_save=["score"] from tunelab loads in PEFT; PEFT's TOKEN_CLS adapter (which lists the
    candidate heads ["classifier", "score"]) loads in tunelab."""
    ours = apply_lora(make_tiny_token_classifier(), LoraConfig(r=4, alpha=8, modules_to_save=["score"]),
                      verbose=False)
    perturb(ours)
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["task_type"] == "TOKEN_CLS"
    theirs = peft.PeftModel.from_pretrained(make_tiny_token_classifier(), tmp_path / "ours").eval()
    assert (logits(theirs, ids) - logits(ours, ids)).abs().max() <= TOL

    theirs = peft.get_peft_model(make_tiny_token_classifier(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="TOKEN_CLS")).eval()
    perturb(theirs, seed=2)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(make_tiny_token_classifier(), tmp_path / "peft", verbose=False).eval()
    assert ours.lora_config.modules_to_save == ["score"]
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max() <= TOL
    assert (logits(ours, ids) - logits(make_tiny_token_classifier(), ids)).abs().max() > 1e-2


@pytest.mark.parametrize("text,message", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
                                          (b"\xff\xfe{}", "not valid JSON")])
def test_malformed_adapter_config_is_a_clear_error(tmp_path, text, message):
    from tunelab.errors import TunelabError

    f = tmp_path / "adapter_config.json"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(TunelabError, match=f"adapter_config.json: {message}"):
        load_adapter(make_tiny_llama(), tmp_path, verbose=False)

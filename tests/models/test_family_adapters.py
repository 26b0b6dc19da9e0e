"""Every dense family of the table through the real CLI: `tunelab train` with lora and qlora for 3 steps on a
saved tiny model; the adapter loads in PEFT with the same logits; merging equals PEFT's merge_and_unload;
a resumed run continues the same losses."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.models.test_families import _COMMON, CASES
from tests.support.tiny_models import make_tiny_tokenizer
from tests.support.tiny_run import losses, run_config
from tunelab.cli import main
from tunelab.export.resolve import open_model
from tunelab.models.families import family_of

# The dense families (MoE experts are 3-D parameters that neither LoRA nor PEFT's all-linear adapts).
DENSE = [c for c in CASES if not family_of(CASES[c][0](**_COMMON)).experts]
TOL = 1e-5  # max |logit difference|, fp32: the same sums in other orders (logits of a few units)


def _workspace(tmp_path, case: str):
    tok = make_tiny_tokenizer()
    config_cls, extra, model_cls = CASES[case]
    torch.manual_seed(0)
    model_cls(config_cls(**{**_COMMON, **extra, "vocab_size": len(tok)})).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rows = [{"prompt": f"Reverse: {a} {b}", "response": f"{b} {a}"} for a, b in
            (("alpha", "beta"), ("gamma", "delta"), ("eta", "theta"), ("iota", "kappa"))]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def _train(ws, out, method: str, resume: bool = False) -> int:
    cfg = run_config(ws, out, method=method, quant={"block_size": 32}, resume=resume,
                     train={"max_steps": 3, "batch_size": 2, "save_every": 2, "keep_last": 3})
    return main(["train", str(cfg), "--no-progress"])


def _trained(tmp_path, case: str, method: str):
    """(workspace, run folder, our model with the run's adapter) after 3 steps of `tunelab train`."""
    ws = _workspace(tmp_path, case)
    run = tmp_path / method
    assert _train(ws, run, method) == 0
    return ws, run, open_model(str(run)).model.eval()


def _ids():
    return torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(5))


def _peft(ws, run, dequantized_from=None):
    """PEFT's model: the saved base (its linears replaced by our de-quantized 4-bit weights for qlora) with
    the run's adapter."""
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(ws / "model", dtype=torch.float32).eval()
    if dequantized_from is not None:
        with torch.no_grad():
            for name, module in dequantized_from.named_modules():
                if hasattr(module, "dequantize_weight"):
                    base.get_submodule(name.replace(".base", "")).weight.copy_(module.dequantize_weight(torch.float32))
    return peft.PeftModel.from_pretrained(base, run / "adapter").eval()


@pytest.mark.parametrize("case", DENSE)
def test_lora_adapter_merge_and_resume_against_peft(case, tmp_path):
    ws, run, ours = _trained(tmp_path, case, "lora")
    theirs = _peft(ws, run)
    ids = _ids()
    with torch.no_grad():
        want = theirs(ids).logits
        with theirs.disable_adapter():  # 3 steps moved the adapter off the identity: the check means something
            assert (theirs(ids).logits - want).abs().max() > 100 * TOL
        assert (ours(ids).logits - want).abs().max() <= TOL
        merged = open_model(str(run), merge=True).model.eval()
        assert (merged(ids).logits - theirs.merge_and_unload()(ids).logits).abs().max() <= TOL
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000003")
    shutil.rmtree(resumed / "adapter")
    assert _train(ws, resumed, "lora", resume=True) == 0
    assert losses(resumed) == losses(run)  # the same steps, the same bits


@pytest.mark.parametrize("case", DENSE)
def test_qlora_adapter_against_peft_on_the_same_4bit_weights(case, tmp_path):
    ws, run, ours = _trained(tmp_path, case, "qlora")
    assert any(hasattr(m, "dequantize_weight") for m in ours.modules())
    theirs = _peft(ws, run, dequantized_from=ours)
    ids = _ids()
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max() <= TOL

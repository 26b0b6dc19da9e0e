"""tunelab cost: analytic numbers against direct counts on a tiny Llama (parameters, tensor bytes, the
tensors autograd saves, matmul FLOPs), and the --measure path runs."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.support.tiny_models import make_tiny_llama
from tunelab.accel.fused import fuse
from tunelab.experiments import cost_cli
from tunelab.experiments.cost import Arch, Setup, analytic
from tunelab.lora import LoraConfig, apply_lora, count_parameters
from tunelab.quant import model_nbytes, quantize_model
from tunelab.train.loss import causal_lm_loss_sum


def _prepared(method: str, tied: bool, fused: bool = False):
    m = make_tiny_llama(num_hidden_layers=3, tie_word_embeddings=tied).train()
    if fused:
        assert fuse(m) == 7 + 3 + 3  # RMSNorms, MLPs, attention modules (rotary)
    if method == "qlora":
        quantize_model(m, block_size=32)
    if method == "full":
        m.requires_grad_(True)
    else:
        apply_lora(m, LoraConfig(r=4, alpha=8), verbose=False)
    return m


def _batch(B: int, T: int) -> dict:
    ids = torch.randint(3, 500, (B, T), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(T).repeat(B, 1)}


def _saved_bytes(model, batch) -> int:
    """Bytes of the distinct non-parameter storages autograd saves during the forward (loss included)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss_sum(model, batch, 1024)
    return sum(seen.values())


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_analytic_counts_match_the_model(method, tied, fused):
    B, T = 2, 32
    model = _prepared(method, tied, fused)
    arch = Arch.from_hf(model.config)
    a = analytic(arch, Setup(method, B, T, r=4, quant_block=32, fused=fused))
    trainable, total = count_parameters(model)
    assert a["trainable"] == trainable and a["total_params"] == total
    assert a["weights"] == model_nbytes(model)  # exact: fp32 tensors, packed codes, absmax, nested state
    assert a["grads"] == 4 * trainable and a["optimizer"] == 8 * trainable
    # saved tensors = decoder activations + the loss's saved dL/dh (+ the head's weight gradient for full);
    # the analytic count leaves out only the (B, T-1) bool label mask
    head_grad = arch.vocab * arch.hidden * 4 if method == "full" else 0
    expected = a["activations"] + B * (T - 1) * arch.hidden * 4 + head_grad
    assert _saved_bytes(model, _batch(B, T)) == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_flops_per_token_match_counted_matmuls(method):
    B, T = 2, 32
    model = _prepared(method, tied=False)
    a = analytic(Arch.from_hf(model.config), Setup(method, B, T, r=4))
    # LoRA layers accumulate their second product in place (addmm_), which the counter does not know
    def addmm_(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]  # as the counter's own addmm: the product only

    inplace = {torch.ops.aten.addmm_: addmm_}
    with FlopCounterMode(display=False, custom_mapping=inplace) as fc:
        s, _ = causal_lm_loss_sum(model, _batch(B, T))
        s.backward()
    # the counter sees every matmul; CPU attention (SDPA) it does not, so add our 12*L*T*H*d for it
    cfg = model.config
    attention = 12 * cfg.num_hidden_layers * T * cfg.hidden_size
    assert fc.get_total_flops() / (B * T) + attention == pytest.approx(a["flops_per_token"], rel=1e-9)


def test_cost_command_measures(tmp_path, capsys):
    make_tiny_llama().save_pretrained(tmp_path / "model")
    p = argparse.ArgumentParser()
    cost_cli.add_arguments(p)
    args = p.parse_args([str(tmp_path / "model"), "--method", "lora", "--batch-size", "2", "--seq-len", "32",
                         "--measure", "--steps", "2", "--json", str(tmp_path / "cost.json")])
    assert cost_cli.run(args) == 0
    rows = json.loads((tmp_path / "cost.json").read_text())
    assert [r["method"] for r in rows] == ["lora"]
    for r in rows:
        assert r["measured_peak"] > 0 and r["tokens_per_s"] > 0 and r["allocator"] == "loop"
        assert r["peak_ratio"] == pytest.approx(r["measured_peak"] / r["peak"])
        # the live tensors include at least the weights and AdamW's moments the analytic model counts
        assert r["live_peak"] >= r["weights"] + r["optimizer"]
        assert r["live_ratio"] == pytest.approx(r["live_peak"] / r["peak"])
    assert "live/analytic" in capsys.readouterr().out


def test_live_tensor_counts_are_exact():
    """tunelab.experiments.memory against tensors of known sizes: views share their storage; a step's
    peak is the largest total alive at once, not the sum of everything it made."""
    from tunelab.experiments.memory import live_peak_bytes, live_tensor_bytes

    before = live_tensor_bytes()
    a = torch.zeros(1000, 250)  # 1,000,000 bytes
    views = [a[1:], a.t()]  # noqa: F841  (no new storage)
    assert live_tensor_bytes() - before == 1_000_000

    def step():
        x = torch.ones(500_000)  # 2,000,000 bytes, freed before y exists
        del x
        y = torch.ones(250_000)  # 1,000,000
        z = torch.ones(250_000)  # 1,000,000: y and z alive together, 2,000,000
        del y, z

    assert live_peak_bytes(step) == 2_000_000


@pytest.mark.parametrize("flag, value, needle", [("--batch-size", "0", "--batch-size must be 1 or more, got 0"),
                                                 ("--seq-len", "-1", "--seq-len must be 1 or more"),
                                                 ("--rank", "0", "--rank must be 1 or more"),
                                                 ("--quant-block", "48", "power of two")])
def test_cost_refuses_sizes_that_make_no_sense(tmp_path, capsys, flag, value, needle):
    from tunelab.cli import main

    assert main(["cost", "bundled", flag, value]) == 2  # checked before the model is looked at
    assert needle in capsys.readouterr().err

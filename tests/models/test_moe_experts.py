"""Mixture-of-experts expert weights (3-D parameters in transformers 5): LoRA per expert in PEFT's
`target_parameters` layout, 4-bit experts for qlora, on tiny random Mixtral and Qwen3-MoE models.

References: PEFT 0.21 for the adapter (logits, merge_and_unload), a float64 loop over tokens and experts for the
gradients, the model's own forward for the loss with the router's auxiliary loss.
"""

from __future__ import annotations

import copy
import math
import shutil
import warnings

import pytest
import torch
import transformers

from tests.models.test_families import _batch, _close, _grads, _model, _own_forward, _tunelab
from tests.models.test_family_adapters import TOL, _ids, _workspace
from tests.support.tiny_run import losses, run_config
from tunelab.accel import kernels
from tunelab.cli import main
from tunelab.export.resolve import open_model
from tunelab.lora import LoraConfig, apply_lora
from tunelab.lora.experts import LoRAExperts
from tunelab.quant import model_nbytes, quantize_model
from tunelab.quant.experts import Experts4bit

MOE = ["mixtral", "qwen3_moe", "gpt_oss", "qwen2_moe", "olmoe", "granitemoe"]


def _randomize_b(model, seed=1):
    """B starts at zero (the adapter is the identity): give every B values so the update shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ---- gradients: the expert update against a float64 loop ------------------------------------------------

def _moe_block(layer):
    """A decoder layer's MoE block: `mlp`, or Granite-MoE's `block_sparse_moe`."""
    return getattr(layer, "block_sparse_moe", None) or layer.mlp


def _adapted(weights, lora, scale, transposed=False):
    """expert(name, e): W_e + scale * B_e @ A_e, with A_e = A[e*r:(e+1)*r] and B_e = B[:, e::E] (PEFT's layout,
    sliced directly); the update transposed for weights stored (in, out)."""
    E = weights["gate_up_proj"].shape[0]

    def expert(name, e):
        w = weights[name][e]
        if name in lora:
            a, b = lora[name]
            r = a.shape[0] // E
            update = scale * b[:, e::E] @ a[e * r:(e + 1) * r]
            w = w + (update.T if transposed else update)
        return w

    return expert


def _route(h, idx, wts, ffn):
    """Float64, token by token: y_t = sum_k w_tk * ffn(e_tk, h_t)."""
    rows = []
    for t in range(h.shape[0]):
        y = torch.zeros_like(h[t])
        for k in range(idx.shape[1]):
            y = y + wts[t, k] * ffn(int(idx[t, k]), h[t])
        rows.append(y)
    return torch.stack(rows)


def _reference_experts(h, idx, wts, weights, lora, scale, act):
    """ffn(e, x) = D_e (act(G_e x) * U_e x), each weight adapted."""
    expert = _adapted(weights, lora, scale)

    def ffn(e, x):
        gate, up = (expert("gate_up_proj", e) @ x).chunk(2)
        return expert("down_proj", e) @ (act(gate) * up)

    return _route(h, idx, wts, ffn)


def _reference_gpt_oss(h, idx, wts, weights, lora, scale, module):
    """The same for gpt-oss's experts, written from its modeling code: weights stored (in, out) (the update is
    (B_e @ A_e)^T), biases, gate and up interleaved (even / odd columns), both clamped at `limit`, and
    (up + 1) * gate * sigmoid(alpha * gate)."""
    expert = _adapted(weights, lora, scale, transposed=True)
    bias = {n: getattr(module, f"{n}_bias").detach().double() for n in ("gate_up_proj", "down_proj")}

    def ffn(e, x):
        gu = x @ expert("gate_up_proj", e) + bias["gate_up_proj"][e]
        gate, up = gu[::2].clamp(max=module.limit), gu[1::2].clamp(-module.limit, module.limit)
        return ((up + 1) * gate * torch.sigmoid(gate * module.alpha)) @ expert("down_proj", e) + bias["down_proj"][e]

    return _route(h, idx, wts, ffn)


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "4bit"])
@pytest.mark.parametrize("case", MOE)
def test_expert_lora_output_and_gradients_equal_a_float64_loop(case, quantized):
    model = _model(case)
    if quantized:
        quantize_model(model, block_size=32)
    apply_lora(model, LoraConfig(r=2, alpha=6, target_experts=True), verbose=False)
    _randomize_b(model)
    layer = _moe_block(model.model.layers[0]).experts
    assert isinstance(layer, LoRAExperts) and isinstance(layer.base, Experts4bit) == quantized
    g = torch.Generator().manual_seed(3)
    T, E = 10, layer.module.num_experts
    h = torch.randn(T, model.config.hidden_size, generator=g, requires_grad=True)
    idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)])  # (T, top_k) distinct experts
    wts = torch.rand(T, 2, generator=g)
    probe = torch.randn(T, model.config.hidden_size, generator=g)
    (layer(h, idx, wts) * probe).sum().backward()

    base = layer.weights(adapted=False)  # float, or de-quantized 4-bit
    leaves = {n: [p.detach().double().requires_grad_() for p in (a.lora_A.weight, a.lora_B.weight)]
              for n, a in layer.adapters.items()}
    h64 = h.detach().double().requires_grad_()
    weights = {n: w.detach().double() for n, w in base.items()}
    if case == "gpt_oss":
        want = _reference_gpt_oss(h64, idx, wts.double(), weights, leaves, layer.scale, layer.module)
    else:
        want = _reference_experts(h64, idx, wts.double(), weights, leaves, layer.scale, torch.nn.functional.silu)
    (want * probe.double()).sum().backward()
    _close(h.grad, h64.grad.float(), "input gradient")
    for name, adapter in layer.adapters.items():
        _close(adapter.lora_A.weight.grad, leaves[name][0].grad.float(), f"{name} lora_A gradient")
        _close(adapter.lora_B.weight.grad, leaves[name][1].grad.float(), f"{name} lora_B gradient")
    assert layer.scale == 3.0 and all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


# ---- the loss: router auxiliary loss still added exactly -----------------------------------------------

@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_loss_with_expert_lora_equals_the_models_own_with_router_loss(quantized):
    """Qwen3-MoE with output_router_logits: tunelab's loss (chunked head + router loss) and every LoRA gradient
    equal the model's own forward with labels, adapters included."""
    model = _model("qwen3_moe-router-loss")
    if quantized:
        quantize_model(model, block_size=32)
    apply_lora(model, LoraConfig(r=2, alpha=4, target_experts=True), verbose=False)
    _randomize_b(model)
    batch = _batch()
    want, want_grads = _own_forward(model, batch)
    k = kernels.choose(model, "auto", "cpu")
    assert k.router_aux
    got, grads = _tunelab(model, batch, k)
    _close(got, want, "loss")
    assert set(grads) == set(want_grads) and any(".experts.adapters." in n for n in grads)
    for name in want_grads:
        _close(grads[name], want_grads[name], name)


# ---- through the CLI: the adapter in PEFT -----------------------------------------------------------------

def _train(ws, out, method: str, resume: bool = False) -> int:
    cfg = run_config(ws, out, method=method, quant={"block_size": 32}, lora={"target_experts": True}, resume=resume,
                     train={"max_steps": 3, "batch_size": 2, "save_every": 2, "keep_last": 3})
    return main(["train", str(cfg), "--no-progress"])


def _peft(ws, run, dequantized_from=None):
    """PEFT's model over the saved base (qlora: its linears and experts replaced by our de-quantized weights)."""
    import peft

    base = transformers.AutoModelForCausalLM.from_pretrained(ws / "model", dtype=torch.float32).eval()
    if dequantized_from is not None:
        with torch.no_grad():
            for name, module in dequantized_from.named_modules():
                plain = name.replace(".base", "")
                if hasattr(module, "dequantize_weight"):
                    base.get_submodule(plain).weight.copy_(module.dequantize_weight(torch.float32))
                elif isinstance(module, Experts4bit):
                    for pname, w in module.dequantize_weights(torch.float32).items():
                        getattr(base.get_submodule(plain), pname).copy_(w)
    return peft.PeftModel.from_pretrained(base, run / "adapter").eval()


def _same_logits_as_peft(ours, theirs, ids) -> None:
    """Our trained model gives PEFT's logits (within TOL), and PEFT's adapter does change them (the check has power)."""
    with torch.no_grad():
        want = theirs(ids).logits
        with theirs.disable_adapter():
            assert (theirs(ids).logits - want).abs().max() > 100 * TOL
        assert (ours(ids).logits - want).abs().max() <= TOL


@pytest.mark.parametrize("case", MOE)
def test_expert_lora_through_the_cli_loads_in_peft_merges_as_peft_and_resumes(case, tmp_path):
    ws = _workspace(tmp_path, case)
    run = tmp_path / "lora"
    assert _train(ws, run, "lora") == 0
    ours = open_model(str(run)).model.eval()
    assert any(isinstance(m, LoRAExperts) for m in ours.modules())
    theirs = _peft(ws, run)
    assert any(type(m).__name__ == "ParamWrapper" for m in theirs.modules())  # PEFT read target_parameters
    ids = _ids()
    _same_logits_as_peft(ours, theirs, ids)
    with torch.no_grad():
        merged = open_model(str(run), merge=True).model.eval()
        assert not any(isinstance(m, LoRAExperts) for m in merged.modules())
        assert (merged(ids).logits - theirs.merge_and_unload()(ids).logits).abs().max() <= TOL
    resumed = tmp_path / "resumed"  # from the step-2 checkpoint: the same third step
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000003")
    shutil.rmtree(resumed / "adapter")
    assert _train(ws, resumed, "lora", resume=True) == 0
    assert losses(resumed) == losses(run)


@pytest.mark.parametrize("case", MOE)
def test_expert_qlora_through_the_cli_against_peft_on_the_same_4bit_weights(case, tmp_path):
    ws = _workspace(tmp_path, case)
    run = tmp_path / "qlora"
    assert _train(ws, run, "qlora") == 0
    ours = open_model(str(run)).model.eval()
    experts = [m for m in ours.modules() if isinstance(m, Experts4bit)]
    assert len(experts) == 2 and not any(p.ndim == 3 for p in ours.parameters())  # no float expert weight left
    for m in experts:  # NF4 at block 32 with double quantization: 4 bits + one 8-bit scale per 32 (+ nested)
        assert 4.0 < 8 * m.nbytes / m.numel() < 4.4
    theirs = _peft(ws, run, dequantized_from=ours)
    _same_logits_as_peft(ours, theirs, _ids())


@pytest.mark.parametrize("case", MOE)
def test_expert_qlora_merges_as_peft_into_the_original_or_the_dequantized_weights(case, tmp_path):
    """`tunelab merge` / `export` of an expert QLoRA run: plain float experts and linears equal to PEFT's
    merge_and_unload over the original float base (the default) or over our de-quantized weights."""
    ws = _workspace(tmp_path, case)
    run = tmp_path / "qlora"
    assert _train(ws, run, "qlora") == 0
    ids = _ids()
    for from_quantized in (False, True):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # from_quantized warns that the 4-bit rounding error stays
            merged = open_model(str(run), merge=True, from_quantized=from_quantized).model.eval()
            assert not any(isinstance(m, (LoRAExperts, Experts4bit)) for m in merged.modules())
            theirs = _peft(ws, run, dequantized_from=open_model(str(run)).model if from_quantized else None)
            assert (merged(ids).logits - theirs.merge_and_unload()(ids).logits).abs().max() <= TOL


def test_quantized_experts_store_an_eighth_of_fp32():
    model = _model("qwen3_moe")
    fp32 = model_nbytes(model)
    expert_bytes = sum(p.numel() * 4 for p in model.parameters() if p.ndim == 3)
    quantize_model(model, block_size=64, double_quant=False)
    experts = [m for m in model.modules() if isinstance(m, Experts4bit)]
    stored = sum(m.nbytes for m in experts)
    assert stored == sum(m.numel() // 2 + 4 * m.numel() // 64 for m in experts)  # codes + one fp32 scale a block
    assert stored * 7 < expert_bytes and model_nbytes(model) < fp32 - expert_bytes + 2 * stored + 1


@pytest.mark.parametrize("case", MOE)
def test_streaming_loader_stacks_and_quantizes_experts_as_transformers(case, tmp_path):
    """The per-expert file layout (what save_pretrained writes) through load_quantized gives the same 4-bit codes
    as transformers' own loading (which stacks the experts) followed by quantize_model."""
    from types import SimpleNamespace

    from tunelab.models.load import load_quantized

    ws = _workspace(tmp_path, case)
    q = SimpleNamespace(quant_type="nf4", block_size=32, double_quant=True)
    streamed = load_quantized(ws / "model", q)
    whole = quantize_model(transformers.AutoModelForCausalLM.from_pretrained(ws / "model", dtype=torch.float32),
                           block_size=32)
    ours = dict(streamed.named_modules())
    pairs = [(p, m, ours[p]) for p, m in whole.named_modules() if isinstance(m, Experts4bit)]
    assert len(pairs) == 2
    for path, want, got in pairs:
        assert isinstance(got, Experts4bit) and list(got.qweights) == list(want.qweights)
        for name in want.qweights:
            assert torch.equal(got.qweights[name].data, want.qweights[name].data), f"{path}.{name}"
            assert torch.equal(got.qweights[name].block_scales(), want.qweights[name].block_scales())
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, whole.eval()(ids).logits)


# ---- what is not supported: one line, exit 2 ------------------------------------------------------------

@pytest.mark.parametrize("extra,needle", [
    ({"dropout": 0.1}, "lora dropout=0.1 with target_experts"),
    ({"use_dora": True}, "lora use_dora with target_experts is not supported"),
], ids=["dropout", "dora"])
def test_unsupported_expert_lora_settings_are_one_line_config_errors(extra, needle, tmp_path, capsys):
    ws = _workspace(tmp_path, "qwen3_moe")
    cfg = run_config(ws, tmp_path / "run", lora={"target_experts": True, **extra})
    capsys.readouterr()
    assert main(["train", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_target_experts_on_a_dense_model_is_a_config_error(tmp_path, capsys):
    ws = _workspace(tmp_path, "llama")
    cfg = run_config(ws, tmp_path / "run", lora={"target_experts": True})
    capsys.readouterr()
    assert main(["train", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # after transformers' loading progress: one line of ours
    assert last.startswith("tunelab train: error: ") and "Traceback" not in err
    assert "lora.target_experts=True matches no expert weight of LlamaForCausalLM (it has no mixture-of-experts " \
           "weights)" in last


def test_expert_names_select_some_expert_weights():
    model = _model("mixtral")
    apply_lora(model, LoraConfig(r=2, alpha=4, target_modules=["q_proj"], target_experts=["down_proj"]), verbose=False)
    layer = model.model.layers[1].mlp.experts
    assert list(layer.adapters) == ["down_proj"]
    a, b = layer.adapters["down_proj"].lora_A.weight, layer.adapters["down_proj"].lora_B.weight
    E, I, H = 4, 64, 32
    assert a.shape == (E * 2, I) and b.shape == (H, 2 * E)  # PEFT's (E*r, in), (out, r*E)
    assert math.isclose(layer.scale, 2.0)
    with pytest.raises(Exception, match="matches no expert weight"):
        apply_lora(_model("mixtral"), LoraConfig(r=2, alpha=4, target_experts=["w9"]), verbose=False)


def test_disabled_and_merged_expert_adapters():
    """Disabled: the base model's output; merge_adapter then unmerge_adapter: the same output, base restored."""
    from tunelab.lora import disable_adapters, merge_adapter, unmerge_adapter

    base = _model("qwen3_moe").eval()
    model = apply_lora(copy.deepcopy(base), LoraConfig(r=2, alpha=4, target_experts=True), verbose=False)
    _randomize_b(model)
    ids = _ids() % 90
    with torch.no_grad():
        want = model(ids).logits
        with disable_adapters(model):
            assert torch.equal(model(ids).logits, base(ids).logits)
        merge_adapter(model)  # logits of tens (output weights of std 3): compared relative to their largest
        _close(model(ids).logits, want, "merged logits")
        unmerge_adapter(model)
        w = model.model.layers[0].mlp.experts.base.down_proj
        _close(w, base.model.layers[0].mlp.experts.down_proj, "unmerged weight")
        _close(model(ids).logits, want, "unmerged logits")
    assert _grads(model) == {}


@pytest.mark.parametrize("targets", [["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], ["mlp.experts.down_proj"]],
                         ids=["both", "down"])
def test_a_peft_made_expert_adapter_loads_in_tunelab(targets, tmp_path):
    """The other direction: PEFT's own target_parameters adapter (suffix names) read by load_adapter."""
    import peft

    from tunelab.lora import load_adapter

    base = _model("mixtral").eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=targets))
    _randomize_b(theirs, seed=4)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_adapter(copy.deepcopy(base), tmp_path / "adapter", verbose=False)
    assert [list(m.adapters) for m in ours.modules() if isinstance(m, LoRAExperts)] == \
        [[t.rsplit(".", 1)[1] for t in targets]] * 2
    ids = _ids() % 90
    with torch.no_grad():
        want = theirs.eval()(ids).logits
        assert (want - base(ids).logits).abs().max() > 1e-2
        _close(ours(ids).logits, want, "logits")

"""The fused RMSNorm and SwiGLU kernels (tunelab.accel.fused): against transformers' modules and float64 formulas."""

import copy
import inspect
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from tests.support.numerics import assert_as_accurate, assert_within, sum_reorder_bound
from tunelab.accel import fused
from tunelab.train.run import enable_checkpointing

pytestmark = pytest.mark.skipif(not fused.available(), reason="needs a C compiler (gcc is on CI)")


def _reference64(x, w, eps):
    """float64 forward, and its autograd gradients, of w * x / sqrt(mean(x^2) + eps)."""
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps))
    return y, x64, w64


@pytest.mark.parametrize("shape", [(3, 5, 64), (7, 67), (1, 1, 576), (130, 8)])
def test_forward_and_backward_match_float64(shape):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3).requires_grad_()
    w = torch.empty(shape[-1]).uniform_(0.5, 1.5).requires_grad_()
    y = fused.rms_norm(x, w, 1e-5)
    gy = torch.randn(shape)
    y.backward(gy)
    y64, x64, w64 = _reference64(x, w, 1e-5)
    y64.backward(gy.double())
    # the same formula in float32 PyTorch ops (LlamaRMSNorm's): the kernel is as close to float64 as it
    x32, w32 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y32 = w32 * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5))
    y32.backward(gy)
    for got, ref, exact, name in ((y, y32, y64, "y"), (x.grad, x32.grad, x64.grad, "dx"), (w.grad, w32.grad, w64.grad, "dw")):
        assert_as_accurate(got, ref, exact, what=name)


def test_matches_transformers_llama_rmsnorm_on_a_strided_input():
    torch.manual_seed(1)
    norm = LlamaRMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    base = torch.randn(6, 2, 48)
    x = base.transpose(0, 1).requires_grad_()  # not contiguous: the kernel copies it first
    ref = norm(x)
    gy = torch.randn_like(ref)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x, norm.weight), gy)
    out = fused.rms_norm(x, norm.weight, norm.variance_epsilon)
    gx, gw = torch.autograd.grad(out, (x, norm.weight), gy)
    y64, x64, w64 = _reference64(x, norm.weight, norm.variance_epsilon)
    exact = (y64, *torch.autograd.grad(y64, (x64, w64), gy.double()))
    for got, ref, ex, name in zip((out, gx, gw), (ref, gx_ref, gw_ref), exact, ("y", "dx", "dw")):
        assert_as_accurate(got, ref, ex, what=name)


def test_rows_split_across_threads_give_the_same_result(monkeypatch):
    torch.manual_seed(2)
    x = torch.randn(301, 40, requires_grad=True)
    w = torch.randn(40, requires_grad=True)
    gy = torch.randn(301, 40)
    one = fused.rms_norm(x, w, 1e-5)
    g_one = torch.autograd.grad(one, (x, w), gy)
    monkeypatch.setattr(fused, "PARALLEL_MIN", 1000)  # split a small input as a large one would be
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert len(fused._row_parts(301, 40)) == 3
    split = fused.rms_norm(x, w, 1e-5)
    g_split = torch.autograd.grad(split, (x, w), gy)
    assert torch.equal(split, one) and torch.equal(g_split[0], g_one[0])  # rows are independent
    # dw_j = sum over the 301 rows of dy_ij * x_ij * r_i, summed per thread then across threads: another
    # order of the same terms (r_i = 1 / rms of row i, the same bits in both)
    r = torch.rsqrt(x.detach().double().pow(2).mean(-1, keepdim=True) + 1e-5)
    terms = gy.double() * x.detach().double() * r  # (301, 40)
    assert_within(g_split[1], g_one[1], sum_reorder_bound(terms, 0), "dw, rows split across 3 threads")


def _tiny_llama():
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def _float64_twin(model, ids):
    """The output and every parameter gradient of a float64 copy (whose modules take their own formula)."""
    twin = copy.deepcopy(model).double()
    twin.zero_grad(set_to_none=True)
    out = twin(ids, labels=ids)
    out.loss.backward()
    return out, {n: p.grad for n, p in twin.named_parameters()}


def _assert_as_accurate_as_unfused(model, out, ref, ref_grads, exact):
    """The fused model's loss, logits and gradients are as close to float64 as the unfused model's: the
    kernels sum rows (norms) and the gradient flows through other orders of the same sums."""
    out64, grads64 = exact
    assert_as_accurate(out.loss, ref.loss, out64.loss, what="loss")
    assert_as_accurate(out.logits, ref.logits, out64.logits, what="logits")
    for name, p in model.named_parameters():  # every weight, the norms' own included (full fine-tuning)
        assert_as_accurate(p.grad, ref_grads[name], grads64[name], what=name)


def test_fuse_rmsnorm_keeps_keys_and_gives_the_same_training_gradients():
    model = _tiny_llama()
    ids = torch.randint(0, 96, (2, 12))
    ref = model(ids, labels=ids)
    ref.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    exact = _float64_twin(model, ids)
    model.zero_grad()
    assert fused.fuse_rmsnorm(model) == 2 * 2 + 1  # two per layer and the final norm
    assert type(model.model.norm).__name__ == "FusedLlamaRMSNorm"
    assert isinstance(model.model.norm, LlamaRMSNorm) and list(model.state_dict()) == keys
    twin = copy.deepcopy(model)
    assert type(twin.model.norm) is type(model.model.norm)
    out = model(ids, labels=ids)
    out.loss.backward()
    _assert_as_accurate_as_unfused(model, out, ref, grads, exact)


def _fp32_only(monkeypatch, name, function, module, plain) -> None:
    """`module`'s fused kernel (fused.<name>, counted) runs on an fp32 input once; bf16 weights and CPU
    autocast take the module's own forward, equal bit for bit to `plain`, transformers' module with the same
    weights."""
    calls = []
    monkeypatch.setattr(fused, name, lambda *a: calls.append(1) or function.apply(*a))
    x = torch.randn(3, 32)
    module(x)
    assert calls == [1]
    plain.load_state_dict(module.state_dict())
    xb = x.bfloat16()
    assert torch.equal(module.bfloat16()(xb), plain.bfloat16()(xb))  # transformers' own formula, bit for bit
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module.float()(x)
    assert calls == [1]


def test_other_dtypes_and_autocast_take_the_modules_own_forward(monkeypatch):
    model = _tiny_llama()
    fused.fuse_rmsnorm(model)
    norm = model.model.norm
    _fp32_only(monkeypatch, "rms_norm", fused._RMSNorm, norm, LlamaRMSNorm(32, eps=norm.variance_epsilon))


def test_switched_off_changes_nothing(monkeypatch):
    monkeypatch.setattr(fused, "_lib", None)  # as with TUNELAB_C_KERNELS=0 or no compiler
    model = _tiny_llama()
    assert fused.fuse_rmsnorm(model) == 0 and type(model.model.norm) is LlamaRMSNorm
    assert fused.fuse(model) == 0 and type(model.model.layers[0].mlp) is LlamaMLP


def _body(cls) -> str:
    """A class's forward source without its docstring, comments and the class-specific names."""
    return _body_of(cls.forward)


def _family_modules():
    """(family, its transformers modeling module) for every family of the table."""
    import importlib

    from tunelab.models.families import FAMILIES

    for fam in FAMILIES.values():
        name = fam.model_type.removesuffix("_text")  # gemma3_text lives in models/gemma3
        yield fam, importlib.import_module(f"transformers.models.{name}.modeling_{name}")


def _activation(model_type: str) -> str:
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type)
    return getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None)  # LFM2: neither (SiLU)


@pytest.mark.parametrize(("field", "llama_cls"), [("norm", LlamaRMSNorm), ("mlp", LlamaMLP)])
def test_the_table_claims_llamas_formula_only_where_it_is(field, llama_cls):
    """Every RMSNorm / MLP class the family table names has LlamaRMSNorm's / LlamaMLP's forward, source for
    source; and no family leaves out a class of Llama's formula (the table claims all that apply)."""
    llama = _body(llama_cls)
    suffix = "RMSNorm" if field == "norm" else "MLP"
    claimed = 0
    for fam, module in _family_modules():
        name = getattr(fam, field)
        if name is not None:
            assert _body(getattr(module, name)) == llama, f"{fam.model_type}: {name}.forward differs from Llama's"
            claimed += 1
        else:
            same = [c for n, c in vars(module).items() if n.endswith(suffix) and isinstance(c, type)
                    and _body(c) == llama]
            if field == "mlp" and _activation(fam.model_type) != "silu":
                same = []  # LlamaMLP's formula with another activation: no SwiGLU
            assert not same, f"{fam.model_type}: {same} has Llama's formula but the table does not claim it"
    assert claimed >= 8


def test_under_gradient_checkpointing_the_same_gradients():
    """The norm's backward runs on the recomputed forward (non-reentrant checkpointing, as tunelab train)."""
    model = _tiny_llama()
    fused.fuse_rmsnorm(model)
    ids = torch.randint(0, 96, (2, 12))
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    enable_checkpointing(model)
    calls = []
    model.model.layers[0].input_layernorm.register_forward_pre_hook(lambda *_: calls.append(1))
    model(ids, labels=ids).loss.backward()
    assert len(calls) == 2  # forward, then again in backward: the layer really is checkpointed
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.parametrize("shape", [(3, 5, 64), (7, 67), (1, 1), (2, 300, 513)])
def test_swiglu_matches_float64(shape):
    torch.manual_seed(4)
    g = (torch.randn(shape) * 6).requires_grad_()  # into exp's tails: silu(-36) ~ -8e-15, silu(36) = 36
    u = torch.randn(shape).requires_grad_()
    with torch.no_grad():
        g.view(-1)[:2] = torch.tensor([-100.0, 100.0])[: g.numel()]  # exp(100) overflows fp32: inf, not NaN
    h = fused.swiglu(g, u)
    dh = torch.randn(shape)
    h.backward(dh)
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    h64 = torch.nn.functional.silu(g64) * u64
    h64.backward(dh.double())
    g32, u32 = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    h32 = torch.nn.functional.silu(g32) * u32  # transformers' formula in float32
    h32.backward(dh)
    for got, ref, exact, name in ((h, h32, h64, "h"), (g.grad, g32.grad, g64.grad, "dg"), (u.grad, u32.grad, u64.grad, "du")):
        assert_as_accurate(got, ref, exact, what=name)


def test_swiglu_split_across_threads_gives_the_same_result(monkeypatch):
    torch.manual_seed(5)
    g, u = torch.randn(33, 70, requires_grad=True), torch.randn(33, 70, requires_grad=True)
    dh = torch.randn(33, 70)
    one = fused.swiglu(g, u)
    g_one = torch.autograd.grad(one, (g, u), dh)
    monkeypatch.setattr(fused, "SWIGLU_PARALLEL_MIN", 500)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert len(fused._value_parts(33 * 70)) == 3
    split = fused.swiglu(g, u)
    g_split = torch.autograd.grad(split, (g, u), dh)
    # a range's last few values take the scalar expf, the others libmvec's vector one: both within a few
    # ulps of float64, neither more than the other
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    h64 = torch.nn.functional.silu(g64) * u64
    exact = (h64, *torch.autograd.grad(h64, (g64, u64), dh.double()))
    for a, b, ex, name in zip((split, *g_split), (one, *g_one), exact, ("h", "dg", "du")):
        assert_as_accurate(a, b, ex, what=name)


def _saved_bytes(model, ids):
    """Bytes of the distinct storages autograd keeps for backward over one forward, and its output."""
    seen = {}

    def pack(t):
        if t.device.type == "cpu":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=ids)
    return sum(seen.values()), out


def test_fused_swiglu_same_training_gradients_and_one_tensor_less_kept():
    model = _tiny_llama()
    ids = torch.randint(0, 96, (2, 12))
    before, ref = _saved_bytes(model, ids)
    ref.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    exact = _float64_twin(model, ids)
    model.zero_grad()
    assert fused.fuse_swiglu(model) == 2 and type(model.model.layers[1].mlp).__name__ == "FusedLlamaMLP"
    assert isinstance(model.model.layers[1].mlp, LlamaMLP) and list(model.state_dict()) == keys
    after, out = _saved_bytes(model, ids)
    out.loss.backward()
    assert before - after == 2 * (2 * 12 * 64) * 4  # silu(gate) no more: per layer, tokens x intermediate fp32
    _assert_as_accurate_as_unfused(model, out, ref, grads, exact)
    assert fused.fuse(_tiny_llama()) == 2 * 2 + 1 + 2 + 2  # norms, MLPs and attention modules


def test_swiglu_other_dtypes_autocast_and_activations_keep_the_modules_own_forward(monkeypatch):
    model = _tiny_llama()
    fused.fuse_swiglu(model)
    mlp = model.model.layers[0].mlp
    _fp32_only(monkeypatch, "swiglu", fused._SwiGLU, mlp, LlamaMLP(model.config))
    cfg = copy.deepcopy(model.config)
    cfg.hidden_act = "gelu"
    assert fused.fuse_swiglu(LlamaForCausalLM(cfg)) == 0  # another activation: left alone


def test_a_failing_gpu_kernel_warns_once_and_the_module_formula_takes_over(monkeypatch):
    """The CUDA dispatch (tunelab.accel.triton_fused), with a stand-in kernel that fails: the norm and the
    MLP give transformers' own result, one warning, and the kernel is not called again for this model."""
    calls = []

    class Broken:
        def rms_norm(self, *a):
            calls.append("norm")
            raise RuntimeError("no sm_90 in this Triton")

        def swiglu(self, *a):
            calls.append("swiglu")
            raise RuntimeError("no sm_90 in this Triton")

    monkeypatch.setattr(fused, "fusable", lambda *a: False)  # as for CUDA tensors
    monkeypatch.setattr(fused, "_cpu_fp32", lambda *a: False)
    monkeypatch.setattr(fused, "_gpu", lambda *ts: Broken())
    model = _tiny_llama()
    plain = _tiny_llama()
    plain.load_state_dict(model.state_dict())
    fused.fuse(model)
    ids = torch.randint(0, 96, (2, 9))
    with pytest.warns(UserWarning, match="fused Triton kernels failed .*no sm_90"):
        got = model(ids).logits
    assert calls == ["norm"] and fused.TRITON in model.model.norm.accel_guard.failed  # off for this model
    torch.testing.assert_close(got, plain(ids).logits, rtol=0, atol=0)


def _rope_inputs(batch_cos: int, layout: str, seed: int = 4):
    """q (2, 3, 5, 8) as transformers makes it (a transposed (B, T, H, D) view) or contiguous; cos and sin
    of one row or of every batch row."""
    g = torch.Generator().manual_seed(seed)
    B, H, T, D = 2, 3, 5, 8
    if layout == "transposed":
        q = torch.randn(B, T, H * D, generator=g).view(B, T, H, D).transpose(1, 2)
    else:
        q = torch.randn(B, H, T, D, generator=g)
    cos, sin = torch.randn(batch_cos, T, D, generator=g), torch.randn(batch_cos, T, D, generator=g)
    return q.requires_grad_(), cos, sin, torch.randn(B, H, T, D, generator=g)


@pytest.mark.parametrize("batch_cos", [1, 2])
@pytest.mark.parametrize("layout", ["transposed", "contiguous"])
@pytest.mark.parametrize("grad_layout", ["contiguous", "transposed"])
def test_rotary_gives_transformers_bits_forward_and_backward(batch_cos, layout, grad_layout):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

    q, cos, sin, gy = _rope_inputs(batch_cos, layout)
    if grad_layout == "transposed":
        gy = gy.transpose(1, 2).contiguous().transpose(1, 2)
    ref = q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)
    (g_ref,) = torch.autograd.grad(ref, q, gy)
    assert fused._rotary_fusable(q, cos, sin)
    out = fused.rotary(q, cos, sin)
    (g_out,) = torch.autograd.grad(out, q, gy)
    assert torch.equal(out, ref) and torch.equal(g_out, g_ref)
    assert out.stride() == q.stride()  # the input's layout, as transformers' ops keep it
    routed = fused._fused_apply_rotary(apply_rotary_pos_emb)
    q2, k2 = routed(q, q[:, :1], cos, sin)
    assert torch.equal(q2, ref) and torch.equal(k2, ref[:, :1])
    qt, _ = routed(q.transpose(1, 2), q.transpose(1, 2), cos, sin, unsqueeze_dim=2)  # another layout: transformers'
    assert torch.equal(qt.transpose(1, 2), ref)


def test_rotary_rows_split_across_threads_give_the_same_result(monkeypatch):
    q, cos, sin, gy = _rope_inputs(1, "transposed")
    one = fused.rotary(q, cos, sin)
    (g_one,) = torch.autograd.grad(one, q, gy)
    monkeypatch.setattr(fused, "PARALLEL_MIN", 16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    split = fused.rotary(q, cos, sin)
    (g_split,) = torch.autograd.grad(split, q, gy)
    assert torch.equal(split, one) and torch.equal(g_split, g_one)


def test_fuse_rotary_routes_llama_attention_and_keeps_every_gradient(monkeypatch):
    from transformers.models.llama import modeling_llama

    transformers_own = modeling_llama.apply_rotary_pos_emb
    model = _tiny_llama()
    ids = torch.randint(0, 96, (2, 12))
    ref = model(ids, labels=ids)
    ref.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    calls = []
    real = fused._rope
    monkeypatch.setattr(fused, "_rope", lambda *a: calls.append(a[-1]) or real(*a))
    assert fused.fuse_rotary(model) == 2 and fused.fuse_rotary(model) == 2  # the second call wraps nothing again
    assert type(model.model.layers[0].self_attn).__name__ == "FusedLlamaAttention"
    assert modeling_llama.apply_rotary_pos_emb is transformers_own  # transformers' module is left as it was
    out = model(ids, labels=ids)
    out.loss.backward()
    assert calls.count(0) == 4 and calls.count(1) == 4  # q and k of two layers, forward and backward
    assert torch.equal(out.logits, ref.logits)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), name
    calls.clear()
    model.double()(ids)  # float64 takes transformers' own formula
    assert calls == []
    other = _tiny_llama()  # a second model in the process, not fused: transformers' own rotary
    other(ids, labels=ids).loss.backward()
    assert calls == []


def test_fused_model_copies_and_pickles_as_itself():
    import pickle

    model = _tiny_llama()
    fused.fuse(model)
    ids = torch.randint(0, 96, (2, 7))
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(twin.model.layers[1].self_attn) is type(model.model.layers[1].self_attn)
        assert torch.equal(twin(ids).logits, model(ids).logits)


def test_the_tables_attention_modules_have_llamas_rotary():
    from transformers.models.llama import modeling_llama

    def source(module, name):
        fn = getattr(module, name)
        fn = getattr(fn, "tunelab_original", fn)
        if isinstance(fn, torch.nn.Module):  # with the `kernels` package transformers wraps it in a module
            fn = inspect.getclosurevars(type(fn).forward).nonlocals["func"]  # whose forward calls it
        return _body_of(fn)

    llama = {fn: source(modeling_llama, fn) for fn in ("apply_rotary_pos_emb", "rotate_half")}
    claimed = 0
    for fam, module in _family_modules():
        same = all(source(module, fn) == llama[fn] for fn in llama)
        assert same == (fam.attention is not None), f"{fam.model_type}'s rotary: Llama's {same}, claimed {not same}"
        if fam.attention is not None:
            assert isinstance(getattr(module, fam.attention), type)
            claimed += 1
    assert claimed >= 8


def _body_of(fn) -> str:
    """A function's source without its docstring and comments, whitespace collapsed."""
    src = re.sub(r'"""[\s\S]*?"""', "", inspect.getsource(fn))
    return re.sub(r"\s+", " ", re.sub(r"#.*", "", src)).strip()

"""Packed rows train as if each example were alone: loss and gradients of a packed batch equal those of the
same examples padded one per row.

A packed row holds several examples end to end, position ids restarting at 0 at each; the loop's collate
gives it no 2-D attention mask, so transformers (>= 5) builds the block-diagonal causal mask from the position
ids (`masking_utils.find_packed_sequence_indices`). Checked here through tunelab's whole loss path: the
chunked head, the last decoder layer's shortcut (prompts without loss), the fused rotary/RMSNorm/SwiGLU
modules (train.kernels=auto), and the model's own forward (train.kernels=off); for a tiny Llama and for
families with another attention (Qwen3's q/k norms, Gemma 3's softcap and sliding-window layer, Mistral's sliding window shorter
than the examples). Tolerance: `numerics.assert_as_accurate`: the packed float32 result is as near the
float64 result of each example alone (a batch of one, no padding) as the padded float32 one is (both sum
the same terms in other orders).
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from tests.support.numerics import assert_as_accurate
from tunelab.accel import kernels as accel
from tunelab.data.packing import pack, padded
from tunelab.train.loop import collate
from tunelab.train.loss import causal_lm_loss_sum

V = 96
_COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
CASES = {
    "llama": (transformers.LlamaConfig, {}, transformers.LlamaForCausalLM),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=8), transformers.Qwen3ForCausalLM),
    "gemma3": (transformers.Gemma3TextConfig, dict(head_dim=8, final_logit_softcapping=5.0, sliding_window=6,
                                                   layer_types=["sliding_attention", "full_attention"]),
               transformers.Gemma3ForCausalLM),
    "mistral-window": (transformers.MistralConfig, dict(head_dim=8, sliding_window=5), transformers.MistralForCausalLM),
}


def _model(case: str, attn: str):
    config_cls, extra, model_cls = CASES[case]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**_COMMON, **extra}, attn_implementation=attn))
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 1.0)
    return model.train()


def _docs():
    """Seven SFT-like examples of 3 to 16 tokens, the first few tokens of most a prompt without loss."""
    g = torch.Generator().manual_seed(3)
    docs = []
    for n, prompt in ((9, 4), (3, 0), (16, 7), (5, 2), (12, 5), (7, 0), (14, 6)):
        ids = torch.randint(1, V, (n,), generator=g).tolist()
        docs.append((ids, [-100] * prompt + ids[prompt:]))
    return docs


def _batches(seq_len: int = 32, trim: bool = False):
    """(padded batch, packed batch); trim: the packed rows without the padding `pack` ends them with, so
    that collate pads them again, to the longest."""
    docs = _docs()
    padded_rows = list(padded(docs, seq_len))
    packed_rows = list(pack(docs, seq_len, pad_id=0, split_docs=False))
    assert len(packed_rows) < len(padded_rows)  # several examples share a row
    if trim:  # pack's rule: an example that does not fit the row starts the next one
        used = [0]
        for ids, _ in docs:
            used += [0] if used[-1] + len(ids) > seq_len else []
            used[-1] += len(ids)
        packed_rows = [{k: v[:n] for k, v in r.items()} for r, n in zip(packed_rows, used, strict=True)]
        assert len(set(used)) > 1
    return collate(padded_rows, 0, "cpu"), collate(packed_rows, 0, "cpu")


def _loss_and_grads(model, batches: list[dict], kernels):
    """(mean loss over every label token of the batches, gradients of it, label tokens)."""
    model.zero_grad(set_to_none=True)
    sums = [causal_lm_loss_sum(model, b, chunk=7, kernels=kernels) for b in batches]
    n = sum(c for _, c in sums)
    mean = sum(s for s, _ in sums) / n
    mean.backward()
    return mean.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}, n


def _alone():
    """Each example as a batch of its own: no padding, no other example (the float64 reference)."""
    return [collate([row], 0, "cpu") for row in padded(_docs(), 32)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["auto", "off"])
@pytest.mark.parametrize("case", list(CASES))
def test_packed_batch_equals_the_same_examples_padded(case, mode, attn):
    _check_packed(case, mode, attn, trim=False)


def test_packed_rows_of_different_lengths_are_padded_without_a_mask():
    """Packed rows that collate pads again (rows of different lengths): still no 2-D mask, the padding is one
    more example of its own, and the result is the padded one's."""
    _check_packed("llama", "auto", "sdpa", trim=True)


def _check_packed(case, mode, attn, trim):
    pad_batch, pack_batch = _batches(trim=trim)
    assert "attention_mask" not in pack_batch  # transformers reads the examples off the position ids
    exact_model = copy.deepcopy(_model(case, attn)).double()
    exact, exact_grads, n64 = _loss_and_grads(exact_model, _alone(), accel.choose(exact_model, "off", "cpu"))
    model = _model(case, attn)
    k = accel.choose(model, mode, "cpu")
    accel.apply(model, k)
    ref, ref_grads, n_pad = _loss_and_grads(model, [pad_batch], k)
    got, got_grads, n_pack = _loss_and_grads(model, [pack_batch], k)
    assert n_pack == n_pad == n64  # the same label tokens: no example's first token is predicted from another
    assert_as_accurate(got, ref, exact, what=f"{case} {mode} {attn}: packed loss")
    assert got_grads.keys() == ref_grads.keys() == exact_grads.keys()
    for name in ref_grads:
        assert_as_accurate(got_grads[name], ref_grads[name], exact_grads[name], what=f"{case} {mode} {attn}: {name}")


def test_without_the_block_diagonal_mask_packed_examples_would_mix():
    """The check above can fail: with a plain causal mask over the row (a 2-D all-ones attention mask turns
    transformers' packed-sequence detection off) the packed loss moves far outside the tolerance."""
    pad_batch, pack_batch = _batches()
    model = _model("llama", "sdpa")
    k = accel.choose(model, "auto", "cpu")
    ref, _, _ = _loss_and_grads(model, [pad_batch], k)
    mixed = {**pack_batch, "attention_mask": torch.ones_like(pack_batch["input_ids"])}
    got, _, _ = _loss_and_grads(model, [mixed], k)
    assert abs(float(got - ref)) > 1e-3, (float(got), float(ref))


def test_a_model_that_ignores_packed_positions_is_refused():
    """tunelab.train.packed.check_attention (run before training with data.packing=packed): a model of the
    table passes; one whose forward drops the packed reading (here: it always passes a 2-D mask) is refused."""
    from tunelab.errors import TunelabError
    from tunelab.train.packed import check_attention

    model = _model("llama", "sdpa")
    check_attention(model, "cpu")
    assert model.training  # left as it was

    class Leaky(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def forward(self, input_ids, attention_mask=None, **kw):
            return self.inner(input_ids, attention_mask=torch.ones_like(input_ids), **kw)

    with pytest.raises(TunelabError, match="data.packing=padded"):
        check_attention(Leaky(model), "cpu")

"""Preference tuning: per-sequence log-probabilities through the chunked head, and the objectives."""

import pytest
import torch

from tests.models.test_families import _batch, _model, _unknown
from tests.support.numerics import assert_as_accurate
from tunelab.train.preference import sequence_logps


def _reference_logps(model, batch):
    """transformers' full logits -> log_softmax -> gather, summed over each row's label tokens (B,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits[:, :-1]
    y = batch["labels"][:, 1:]
    per_token = logits.log_softmax(-1).gather(2, y.clamp_min(0)[..., None]).squeeze(2)
    return (per_token * (y != -100)).sum(1)


def _value_and_grads(fn, model, batch, weights):
    """logps (B,) and the gradients of sum(weights * logps): each row weighed differently, as a preference
    loss does, so a gradient that treats rows alike fails."""
    model.zero_grad(set_to_none=True)
    logps = fn(model, batch)
    (logps * weights.to(logps.dtype)).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _ours(chunk):
    return lambda model, batch: sequence_logps(model, batch, chunk=chunk)[0]


# llama: the last-layer shortcut; gemma2: softcap; granite: a logits scale; unknown: the model's own logits
@pytest.mark.parametrize("case", ["llama", "gemma2", "granite", "unknown"])
@pytest.mark.parametrize("head_trains", [False, True])
def test_sequence_logps_equal_full_logits_values_and_gradients(case, head_trains):
    """float64: values and every gradient to 1e-10 relative; float32: as accurate as transformers' float32
    full logits against float64 (tests/support/numerics.py). Chunks of 5 tokens split rows across chunks."""
    weights = torch.tensor([0.7, -1.3, 2.1])
    results = {}
    for dtype in (torch.float64, torch.float32):
        model = (_unknown() if case == "unknown" else _model(case)).to(dtype)
        model.get_output_embeddings().requires_grad_(head_trains)
        batch = _batch()
        results[dtype] = (_value_and_grads(_ours(5), model, batch, weights),
                          _value_and_grads(_reference_logps, model, batch, weights))
    (got64, grads64), (ref64, ref_grads64) = results[torch.float64]
    (got32, grads32), (ref32, ref_grads32) = results[torch.float32]
    _, tokens = sequence_logps(model, batch)
    assert tokens.tolist() == (batch["labels"][:, 1:] != -100).sum(1).tolist()
    torch.testing.assert_close(got64, ref64, rtol=1e-10, atol=0)
    assert_as_accurate(got32, ref32, ref64, what="logps")
    assert grads64.keys() == ref_grads64.keys() == grads32.keys()
    assert any(n.endswith("lm_head.weight") for n in grads64) == head_trains
    for name, g in grads64.items():
        torch.testing.assert_close(g, ref_grads64[name], rtol=1e-10, atol=1e-10 * float(g.abs().max()), msg=name)
        assert_as_accurate(grads32[name], ref_grads32[name], ref_grads64[name], what=name)


def test_sequence_logps_never_build_full_logits():
    """Forward and backward: every tensor with a vocabulary-sized last dimension that any operation
    produces (seen by a TorchDispatchMode, local to this block) has at most `chunk` rows; the reference
    path, as a check of the check, builds (B, T, V) logits."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self, vocab):
            super().__init__()
            self.vocab, self.seen = vocab, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab:
                    self.seen.append(tuple(t.shape))
            return out

    model = _model("llama")
    V = model.config.vocab_size
    for fn, check in ((_ours(4), lambda shapes: all(len(s) == 2 and s[0] <= 4 for s in shapes)),
                      (_reference_logps, lambda shapes: any(len(s) == 3 for s in shapes))):
        model.zero_grad(set_to_none=True)
        with Shapes(V) as mode:
            fn(model, _batch()).sum().backward()
        C = model.config.hidden_size
        logits = [s for s in mode.seen if s not in ((V, C), (C, V))]  # the head's weight, its transpose
        assert logits and check(logits), logits


# --- Parity with TRL 1.16 (tests only, like PEFT): its own loss code on the same per-sequence log-probs.
# Losses, rewards and the gradients w.r.t. the log-probs equal ours to 1e-5 relative in float32.

from collections import defaultdict  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from tunelab.train import preference as pref  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-7)
_ACC = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t,
                       unwrap_model=lambda m: m)


def _pairs(P=6, seed=0):
    """Summed log-probs of P pairs (policy and reference, float32 leaves) and token counts 1..11."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 12, (2, P), generator=g).float()
    logps = -tokens * torch.rand(2, P, generator=g) * 3  # about -3 nats a token at most
    ref = logps + torch.randn(2, P, generator=g)
    return logps.requires_grad_(), ref, tokens


class _LogProbTable(torch.nn.Module):
    """A stand-in for the model TRL's trainers call with fused_lm_head=True: row i of input_ids names, in
    its first token, the entry of `table` that is that sequence's summed log-prob; it returns it as the
    first per-token log-prob and zeros after, so TRL's sum over positions gives exactly that value."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, input_ids, labels=None, **_):
        rest = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 2)
        lp = torch.cat([self.table[input_ids[:, 0]][:, None], rest], 1)  # (B, T-1)
        zeros = torch.zeros_like(lp.detach())
        return SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _rows(table_ids, tokens, T=12):
    """input_ids naming table entries, and a completion mask with tokens[i] ones per row (IPO reads it)."""
    ids = torch.zeros(len(table_ids), T, dtype=torch.long)
    ids[:, 0] = torch.as_tensor(table_ids)
    mask = (torch.arange(T) < tokens.long()[:, None]).long()
    return ids, mask


def _grad(loss, leaf):
    (g,) = torch.autograd.grad(loss, leaf)
    return g


def _trl(cls, **attrs):
    """A TRL trainer object with only the attributes its loss code reads (no model, data or run)."""
    trainer = cls.__new__(cls)
    vars(trainer).update(accelerator=_ACC, aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
                         _total_train_tokens=0, _tp_size=1, **attrs)
    return trainer


def _trl_metrics(trainer):
    return {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_equal_trl(loss_type):
    """TRL's DPOTrainer._compute_loss (trl/trainer/dpo_trainer.py) with precomputed reference log-probs."""
    from trl import DPOTrainer

    logps, ref, tokens = _pairs()
    P = logps.shape[1]
    model = _LogProbTable(logps.view(-1)).train()
    ids, mask = _rows(range(2 * P), tokens.view(-1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
              "ref_chosen_logps": ref[0], "ref_rejected_logps": ref[1]}
    beta = 0.3
    trainer = _trl(DPOTrainer, model=model, ref_model=None, precompute_ref_logps=True, ld_alpha=None,
                   f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], use_weighting=False,
                   beta=beta, label_smoothing=0.0, args=SimpleNamespace(gradient_checkpointing_kwargs=None))
    want = trainer._compute_loss(model, inputs, return_outputs=False)
    want_metrics = _trl_metrics(trainer)
    if loss_type == "sigmoid":
        got, metrics = pref.dpo_loss(logps[0], logps[1], ref[0], ref[1], beta=beta)
    else:
        got, metrics = pref.ipo_loss(logps[0], logps[1], ref[0], ref[1], tokens[0], tokens[1], beta=beta)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(_grad(got, logps), _grad(want, logps), **TOL)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected"):
        assert metrics[k] == pytest.approx(want_metrics[k], rel=1e-5, abs=1e-7), k
    assert 0 < metrics["rewards/accuracies"] < 1  # the data has pairs on both sides


def test_dpo_label_smoothing_equals_trl_conservative_sigmoid():
    """TRL 1.16's DPO sigmoid ignores label_smoothing (it is used by its robust and EXO losses); the
    conservative DPO loss with label smoothing is its CPOTrainer.cpo_loss "sigmoid" (trl/experimental/cpo/
    cpo_trainer.py), which applied to the log-ratios pi - ref is DPO's."""
    from trl.experimental.cpo import CPOTrainer

    logps, ref, _ = _pairs(seed=1)
    trainer = _trl(CPOTrainer, loss_type="sigmoid", alpha=0.0, beta=0.2, label_smoothing=0.15)
    losses, chosen_rewards, rejected_rewards = trainer.cpo_loss(logps[0] - ref[0], logps[1] - ref[1])
    want = losses.mean()
    got, metrics = pref.dpo_loss(logps[0], logps[1], ref[0], ref[1], beta=0.2, label_smoothing=0.15)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(_grad(got, logps), _grad(want, logps), **TOL)
    assert metrics["rewards/chosen"] == pytest.approx(float(chosen_rewards.mean()), rel=1e-5)
    assert metrics["rewards/rejected"] == pytest.approx(float(rejected_rewards.mean()), rel=1e-5)


def _trl_with_forward(trainer, logps, tokens, nll):
    """TRL's get_batch_loss_metrics with this instance's concatenated_forward giving the length-normalised
    log-probs (ORPO and SimPO average over the response tokens) and the chosen NLL."""
    avg = logps / tokens
    dummy = torch.zeros(1, 1, 1)
    trainer.concatenated_forward = lambda model, batch: (avg[0], avg[1], dummy, dummy, nll)
    return trainer.get_batch_loss_metrics(None, {})


def test_orpo_equals_trl():
    """TRL's ORPOTrainer.get_batch_loss_metrics and odds_ratio_loss (trl/experimental/orpo/orpo_trainer.py),
    given our NLL (TRL's own counts prompt tokens too; ours the responses', as SFT)."""
    from trl.experimental.orpo import ORPOTrainer

    logps, _, tokens = _pairs(seed=2)
    got, metrics = pref.orpo_loss(logps[0], logps[1], tokens[0], tokens[1], beta=0.25)
    nll = -logps[0].sum() / tokens[0].sum()
    want, want_metrics = _trl_with_forward(_trl(ORPOTrainer, beta=0.25), logps, tokens, nll)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(_grad(got, logps), _grad(want, logps), **TOL)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "nll_loss",
              "log_odds_ratio", "log_odds_chosen"):
        assert metrics[k] == pytest.approx(want_metrics[k], rel=1e-5, abs=1e-7), k


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_equals_trl(label_smoothing):
    """TRL's CPOTrainer with loss_type="simpo", cpo_alpha=0 (trl/experimental/cpo/cpo_trainer.py)."""
    from trl.experimental.cpo import CPOTrainer

    logps, _, tokens = _pairs(seed=3)
    trainer = _trl(CPOTrainer, loss_type="simpo", alpha=0.0, beta=2.0, simpo_gamma=0.7,
                   label_smoothing=label_smoothing, cpo_alpha=0.0)
    want, want_metrics = _trl_with_forward(trainer, logps, tokens, torch.tensor(0.0))
    got, metrics = pref.simpo_loss(logps[0], logps[1], tokens[0], tokens[1], beta=2.0, gamma=0.7,
                                   label_smoothing=label_smoothing)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(_grad(got, logps), _grad(want, logps), **TOL)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[k] == pytest.approx(want_metrics[k], rel=1e-5, abs=1e-7), k


def test_kl_pairs_are_trls():
    """TRL pairs each prompt with the previous record's completion within a batch:
    `[completion_ids[-1]] + completion_ids[:-1]` (trl/trainer/kto_trainer.py, add_kl_completion_ids)."""
    c = list("abcde")
    assert [c[i] for i in pref.kl_mismatch(len(c))] == [c[-1]] + c[:-1]
    assert pref.kl_mismatch(0) == []


def test_fixed_kl_partners_are_trls_data_order_chunks():
    """With precompute_ref, KTO's KL partners are fixed as TRL's KTOTrainer fixes them when it prepares the
    data: `[c[-1]] + c[:-1]` on each consecutive chunk of per_device_train_batch_size completions (a datasets
    map with batched=True), the last chunk shorter (one row: paired with itself, as in TRL)."""
    c = list("abcdefg")
    want = [x for i in range(0, len(c), 3) for x in [c[i:i + 3][-1]] + c[i:i + 3][:-1]]
    assert [c[j] for j in pref.kl_partners(len(c), 3)] == want == list("cabfdeg")
    assert pref.kl_partners(4, 4) == pref.kl_mismatch(4) and pref.kl_partners(0, 4) == []


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_equals_trl(weights):
    """TRL's KTOTrainer._compute_loss with precomputed reference log-probs; the KL sequences are prompt i
    with completion kl_mismatch(n)[i] (TRL's cycle), their policy log-probs from the same stand-in model."""
    from trl import KTOTrainer

    g = torch.Generator().manual_seed(4)
    n = 7
    desirable = torch.tensor([True, False, True, True, False, False, True])
    logps = (-torch.rand(n, generator=g) * 20).requires_grad_()
    ref = logps.detach() + torch.randn(n, generator=g)
    kl_logps = -torch.rand(n, generator=g) * 20  # policy log-probs of the mismatched pairs
    ref_kl = kl_logps - torch.rand(n, generator=g)  # KL estimate > 0 here: its clamp does not hide it
    model = _LogProbTable(torch.cat([logps, kl_logps])).train()
    ids, mask = _rows(range(n), torch.ones(n))
    kl_ids, kl_mask = _rows(range(n, 2 * n), torch.ones(n))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(ids), "KL_completion_mask": kl_mask,
              "label": desirable, "ref_logps": ref, "ref_KL_logps": ref_kl}
    trainer = _trl(KTOTrainer, model=model, ref_model=None, precompute_ref_logps=True, calculate_KL=True,
                   loss_type="kto", beta=0.2, desirable_weight=weights[0], undesirable_weight=weights[1],
                   args=SimpleNamespace(gradient_checkpointing_kwargs=None))
    want = trainer._compute_loss(model, inputs, return_outputs=False)
    want_metrics = _trl_metrics(trainer)
    got, metrics = pref.kto_loss(logps, ref, desirable, kl_logps, ref_kl, beta=0.2, desirable_weight=weights[0],
                                 undesirable_weight=weights[1])
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(_grad(got, logps), _grad(want, logps), **TOL)
    assert metrics["kl"] > 0
    for k in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert metrics[k] == pytest.approx(want_metrics[k], rel=1e-5, abs=1e-7), k


def _pair_rows(seed: int = 3):
    """Three pair rows (tunelab.data.preference.row's layout): prompts of 7, 12 and 5 tokens, responses of
    different lengths, chosen and rejected sharing the prompt."""
    from tests.models.test_families import V

    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(1, V, (n,), generator=g).tolist()  # noqa: E731
    rows = []
    for p, nc, nr in ((7, 4, 6), (12, 3, 3), (5, 8, 2)):
        prompt, c, r = ids(p), ids(nc), ids(nr)
        rows.append({"input_ids": prompt + c + prompt + r, "labels": [-100] * p + c + [-100] * p + r,
                     "position_ids": list(range(p + nc)) + list(range(p + nr))})
    return rows


@pytest.mark.parametrize("case", ["llama", "qwen3", "granite", "cohere"])
def test_shared_prompt_batches_equal_the_plain_layout(case):
    """collate_shared (each prompt once, a 4-D mask) against collate_pairs (2P sequences): per-response log-probs
    and token counts, and the gradients of a differently weighted sum. float64: values to 1e-12 relative,
    gradients to 1e-6 of their largest entry (transformers' RMSNorm computes in float32 even in a float64
    model, and a shared prompt position rounds the sum of both responses' gradients once where the plain
    layout rounds each; 1e-7 measured); float32: as accurate against the float64 plain layout as the float32
    plain layout (tests/numerics.py). llama: with the last-layer shortcut; qwen3: q/k norms, no shortcut;
    granite: a logits scale; cohere: parallel attention and MLP. The shared batch has fewer tokens."""
    from tunelab.accel import kernels as accel
    from tunelab.train.preference import collate_pairs, collate_shared

    rows = _pair_rows()
    plain, shared = collate_pairs(rows, 0, "cpu"), collate_shared(rows, 0, "cpu")
    assert shared["input_ids"].numel() < plain["input_ids"].numel() and shared["input_ids"].shape[0] == 3
    weights = torch.tensor([0.7, -1.3, 2.1, 0.4, 1.1, -0.6])
    out = {}
    for dtype in (torch.float64, torch.float32):
        model = _model(case).to(dtype)
        k = accel.choose(model, "auto", "cpu")
        assert k.shared_prompt
        fn = lambda m, b: sequence_logps(m, b, chunk=5, kernels=k)[0]  # noqa: E731
        out[dtype] = _value_and_grads(fn, model, plain, weights), _value_and_grads(fn, model, shared, weights)
        assert sequence_logps(model, shared, kernels=k)[1].tolist() == sequence_logps(model, plain, kernels=k)[1].tolist()
    (want64, want_grads64), (got64, grads64) = out[torch.float64]
    (want32, want_grads32), (got32, grads32) = out[torch.float32]
    torch.testing.assert_close(got64, want64, rtol=1e-12, atol=0)
    assert_as_accurate(got32, want32, want64, what="logps")
    assert grads64.keys() == want_grads64.keys() == grads32.keys()
    for name, g in grads64.items():
        torch.testing.assert_close(g, want_grads64[name], rtol=0, atol=1e-6 * float(g.abs().max()), msg=name)
        assert_as_accurate(grads32[name], want_grads32[name], want_grads64[name], what=name)


def test_shared_prompt_applies_only_where_it_gives_the_same_numbers():
    """Not for a family outside the table (its own forward), a sliding window (gemma2, mistral) or eager
    attention; a pair whose halves do not share the prompt makes the batch fall back to the plain layout."""
    from tunelab.accel import kernels as accel
    from tunelab.train.preference import collate_shared

    for model in (_unknown(), _model("gemma2"), _model("mistral")):
        assert not accel.choose(model, "auto", "cpu").shared_prompt
    model = _model("llama")
    model.config._attn_implementation = "eager"
    assert not accel.choose(model, "auto", "cpu").shared_prompt and not accel.choose(_model("llama"), "off").shared_prompt
    rows = _pair_rows()
    rows[1] = {**rows[1], "input_ids": rows[1]["input_ids"][:15] + [1] + rows[1]["input_ids"][16:]}  # rejected's prompt differs
    batch = collate_shared(rows, 0, "cpu")
    assert "sequence" not in batch and batch["input_ids"].shape[0] == 6

"""Preference objectives on per-sequence log-probabilities, and those log-probabilities from the model.

Every objective is a small function of tensors of shape (P,): `logps` are sums of log p(token) over a
response's tokens (labels != -100), `tokens` their counts. Each returns (loss, metrics): the scalar loss
the loop backpropagates, and the detached numbers people log (TRL's names: rewards/chosen,
rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen, logps/rejected, and the objective's
own). tests/test_preference.py checks losses, rewards and gradients against TRL 1.16's own code.

A batch of pairs is laid out [chosen_0 .. chosen_{P-1}, rejected_0 .. rejected_{P-1}] (TRL's layout), so
one forward computes both halves: `sequence_logps` then `.chunk(2)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.train.loss import IGNORE, label_hidden, linear_log_probs

OBJECTIVES = ("dpo", "ipo", "orpo", "simpo", "kto")
NEEDS_REFERENCE = ("dpo", "ipo", "kto")


def sequence_logps(model, batch: dict, chunk: int = 256, kernels=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps (B,), tokens (B,)): per row, the summed log-probability of its label tokens (labels != -100,
    position t predicting labels[t + 1]) and how many there are.

    Through the chunked head (tunelab.train.loss.linear_log_probs: no (B, T, V) logits, the family's logits
    transform inside, the last-layer shortcut where the family allows it); for train.kernels=off or a family
    not in the table, from the model's own logits. float32 or wider (half-precision logits are upcast).
    """
    if kernels is None:
        from tunelab.accel.kernels import choose

        kernels = choose(model, "auto", batch["input_ids"].device)
    targets = batch["labels"][:, 1:]  # (B, T-1)
    B = targets.shape[0]
    tokens = (targets != IGNORE).sum(1)
    if not kernels.chunked_head:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       position_ids=batch.get("position_ids"), use_cache=False).logits[:, :-1]
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        keep = targets != IGNORE
        per_token = logits.log_softmax(-1).gather(2, targets.clamp_min(0)[..., None]).squeeze(2)  # (B, T-1)
        return (per_token * keep).sum(1), tokens
    _, h, y, row = label_hidden(model, batch, kernels)
    per_token = linear_log_probs(h, model.get_output_embeddings(), y, chunk, logits=kernels.logits)  # (N,)
    return per_token.new_zeros(B).index_add(0, row, per_token), tokens


def _pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, **extra) -> dict:
    """TRL's logged numbers, batch means (detached floats)."""
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    out = {"rewards/chosen": c.mean(), "rewards/rejected": r.mean(), "rewards/margins": (c - r).mean(),
           "rewards/accuracies": (c > r).float().mean(), "logps/chosen": chosen_logps.detach().mean(),
           "logps/rejected": rejected_logps.detach().mean(), **extra}
    return {k: float(v) for k, v in out.items()}


def _smoothed_sigmoid(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - e) log sigmoid(x) - e log sigmoid(-x) per pair: the logistic loss with the preference label
    flipped with probability e (conservative DPO, Mitchell 2023, "A note on DPO with noisy preferences")."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float = 0.1,
             label_smoothing: float = 0.0):
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290, eq. 7), sigmoid loss:
    mean -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), with conservative label smoothing e
    (`_smoothed_sigmoid`; e = 0 is the paper's loss). Rewards are beta * (pi - ref)."""
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    loss = _smoothed_sigmoid(chosen_rewards - rejected_rewards, label_smoothing).mean()
    return loss, _pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)


def ipo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_tokens,
             rejected_tokens, beta: float = 0.1):
    """Identity Preference Optimization (Azar et al. 2023, arXiv:2310.12036, eq. 17, tau = beta):
    mean (h - 1 / (2 beta))^2, h the difference of the log-ratios each divided by its response's token
    count (the per-token form TRL uses and the IPO authors confirmed; without it the square grows with
    length). Rewards are beta * (pi - ref), unnormalised, as TRL logs them."""
    h = ((chosen_logps - ref_chosen_logps) / chosen_tokens.clamp_min(1)
         - (rejected_logps - ref_rejected_logps) / rejected_tokens.clamp_min(1))
    loss = ((h - 1 / (2 * beta)) ** 2).mean()
    return loss, _pair_metrics(beta * (chosen_logps - ref_chosen_logps), beta * (rejected_logps - ref_rejected_logps),
                               chosen_logps, rejected_logps)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))")."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, beta: float = 0.1):
    """Odds Ratio Preference Optimization (Hong et al. 2024, arXiv:2403.07691, eqs. 6-7), no reference model:
    NLL of the chosen responses (mean over their tokens) - beta * mean log sigmoid(log odds ratio), with
    length-normalised log-probs p = logps / tokens and odds(y) = p / (1 - p) in log space:
    log odds ratio = (p_c - p_r) - (log(1 - e^p_c) - log(1 - e^p_r)). beta is the paper's lambda.
    The NLL covers the chosen responses' tokens (as tunelab's SFT; TRL's ORPOTrainer also counts the prompt).
    Rewards are beta * p."""
    pc, pr = chosen_logps / chosen_tokens.clamp_min(1), rejected_logps / rejected_tokens.clamp_min(1)
    log_odds = (pc - pr) - (_log1mexp(pc) - _log1mexp(pr))
    ratio = F.logsigmoid(log_odds)
    nll = -chosen_logps.sum() / chosen_tokens.sum().clamp_min(1)
    loss = nll - beta * ratio.mean()
    return loss, _pair_metrics(beta * pc, beta * pr, pc, pr, nll_loss=nll.detach(), log_odds_ratio=ratio.detach().mean(),
                               log_odds_chosen=log_odds.detach().mean())


def simpo_loss(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, beta: float = 2.0,
               gamma: float = 0.5, label_smoothing: float = 0.0):
    """Simple Preference Optimization (Meng et al. 2024, arXiv:2405.14734, eq. 6), no reference model:
    mean -log sigmoid(beta * (p_c - p_r) - gamma), p = logps / tokens the length-normalised log-prob and
    gamma the target reward margin (with `_smoothed_sigmoid`'s label smoothing). Rewards are beta * p."""
    pc, pr = chosen_logps / chosen_tokens.clamp_min(1), rejected_logps / rejected_tokens.clamp_min(1)
    loss = _smoothed_sigmoid(beta * (pc - pr) - gamma, label_smoothing).mean()
    return loss, _pair_metrics(beta * pc, beta * pr, pc, pr)


def kl_mismatch(n: int) -> list[int]:
    """For KTO's KL estimate: the completion paired with each of n prompts, TRL's cycle by one within a batch
    (prompt i with completion i - 1, prompt 0 with the last), so every pair is a mismatched one."""
    return [n - 1] + list(range(n - 1)) if n else []


def kto_loss(logps, ref_logps, desirable, kl_logps, ref_kl_logps, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 7), unpaired responses:
    z0 = max(0, mean(kl_logps - ref_kl_logps)), the KL reference point estimated on mismatched
    prompt/completion pairs (`kl_mismatch`) and not backpropagated; r = pi - ref; a desirable response
    loses w_d (1 - sigmoid(beta (r - z0))), an undesirable one w_u (1 - sigmoid(beta (z0 - r))); the loss
    is the mean over responses. desirable: (n,) bool. Rewards are beta * r; rewards/margins is the
    difference of the two means (TRL's), logged only when the batch holds both kinds."""
    kl = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    r = logps - ref_logps
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - r))))
    rewards = beta * r.detach()
    metrics = {"kl": float(kl)}
    for name, sel in (("chosen", desirable), ("rejected", ~desirable)):
        if sel.any():
            metrics[f"rewards/{name}"] = float(rewards[sel].mean())
            metrics[f"logps/{name}"] = float(logps.detach()[sel].mean())
    if desirable.any() and (~desirable).any():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses.mean(), metrics

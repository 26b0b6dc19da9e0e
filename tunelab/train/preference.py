"""Preference objectives on per-sequence log-probabilities, and those log-probabilities from the model.

Every objective is a small function of tensors of shape (P,): `logps` are sums of log p(token) over a
response's tokens (labels != -100), `tokens` their counts. Each returns (loss, metrics): the scalar loss
the loop backpropagates, and the detached numbers people log (TRL's names: rewards/chosen,
rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen, logps/rejected, and the objective's
own). tests/train/test_preference.py checks losses, rewards and gradients against TRL 1.16's own code.

A batch of pairs is laid out [chosen_0 .. chosen_{P-1}, rejected_0 .. rejected_{P-1}] (TRL's layout), so
one forward computes both halves: `sequence_logps` then `.chunk(2)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from tunelab.train.loss import IGNORE, label_hidden, linear_log_probs

OBJECTIVES = ("dpo", "ipo", "orpo", "simpo", "kto")
NEEDS_REFERENCE = ("dpo", "ipo", "kto")


def sequence_logps(model, batch: dict, chunk: int = 256, kernels=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps (B,), tokens (B,)): per row, the summed log-probability of its label tokens (labels != -100,
    position t predicting labels[t + 1]) and how many there are; a shared-prompt batch (collate_shared) of P
    rows gives one per response, (2P,).

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
        if "sequence" in batch:
            raise ValueError("a shared-prompt batch needs the chunked head: collate pairs with collate_pairs for "
                             "train.kernels=off or a family outside the table")
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       position_ids=batch.get("position_ids"), use_cache=False).logits[:, :-1]
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        keep = targets != IGNORE
        per_token = logits.log_softmax(-1).gather(2, targets.clamp_min(0)[..., None]).squeeze(2)  # (B, T-1)
        return (per_token * keep).sum(1), tokens
    _, h, y, row = label_hidden(model, batch, kernels)
    per_token = linear_log_probs(h, model.get_output_embeddings(), y, chunk, logits=kernels.logits)  # (N,)
    if "sequence" in batch:  # the shared prompt (collate_shared): P rows hold 2P responses
        row = batch["sequence"][:, 1:][targets != IGNORE]  # (N,) in label_hidden's row-major order
        B, tokens = 2 * B, torch.bincount(row, minlength=2 * B)
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


def kl_partners(n: int, batch_size: int) -> list[int]:
    """KTO with precomputed reference log-probs: each of n rows' fixed KL partner (the row whose completion
    follows its prompt), kl_mismatch within consecutive chunks of batch_size rows in data order: TRL's
    KTOTrainer builds its KL completions this way when it prepares the data. (Without precompute_ref the
    partners are drawn from each batch instead, kl_mismatch over the batch's rows.)"""
    return [start + j for start in range(0, n, batch_size) for j in kl_mismatch(min(batch_size, n - start))]


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


# --- In the training loop: batches, the reference model, the Objective (tunelab.train.loss.Objective).

def _split_pair(row: dict) -> tuple[dict, dict]:
    """A pair row (tunelab.data.preference.row) -> (chosen, rejected): rejected begins where position_ids
    restart at 0."""
    pos = row["position_ids"]
    k = next(i for i in range(1, len(pos)) if pos[i] == 0)
    part = lambda a, b: {f: row[f][a:b] for f in ("input_ids", "labels", "position_ids")}
    return part(0, k), part(k, len(pos))


def _with_completion(prompt_row: dict, completion_row: dict) -> dict:
    """KTO's mismatched sequence: the prompt of one row (its tokens before the first label) followed by the
    completion (labelled tokens) of another."""
    p = next(i for i, y in enumerate(prompt_row["labels"]) if y != IGNORE)
    c = next(i for i, y in enumerate(completion_row["labels"]) if y != IGNORE)
    ids = prompt_row["input_ids"][:p] + completion_row["input_ids"][c:]
    return {"input_ids": ids, "labels": [IGNORE] * p + completion_row["labels"][c:], "position_ids": list(range(len(ids)))}


def collate_pairs(rows: list[dict], pad_id: int, device) -> dict:
    """P pair rows -> one batch of 2P sequences [chosen_0 .. chosen_{P-1}, rejected_0 ..] (one forward for
    both halves), right-padded as the loop's collate does; `ref_logps` (2P,) when the rows carry
    precomputed reference log-probs ("ref": [chosen, rejected])."""
    from tunelab.train.loop import collate

    halves = [_split_pair(r) for r in rows]
    batch = collate([c for c, _ in halves] + [r for _, r in halves], pad_id, device)
    if "ref" in rows[0]:
        batch["ref_logps"] = torch.tensor([r["ref"][0] for r in rows] + [r["ref"][1] for r in rows], device=device)
    return batch


def collate_shared(rows: list[dict], pad_id: int, device) -> dict:
    """P pair rows -> P sequences, each holding its prompt once and both responses, with a 4-D attention mask
    (the speed-up `shared_prompt`, tunelab/accel/shared_prompt.py; sequence_logps reads its "sequence");
    collate_pairs' batch when a pair's halves do not share their prompt. Only for a model whose Kernels say
    shared_prompt."""
    from tunelab.accel.kernels import shared_prompt_collate

    batch = shared_prompt_collate([_split_pair(r) for r in rows], pad_id, device)
    if batch is None:
        return collate_pairs(rows, pad_id, device)
    if "ref" in rows[0]:
        batch["ref_logps"] = torch.tensor([r["ref"][0] for r in rows] + [r["ref"][1] for r in rows], device=device)
    return batch


def collate_unpaired(rows: list[dict], pad_id: int, device) -> dict:
    """n KTO rows -> the batch of their sequences, `desirable` (n,) and `kl`: the batch of the mismatched
    sequences (prompt i with completion kl_mismatch(n)[i], TRL's pairing, or each row's fixed "kl_row") for the
    KL estimate; `ref_logps`, `ref_kl_logps` (n,) when the rows carry precomputed ones ("ref")."""
    from tunelab.train.loop import collate

    batch = collate(rows, pad_id, device)
    batch["desirable"] = torch.tensor([bool(r["desirable"]) for r in rows], device=device)
    if "kl_row" in rows[0]:  # a fixed partner per row (kl_partners: precompute_ref)
        kl_rows = [r["kl_row"] for r in rows]
    else:
        kl_rows = [_with_completion(r, rows[j]) for r, j in zip(rows, kl_mismatch(len(rows)))]
    batch["kl"] = collate(kl_rows, pad_id, device)
    if "ref" in rows[0]:  # precomputed: [response, KL sequence]
        batch["ref_logps"], batch["ref_kl_logps"] = torch.tensor([r["ref"] for r in rows], device=device).unbind(1)
    return batch


def adapter_off_logps(model, batch: dict, chunk: int = 256, kernels=None) -> torch.Tensor:
    """The reference of lora/qlora: the same model with every adapter switched off (tunelab.lora.
    disable_adapters), no gradient; no second copy of the weights."""
    from tunelab.lora import disable_adapters

    with torch.no_grad(), disable_adapters(model):
        return sequence_logps(model, batch, chunk, kernels)[0]


def frozen_copy_logps(ref_model):
    """The reference of full/freeze with train.ref_model_copy: a frozen copy taken before training."""
    def logps(model, batch: dict, chunk: int = 256, kernels=None) -> torch.Tensor:
        with torch.no_grad():
            return sequence_logps(ref_model, batch, chunk, kernels)[0]
    return logps


class PreferenceObjective:
    """One preference objective as the loop's Objective: `loss_sum` returns the batch's mean loss times its
    number of pairs (KTO: responses), `label_tokens` that number, so the loop's sum / global count is the
    mean over the global batch. `reference(model, batch, chunk, kernels) -> logps` (DPO, IPO, KTO) is used
    where the batch carries no precomputed `ref_logps`. The objective's numbers (rewards, margins, ...)
    are averaged over a step's micro-batches (`step_metrics`) and over an evaluation (`metrics`, eval_ names)."""

    def __init__(self, name: str, beta: float | None = None, reference=None, label_smoothing: float | None = None,
                 simpo_gamma: float | None = None, kto_desirable_weight: float | None = None,
                 kto_undesirable_weight: float | None = None, share_prompt: bool = False):
        if name not in OBJECTIVES:
            raise ValueError(f"unknown preference objective {name!r}: one of {', '.join(OBJECTIVES)}")
        self.name, self.reference = name, reference
        self.beta = beta if beta is not None else (2.0 if name == "simpo" else 0.1)  # TRL's defaults
        self.label_smoothing, self.gamma = label_smoothing or 0.0, 0.5 if simpo_gamma is None else simpo_gamma
        self.weights = (kto_desirable_weight or 1.0, kto_undesirable_weight or 1.0)
        # share_prompt (Kernels.shared_prompt): a pair's prompt runs once for both responses
        self.collate = collate_unpaired if name == "kto" else collate_shared if share_prompt else collate_pairs
        self._seen = {True: [], False: []}  # metrics of the micro-batches since the last read, by model.training

    @classmethod
    def from_config(cls, train_cfg, reference=None, share_prompt: bool = False) -> PreferenceObjective:
        t = train_cfg
        return cls(t.objective, t.beta, reference, t.label_smoothing, t.simpo_gamma, t.kto_desirable_weight,
                   t.kto_undesirable_weight, share_prompt)

    def label_tokens(self, labels: torch.Tensor) -> int:
        return labels.shape[0] if self.name == "kto" else labels.shape[0] // 2

    def _ref(self, model, batch, key: str, chunk, kernels):
        if key in batch:
            return batch[key]
        if self.reference is None:
            raise ValueError(f"objective {self.name} needs reference log-probs: give a reference or precompute them")
        return self.reference(model, batch if key == "ref_logps" else batch["kl"], chunk, kernels)

    def loss_sum(self, model, batch: dict, chunk: int = 256, kernels=None) -> tuple[torch.Tensor, int]:
        logps, tokens = sequence_logps(model, batch, chunk, kernels)  # (2P,) or KTO's (n,)
        if self.name == "kto":
            with torch.no_grad():  # the KL estimate is not backpropagated (TRL computes it without gradient)
                kl_logps = sequence_logps(model, batch["kl"], chunk, kernels)[0]
            loss, metrics = kto_loss(logps, self._ref(model, batch, "ref_logps", chunk, kernels), batch["desirable"],
                                     kl_logps, self._ref(model, batch, "ref_kl_logps", chunk, kernels), self.beta,
                                     *self.weights)
        else:
            (pc, pr), (tc, tr) = logps.chunk(2), tokens.chunk(2)
            if self.name in ("dpo", "ipo"):
                rc, rr = self._ref(model, batch, "ref_logps", chunk, kernels).chunk(2)
            if self.name == "dpo":
                loss, metrics = dpo_loss(pc, pr, rc, rr, self.beta, self.label_smoothing)
            elif self.name == "ipo":
                loss, metrics = ipo_loss(pc, pr, rc, rr, tc, tr, self.beta)
            elif self.name == "orpo":
                loss, metrics = orpo_loss(pc, pr, tc, tr, self.beta)
            else:
                loss, metrics = simpo_loss(pc, pr, tc, tr, self.beta, self.gamma, self.label_smoothing)
        self._seen[model.training].append(metrics)
        n = self.label_tokens(batch["labels"])
        return loss * n, n

    def _drain(self, training: bool) -> dict:
        seen, self._seen[training] = self._seen[training], []
        keys = dict.fromkeys(k for m in seen for k in m)  # KTO: a key only where its micro-batch had that kind
        return {k: sum(m[k] for m in seen if k in m) / sum(1 for m in seen if k in m) for k in keys}

    def step_metrics(self) -> dict:
        return self._drain(True)

    def metrics(self, model) -> dict:
        return {f"eval_{k}": v for k, v in self._drain(False).items()}


class WithRef(Sequence):
    """Rows with their precomputed reference log-probs, rows[i] plus "ref": [chosen, rejected] (KTO: [response,
    KL sequence]), and for KTO the fixed KL sequence "kl_row": row i's prompt with the completion of row
    partners[i] (kl_partners). ref None: no "ref"."""

    def __init__(self, rows, ref, partners: list[int] | None = None):
        self.rows, self.ref, self.partners = rows, ref, partners

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = dict(self.rows[i])
        if self.ref is not None:
            row["ref"] = [float(x) for x in self.ref[i]]
        if self.partners is not None:
            row["kl_row"] = _with_completion(row, self.rows[self.partners[i]])
        return row


@torch.no_grad()
def reference_table(rows, reference, model, batch_size: int, pad_id: int, device, chunk: int, kernels,
                    collate=collate_pairs):
    """(len(rows), 2) float32 numpy: every row's reference log-probs, [chosen, rejected] of a pair row
    (collate_pairs) or [response, KL sequence] of a KTO row with its "kl_row" (collate_unpaired), in batches
    of batch_size rows under the loop's autocast (so they equal what the loop would compute)."""
    import numpy as np

    from tunelab.train.loop import _autocast

    out = np.zeros((len(rows), 2), dtype=np.float32)
    for i in range(0, len(rows), batch_size):
        part = rows[i : i + batch_size]
        with _autocast(device):
            batch = collate(part, pad_id, device)
            if "kl" in batch:  # KTO: (n, 2) [response, KL sequence]
                logps = torch.stack([reference(model, batch, chunk, kernels), reference(model, batch["kl"], chunk, kernels)], 1)
            else:  # pairs: (2P,) chosen then rejected -> (P, 2)
                logps = reference(model, batch, chunk, kernels).view(2, -1).t()
        out[i : i + len(part)] = logps.float().cpu().numpy()
    return out


def precomputed(folder: Path, key: str, splits: dict, compute) -> dict:
    """{split: table} read from `folder` (reference_logps/ in the run folder) when its key.txt equals `key`
    (the prepared data's and the model's fingerprint), else computed with compute(rows) and written there."""
    import numpy as np

    folder = Path(folder)
    if (folder / "key.txt").is_file() and (folder / "key.txt").read_text() == key and all(
            (folder / f"{s}.npy").is_file() for s in splits):
        print(f"tunelab: reusing the reference log-probs in {folder}")
        return {s: np.load(folder / f"{s}.npy") for s in splits}
    print(f"tunelab: computing the reference log-probs once ({', '.join(f'{len(r)} {s}' for s, r in splits.items())} "
          f"pairs) into {folder}")
    tables = {s: compute(rows) for s, rows in splits.items()}
    folder.mkdir(parents=True, exist_ok=True)
    for s, t in tables.items():
        np.save(folder / f"{s}.npy", t, allow_pickle=False)
    (folder / "key.txt").write_text(key)  # last: a crash before it leaves no matching key
    return tables


def setup(cfg, model, tok, kernels, out: Path, train_set, eval_set, device):
    """The run's preference objective (cfg a RunConfig, model prepared and on its device) and its rows:
    the reference is the adapter switched off (lora/qlora), a frozen copy (train.ref_model_copy), or
    precomputed into out/reference_logps (train.precompute_ref, the rows then carry it)."""
    import copy
    import hashlib
    import json

    t = cfg.train
    share = kernels.shared_prompt
    if t.objective not in NEEDS_REFERENCE:
        return PreferenceObjective.from_config(t, share_prompt=share), train_set, eval_set
    if t.ref_model_copy:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        reference = frozen_copy_logps(ref_model)
    elif cfg.method in ("lora", "qlora"):
        reference = adapter_off_logps
    else:
        reference = lambda m, b, c, k: sequence_logps(m, b, c, k)[0]  # precomputed from the weights before training
    if not t.precompute_ref:
        return PreferenceObjective.from_config(t, reference, share), train_set, eval_set
    from tunelab.data import prepared

    key = hashlib.sha256(json.dumps([prepared.fingerprint(cfg.data, tok, t.seq_len, t.seed),
                                     cfg.model.model_dump(mode="json"), cfg.method, cfg.quant.model_dump(mode="json"),
                                     t.batch_size], sort_keys=True).encode()).hexdigest()
    # KTO: each row's KL partner is fixed (kl_partners, TRL's), so its KL sequence's reference is known now
    kto = t.objective == "kto"
    partners = {s: kl_partners(len(rows), t.batch_size) if kto else None
                for s, rows in (("train", train_set), ("eval", eval_set))}
    was = model.training
    model.eval()
    tables = precomputed(out / "reference_logps", key, {"train": WithRef(train_set, None, partners["train"]),
                                                         "eval": WithRef(eval_set, None, partners["eval"])},
                         lambda rows: reference_table(rows, reference, model, t.batch_size, tok.pad_token_id, device,
                                                      t.loss_chunk_tokens, kernels,
                                                      collate_unpaired if kto else collate_pairs))
    model.train(was)
    return (PreferenceObjective.from_config(t, share_prompt=share), WithRef(train_set, tables["train"], partners["train"]),
            WithRef(eval_set, tables["eval"], partners["eval"]))

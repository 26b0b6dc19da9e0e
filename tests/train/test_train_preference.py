"""Preference objectives in the training loop and in `tunelab train`: parity of the loop's first step with
TRL 1.16's loss code, the reference model, a run whose margins rise, resume, and the config's checks."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.tiny_models import make_tiny_llama
from tests.support.tiny_run import make_workspace
from tests.train.test_preference import TOL, _LogProbTable, _reference_logps, _rows, _trl, _trl_with_forward
from tunelab.cli import main
from tunelab.config import TrainConfig, load_config
from tunelab.data import preference as data_pref
from tunelab.errors import ConfigError
from tunelab.lora import LoraConfig, apply_lora, lora_param_groups
from tunelab.train import preference as pref
from tunelab.train.loop import collate, train_loop

ROOT = Path(__file__).resolve().parents[2]
RECORDS = [
    {"prompt": "Reverse: alpha beta gamma", "chosen": "gamma beta alpha", "rejected": "alpha gamma beta"},
    {"prompt": "Reverse: delta eta", "chosen": "eta delta", "rejected": "I don't know."},
    {"prompt": "What is `json.dumps`?", "chosen": "Serialize obj to a JSON formatted str.", "rejected": "A sorting routine."},
    {"prompt": "Say hi", "chosen": "hi", "rejected": "Hello there, how may I help you today with anything at all?"},
    {"prompt": "Reverse: sigma omega iota kappa", "chosen": "kappa iota omega sigma", "rejected": "omega"},
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("pref"))


@pytest.fixture(scope="module")
def tok(workspace):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(workspace / "model")


def _policy_and_base(seed: int = 1):
    """A tiny random Llama with LoRA whose B is random (so policy != reference at step 1), and a separate
    frozen copy of its base taken before the adapter went on. KTO tests use seed 9: its KL estimate on the
    tests' batch is above 0, so the clamp at 0 does not hide the KL sequences' log-probs."""
    model = make_tiny_llama().train()
    base = copy.deepcopy(model).requires_grad_(False)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return model, base


def _loop_first_loss(model, rows, objective, tmp_path) -> tuple[float, dict]:
    """The loss and metrics tunelab's loop logs for step 1, one batch of all rows (lr is irrelevant to it)."""
    cfg = TrainConfig(batch_size=len(rows), max_steps=1, lr=1e-3, device="cpu", max_grad_norm=None, save_every=0)
    train_loop(model, rows, [], cfg, tmp_path, param_groups=lora_param_groups(model, 1e-3), pad_id=0,
               progress=False, objective=objective)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    return record["loss"], record


def _full_logits_logps(model, seqs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label log-probs and token counts of each sequence from the model's own full logits
    (test_preference's reference), no gradient."""
    batch = collate(seqs, 0, "cpu")
    batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"]))
    with torch.no_grad():
        return _reference_logps(model, batch), (batch["labels"][:, 1:] != -100).sum(1).float()


@pytest.mark.parametrize("share", [False, True], ids=["two-sequences", "shared-prompt"])
@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_loop_first_step_equals_trl(tok, tmp_path, objective, share):
    """The loop's step-1 loss (chunked head, reference = adapter off) equals TRL's DPOTrainer._compute_loss /
    ORPOTrainer.get_batch_loss_metrics on log-probs from the model's own full logits, the reference from a
    separate frozen base copy; 1e-5 relative (float32). ORPO: TRL given the NLL of the chosen responses.
    With each pair as two sequences and with the shared prompt (one sequence per pair, policy and reference)."""
    from trl import DPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    model, base = _policy_and_base()
    rows = [data_pref.row(data_pref.encode_pair(r, tok, 64)) for r in RECORDS]
    halves = [pref._split_pair(r) for r in rows]
    chosen, rejected = [c for c, _ in halves], [r for _, r in halves]
    logps, tokens = _full_logits_logps(model, chosen + rejected)  # (2P,): chosen then rejected
    P = len(rows)
    reference = pref.adapter_off_logps if objective == "dpo" else None
    from tunelab.accel.kernels import choose

    assert choose(model, "auto", "cpu").shared_prompt  # the tiny Llama takes the shared layout where asked
    objective_ = pref.PreferenceObjective(objective, 0.2, reference, share_prompt=share)
    assert ("sequence" in objective_.collate(rows, 0, "cpu")) == share
    got, record = _loop_first_loss(model, rows, objective_, tmp_path)
    if objective == "dpo":
        ref, _ = _full_logits_logps(base, chosen + rejected)
        table = _LogProbTable(logps).train()
        ids, mask = _rows(range(2 * P), tokens)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
                  "ref_chosen_logps": ref[:P], "ref_rejected_logps": ref[P:]}
        from types import SimpleNamespace

        trainer = _trl(DPOTrainer, model=table, ref_model=None, precompute_ref_logps=True, ld_alpha=None,
                       f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0],
                       use_weighting=False, beta=0.2, label_smoothing=0.0,
                       args=SimpleNamespace(gradient_checkpointing_kwargs=None))
        want = trainer._compute_loss(table, inputs, return_outputs=False)
    else:
        pair_logps, pair_tokens = logps.view(2, P), tokens.view(2, P)
        nll = -pair_logps[0].sum() / pair_tokens[0].sum()
        want, _ = _trl_with_forward(_trl(ORPOTrainer, beta=0.2), pair_logps, pair_tokens, nll)
    assert abs(float(want) - 0.6931) > 1e-3  # policy and reference differ: not the trivial ln 2
    torch.testing.assert_close(torch.tensor(got), want.detach().double(), **TOL, check_dtype=False)
    assert {"rewards/chosen", "rewards/margins", "rewards/accuracies"} <= record.keys()


def _trl_kto_loss(model, base, batch_rows, kl_rows):
    """TRL's KTOTrainer._compute_loss (beta 0.2, undesirable weight 1.5) on `batch_rows` and their KL sequences
    `kl_rows`, fed with full-logits log-probs of `model` and reference log-probs of `base`."""
    from types import SimpleNamespace

    from trl import KTOTrainer

    n = len(batch_rows)
    logps, tokens = _full_logits_logps(model, batch_rows)
    kl_logps, _ = _full_logits_logps(model, kl_rows)
    ref, _ = _full_logits_logps(base, batch_rows)
    ref_kl, _ = _full_logits_logps(base, kl_rows)
    table = _LogProbTable(torch.cat([logps, kl_logps])).train()
    ids, mask = _rows(range(n), tokens)
    kl_ids, kl_mask = _rows(range(n, 2 * n), tokens)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(ids), "KL_completion_mask": kl_mask,
              "label": torch.tensor([r["desirable"] for r in batch_rows]), "ref_logps": ref, "ref_KL_logps": ref_kl}
    trainer = _trl(KTOTrainer, model=table, ref_model=None, precompute_ref_logps=True, calculate_KL=True,
                   loss_type="kto", beta=0.2, desirable_weight=1.0, undesirable_weight=1.5,
                   args=SimpleNamespace(gradient_checkpointing_kwargs=None))
    return trainer._compute_loss(table, inputs, return_outputs=False)


def test_loop_first_step_kto_equals_trl(tok, tmp_path):
    """KTO: the loop's step-1 loss equals TRL's KTOTrainer._compute_loss with the KL sequences built as TRL
    builds them (prompt i with the completion before it in the batch, kl_mismatch) from the batch the loop
    draws at step 1 (the permutation of tunelab.train.loop's `order`, seed 0, epoch 0)."""


    model, base = _policy_and_base(seed=9)
    rows = _kto_rows(tok)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    batch_rows = [rows[i] for i in order]
    kl_rows = [pref._with_completion(r, batch_rows[j]) for r, j in zip(batch_rows, pref.kl_mismatch(len(rows)))]
    assert kl_rows[1]["input_ids"][-3:] == batch_rows[0]["input_ids"][-3:]  # row 1's KL completion is row 0's
    want = _trl_kto_loss(model, base, batch_rows, kl_rows)
    objective = pref.PreferenceObjective("kto", 0.2, pref.adapter_off_logps, kto_undesirable_weight=1.5)
    got, record = _loop_first_loss(model, rows, objective, tmp_path)
    torch.testing.assert_close(torch.tensor(got), want.detach().double(), **TOL, check_dtype=False)
    assert record["kl"] > 0 and "rewards/margins" in record


def _kto_rows(tok) -> list[dict]:
    records = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in RECORDS
               for k in ("chosen", "rejected")][:7]
    return [data_pref.row(data_pref.encode_unpaired(r, tok, 64)) for r in records]


def _precomputed_kto_rows(model, rows, batch_size: int):
    """What train.precompute_ref gives KTO (tunelab.train.preference.setup): rows with their fixed KL partner
    (kl_partners) and the adapter-off reference of the response and of its KL sequence."""
    partners = pref.kl_partners(len(rows), batch_size)
    table = pref.reference_table(pref.WithRef(rows, None, partners), pref.adapter_off_logps, model, batch_size, 0,
                                 torch.device("cpu"), 8, None, pref.collate_unpaired)
    return pref.WithRef(rows, table, partners)


def test_kto_precomputed_reference_equals_the_reference_in_the_loop(tok):
    """KTO with precomputed reference log-probs: loss, metrics and LoRA gradients of a batch equal those with
    the reference (adapter off) computed during the step on the same fixed KL pairs (float32, 1e-5)."""
    model, _ = _policy_and_base(seed=9)
    rows = _kto_rows(tok)
    with_ref = _precomputed_kto_rows(model, rows, 3)
    assert with_ref[1]["kl_row"]["input_ids"][-3:] == rows[0]["input_ids"][-3:]  # partners within chunks of 3
    assert with_ref[3]["kl_row"]["input_ids"][-3:] == rows[5]["input_ids"][-3:]
    order = [4, 0, 6, 2, 5]  # a batch as the loop draws it: not the chunks the partners were fixed in
    results = []
    for reference, batch_rows in ((pref.adapter_off_logps, [pref.WithRef(rows, None, with_ref.partners)[i] for i in order]),
                                  (None, [with_ref[i] for i in order])):
        objective = pref.PreferenceObjective("kto", 0.2, reference, kto_undesirable_weight=1.5)
        batch = objective.collate(batch_rows, 0, "cpu")
        assert ("ref_logps" in batch) == (reference is None)
        model.zero_grad()
        loss, n = objective.loss_sum(model, batch, 8)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), objective.step_metrics(), grads, batch))
    (live, live_metrics, live_grads, live_batch), (pre, pre_metrics, pre_grads, pre_batch) = results
    # the stored references are the live ones (also of the KL sequences, whose effect the KL's clamp at 0 may hide)
    torch.testing.assert_close(pre_batch["ref_logps"], pref.adapter_off_logps(model, live_batch, 8), **TOL)
    torch.testing.assert_close(pre_batch["ref_kl_logps"], pref.adapter_off_logps(model, live_batch["kl"], 8), **TOL)
    torch.testing.assert_close(pre, live, **TOL)
    assert pre_metrics == pytest.approx(live_metrics, rel=1e-5, abs=1e-7) and live_metrics["kl"] > 0
    assert live_grads.keys() == pre_grads.keys() and any(g.abs().max() > 0 for g in live_grads.values())
    for k in live_grads:
        torch.testing.assert_close(pre_grads[k], live_grads[k], **TOL)


def test_loop_first_step_kto_precomputed_equals_trl(tok, tmp_path):
    """KTO with precomputed reference log-probs: the loop's step-1 loss equals TRL's KTOTrainer._compute_loss
    with TRL's precompute_ref_logps, the KL completions fixed as TRL fixes them in its data preparation
    (`[c[-1]] + c[:-1]` within consecutive chunks of its batch size, 3 here, in data order), the batch drawn by
    the loop (seed 0's permutation), the reference from a separate frozen base copy."""


    model, base = _policy_and_base(seed=9)
    rows = _kto_rows(tok)
    n = len(rows)
    completions = [r["input_ids"][next(i for i, y in enumerate(r["labels"]) if y != -100):] for r in rows]
    rotated = [x for i in range(0, n, 3) for x in [completions[i:i + 3][-1]] + completions[i:i + 3][:-1]]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    batch_rows = [rows[i] for i in order]
    kl_rows = []
    for i in order:  # TRL's KL sequence: row i's prompt, then its rotated completion
        p = next(k for k, y in enumerate(rows[i]["labels"]) if y != -100)
        ids = rows[i]["input_ids"][:p] + rotated[i]
        kl_rows.append({"input_ids": ids, "labels": [-100] * p + rotated[i], "position_ids": list(range(len(ids)))})
    want = _trl_kto_loss(model, base, batch_rows, kl_rows)
    objective = pref.PreferenceObjective("kto", 0.2, None, kto_undesirable_weight=1.5)  # no reference: precomputed only
    got, record = _loop_first_loss(model, list(_precomputed_kto_rows(model, rows, 3)), objective, tmp_path)
    torch.testing.assert_close(torch.tensor(got), want.detach().double(), **TOL, check_dtype=False)
    assert record["kl"] > 0 and "rewards/margins" in record


@pytest.mark.parametrize("kernels", ["auto", "off"])
def test_adapter_off_reference_equals_a_frozen_base_copy(tok, kernels):
    """The lora reference (the same model, adapters switched off) gives exactly (bitwise) the log-probs of a
    separate frozen copy of the base model, through the chunked head and through the model's own logits."""
    from tunelab.accel.kernels import choose

    model, base = _policy_and_base()
    k = choose(model, kernels, "cpu")
    batch = pref.collate_pairs([data_pref.row(data_pref.encode_pair(r, tok, 64)) for r in RECORDS], 0, "cpu")
    got = pref.adapter_off_logps(model, batch, 8, k)
    want = pref.sequence_logps(base, batch, 8, k)[0]
    assert torch.equal(got, want)
    assert not torch.equal(pref.sequence_logps(model, batch, 8, k)[0], want)  # the adapter is back on


def _config(ws: Path, out: Path, objective: str = "dpo", steps: int = 16, **train) -> Path:
    import yaml

    cfg = {"method": "lora", "model": {"source": str(ws / "model")}, "lora": {"r": 4, "alpha": 8},
           "data": {"task": "preference", "sources": [{"name": "pref", "path": "local:preference" + (
                        "-unpaired" if objective == "kto" else "")}],
                    "preference": "unpaired" if objective == "kto" else "pairs", "eval_fraction": 0.05},
           "train": {"objective": objective, "lr": 2e-2, "batch_size": 4, "max_steps": steps, "seq_len": 64,
                     "warmup_steps": 1, "eval_batches": 2, **train},
           "output_dir": str(out)}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_dpo_run_raises_the_reward_margin(workspace, tmp_path):
    """`tunelab train` with train.objective=dpo on the builtin local:preference pairs (seed 0): step 1 is
    ln 2 with zero margins (policy = reference); over 16 steps the training margins and accuracies rise, and
    the held-out pairs' margin is positive at the end."""
    out = tmp_path / "dpo"
    assert main(["train", str(_config(workspace, out)), "--no-progress"]) == 0
    rows = [r for r in _records(out) if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5) and rows[0]["rewards/margins"] == 0
    last = rows[-6:]
    assert sum(r["rewards/margins"] for r in last) / len(last) > 0.2
    assert sum(r["rewards/accuracies"] for r in last) / len(last) > 0.7
    assert rows[-1]["eval_rewards/margins"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_resume_equals_uninterrupted_with_precomputed_reference(workspace, tmp_path, objective):
    """A run killed after step 3 (TUNELAB_FAULT) and resumed logs the same losses and rewards as an
    uninterrupted one; its precomputed reference log-probs are read back, not recomputed, on resume; and (DPO)
    precomputed equals the reference computed in the loop (the same run without precompute_ref). KTO's run
    without precompute_ref draws other KL pairs (from each batch), so there the two references are compared on
    the same pairs by test_kto_precomputed_reference_equals_the_reference_in_the_loop."""
    steps = 6
    full, cut, live = tmp_path / "full", tmp_path / "cut", tmp_path / "live"
    assert main(["train", str(_config(workspace, full, objective, steps=steps, precompute_ref=True, save_every=1)),
                 "--no-progress"]) == 0
    cfg = _config(workspace, cut, objective, steps=steps, precompute_ref=True, save_every=1)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TUNELAB_FAULT": "step:3"}
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg), "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and (cut / "checkpoints" / "step-00000002").is_dir()
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg), "resume=true", "--no-progress"],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reusing the reference log-probs" in proc.stdout
    if objective == "dpo":
        assert main(["train", str(_config(workspace, live, steps=steps)), "--no-progress"]) == 0
    keys = ("loss", "rewards/chosen", "rewards/rejected") + (("rewards/margins",) if objective == "dpo" else ("kl",))
    want = [r.get(k) for r in _records(full) if "loss" in r for k in keys]  # KTO: a kind may miss from a batch
    assert len(want) == steps * len(keys) and sum(x is not None for x in want) >= steps * 2
    for other in (cut, live) if objective == "dpo" else (cut,):
        got = [r.get(k) for r in _records(other) if "loss" in r for k in keys]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), other.name


@pytest.mark.parametrize("objective", ["orpo", "kto"])
def test_cli_runs_the_other_objectives(workspace, tmp_path, objective):
    out = tmp_path / objective
    assert main(["train", str(_config(workspace, out, objective, steps=2)), "--no-progress"]) == 0
    rows = [r for r in _records(out) if "loss" in r]
    assert len(rows) == 2 and all(r["loss"] == r["loss"] and "rewards/chosen" in r for r in rows)


def _base(**train):
    return {"method": "lora", "data": {"task": "preference", "sources": [{"name": "p", "path": "local:preference"}]},
            "train": {"objective": "dpo", **train}}


@pytest.mark.parametrize("change, message", [
    ({"method": "full"}, "train.precompute_ref=true (computed once"),
    ({"train": {"objective": "kto"}}, "set data.preference=unpaired"),
    ({"train": {"objective": "sft"}}, "needs a preference objective"),
    ({"data": {"task": "sft", "sources": [{"name": "p", "path": "x.jsonl"}]}}, "set data.task=preference"),
    ({"train": {"objective": "dpo", "simpo_gamma": 1.0}}, "train.simpo_gamma is for train.objective simpo"),
    ({"train": {"objective": "orpo", "precompute_ref": True}}, "has no reference model"),
    ({"train": {"objective": "dpo", "ref_model_copy": True}}, "no copy needed"),
])
def test_config_errors_name_the_fix(change, message):
    cfg = _base()
    for k, v in change.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and k != "data" else v
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, base=cfg)
    load_config(None, base=_base())  # the unchanged base is valid
    load_config(None, base={**_base(), "method": "full", "train": {"objective": "dpo", "ref_model_copy": True}})


def test_bad_preference_record_names_file_and_line(workspace, tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({**RECORDS[1], "rejected": RECORDS[1]["chosen"]}) + "\n")
    cfg = _config(workspace, tmp_path / "bad")
    text = cfg.read_text().replace("local:preference", str(bad))
    cfg.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg), "--no-progress"],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"{bad}:2" in proc.stderr and "identical" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_prepared_preference_rows_round_trip(tok, tmp_path):
    """Pair rows and KTO rows (with their `desirable` flag) read back from a prepared folder equal the built
    ones, so a resumed run trains on the same batches."""
    from tunelab.data import prepared
    from tunelab.data.config import DataConfig

    for layout, path in (("pairs", "local:preference"), ("unpaired", "local:preference-unpaired")):
        cfg = DataConfig(task="preference", preference=layout, sources=[{"name": "p", "path": path}])
        built = prepared.load_or_build(cfg, tok, 48, 0, tmp_path / layout, verbose=False)
        loaded = prepared.load_or_build(cfg, tok, 48, 0, tmp_path / layout, verbose=False)
        assert isinstance(loaded[0], prepared.Rows) and list(loaded[0]) == list(built[0])
        assert list(loaded[1]) == list(built[1]) and len(built[1]) == 20 * (1 if layout == "pairs" else 2)
        if layout == "unpaired":
            assert {r["desirable"] for r in loaded[0]} == {True, False}
        else:
            assert all(pref._split_pair(r)[1]["position_ids"][0] == 0 for r in loaded[0][:5])

"""AdamW with 8-bit moments: the code round trip, the update against torch.optim.AdamW, state bytes, and a
training run through the CLI that checkpoints and resumes with the 8-bit state."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.numerics import assert_within
from tests.support.tiny_run import losses, make_workspace, run_config
from tunelab.cli import main
from tunelab.quant import codebooks
from tunelab.train.optim8bit import MIN_SIZE, AdamW8bit, decode, encode

ROOT = Path(__file__).resolve().parents[2]


def test_codes_are_the_nearest_dynamic_values_per_block():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g) * torch.logspace(-6, 0, 1000)  # magnitudes over six decades
    x[256:512] = 0  # a zero block
    codes, absmax = encode(x)
    y = decode(codes, absmax)
    assert codes.dtype == torch.uint8 and absmax.shape == (4,)
    assert torch.equal(y[256:512], torch.zeros(256))
    # against a brute-force nearest code per element (float64)
    code = codebooks.dynamic_map().double()
    scaled = x.double() / torch.repeat_interleave(absmax.double().clamp(min=1e-38), 256)[:1000]
    nearest = (scaled[:, None] - code[None]).abs().argmin(1)
    tie = (scaled[:, None] - code[None]).abs().sort(1).values
    exact = (tie[:, 1] - tie[:, 0]) > 1e-12  # skip exact midpoints, where either neighbour is right
    assert torch.equal(codes.long()[exact], nearest[exact])


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 8))


def _train_both(opt_8bit_cls_kwargs: dict, steps: int):
    torch.manual_seed(0)
    ref, ours, init = _mlp(), _mlp(), _mlp()
    ours.load_state_dict(ref.state_dict())
    init.load_state_dict(ref.state_dict())
    x, y = torch.randn(256, 64), torch.randn(256, 8)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.01)
    opt = AdamW8bit(ours.parameters(), lr=1e-2, weight_decay=0.01, **opt_8bit_cls_kwargs)
    for _ in range(steps):
        for model, o in ((ref, opt_ref), (ours, opt)):
            o.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            o.step()
    loss = [float(torch.nn.functional.mse_loss(m(x), y)) for m in (init, ref, ours)]
    return ref, ours, init, opt, loss


def test_update_rule_is_adamw_when_moments_stay_fp32(monkeypatch):
    """With every tensor below the 8-bit size, the update is torch.optim.AdamW's to float32 rounding over 10 steps."""
    from tunelab.train import optim8bit

    monkeypatch.setattr(optim8bit, "MIN_SIZE", 10**9)
    ref, ours, *_ = _train_both({}, 10)
    # the same elementwise update in another kernel: a few roundings a step, each of them (and the next
    # step's gradient moved by them) within an ulp of the tensor's largest weight; 4 a step, 10 steps
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert_within(b, a, 4 * 10 * torch.finfo(a.dtype).eps * a.detach().abs().max(), "AdamW, fp32 moments")


def test_8bit_moments_train_as_well_as_adamw():
    """30 steps at lr 1e-2: the 8-bit run ends within 5% of AdamW's loss, and its weights within 10% of the
    distance AdamW moved them (quantized moments change the path a little, not where it goes)."""
    ref, ours, init, opt, (l0, l_ref, l_ours) = _train_both({}, 30)
    assert l_ref < 0.3 * l0 and l_ours == pytest.approx(l_ref, rel=0.05)
    for (name, a), b, c in zip(ref.named_parameters(), ours.parameters(), init.parameters()):
        assert (a - b).norm() < 0.1 * (a - c).norm(), name
    big = ours[0].weight  # 8192 elements: 8-bit state
    assert big.numel() >= MIN_SIZE and opt.state[big]["exp_avg_codes"].dtype == torch.uint8
    state_bytes = sum(t.numel() * t.element_size() for t in opt.state[big].values())
    assert state_bytes < 2.1 * big.numel() + 8  # 2 bytes + 2 x 4/256 bytes per value, + the step


def test_cli_run_killed_and_resumed_equals_an_uninterrupted_one(tmp_path):
    """Full fine-tune with adamw8bit (the embedding's moments are 8-bit); SIGKILL after step 3's optimizer
    step (TUNELAB_FAULT=step:3, checkpoint of step 2 on disk), resume: the same losses as one run."""
    ws = make_workspace(tmp_path, records=32)
    train = {"optimizer": "adamw8bit", "max_steps": 5, "save_every": 2}
    full = tmp_path / "full"
    assert main(["train", str(run_config(ws, full, method="full", train=train)), "--no-progress"]) == 0
    cut = tmp_path / "cut"
    cfg = run_config(ws, cut, method="full", train=train)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TUNELAB_FAULT": "step:3"}
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg), "--no-progress"], env=env,
                          capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    ckpt = load_file(cut / "checkpoints" / "step-00000002" / "optimizer.safetensors")
    assert ckpt["model.embed_tokens.weight::exp_avg_codes"].dtype == torch.uint8
    assert main(["train", str(cfg), "resume=true", "--no-progress"]) == 0
    assert losses(cut) == pytest.approx(losses(full), rel=1e-6, abs=1e-7)


def test_config_takes_adamw8bit_and_refuses_unknown_optimizers():
    from tunelab.config import TrainConfig

    assert TrainConfig(optimizer="adamw8bit").optimizer == "adamw8bit"
    with pytest.raises(Exception, match="optimizer"):
        TrainConfig(optimizer="adam9bit")


def test_loop_adamw_is_torchs_fused_kernel_with_the_default_update():
    """tunelab.train.loop.adamw (what `tunelab train` steps with) takes torch's fused kernel for float CPU
    parameters, given as groups or a list, and 10 of its steps equal torch's default (foreach) AdamW to
    1e-6; a parameter the fused kernel cannot take (complex) keeps the default."""
    import copy

    from tunelab.train.loop import adamw

    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    ours = copy.deepcopy(ref)
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    o_ours = adamw([{"params": list(ours.parameters())}], lr=1e-2, weight_decay=0.1)
    assert o_ours.defaults["fused"] and not o_ref.defaults["fused"]
    for _ in range(10):
        for m, o in ((ref, o_ref), (ours, o_ours)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert adamw(list(ours.parameters()), lr=1e-3).defaults["fused"]
    assert not adamw([torch.zeros(2, dtype=torch.complex64, requires_grad=True)], lr=1e-3).defaults["fused"]

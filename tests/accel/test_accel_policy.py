"""One failure policy for every kernel that can fail while it runs (train.kernels, tunelab.accel.guard): the
real Triton kernels of a tiny QLoRA Llama under Triton's interpreter (tests/support/accel_policy_cases.py, in a
subprocess), with failures forced by the script's fault seam.

Tolerances: the loss equal to the reference path's (train.kernels=off: the model's own forward, PyTorch's
dequantize) to 1e-6 relative, every LoRA gradient to 1e-5 relative (fp32; the kernels sum in another order).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.accel.guard import Guard
from tunelab.errors import TunelabError

pytest.importorskip("triton")  # an optional dependency: without it PyTorch's ops serve CUDA too

SCRIPT = Path(__file__).resolve().parents[1] / "support" / "accel_policy_cases.py"


@pytest.fixture(scope="module")
def cases():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _matches_reference(r: dict) -> None:
    assert r["losses"] and r["error"] is None
    assert all(loss == pytest.approx(r["ref_loss"], rel=1e-6) for loss in r["losses"])
    assert max(r["grad_rel"]) < 1e-5


def test_kernels_that_run_match_the_reference(cases):
    for mode in ("auto", "strict"):
        r = cases[mode]
        _matches_reference(r)
        assert min(r["calls"].values()) > 0 and not r["warnings"] and not r["failed"]  # the Triton kernels ran


def test_auto_falls_back_once_per_kernel_and_names_it(cases):
    r = cases["auto_failing"]
    _matches_reference(r)  # two steps, both on the reference path of the kernels that failed
    assert r["calls"]["rms_norm"] == 1 and r["calls"]["dequantize_4bit"] == 1  # never tried again
    assert r["calls"]["swiglu"] == 0  # one name for both fused Triton kernels: a broken Triton breaks both
    assert r["failed"] == ["Triton dequantize kernel", "fused Triton kernels"]
    assert len(r["warnings"]) == 2
    assert "fused Triton kernels failed (RuntimeError: forced failure of rms_norm)" in r["warnings"][0]
    assert "Triton dequantize kernel failed (RuntimeError: forced failure of dequantize_4bit)" in r["warnings"][1]
    assert all("train.kernels=auto turned it off for this model" in w for w in r["warnings"])


def test_strict_stops_at_the_first_failure(cases):
    r = cases["strict_failing"]
    assert r["losses"] == [] and r["calls"]["swiglu"] == 1 and not r["warnings"]
    assert r["error"] == ("train.kernels=strict: tunelab's fused Triton kernels failed (RuntimeError: forced failure "
                          "of swiglu); use train.kernels=auto to run without it")


def test_a_failure_is_per_model(cases):
    """The models built after the one whose kernels failed (auto_failing) still run the kernels."""
    assert cases["strict"]["calls"]["dequantize_4bit"] > 0 and cases["strict_failing"]["calls"]["rms_norm"] > 0


def test_guard_policy_in_process():
    calls = []

    def kernel():
        calls.append(1)
        raise ValueError("bad launch")

    auto = Guard("auto")
    with pytest.warns(UserWarning, match=r"tunelab's k failed \(ValueError: bad launch\)"):
        assert auto.run("k", kernel, lambda: 7) == 7
    assert auto.run("k", kernel, lambda: 8) == 8 and calls == [1] and auto.failed == {"k": "ValueError: bad launch"}
    assert Guard("auto").run("k", lambda: 5, lambda: 7) == 5  # another model's guard: not switched off
    with pytest.raises(TunelabError, match=r"^train.kernels=strict: tunelab's k failed \(ValueError: bad launch\)"):
        Guard("strict").run("k", kernel, lambda: 7)


def test_each_model_instance_gets_its_own_guard_and_workspace():
    """kernels.apply gives each model its own Guard and dequantize workspace; a deep copy gets fresh ones."""
    import copy

    import torch

    from tests.support.tiny_models import make_tiny_llama
    from tunelab.accel import kernels
    from tunelab.quant import Linear4bit, quantize_model

    a, b = (quantize_model(make_tiny_llama(vocab_size=96), block_size=32) for _ in range(2))
    for m in (a, b):
        kernels.apply(m, kernels.Kernels("strict", None, dequant=True))
    da, db = (next(x for x in m.modules() if isinstance(x, Linear4bit)).dequant for m in (a, b))
    assert da is not db and da.guard is not db.guard and da.guard.mode == "strict"
    assert all(x.dequant is da for x in a.modules() if isinstance(x, Linear4bit))  # one per model
    ids = torch.randint(0, 96, (1, 8))
    want = a(ids).logits
    c = copy.deepcopy(a)
    dc = next(x for x in c.modules() if isinstance(x, Linear4bit)).dequant
    assert dc is not da and dc.guard is not da.guard and dc.guard.mode == "strict"
    assert torch.equal(c(ids).logits, want)

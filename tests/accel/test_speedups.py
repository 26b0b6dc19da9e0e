"""The parity suite, generated from the registry (tunelab.accel.kernels.REGISTRY): every speed-up switched by
train.kernels, alone, on every family of the table that claims it, against its reference twin (every
speed-up off: the model's own modules and forward); the loss and every gradient, float32, as close to a
float64 evaluation as the reference is (tests/support/numerics.py). The registry's other entries name their own
parity tests, which must exist."""

from __future__ import annotations

import ast
import copy
import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from tests.models.test_families import _DATA, CASES, _batch, _model
from tests.support.numerics import assert_as_accurate
from tunelab.accel import fused, kernels
from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.models.families import family_of
from tunelab.train.loss import causal_lm_loss_sum
from tunelab.train.run import prepare_method

ROOT = Path(__file__).resolve().parents[2]
SWITCHED = [e for e in kernels.REGISTRY if e.test == kernels.PARITY]  # the entries test_parity is generated for
METHOD = {"fused_lora": "lora", "dequant": "qlora"}  # the method that has the layers a speed-up changes


def _claimed() -> list[tuple[str, str]]:
    out = []
    for entry in SWITCHED:
        for case in CASES:
            if kernels.claims(entry, family_of(_model(case).config)):
                out.append((entry.name, case))
    return out


def _loss_and_grads(model, k: kernels.Kernels, method: str):
    cfg = load_config(None, [f"method={method}", "lora.r=4", "lora.alpha=8"], base=_DATA)
    torch.manual_seed(1)  # the same LoRA init in every twin
    prepare_method(model, cfg, k)
    if method in ("lora", "qlora"):
        with torch.no_grad():  # B = 0 would leave A without gradient
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    batch = _batch()
    total, n = causal_lm_loss_sum(model, batch, chunk=7, kernels=k)
    (total / n).backward()
    return (total / n).detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def test_every_speed_up_is_a_field_of_kernels_and_every_family_has_one_to_check():
    names = {f.name for f in fields(kernels.Kernels)}
    assert {e.name for e in kernels.REGISTRY} <= names
    claimed = _claimed()
    assert {name for name, _ in claimed} == {e.name for e in SWITCHED}  # each checked on some family


@pytest.mark.skipif(not fused.available(), reason="needs a C compiler (gcc is on CI)")
@pytest.mark.parametrize(("name", "case"), _claimed())
def test_parity(name, case):
    method = METHOD.get(name, "full")
    base = _model(case)
    if hasattr(base, "set_experts_implementation"):
        base.set_experts_implementation("eager")  # MoE experts in float64 too (grouped_mm is float32/16 only)
    k = kernels.only(base, name)
    assert getattr(k, name), f"{name} is claimed for {case} but auto cannot run it here"
    off = kernels.Kernels("off", k.family)
    fast_model = copy.deepcopy(base)
    fast_loss, fast = _loss_and_grads(fast_model, k, method)
    ref_loss, ref = _loss_and_grads(copy.deepcopy(base), off, method)
    if name == "dequant":
        assert any(getattr(m, "dequant", None) is not None for m in fast_model.modules())  # the kernel ran  # the kernel's promise is PyTorch's bits (and 4-bit codes have no float64 twin)
        assert fast.keys() == ref.keys() and fast and torch.equal(fast_loss, ref_loss)
        for key in ref:
            assert torch.equal(fast[key], ref[key]), f"dequant on {case}: {key}"
        return
    exact_loss, exact = _loss_and_grads(copy.deepcopy(base).double(), off, method)
    assert fast.keys() == ref.keys() == exact.keys() and fast
    assert_as_accurate(fast_loss, ref_loss, exact_loss, what=f"{name} on {case}: loss")
    for key in ref:
        assert_as_accurate(fast[key], ref[key], exact[key], what=f"{name} on {case}: {key}")


@pytest.mark.parametrize(("device", "variable"), [("cpu", "TUNELAB_C_KERNELS"), ("cuda", "TUNELAB_TRITON")])
def test_the_environment_feeds_the_switch_when_kernels_are_chosen(monkeypatch, device, variable):
    """TUNELAB_C_KERNELS=0 / TUNELAB_TRITON=0 turn off that device's kernels in the Kernels value `choose`
    builds (auto: with the reason; strict: refused), read then and only then: the value does not change
    when the variable does, and the kernel modules never read it."""
    model = _model("llama")
    monkeypatch.setenv(variable, "0")
    k = kernels.choose(model, "auto", device)
    assert not (k.norm or k.swiglu or k.dequant) and k.chunked_head and k.fused_lora
    assert f"fused RMSNorm: {variable}=0" in k.off and f"4-bit dequantize kernel: {variable}=0" in k.off
    with pytest.raises(TunelabError, match=f"strict: fused RMSNorm cannot run for llama on {device}: {variable}=0"):
        kernels.choose(model, "strict", device)
    monkeypatch.delenv(variable)
    assert not k.norm
    assert not kernels.choose(model, "off", device).dequant
    for path in (ROOT / "tunelab" / "accel").glob("*.py"):
        assert path.name == "kernels.py" or variable not in _code(path), path


def _code(path: Path) -> str:
    """The module's source without its docstrings and comments (what it executes)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body[0] = ast.Pass()
    return ast.unparse(tree)


def test_the_registry_names_parity_tests_that_exist():
    for entry in kernels.REGISTRY:
        path, test = entry.test.split("::")
        tree = ast.parse((ROOT / path).read_text())
        assert test in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, entry.test


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")
def test_malloc_setting_changes_no_loss(tmp_path):
    """The same tiny run with tunelab's malloc setting and with a user's setting (which wins: glibc's own
    behaviour then): the same losses, bit for bit. Reading memory a step did not write would show here."""
    from tests.support.tiny_run import losses, make_workspace, run_config

    ws = make_workspace(tmp_path)
    got = []
    for label, extra in (("tuned", {}), ("user", {"MALLOC_MMAP_THRESHOLD_": "65536"})):
        out = tmp_path / label
        env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
        subprocess.run([sys.executable, "-m", "tunelab", "train", str(run_config(ws, out)), "--no-progress"],
                       check=True, env=env, capture_output=True, timeout=300)
        got.append(losses(out))
        assert json.loads((out / "summary.json").read_text())
    assert len(got[0]) == 3 and got[0] == got[1]

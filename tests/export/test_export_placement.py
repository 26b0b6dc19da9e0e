"""merge --dtype (default: the base's own) and --device / --dtype on merge, generate, chat and eval."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.support.export_helpers import LORA, adapter, base, ids, logits, make_adapter, make_run, parse, save_base  # noqa: F401 (adapter, base: fixtures)
from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.export.cli import generate as generate_cli
from tunelab.export.cli import merge as merge_cli
from tunelab.export.merge import _copy_linears
from tunelab.export.resolve import open_model, pick_device


def _expected_bf16(base, adapter, name):
    """W + alpha/r * B @ A in float64 from the base's bf16 weight, rounded once to bf16 (the reference)."""
    w = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).get_submodule(name).weight.double()
    t = load_file(adapter / "adapter_model.safetensors")
    a, b = (t[f"base_model.model.{name}.lora_{x}.weight"].double() for x in "AB")
    return (w + LORA["alpha"] / LORA["r"] * b @ a).to(torch.bfloat16)


def test_merge_dtype_bf16_rounds_once(base, adapter, tmp_path):
    out = tmp_path / "bf16"
    assert merge_cli.run(parse(merge_cli, [str(adapter), "--out", str(out), "--dtype", "bf16"])) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    merged = load_file(out / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        got, want = merged[f"{name}.weight"], _expected_bf16(base, adapter, name)
        # fp32 sum vs float64 sum may round to neighbouring bf16 values in rare ties: at most 1 ulp (2^-8 rel).
        assert torch.allclose(got.double(), want.double(), rtol=2 ** -8, atol=0)
        assert (got == want).double().mean() > 0.99


def test_merge_default_dtype_is_the_bases(tmp_path):
    base = save_base(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model.save_pretrained(base)  # the same base, stored in bf16: config.json records dtype bfloat16
    adapter = make_adapter(base, tmp_path / "adapter")
    merge_cli.run(parse(merge_cli, [str(adapter), "--out", str(tmp_path / "m")]))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    merge_cli.run(parse(merge_cli, [str(adapter), "--out", str(tmp_path / "m32"), "--dtype", "fp32"]))
    assert {t.dtype for t in load_file(tmp_path / "m32" / "model.safetensors").values()} == {torch.float32}


def test_qlora_copy_shares_everything_but_the_linears(base, tmp_path):
    """The merge not written is built on a copy holding only the 4-bit linears and adapters anew."""
    trained = open_model(str(make_run(base, tmp_path / "qlora"))).model
    copy = _copy_linears(trained)
    assert copy.model.embed_tokens.weight is trained.model.embed_tokens.weight
    assert copy.model.norm.weight is trained.model.norm.weight
    q, q_copy = trained.model.layers[0].self_attn.q_proj, copy.model.layers[0].self_attn.q_proj
    assert q_copy is not q and q_copy.lora_A.weight is not q.lora_A.weight
    assert torch.equal(logits(copy, ids()), logits(trained, ids()))


def test_generate_dtype_and_device(adapter, capsys):
    args = parse(generate_cli, [str(adapter), "--prompt", "hi", "--max-new-tokens", "3", "--dtype", "bf16",
                                "--device", "cpu"])
    assert generate_cli.run(args) == 0 and capsys.readouterr().out
    opened = open_model(str(adapter), dtype="bf16", device="cpu")
    assert next(opened.model.parameters()).dtype == torch.bfloat16
    assert next(open_model(str(adapter), dtype="auto", device="cpu").model.parameters()).dtype == torch.float32


def test_cuda_asked_for_and_absent_is_one_line(monkeypatch, base, adapter, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TunelabError, match="torch sees no CUDA GPU"):
        pick_device("cuda")
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(TunelabError, match="give auto, cpu, cuda or cuda:N"):
        pick_device("tpu")
    for argv in (["merge", str(adapter), "--out", str(tmp_path / "m"), "--device", "cuda"],
                 ["generate", str(base), "--prompt", "hi", "--device", "cuda:0"],
                 ["chat", str(base), "--device", "cuda"],
                 ["eval", str(base), "--device", "cuda", "--out", str(tmp_path / "e")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "torch sees no CUDA GPU" in err and "\n" not in err, argv
    assert not (tmp_path / "m").exists()

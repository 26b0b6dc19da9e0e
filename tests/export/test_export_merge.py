"""tunelab merge: adapter + base -> an HF folder that transformers loads with the adapter model's logits."""

import json

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support.export_helpers import QUANT, adapter, base, ids, logits, make_run, parse, save_base  # noqa: F401 (adapter, base: fixtures)
from tunelab.errors import TunelabError
from tunelab.export.cli import merge as merge_cli
from tunelab.export.resolve import find_source, open_model
from tunelab.quant import quantize

TOL = 1e-4  # fp32, the round-trip bound asked of every export



@pytest.fixture(scope="module")
def qlora_run(base, tmp_path_factory):
    return make_run(base, tmp_path_factory.mktemp("runs") / "qlora")


def test_merged_folder_matches_adapter_logits(base, adapter, tmp_path):
    out = tmp_path / "merged"
    assert merge_cli.run(parse(merge_cli, [str(adapter), "--out", str(out)])) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = ids()
    ours = logits(open_model(str(adapter)).model.eval(), x)  # adapter applied on the fly
    peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    assert (logits(merged, x) - ours).abs().max() <= TOL
    assert (logits(merged, x) - logits(peft_model, x)).abs().max() <= TOL  # independent reference
    assert (logits(merged, x) - logits(AutoModelForCausalLM.from_pretrained(base), x)).abs().max() > 0.01
    # The folder is complete: tokenizer with chat template, generation config stopping at <|im_end|>.
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    assert not any(p.suffix == ".bin" for p in out.iterdir())


def test_qlora_merge_goes_into_original_weights(base, qlora_run, tmp_path, capsys):
    out = tmp_path / "merged"
    merge_cli.run(parse(merge_cli, [str(qlora_run), "--out", str(out)]))
    printed = capsys.readouterr().out
    assert "original weights" in printed and "de-quantized weights" in printed
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    a_b = _adapter_tensors(qlora_run / "adapter")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        w = original.get_submodule(name).weight.double()
        a, b = a_b[f"base_model.model.{name}.lora_A.weight"].double(), a_b[f"base_model.model.{name}.lora_B.weight"].double()
        expect = w + (8 / 4) * b @ a  # W + alpha/r * B @ A in float64, W the original fp32 weight
        assert (merged.get_submodule(name).weight.double() - expect).abs().max() < 1e-6


def test_qlora_both_merges_measured_against_the_trained_model(qlora_run, tmp_path):
    from tunelab.export.merge import merge_to_folder

    with pytest.warns(UserWarning, match="de-quantized 4-bit"):
        report = merge_to_folder(str(qlora_run), tmp_path / "deq", from_quantized=True)
    # The trained model is 4-bit base + adapter: the merge into its de-quantized weights reproduces it (fp
    # rounding), the merge into the original weights differs by the base's 4-bit rounding error.
    assert report.diff_dequantized < 1e-4 < report.diff_original
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "deq", dtype=torch.float32)
    trained = open_model(str(qlora_run)).model.eval()
    assert (logits(merged, ids()) - logits(trained, ids())).abs().max() <= TOL


@pytest.mark.parametrize("from_quantized", [False, True])
def test_layer_by_layer_merge_computes_as_the_merged_model(qlora_run, from_quantized):
    """What the QLoRA merge measures without building the merge it does not write (merged_layer_by_layer) is
    bit for bit the logits of that merge built in full (merge_lora on a copy), and the model is left as it was."""
    import copy
    import warnings

    from tunelab.export.merge import merged_layer_by_layer
    from tunelab.lora import merge_lora

    opened = open_model(str(qlora_run))
    model, weights = opened.model.eval(), None if from_quantized else opened.base_weights
    before = logits(model, ids())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the de-quantized merge warns
        with merged_layer_by_layer(model, weights, from_quantized):
            layered = logits(model, ids())
        full = logits(merge_lora(copy.deepcopy(model), base_weights=weights, from_quantized=from_quantized), ids())
    assert torch.equal(layered, full) and (full - before).abs().max() > 0  # the merge is not the identity here
    assert torch.equal(logits(model, ids()), before)  # hooks removed, layers untouched


def test_qlora_run_on_the_fly_is_the_trained_model(base, qlora_run):
    """Applying a qlora run's adapter re-creates the 4-bit base with the run's settings (bitsandbytes-exact)."""
    opened = open_model(str(qlora_run))
    q = opened.model.get_submodule("model.layers.0.mlp.up_proj").base
    w = AutoModelForCausalLM.from_pretrained(base).get_submodule("model.layers.0.mlp.up_proj").weight
    assert torch.equal(q.dequantize_weight(), quantize(w, "nf4", 64, double_quant=True).dequantize())
    assert find_source(str(qlora_run)).quant == QUANT


def test_adapter_for_another_base_names_the_mismatch(adapter, tmp_path):
    other = save_base(tmp_path / "wide", hidden_size=96)
    with pytest.raises(TunelabError, match=r"shape .*\(4, 64\).*\(4, 96\)"):
        open_model(str(adapter), base=str(other))


def test_missing_tokenizer_is_a_clear_error(adapter, base, tmp_path):
    bare = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(bare)
    with pytest.raises(TunelabError, match="tokenizer"):
        merge_cli.run(parse(merge_cli, [str(adapter), "--base", str(bare), "--out", str(tmp_path / "m")]))


def test_not_a_model_folder(tmp_path):
    with pytest.raises(TunelabError, match="not a run folder"):
        find_source(str(tmp_path))
    with pytest.raises(TunelabError, match="no adapter to merge"):
        merge_cli.run(parse(merge_cli, [str(save_base(tmp_path / "b")), "--out", str(tmp_path / "m")]))


def _adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_cli_prints_one_line_errors(monkeypatch, base, tmp_path, capsys):
    from tunelab import cli

    monkeypatch.setitem(cli.COMMANDS, "merge", ("tunelab.export.cli.merge", "merge"))
    assert cli.main(["merge", str(base), "--base", str(base), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tunelab merge: error:") and "has none" in err and "\n" not in err


def test_a_run_folder_is_reopened_through_run_config(tmp_path):
    """export reads a run's config.yaml as tunelab train validated it: RunConfig's defaults for what the file
    leaves out (quant), and RunConfig's error, naming the file and the key, for what it cannot be."""
    from tunelab.errors import TunelabError
    from tunelab.export.resolve import find_source

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("method: qlora\nmodel: {source: bundled}\ndata: {sources: [{name: x, path: x}]}\n")
    src = find_source(str(run))
    assert src.base == "bundled" and src.quant == {"quant_type": "nf4", "block_size": 64, "double_quant": True}
    (run / "config.yaml").write_text("method: qlora\nmodel: {source: bundled}\nquant: {block_sise: 64}\n"
                                     "data: {sources: [{name: x, path: x}]}\n")
    with pytest.raises(TunelabError, match=r"config.yaml.*block_sise"):
        find_source(str(run))

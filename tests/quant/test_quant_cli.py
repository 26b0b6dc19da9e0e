"""`tunelab quantize`: the report on a tiny model saved to disk, --save, and clear errors."""

from __future__ import annotations

import re

import torch

from tunelab.cli import main
from tunelab.quant import Linear4bit, quantize, quantize_model


def test_quantize_report_and_save(tiny_llama, tmp_path, capsys):
    from safetensors.torch import load_file

    from tests.support.tiny_models import make_tiny_llama

    src, out = tmp_path / "model", tmp_path / "q"
    tiny_llama.save_pretrained(src)
    assert main(["quantize", str(src), "--quant-type", "nf4", "--double-quant", "--save", str(out)]) == 0
    text = capsys.readouterr().out
    rows = re.findall(r"^(model\.layers\.\d+\.\S+)\s+(\d+)x(\d+)\s+([\d.]+)\s+([\d.]+)$", text, re.M)
    assert len(rows) == 14  # 2 layers x (q, k, v, o, gate, up, down); lm_head skipped
    # every row is the float64 error of our own quantize on that weight
    weights = dict(tiny_llama.named_parameters())
    for name, o, i, rel, db in rows:
        w = weights[name + ".weight"].detach()
        assert w.shape == (int(o), int(i))
        err = quantize(w, "nf4", double_quant=True).dequantize(torch.float64) - w.double()
        expected = float(err.norm() / w.double().norm())
        assert abs(float(rel) - expected) < 1e-4
        assert abs(float(db) - (-20 * torch.log10(torch.tensor(expected)).item())) < 0.01
    assert re.search(r"weights in memory: [\d.]+ MiB -> [\d.]+ MiB", text)
    assert re.search(r"quantized layers: 4\.\d{3} bits/param", text)

    # the saved folder loads into a quantized tunelab model and reproduces its outputs
    state = load_file(out / "model.safetensors")
    assert state["model.layers.0.mlp.up_proj.weight"].dtype == torch.uint8
    assert "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4" in state
    reloaded = quantize_model(make_tiny_llama(seed=9))
    reloaded.load_state_dict(state)
    expected_model = quantize_model(tiny_llama)
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected_model(ids).logits)
    config = (out / "config.json").read_text()
    assert '"bnb_4bit_quant_type": "nf4"' in config and '"bnb_4bit_use_double_quant": true' in config
    assert isinstance(reloaded.model.layers[0].mlp.up_proj, Linear4bit)


def test_int8_minmax_report(tiny_llama, tmp_path, capsys):
    tiny_llama.save_pretrained(tmp_path)
    assert main(["quantize", str(tmp_path), "--quant-type", "int8", "--scheme", "minmax", "--block-size", "128"]) == 0
    text = capsys.readouterr().out
    assert "int8 minmax, block 128" in text
    assert re.search(r"quantized layers: 8\.500 bits/param", text)  # 8 + (32 + 32) / 128


def test_clear_errors(tmp_path, capsys):
    assert main(["quantize", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path), "--block-size", "100"]) == 2
    assert "power of two" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path), "--quant-type", "nf4", "--scheme", "minmax"]) == 2
    assert "int4 or int8" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path), "--quant-type", "int8", "--save", str(tmp_path / "o")]) == 2
    assert "nf4/fp4" in capsys.readouterr().err


def test_refuses_pickle_weights_broken_files_and_bad_save_folders(tiny_llama, tmp_path, capsys):
    pickled = tmp_path / "pickled"
    tiny_llama.save_pretrained(pickled)
    torch.save(tiny_llama.state_dict(), pickled / "pytorch_model.bin")  # a pickle, the only weights left
    (pickled / "model.safetensors").unlink()
    assert main(["quantize", str(pickled)]) == 2
    assert "pickle" in capsys.readouterr().err
    cut = tmp_path / "cut"
    tiny_llama.save_pretrained(cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["quantize", str(cut)]) == 2
    assert f"{cut}: cannot load the model" in capsys.readouterr().err
    src = tmp_path / "model"
    tiny_llama.save_pretrained(src)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    assert main(["quantize", str(src), "--save", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "mine\n"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine\n")
    assert main(["quantize", str(src), "--save", str(busy)]) == 2
    assert "not a model folder" in capsys.readouterr().err
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]

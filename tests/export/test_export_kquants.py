"""GGUF k-quants go through llama.cpp's own quantizer (optional llama-cpp-python): the missing-extra message,
and the hand-off (an f16 export in, the quantizer's file out). llama.cpp itself is not run here."""

import ctypes
import shutil
import sys
import types

import gguf
import pytest

from tests.support.export_helpers import save_base
from tests.support.tiny_models import make_tiny_llama, make_tiny_tokenizer
from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.export.gguf import export_gguf


def test_missing_extra_is_one_line_naming_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError, installed or not
    base = save_base(tmp_path / "base")
    capsys.readouterr()
    assert main(["export", str(base), "--gguf", str(tmp_path / "m.gguf"), "--dtype", "q4_k_m"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("tunelab export: error: GGUF --dtype q4_k_m")
    assert "llama-cpp-python" in err and "pip install 'tunelab[llamacpp]'" in err
    with pytest.raises(TunelabError, match="llama-cpp-python"):
        export_gguf(make_tiny_llama(), make_tiny_tokenizer(), tmp_path / "m.gguf", "q6_k")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))


def test_quantizer_gets_the_f16_export_and_its_output_becomes_the_file(monkeypatch, tmp_path):
    """A stand-in llama_cpp records the call; the real quantizer's output is checked by the llama.cpp validation."""
    calls = []

    class Params(ctypes.Structure):
        _fields_ = [("nthread", ctypes.c_int), ("ftype", ctypes.c_int)]

    def quantize(src, dst, params):
        calls.append((src.decode(), params._obj.ftype, gguf.GGUFReader(src.decode()).tensors[1].tensor_type.name))
        shutil.copyfile(src, dst)
        return 0

    fake = types.SimpleNamespace(llama_model_quantize_default_params=Params, llama_model_quantize=quantize,
                                 LLAMA_FTYPE_MOSTLY_Q5_K_M=17)
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    out = export_gguf(make_tiny_llama(), make_tiny_tokenizer(), tmp_path / "m.gguf", "q5_k_m")
    [(src, ftype, matrix_type)] = calls
    assert ftype == 17 and matrix_type == "F16" and src != str(out)
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # the f16 intermediate is gone
    fake.llama_model_quantize = lambda src, dst, params: 1
    with pytest.raises(TunelabError, match="returned 1"):
        export_gguf(make_tiny_llama(), make_tiny_tokenizer(), tmp_path / "n.gguf", "q5_k_m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]

"""One name for the 4-bit storage format, `quant_type` (nf4 / fp4 / int4 / int8), and `dtype` for torch dtypes
only; the old names (the config key quant.dtype, `tunelab quantize --dtype`) are still read, with a note."""

from __future__ import annotations

import pytest

from tunelab.cli import main
from tunelab.config import dump_config, load_config
from tunelab.errors import ConfigError

BASE = {"data": {"sources": [{"name": "a", "path": "a.jsonl"}]}}


def test_config_key_is_quant_type_and_the_old_key_maps_to_it(tmp_path):
    cfg = load_config(None, ["quant.quant_type=fp4"], base=BASE)
    assert cfg.quant.quant_type == "fp4" and "dtype" not in cfg.quant.model_dump()
    assert "quant_type: fp4" in dump_config(cfg)  # what a run folder's config.yaml says from now on
    old = tmp_path / "old.yaml"  # a config, or a run folder's config.yaml, written before the rename
    old.write_text("method: qlora\nquant: {dtype: fp4, block_size: 128}\ndata: {sources: [{name: a, path: a.jsonl}]}\n")
    with pytest.warns(FutureWarning, match=r"quant.dtype is now quant.quant_type"):
        from_old = load_config(old)
    assert from_old.quant.model_dump() == {"quant_type": "fp4", "block_size": 128, "double_quant": True}
    with pytest.warns(FutureWarning):
        assert load_config(None, ["quant.dtype=int4"], base=BASE).quant.quant_type == "int4"


def test_both_names_at_once_and_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match=r"`quant`: .*old name of quant.quant_type: give quant_type only"):
        load_config(None, ["quant.dtype=fp4", "quant.quant_type=nf4"], base=BASE)
    with pytest.raises(ConfigError, match=r"`quant.quant_type`: Input should be 'nf4', 'fp4', 'int4' or 'int8'"):
        load_config(None, ["quant.quant_type=float16"], base=BASE)  # a torch dtype is not a 4-bit format


def test_quantize_cli_reads_the_old_flag(tiny_llama, tmp_path, capsys):
    tiny_llama.save_pretrained(tmp_path)
    args = [str(tmp_path), "--scheme", "minmax", "--block-size", "128"]
    assert main(["quantize", *args, "--quant-type", "int8"]) == 0
    new = capsys.readouterr()
    assert main(["quantize", *args, "--dtype", "int8"]) == 0
    old = capsys.readouterr()
    assert old.out == new.out and "int8 minmax, block 128" in new.out
    assert "--dtype is now --quant-type" in old.err and "--dtype" not in new.err
    assert main(["quantize", *args, "--dtype", "int8", "--quant-type", "int4"]) == 2
    err = capsys.readouterr().err
    assert "give --quant-type only" in err and "\n" not in err.strip()

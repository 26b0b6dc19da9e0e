"""The run config: YAML + overrides, typed; bad input is one clear line from the CLI, no traceback."""

import pytest
import yaml

from tunelab.cli import main
from tunelab.config import load_config
from tunelab.errors import ConfigError

DATA = {"sources": [{"name": "x", "path": "x.jsonl"}]}


def test_defaults_and_typed_overrides():
    cfg = load_config(None, ["train.lr=1e-4", "lora.target_modules=[q_proj, v_proj]", "resume=true"],
                      base={"data": DATA})
    assert cfg.train.lr == 1e-4 and cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.resume is True
    assert cfg.method == "lora" and cfg.quant.quant_type == "nf4" and cfg.quant.block_size == 64


def test_default_packing_is_padded():
    """Packed rows let an example attend to the others in its row (HF eager/SDPA, issue 25): the default must
    keep examples apart, one per row."""
    assert load_config(None, [], base={"data": DATA}).data.packing == "padded"


@pytest.mark.parametrize("override, needle", [
    ("train.lrr=1", "unknown key `train.lrr`"),
    ("train.lr=fast", "`train.lr`"),
    ("train.batch_size=0", "`train.batch_size`: Input should be greater than 0"),
    ("method=sgd", "`method`"),
    ("quant.block_size=8", "`quant.block_size`"),
    ("lora.r=-1", "`lora.r`"),
    ("trainlr", "is not key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, [override], base={"data": DATA})
    assert needle in str(e.value)


def test_scratch_needs_full():
    with pytest.raises(ConfigError, match="scratch"):
        load_config(None, ["model.source=scratch", "method=lora"], base={"data": DATA})


@pytest.mark.parametrize("text, needle", [
    ("method: [unclosed", "not valid YAML"),
    ("- a list\n- at top", "top level must be a mapping"),
    ("method: full\n", "`data`: Field required"),
])
def test_bad_yaml_files(tmp_path, text, needle):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert needle in str(e.value) and str(p) in str(e.value)


@pytest.mark.parametrize("args, needle", [
    (["train", "missing.yaml"], "missing.yaml: no such config file"),
    (["train", "{cfg}", "method=sgd"], "`method`"),
    (["train", "{cfg}", "model.source=/no/such/model"], "/no/such/model: no such file or folder"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, args, needle):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"sources": [{"name": "x", "path": str(tmp_path / "x.jsonl")}]}}))
    (tmp_path / "x.jsonl").write_text('{"prompt": "What is two plus two?", "response": "Four."}\n')  # data passes
    assert main([a.replace("{cfg}", str(cfg)) for a in args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_show_config_round_trips(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"data": DATA, "method": "qlora"}))
    assert main(["train", str(cfg), "--show-config", "train.lr=3e-4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["method"] == "qlora" and shown["train"]["lr"] == 3e-4
    assert load_config(None, base=shown).model_dump() == load_config(cfg, ["train.lr=3e-4"]).model_dump()


def test_overrides_do_not_write_into_the_base_dict():
    base = {"data": DATA, "train": {"lr": 1e-3}}
    assert load_config(None, ["train.batch_size=2"], base=base).train.batch_size == 2
    assert base == {"data": DATA, "train": {"lr": 1e-3}}  # a later load from the same base starts clean

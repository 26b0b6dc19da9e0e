"""Bad input battery: every malformed, missing, mislabelled or hostile input a user can hand to the CLI gives
exit code 2 and ONE line `tunelab CMD: error: ...` naming the file or key, never a traceback."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from tests.support.tiny_models import make_tiny_llama
from tests.support.tiny_run import WORDS, make_workspace, run_config
from tunelab.cli import main

BAD_INPUTS: list[str] = []  # ids of the cases run, for the summary line


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("bad"), records=16)


def _fails(argv: list[str], capsys, *needles: str) -> str:
    """Run the CLI in-process; it must fail with one clean line that contains every needle."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    # progress bars (loading weights) may come before; the error is the one last line
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line]
    assert code == 2, f"exit {code}, stderr: {err}"
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"tunelab {argv[0]}: error: "), err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


# --- train: the config file and its values ---------------------------------------------------------------------

CONFIG_TEXTS = {
    "malformed_yaml": ("method: lora\ntrain: {lr: [1e-4\n", ["not valid YAML"]),
    "top_level_list": ("- method\n- lora\n", ["top level must be a mapping"]),
    "unknown_top_key": ("data: {sources: [{name: a, path: a.jsonl}]}\nlerning_rate: 1\n", ["unknown key `lerning_rate`"]),
    "unknown_nested_key": ("data: {sources: [{name: a, path: a.jsonl}]}\ntrain: {lrr: 1}\n", ["unknown key `train.lrr`"]),
    "wrong_type": ("data: {sources: [{name: a, path: a.jsonl}]}\ntrain: {batch_size: eight}\n", ["`train.batch_size`"]),
    "wrong_type_section": ("data: {sources: [{name: a, path: a.jsonl}]}\ntrain: 3\n", ["`train`"]),
    "zero_batch": ("data: {sources: [{name: a, path: a.jsonl}]}\ntrain: {batch_size: 0}\n", ["`train.batch_size`", "greater than 0"]),
    "negative_rank": ("data: {sources: [{name: a, path: a.jsonl}]}\nlora: {r: -4}\n", ["`lora.r`"]),
    "zero_seq_len": ("data: {sources: [{name: a, path: a.jsonl}]}\ntrain: {seq_len: 0}\n", ["`train.seq_len`"]),
    "negative_steps": ("data: {sources: [{name: a, path: a.jsonl}]}\ntrain: {max_steps: -1}\n", ["`train.max_steps`"]),
    "block_size_not_power_of_two": ("data: {sources: [{name: a, path: a.jsonl}]}\nquant: {block_size: 48}\n",
                                    ["`quant.block_size`", "power of two"]),
    "infinite_lr": ("data: {sources: [{name: a, path: a.jsonl}]}\ntrain: {lr: .inf}\n", ["`train.lr`", "finite"]),
    "no_sources": ("data: {sources: []}\n", ["`data.sources`"]),
    "missing_data": ("method: lora\n", ["`data`: Field required"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_TEXTS))
def test_bad_config_file(tmp_path, capsys, case):
    text, needles = CONFIG_TEXTS[case]
    cfg = _write(tmp_path / f"{case}.yaml", text)
    _fails(["train", str(cfg)], capsys, str(cfg), *needles)
    BAD_INPUTS.append(f"config:{case}")


@pytest.mark.parametrize("case, override, needle", [
    ("bad_override_type", "train.lr=fast", "`train.lr`"),
    ("bad_override_form", "trainlr", "is not key=value"),
    ("override_into_scalar", "method.x=1", "`method` is not a section"),
    ("negative_override", "train.grad_accum=-2", "`train.grad_accum`"),
])
def test_bad_override(ws, tmp_path, capsys, case, override, needle):
    _fails(["train", str(run_config(ws, tmp_path / "o")), override], capsys, needle)
    BAD_INPUTS.append(f"override:{case}")


def test_config_file_missing_not_utf8_or_a_folder(tmp_path, capsys):
    _fails(["train", str(tmp_path / "nope.yaml")], capsys, "nope.yaml", "no such config file")
    bad = _write(tmp_path / "latin1.yaml", "method: lora # caf\xe9\n".encode("latin-1"))
    _fails(["train", str(bad)], capsys, str(bad), "not UTF-8")
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    _fails(["train", str(folder)], capsys, str(folder), "is a folder")
    BAD_INPUTS.extend(["config:missing", "config:not_utf8", "config:a_folder"])


# --- train: the model source -------------------------------------------------------------------------------------

def _model_copy(ws: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(ws / "model", dest)
    return dest


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


MODEL_CASES = ["missing", "no_config_json", "pickle_only", "truncated_safetensors", "text_as_safetensors",
               "malformed_config_json", "text_as_gguf", "truncated_gguf", "other_file"]


@pytest.mark.parametrize("case", MODEL_CASES)
def test_bad_model_source(ws, tmp_path, capsys, case):
    src = tmp_path / "m"
    needles = [str(src)]
    if case == "missing":
        needles.append("no such file or folder")
    elif case == "no_config_json":
        src.mkdir()
        needles.append("no config.json")
    elif case == "pickle_only":
        _model_copy(ws, src)
        (src / "model.safetensors").rename(src / "pytorch_model.bin")
        needles.append("convert them to safetensors")
    elif case == "truncated_safetensors":
        _truncate(_model_copy(ws, src) / "model.safetensors")
        needles.append("cannot load the model")
    elif case == "text_as_safetensors":
        _write(_model_copy(ws, src) / "model.safetensors", "this is not a safetensors file\n" * 10)
        needles.append("cannot load the model")
    elif case == "malformed_config_json":
        _write(_model_copy(ws, src) / "config.json", '{"model_type": "llama", ')
        needles.append("config.json")
    elif case == "text_as_gguf":
        src = _write(tmp_path / "model.gguf", "hello, I am a text file\n")
        needles = [str(src), "not a GGUF file"]
    elif case == "truncated_gguf":  # a valid GGUF header (v3, 3 tensors, 5 metadata entries), then nothing
        src = _write(tmp_path / "cut.gguf", b"GGUF" + struct.pack("<IQQ", 3, 3, 5) + b"\x05\x00\x00")
        needles = [str(src), "GGUF"]
    elif case == "other_file":
        src = _write(tmp_path / "weights.pt", b"\x80\x04not really a pickle")
        needles = [str(src), "a file must be a .gguf model"]
    cfg = run_config(ws, tmp_path / "run", model={"source": str(src)})
    _fails(["train", str(cfg)], capsys, *needles)
    BAD_INPUTS.append(f"model:{case}")


# --- train: the data ---------------------------------------------------------------------------------------------

def _long_text(n_words: int) -> str:
    """Varied words, so that the repetition filters keep it."""
    return " ".join(f"{w}{i}" for i, w in zip(range(n_words), __import__("itertools").cycle(WORDS)))


def _sft_line(prompt="Reverse: alpha beta", response="beta alpha") -> str:
    return json.dumps({"prompt": prompt, "response": response}) + "\n"


DATA_CASES = {
    "missing_file": (None, "no such file or folder"),
    "empty_file": ("", "no records"),
    "malformed_jsonl": (_sft_line() + '{"prompt": "x", "response": \n', ":2: malformed JSON"),
    "not_an_object": (_sft_line() + "[1, 2]\n", ":2: expected a JSON object"),
    "missing_field": (_sft_line() + json.dumps({"question": "x"}) + "\n", ":2:"),
    "wrong_type": (_sft_line() + json.dumps({"prompt": "x", "response": 7}) + "\n", ":2:"),
    "unknown_role": (_sft_line() + json.dumps({"messages": [{"role": "wizard", "content": "hi"},
                                                           {"role": "assistant", "content": "ho"}]}) + "\n",
                     ":2: messages[0] has role 'wizard'"),
    "not_utf8": (_sft_line().encode() + b'{"prompt": "caf\xe9", "response": "x"}\n', ":2: not UTF-8"),
    "prompt_longer_than_seq_len": (_sft_line() + _sft_line(_long_text(200), "done"), ":2:"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_training_data(ws, tmp_path, capsys, case):
    content, needle = DATA_CASES[case]
    path = tmp_path / "d.jsonl"
    if content is not None:
        _write(path, content)
    cfg = run_config(ws, tmp_path / "run",
                     data={"sources": [{"name": "d", "path": str(path)}], "packing": "padded", "eval_fraction": 0.0,
                           "filters": {"enabled": False}})
    _fails(["train", str(cfg)], capsys, str(path), needle)
    BAD_INPUTS.append(f"train-data:{case}")


FILTER_CASES = {
    "malformed_jsonl.jsonl": ('{"text": "fine text here"}\n{"text": oops}\n', ":2: malformed JSON"),
    "missing_field.jsonl": ('{"text": "fine text here"}\n{"body": "no text"}\n', ":2:"),
    "wrong_type.jsonl": ('{"text": "fine text here"}\n{"text": 42}\n', ":2: field 'text' is int"),
    "not_utf8.jsonl": (b'{"text": "fine"}\n{"text": "\xff\xfe"}\n', ":2: not UTF-8"),
    "empty.jsonl": ("", "no records"),
    "broken.csv": ("text,kind\nhello there,web\nthree,fields,here\n", ":3: 3 fields, the header has 2"),
    "not_utf8.csv": (b"text\nfine\ncaf\xe9\n", ":3: not UTF-8"),
    "text_as.parquet": ("this is not a parquet file\n", "parquet"),
    "truncated.parquet": (None, "parquet"),
    "unknown.xyz": ("text\n", "cannot tell the format"),
}


@pytest.mark.parametrize("name", sorted(FILTER_CASES))
def test_bad_files_through_data_filter(tmp_path, capsys, name):
    content, needle = FILTER_CASES[name]
    path = tmp_path / name
    if content is None:  # a real Parquet file cut in half
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": [f"row number {i} with some text" for i in range(200)]}), path)
        _truncate(path)
    else:
        _write(path, content)
    out = tmp_path / "kept.jsonl"
    _fails(["data", "filter", str(path), "--out", str(out)], capsys, str(path), needle)
    assert not out.exists() and not list(tmp_path.glob("kept.jsonl.*")), "a half-written output was left"
    BAD_INPUTS.append(f"data-filter:{name}")


def test_unknown_role_through_data_inspect(ws, tmp_path, capsys):
    path = _write(tmp_path / "chat.jsonl", json.dumps({"messages": [{"role": "wizard", "content": "hi"},
                                                                  {"role": "assistant", "content": "ho"}]}) + "\n")
    _fails(["data", "inspect", "--source", str(path), "--task", "sft", "--tokenizer", str(ws / "model")],
           capsys, f"{path}:1", "role 'wizard'")
    BAD_INPUTS.append("data-inspect:unknown_role")


def test_over_long_examples_are_cut_and_reported(ws, tmp_path, capsys):
    """The data module's rule: an example longer than seq_len keeps its first seq_len tokens and is counted;
    one whose response would be cut away entirely is an error (see prompt_longer_than_seq_len above)."""
    path = _write(tmp_path / "long.jsonl", "".join(_sft_line(f"Reverse {i}: alpha beta", _long_text(80)) for i in range(8)))
    assert main(["data", "inspect", "--source", str(path), "--task", "sft", "--tokenizer", str(ws / "model"),
                 "--seq-len", "32"]) == 0
    out = capsys.readouterr().out
    assert "truncated to max length: 8 examples" in out and f"{path}:" in out
    BAD_INPUTS.append("data-inspect:over_long")


# --- adapters and resume state from another model ------------------------------------------------------------------

def test_adapter_for_another_base_model(ws, tmp_path, capsys):
    from tunelab.lora import LoraConfig, apply_lora, save_adapter

    other = make_tiny_llama(vocab_size=600, hidden_size=32, intermediate_size=64)  # another base's shapes
    apply_lora(other, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), verbose=False)
    save_adapter(other, tmp_path / "adapter")
    _fails(["eval", str(ws / "model"), "--adapter", str(tmp_path / "adapter"), "--skip-base"], capsys,
           "adapter tensor", "different shape")
    BAD_INPUTS.append("eval:adapter_for_other_base")


def test_resume_from_a_checkpoint_of_another_config(ws, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(run_config(ws, out, train={"max_steps": 1})), "--no-progress"]) == 0
    cfg = run_config(ws, out, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj"]}, resume=True)
    _fails(["train", str(cfg), "--no-progress"], capsys, str(out / "checkpoints"), "same config")
    BAD_INPUTS.append("train:resume_other_config")


# --- where outputs go --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["adapter", "checkpoints"])
def test_outputs_cannot_escape_output_dir(ws, tmp_path, capsys, name):
    """A link planted inside output_dir must not redirect a write outside it (a new run refuses the folder as
    holding a run already; resuming there gets as far as the first write)."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(outside, out / name)
    _fails(["train", str(run_config(ws, out, train={"max_steps": 1})), "--no-progress"], capsys,
           f"output_dir {out} already holds an unfinished run ({name})")
    _fails(["train", str(run_config(ws, out, train={"max_steps": 1}, resume=True)), "--no-progress"], capsys,
           str(out / name), "outside output_dir")
    assert not list(outside.iterdir())
    BAD_INPUTS.append(f"output:{name}_symlink")



def test_an_output_path_that_cannot_be_used(ws, tmp_path, capsys):
    """An OSError from a path the user gave (a file where a folder goes, a folder where a file goes) is one line."""
    a_file = _write(tmp_path / "notes.txt", "mine\n")
    _fails(["train", str(run_config(ws, a_file)), "--no-progress"], capsys, str(a_file), "is a file")
    assert a_file.read_text() == "mine\n"
    _fails(["cost", str(ws / "model"), "--json", str(tmp_path)], capsys, str(tmp_path), "Is a directory")
    BAD_INPUTS.extend(["output:train_dir_is_a_file", "output:cost_json_is_a_folder"])

def test_debug_flag_shows_the_traceback(tmp_path, capsys):
    cfg = _write(tmp_path / "bad.yaml", "train: {lrr: 1}\n")
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["train", str(cfg), "--debug"])
    with pytest.raises(ConfigError):
        main(["--debug", "train", str(cfg)])


def test_summary(capsys):
    with capsys.disabled():
        print(f"\nbad inputs: {len(BAD_INPUTS)} tried, {len(BAD_INPUTS)} gave exit 2 and one clear line, 0 tracebacks")
    assert len(BAD_INPUTS) >= 40

"""`tunelab --help` says what tunelab is and lists every command with its line; `tunelab --version`."""

import re

import pytest

import tunelab
from tunelab.cli import COMMANDS, main


def _exit(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().out


def test_version(capsys):
    code, out = _exit(["--version"], capsys)
    assert code == 0 and out.strip() == f"tunelab {tunelab.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", tunelab.__version__)


def test_help_says_what_tunelab_is_and_lists_the_commands(capsys):
    code, out = _exit(["--help"], capsys)
    flat = " ".join(out.split())  # argparse wraps the command lines
    assert code == 0 and "The `tunelab` command." not in out
    assert "fine-tune and evaluate language models" in flat and "LoRA and QLoRA" in flat
    for name, (_, line) in COMMANDS.items():
        assert f"{name} {' '.join(line.split())}" in flat, name
    assert "tunelab train configs/lora-sft.yaml" in out

"""Promises the project makes to a newcomer: the README's commands are the ones CI runs."""

import re
from pathlib import Path

from tunelab.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[2]


def _readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_opens_with_quickstart_then_tests():
    first, second = _readme_commands()[:2]
    assert first.endswith("tunelab quickstart")
    assert "pytest" in second


def test_ci_runs_the_readme_test_command_verbatim():
    assert _readme_commands()[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_every_command_module_has_the_two_functions():
    import importlib

    for name, (module, _) in COMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(mod.add_arguments) and callable(mod.run), name


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "quickstart" in capsys.readouterr().out

"""The README and docs/*.md say what works: their commands parse, their configs validate, their links resolve.

Every fenced block of README.md and docs/*.md is read:
- shell blocks (bash, sh, shell, console or no language): every `tunelab ...` line (also `python -m tunelab`,
  `torchrun ... -m tunelab`) parses with the real parser (tunelab.cli.parse_args) and its `key=value` overrides
  name config fields (and, with a config file of this repository, validate with it); a synopsis line
  (`[--flag]`, `a|b`) names only flags its command has; `python -m tunelab.X`, `python benchmarks/X.py`,
  `python tests/X.py`, `bash benchmarks/X.sh` and pytest's files exist, and the flags given a script appear in
  its source. A command followed by the line `tunelab CMD: error: MESSAGE` must fail with that message.
- yaml blocks with a top-level method/model/quant/lora/data/train key (or marked: ```yaml config) validate as
  RunConfig, merged into a minimal config the way `load_config` merges overrides;
- python blocks that are Python: the tunelab names they use exist and their calls bind to the signatures;
- blocks whose info string carries the word `run` (```bash run) are run, with TUNELAB_DOCS_TINY=1 (tunelab.cli:
  every run 2 steps, 1 eval batch, 1 eval item per kind); a page's blocks run in order in one temporary folder
  holding links to configs/ and benchmarks/, as a reader runs them from the repository's root (the README's
  recipes 3-5 use the run of recipe 1).
Inline code: `tunelab ...` spans are checked as synopses, config keys (`train.lr`) must name RunConfig fields.
Relative links and #anchors (GitHub's heading slugs) resolve, and `mkdocs build --strict` (mkdocs.yml) passes.
`python tests/project/test_docs.py` lists every block and what is done with it.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import inspect
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import pytest
import yaml
from pydantic import BaseModel

from tunelab.cli import COMMANDS, TINY_ENV, _parser, parse_args
from tunelab.config import RunConfig, load_config
from tunelab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"", "bash", "sh", "shell", "console"}
CONFIG_KEYS = {"method", "model", "quant", "lora", "data", "train"}


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    markers: list[str]  # the info string's words after the language: `run`, `config`
    text: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line} ({self.lang or 'no language'})"


def blocks(page: Path) -> list[Block]:
    """Fenced blocks (``` or ~~~, CommonMark: the closing fence is at least as long as the opening one)."""
    found, lines, i = [], page.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        m = re.match(r" {0,3}(`{3,}|~{3,})(.*)$", lines[i])
        if not m:
            i += 1
            continue
        fence, info = m.group(1), m.group(2).split()
        end = next((j for j in range(i + 1, len(lines)) if re.match(rf" {{0,3}}{fence[0]}{{{len(fence)},}}\s*$",
                                                                     lines[j])), len(lines))
        found.append(Block(page, i + 1, info[0] if info else "", info[1:], "\n".join(lines[i + 1:end])))
        i = end + 1
    return found


ALL_BLOCKS = [b for page in PAGES for b in blocks(page)]


# ---- shell lines -> commands --------------------------------------------------------------------------------

# the first word of a line that is a command (the rest of a shell block is output)
COMMAND_START = re.compile(r"(\$ )?([A-Za-z_]\w*=\S*\s+)*(tunelab|python3?|torchrun|nice|/usr/bin/time|time|bash|pip)\s")


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(line offset, command) for each command line: `\\` continuations joined, multi-line quotes kept whole."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if not COMMAND_START.match(lines[i] + " "):
            i += 1
            continue
        start, cmd = i, lines[i].removeprefix("$ ")
        while i + 1 < len(lines):
            if cmd.endswith("\\"):
                cmd = cmd[:-1] + " " + lines[i + 1].strip()
            else:
                try:
                    shlex.split(cmd, comments=True)
                    break
                except ValueError:  # a quote open across lines: `python -c "...`
                    cmd += "\n" + lines[i + 1]
            i += 1
        out.append((start, cmd))
        i += 1
    return out


def is_synopsis(line: str) -> bool:
    """`tunelab eval RUN [--suite a|b]`: usage syntax, not a command to run."""
    return bool(re.search(r"\[-|\[\w+=|\w\|\w", line))


def simple_commands(line: str) -> list[list[str]]:
    """Words of each command of a line (split at |, &&, ||, ;), redirections, env assignments and wrappers
    removed."""
    line = re.sub(r"\$\([^)]*\)", "SUBST", line)  # $(cat prompt.txt): one word
    line = re.sub(r"(^|\s)[12]?>&[12](?=\s|$)", " ", line)  # 2>&1
    lex = shlex.shlex(line, posix=True, punctuation_chars="|&;<>")
    lex.whitespace_split = True
    words, cmds = list(lex), [[]]
    while words:
        w = words.pop(0)
        if w in ("|", "||", "&&", ";", "&"):
            cmds.append([])
        elif w in (">", ">>", "<", "&>"):  # > out.txt: not the command's argument
            words = words[1:]
        else:
            cmds[-1].append(w)
    return [strip_wrappers(c) for c in cmds if c]


def strip_wrappers(words: list[str]) -> list[str]:
    while words:
        if re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):  # PYTHONPATH=$PWD ...
            words = words[1:]
        elif words[0] == "nice":
            words = words[3:] if words[1:2] == ["-n"] else words[1:]
        elif words[0] in ("time", "/usr/bin/time"):
            words = words[2:] if words[1:2] == ["-v"] else words[1:]
        elif words[0] == "torchrun":  # torchrun [options] -m tunelab ...
            words = ["python", *words[words.index("-m"):]]
        else:
            return words
    return words


@dataclass
class Command:
    block: Block
    line: int
    kind: str  # tunelab | module | script | pytest | synopsis
    words: list[str]
    error: str | None = None  # the message the docs show it failing with

    def __str__(self) -> str:
        words = ["tunelab", *self.words] if self.kind == "tunelab" else self.words
        return f"{self.block.page.relative_to(ROOT)}:{self.block.line + 1 + self.line}: {' '.join(words)}"


def classify(words: list[str]) -> tuple[str, list[str]] | None:
    if words[0] == "tunelab":
        return "tunelab", words[1:]
    if words[0] in ("python", "python3"):
        if words[1:3] == ["-m", "tunelab"]:
            return "tunelab", words[3:]
        if words[1:3] == ["-m", "pytest"]:
            return "pytest", words[3:]
        if words[1] == "-m":
            return "module", words[2:]
        if words[1].endswith(".py"):
            return "script", words[1:]
    if words[0] == "bash" and len(words) > 1 and words[1].endswith(".sh"):
        return "script", words[1:]
    return None


def block_commands(block: Block) -> list[Command]:
    cmds = []
    for offset, line in logical_lines(block.text):
        if line.startswith("tunelab ") and re.match(r"tunelab [\w-]+: error: ", line):
            if cmds:  # `tunelab train: error: ...`: the output of the command above
                cmds[-1].error = line.split(": error: ", 1)[1]
            continue
        if is_synopsis(line):
            words = shlex.split(re.sub(r"[\[\]]", " ", line), comments=True)
            cmds.append(Command(block, offset, "synopsis", words))
            continue
        for words in simple_commands(line):
            while words and (found := classify(words)):
                kind, rest = found
                if kind == "script" and rest[0] == "benchmarks/quiet.py":  # quiet.py COMMAND: runs COMMAND
                    cmds.append(Command(block, offset, kind, rest[:1]))
                    words = strip_wrappers(rest[1:])
                    continue
                cmds.append(Command(block, offset, kind, rest))
                break
    return cmds


SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.lang in SHELL]
COMMANDS_IN_DOCS = [c for b in SHELL_BLOCKS for c in block_commands(b)]


def prose(page: Path) -> str:
    """A page's text without its fenced blocks (a `# comment` in a block is no heading, its `[x](y)` no link)."""
    text = page.read_text(encoding="utf-8")
    for b in blocks(page):
        text = text.replace(b.text, "")
    return text


def inline_code(page: Path) -> list[str]:
    return re.findall(r"`([^`\n]+)`", prose(page))


def inline_synopses() -> list[Command]:
    """`tunelab ...` in inline code (the README's command table, the pages' prose), checked as synopses."""
    return [Command(Block(page, 0, "inline", [], ""), 0, "synopsis", shlex.split(re.sub(r"[\[\]]|\\\|", " ", code)))
            for page in PAGES for code in inline_code(page)
            if code.startswith("tunelab ") and not re.match(r"tunelab [\w-]+: error: ", code)]


# ---- the checks ---------------------------------------------------------------------------------------------

def test_the_docs_have_commands_of_each_kind():
    kinds = {c.kind for c in COMMANDS_IN_DOCS}
    assert {"tunelab", "module", "script", "pytest", "synopsis"} <= kinds, kinds
    assert sum(c.kind == "tunelab" for c in COMMANDS_IN_DOCS) > 40


def _sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return actions[0].choices.get(name) if actions else None


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def synopsis_problems(cmd: Command) -> list[str]:
    words = [w for w in cmd.words if w != "..."]
    if words[:1] == ["tunelab"]:
        words = words[1:]
    if not words or words[0] in ("python", "-m"):  # `python -m tunelab ...` in the README's inline code
        return []
    names = [n for n in words[0].split("|") if n and not n.isupper()]  # `tunelab COMMAND --help`: a placeholder
    problems = []
    for name in names:
        if name.startswith("-"):
            continue
        parser = _sub(_parser(name if name in COMMANDS else None), name)
        if parser is None:
            problems.append(f"no command `tunelab {name}`")
            continue
        rest = words[1:]
        if _sub(parser, rest[0].split("|")[0] if rest else "") is not None:  # `data build-corpus|inspect ...`
            for sub in rest[0].split("|"):
                problems += [f"`tunelab {name} {sub}` has no {f}" for f in _flag_words(rest[1:])
                             if f not in _flags(_sub(parser, sub))]
            continue
        problems += [f"`tunelab {name}` has no {f}" for f in _flag_words(rest) if f not in _flags(parser)]
    return problems


def _flag_words(words: list[str]) -> list[str]:
    return [w.split("=")[0] for w in words if re.fullmatch(r"--?[a-z][\w-]*(=.*)?", w)]


def override_problems(args: argparse.Namespace) -> list[str]:
    config = getattr(args, "config", None)
    if config and (ROOT / config).is_file():  # a config of this repository: validate the whole run
        try:
            load_config(ROOT / config, args.overrides)
        except ConfigError as e:
            return [str(e)]
        return []
    # a placeholder (CONFIG, run.yaml): the keys at least
    return [f"`{o}` names no config field" for o in args.overrides if not names_a_field(o.partition("=")[0])]


def names_a_field(dotted: str) -> bool:
    model: type[BaseModel] | None = RunConfig
    for part in dotted.split("."):
        field = model.model_fields.get(part) if model else None
        if field is None:
            return False
        # the next section's model: a plain model, or one inside `Model | None`
        model = next((t for t in (field.annotation, *get_args(field.annotation))
                      if isinstance(t, type) and issubclass(t, BaseModel)), None)
    return True


def tunelab_problems(cmd: Command) -> list[str]:
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            args = parse_args(cmd.words)
    except SystemExit as e:
        if e.code == 0:  # --help, --version
            return []
        return [stderr.getvalue().strip().splitlines()[-1]]
    return override_problems(args) if hasattr(args, "overrides") else []


@pytest.mark.parametrize("cmd", [c for c in COMMANDS_IN_DOCS if c.kind == "tunelab"], ids=str)
def test_tunelab_commands_parse_and_their_overrides_validate(cmd):
    problems = tunelab_problems(cmd)
    if cmd.error is None:
        assert not problems, f"{cmd}: {problems}"
    else:  # the docs show this command failing: it must, with the message shown
        assert any(p.endswith(cmd.error) for p in problems), f"{cmd}: shown failing with {cmd.error!r}, got {problems}"


@pytest.mark.parametrize("cmd", [c for c in COMMANDS_IN_DOCS if c.kind == "synopsis"] + inline_synopses(),
                         ids=str)
def test_synopses_name_real_commands_and_flags(cmd):
    assert not synopsis_problems(cmd), f"{cmd}: {synopsis_problems(cmd)}"


def _source_flags(path: Path) -> set[str]:
    """The `--flag` strings a script's source holds (its argparse options), without running it."""
    consts = {n.value for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
              if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return {c for c in consts if c.startswith("-")}


def _module_file(name: str) -> Path | None:
    base = ROOT / name.replace(".", "/")
    return next((p for p in (base.with_suffix(".py"), base / "__main__.py") if p.is_file()), None)


@pytest.mark.parametrize("cmd", [c for c in COMMANDS_IN_DOCS if c.kind in ("module", "script", "pytest")], ids=str)
def test_modules_scripts_and_test_files_exist(cmd):
    if cmd.kind == "pytest":
        files = [w.split("::")[0] for w in cmd.words if w.startswith("tests/")]
        assert all((ROOT / f).is_file() for f in files), f"{cmd}: no such test file"
        return
    if cmd.kind == "module":
        if not cmd.words[0].startswith("tunelab."):
            return
        path = _module_file(cmd.words[0])
    else:
        path = ROOT / cmd.words[0] if (ROOT / cmd.words[0]).is_file() else None
    assert path is not None, f"{cmd}: no such module or file"
    if path.suffix == ".py" and "add_argument(" in path.read_text(encoding="utf-8"):  # argparse: its options
        unknown = [f for f in _flag_words(cmd.words[1:]) if f not in _source_flags(path)]
        assert not unknown, f"{cmd}: {path.relative_to(ROOT)} has no option {unknown}"


def test_the_checks_catch_broken_lines():
    text = """tunelab train CONFIG.yaml train.lrr=1e-4       # a misspelt key
$ tunelab eval runs/x --suites all
python -m tunelab.eval.nothing RUN
python benchmarks/quant_bench.py --no-such-flag
pip install -e . && tunelab quantise bundled > out.txt 2>&1
tunelab export RUN --gguf out.gguf [--dtype f32|f16] [--no-such-flag]
tunelab train configs/dpo.yaml train.objective=simpo train.simpo_gamma=-1
"""
    cmds = block_commands(Block(ROOT / "README.md", 1, "bash", [], text))
    assert [c.kind for c in cmds] == ["tunelab", "tunelab", "module", "script", "tunelab", "synopsis", "tunelab"]
    assert tunelab_problems(cmds[0]) == ["`train.lrr=1e-4` names no config field"]
    assert "unrecognized arguments: --suites" in tunelab_problems(cmds[1])[0]
    assert _module_file(cmds[2].words[0]) is None
    assert "--no-such-flag" not in _source_flags(ROOT / cmds[3].words[0]) and "--repeats" in _source_flags(
        ROOT / cmds[3].words[0])
    assert cmds[4].words == ["quantise", "bundled"] and "invalid choice: 'quantise'" in tunelab_problems(cmds[4])[0]
    assert synopsis_problems(cmds[5]) == ["`tunelab export` has no --no-such-flag"]
    assert "simpo_gamma" in tunelab_problems(cmds[6])[0]


FILE_SUFFIXES = {"json", "jsonl", "safetensors", "yaml", "gguf", "npy", "py", "md", "log", "png", "txt"}  # `model.safetensors`: a file


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_keys_in_inline_code_exist(page):
    # `train.kernels`, `lora.r=16`, `data.task: spans` in the prose name fields of RunConfig
    keys = [m.group(1) for code in inline_code(page)
            if (m := re.fullmatch(r"((?:model|quant|lora|data|train)(?:\.[a-z_]+)+)(?:=\S*|: \S+)?", code))
            and not FILE_SUFFIXES & set(m.group(1).split("."))]
    unknown = [k for k in keys if not names_a_field(k)]
    assert not unknown, f"{page.relative_to(ROOT)}: no such config field {unknown}"


# ---- yaml and python blocks ---------------------------------------------------------------------------------

def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


MINIMAL = {"data": {"sources": [{"name": "docs", "path": "local:qa"}]}}
# a tunelab config: one of its sections at the top, or the marker (```yaml config) on a block of other keys only
YAML_CONFIGS = [b for b in ALL_BLOCKS if b.lang in ("yaml", "yml") and ("config" in b.markers or (
                isinstance(t := yaml.safe_load(b.text), dict) and CONFIG_KEYS & set(t)))]


@pytest.mark.parametrize("block", YAML_CONFIGS, ids=str)
def test_yaml_config_blocks_validate(block):
    # a fragment (`data:` alone) is merged into a minimal config, as load_config merges overrides
    tree = _deep_merge(MINIMAL, yaml.safe_load(block.text))
    assert load_config(None, base=tree)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_bundled_configs_validate(path):
    assert load_config(path)


def python_blocks() -> list[tuple[Block, ast.Module]]:
    out = []
    for b in ALL_BLOCKS:
        if b.lang == "python":
            try:
                out.append((b, ast.parse(b.text)))
            except SyntaxError:  # a signature list, `... train ...`: prose in code font (read only)
                pass
    return out


def tunelab_names(tree: ast.Module) -> dict[str, object]:
    """What a block's imports bind from tunelab: `from tunelab.x import f` -> f, `import tunelab.x as m` -> m."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tunelab"):
            module = importlib.import_module(node.module)
            for a in node.names:
                assert hasattr(module, a.name), f"{node.module} has no {a.name}"
                names[a.asname or a.name] = getattr(module, a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("tunelab"):
                    names[a.asname or a.name] = importlib.import_module(a.name)
    return names


def resolve(node: ast.expr, names: dict[str, object]) -> object | None:
    """The tunelab object `f` or `tq.quantize` or `tq.QuantizedTensor.from_bnb_state_dict` names, else None."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Attribute) and (owner := resolve(node.value, names)) is not None:
        assert hasattr(owner, node.attr), f"{getattr(owner, '__name__', owner)} has no {node.attr}"
        return getattr(owner, node.attr)
    return None


@pytest.mark.parametrize("block,tree", python_blocks(), ids=lambda x: str(x) if isinstance(x, Block) else "")
def test_python_blocks_call_tunelab_as_it_is(block, tree):
    # every tunelab name exists, and every call of one binds to its signature (argument count, keyword names)
    names = tunelab_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            resolve(node, names)
        if isinstance(node, ast.Call) and callable(f := resolve(node.func, names)) and not any(
                isinstance(a, ast.Starred) for a in node.args) and all(k.arg for k in node.keywords):
            try:
                inspect.signature(f).bind(*node.args, **{k.arg: k.value for k in node.keywords})
            except TypeError as e:
                raise AssertionError(f"{block}: {ast.unparse(node)}: {e}") from None


def test_python_check_catches_a_renamed_argument_and_a_missing_name():
    block = Block(ROOT / "README.md", 1, "python", [], "")
    good = ast.parse("import tunelab.quant as tq\nqt = tq.quantize(w, 'nf4', block_size=64)")
    test_python_blocks_call_tunelab_as_it_is(block, good)
    for bad, says in [("import tunelab.quant as tq\ntq.quantize(w, 'nf4', blocksize=64)", "blocksize"),
                      ("import tunelab.quant as tq\ntq.quantise(w)", "has no quantise"),
                      ("from tunelab.lora import apply_loras", "has no apply_loras")]:
        with pytest.raises(AssertionError, match=says):
            test_python_blocks_call_tunelab_as_it_is(block, ast.parse(bad))


# ---- runnable blocks ----------------------------------------------------------------------------------------

RUNNABLE = [b for b in ALL_BLOCKS if "run" in b.markers]


def test_markers_are_known():
    # mkdocs_hooks.py drops exactly these from the info string before mkdocs renders the page
    unknown = [f"{b}: {b.markers}" for b in ALL_BLOCKS if not set(b.markers) <= {"run", "config"}]
    assert not unknown, unknown


def test_runnable_blocks_are_few_and_shell():
    # each costs CI time: keep to a handful of cheap ones (TUNELAB_DOCS_TINY caps training at 2 steps): the
    # README's five recipes and one of docs/data.md
    assert 1 <= len(RUNNABLE) <= 8 and all(b.lang in SHELL - {""} for b in RUNNABLE), [str(b) for b in RUNNABLE]


# page -> (its folder, the blocks already run there): a page's blocks share a folder and run in order
_PAGE_FOLDERS: dict[Path, tuple[Path, set[int]]] = {}


def _run_block(block: Block, folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, TINY_ENV: "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                   os.environ.get("PYTHONPATH")]))}
    bindir = Path(sys.executable).parent  # the `tunelab` script of this environment
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("block", RUNNABLE, ids=str)
def test_runnable_blocks_run(block, tmp_path_factory):
    if block.page not in _PAGE_FOLDERS:
        folder = tmp_path_factory.mktemp(block.page.stem)
        for name in ("configs", "benchmarks"):
            (folder / name).symlink_to(ROOT / name)
        _PAGE_FOLDERS[block.page] = (folder, set())
    folder, done_lines = _PAGE_FOLDERS[block.page]
    # the page's blocks above this one first, once each (they ran already unless -k picked this block alone)
    for earlier in [b for b in RUNNABLE if b.page == block.page and b.line < block.line and b.line not in done_lines]:
        done_lines.add(earlier.line)
        ran = _run_block(earlier, folder)
        assert ran.returncode == 0, f"{earlier} (run before {block}): exit {ran.returncode}\n{ran.stderr[-2000:]}"
    done_lines.add(block.line)
    ran = _run_block(block, folder)
    assert ran.returncode == 0, f"{block}: exit {ran.returncode}\n{ran.stderr[-2000:]}"


def test_tiny_mode_caps_every_run(monkeypatch):
    monkeypatch.setenv(TINY_ENV, "1")
    args = parse_args(["train", "configs/lora-sft.yaml", "train.lr=1e-4"])
    cfg = load_config(ROOT / args.config, args.overrides)
    assert (cfg.train.max_steps, cfg.train.eval_batches, cfg.train.lr) == (2, 1, 1e-4)
    assert parse_args(["quickstart"]).max_steps == 2 and parse_args(["quickstart", "--max-steps", "1"]).max_steps == 1
    assert parse_args(["eval", "runs/x", "--suite", "injection", "--n", "20"]).n == 1
    monkeypatch.delenv(TINY_ENV)
    assert parse_args(["eval", "runs/x", "--n", "20"]).n == 20
    assert parse_args(["train", "configs/lora-sft.yaml"]).overrides == []


# ---- links --------------------------------------------------------------------------------------------------

def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lower-cased, punctuation but - and _ dropped, spaces
    to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"[`*]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = prose(page)
    seen: dict[str, int] = {}
    out = set(re.findall(r"<a (?:id|name)=\"([^\"]+)\"", text))
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        slug = github_slug(heading)
        out.add(f"{slug}-{seen[slug]}" if slug in seen else slug)  # repeated headings: -1, -2, ...
        seen[slug] = seen.get(slug, 0) + 1
    return out


def links(page: Path) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", prose(page))  # inline code
    return re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text) + \
        re.findall(r"^\[[^\]]+\]:\s*(\S+)", text, flags=re.M)


def test_slug_rule():
    assert github_slug("Configuration: `data:` section of a run's YAML") == "configuration-data-section-of-a-runs-yaml"
    assert github_slug("Runs 20-25: a second machine (AVX-512)") == "runs-20-25-a-second-machine-avx-512"
    assert github_slug("Where the time goes ([profile](x.md))") == "where-the-time-goes-profile"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_readme_keeps_measurements_in_its_tables():
    # the README is a front door: ratios, percentages and run logs live in its two tables (the quickstart's and
    # the headline results), each row copied from a docs page that has the command; none in its prose
    text = prose(ROOT / "README.md")
    loose = [line for line in text.splitlines() if not line.startswith("|")
             and re.search(r"\d(\.\d+)?x\b|\d(\.\d+)?%|\bUTC\b|\bruns? \d|\d s\b|\bMiB\b", line)]
    assert not loose, loose


# ---- the docs site ------------------------------------------------------------------------------------------

def test_mkdocs_nav_lists_every_docs_page():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]
    listed = {next(iter(item.values())) if isinstance(item, dict) else item for item in nav}
    assert listed == {p.name for p in PAGES if p.parent.name == "docs"}


def test_mkdocs_builds_strict(tmp_path):
    pytest.importorskip("mkdocs")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()
    for page in (tmp_path / "site").rglob("*.html"):  # every fence rendered as code (mkdocs_hooks.py), none as text
        assert "<p>```" not in page.read_text(encoding="utf-8"), page
    for block in [b for b in RUNNABLE if b.page.parent.name == "docs"]:  # the README is GitHub's, not the site's
        html = (tmp_path / "site" / block.page.stem / "index.html").read_text(encoding="utf-8")
        first = block.text.splitlines()[0].replace("&", "&amp;")
        assert f'<code class="language-{block.lang}">{first}' in html, block


if __name__ == "__main__":  # python tests/project/test_docs.py: which blocks are run, which parsed, which only read
    yaml_ids = {id(b) for b in YAML_CONFIGS}
    python_ids = {id(b) for b, _ in python_blocks()}
    for b in ALL_BLOCKS:
        n = sum(c.block is b for c in COMMANDS_IN_DOCS)
        how = ("run" if b in RUNNABLE else f"parsed: {n} command line(s)" if n else
               "validated as RunConfig" if id(b) in yaml_ids else "tunelab names and calls checked" if id(b) in python_ids else
               "read only (output, layout or not a tunelab config)")
        print(f"{b}: {how}")

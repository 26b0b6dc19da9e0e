"""tunelab export --modelfile: an Ollama Modelfile beside the GGUF (FROM, TEMPLATE, stop tokens, SYSTEM)."""

import re
from pathlib import Path

import pytest

from tests.support.export_helpers import parse, save_base
from tests.support.tiny_models import make_tiny_tokenizer
from tunelab.errors import TunelabError
from tunelab.export.cli import export as export_cli
from tunelab.export.modelfile import GO_TEMPLATES, chat_format, modelfile_text

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And now?"}]


def render_go(template: str, messages: list[dict]) -> str:
    """Ollama's rendering of exactly the constructs GO_TEMPLATES use: `{{- range .Messages }}BODY{{ end }}TAIL`
    with {{ .Role }} / {{ .Content }} in BODY (a narrow stand-in for Go's text/template, for this check only)."""
    body, tail = re.fullmatch(r"\{\{- range \.Messages \}\}(.*?)\{\{ end \}\}(.*)", template, re.S).groups()
    return "".join(body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"])
                   for m in messages) + tail


def test_chatml_template_renders_as_the_jinja_template():
    tok = make_tiny_tokenizer()
    assert chat_format(tok.chat_template) == "chatml"
    jinja = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert render_go(GO_TEMPLATES["chatml"][1], MESSAGES) == jinja


def test_llama3_template_renders_as_llama3s_jinja():
    # Llama 3.1's turn format (its Jinja template, system/date preamble aside), written out for the check.
    llama3 = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
              "m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
              "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
    tok = make_tiny_tokenizer()
    tok.chat_template = llama3
    assert chat_format(llama3) == "llama3"
    jinja = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert render_go(GO_TEMPLATES["llama3"][1], MESSAGES) == jinja


def test_export_writes_modelfile_beside_the_gguf(tmp_path, capsys):
    base = save_base(tmp_path / "base")
    out = tmp_path / "out" / "tiny.gguf"
    argv = [str(base), "--gguf", str(out), "--dtype", "f16", "--modelfile", "--system", "You are terse."]
    assert export_cli.run(parse(export_cli, argv)) == 0
    text = (tmp_path / "out" / "tiny.Modelfile").read_text()
    lines = text.splitlines()
    assert lines[0] == "FROM ./tiny.gguf" and out.is_file()
    assert f'TEMPLATE """{GO_TEMPLATES["chatml"][1]}"""' in text
    assert 'PARAMETER stop """<|im_end|>"""' in lines and 'SYSTEM """You are terse."""' in lines
    assert "ollama create NAME -f" in capsys.readouterr().out


def test_unknown_template_and_bad_values():
    tok = make_tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    text = modelfile_text(Path("m.gguf"), tok, ["</s>"])
    assert "TEMPLATE" not in text.replace("# No TEMPLATE", "") and "SYSTEM" not in text
    with pytest.raises(TunelabError, match='cannot contain """'):
        modelfile_text(Path("m.gguf"), tok, ["</s>"], system='say """hi"""')
    with pytest.raises(TunelabError, match="add --modelfile"):
        export_cli.run(parse(export_cli, ["bundled", "--gguf", "x.gguf", "--system", "hi"]))

"""An Ollama Modelfile beside an exported GGUF: `ollama create NAME -f model.Modelfile`.

FROM the GGUF (a path relative to the Modelfile's folder, so the two move together), TEMPLATE in Ollama's
Go-template syntax for the chat formats whose Jinja template can be recognized (ChatML, Llama 3), one
PARAMETER stop per end-of-turn token, and SYSTEM when a system prompt is given. Format:
https://github.com/ollama/ollama/blob/main/docs/modelfile.md
"""

from __future__ import annotations

from pathlib import Path

# Go templates over Ollama's .Messages (each .Role / .Content; the SYSTEM prompt arrives as a system message),
# ending with the assistant header the model continues from: the same text the Jinja templates produce.
GO_TEMPLATES = {
    "chatml": ("<|im_start|>", "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
                               "{{ end }}<|im_start|>assistant\n"),
    "llama3": ("<|start_header_id|>", "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>"
                                      "\n\n{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant"
                                      "<|end_header_id|>\n\n"),
}


def chat_format(chat_template: str | None) -> str | None:
    """`chatml` / `llama3` when the Jinja chat template is one of them (by its turn markers), else None."""
    for name, (marker, _) in GO_TEMPLATES.items():
        if chat_template and marker in chat_template:
            return name
    return None


def _quote(text: str) -> str:
    """A Modelfile value in triple quotes (the form that may span lines); embedded triple quotes refused."""
    from tunelab.errors import TunelabError

    if '"""' in text:
        raise TunelabError('a Modelfile value cannot contain """ (Ollama has no escape for it): change the text')
    return f'"""{text}"""'


def modelfile_text(gguf_path: Path, tokenizer, stop_tokens: list[str], system: str | None = None) -> str:
    lines = [f"FROM ./{gguf_path.name}"]
    fmt = chat_format(tokenizer.chat_template)
    if fmt is not None:
        lines.append(f"TEMPLATE {_quote(GO_TEMPLATES[fmt][1])}")
    else:
        lines.append("# No TEMPLATE: this chat template is neither ChatML nor Llama 3; write one in Go-template "
                     "syntax (see the Modelfile docs) if Ollama does not pick it up from the GGUF")
    lines += [f"PARAMETER stop {_quote(t)}" for t in stop_tokens]
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: str | Path, model, tokenizer, system: str | None = None) -> Path:
    """Write `<gguf stem>.Modelfile` beside `gguf_path`; the stop tokens are the model's EOS ids' tokens."""
    from tunelab.export.resolve import stop_ids

    gguf_path = Path(gguf_path)
    stops = list(dict.fromkeys(tokenizer.convert_ids_to_tokens(stop_ids(model, tokenizer))))
    out = gguf_path.with_suffix(".Modelfile")
    out.write_text(modelfile_text(gguf_path, tokenizer, stops, system), encoding="utf-8")
    return out

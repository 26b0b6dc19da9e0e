"""tunelab generate / chat: greedy output equal on the fly and merged; streaming stops at EOS; 4-bit folders."""

import io

import pytest
import torch
from safetensors.torch import save_file

from tests.support.export_helpers import QUANT, ids, logits, make_adapter, make_run, parse, save_base
from tests.support.tiny_models import make_tiny_llama, make_tiny_tokenizer
from tunelab.errors import TunelabError
from tunelab.export.chat import chat_loop, reply
from tunelab.export.cli import chat as chat_cli
from tunelab.export.cli import generate as generate_cli
from tunelab.export.resolve import open_model
from tunelab.quant import quantize_model

PROMPTS = ["Say something.", "What is a list?"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("base") / "tiny")


def test_generate_same_on_the_fly_and_merged(base, tmp_path, capsys):
    adapter = make_adapter(base, tmp_path / "adapter")
    argv = [str(adapter), "--max-new-tokens", "12"] + [a for p in PROMPTS for a in ("--prompt", p)]
    generate_cli.run(parse(generate_cli, argv))
    on_the_fly = capsys.readouterr().out
    generate_cli.run(parse(generate_cli, argv + ["--merge"]))
    merged = capsys.readouterr().out
    assert on_the_fly == merged and on_the_fly.count("### ") == 2
    base_only = parse(generate_cli, [str(base), "--max-new-tokens", "12", "--prompt", PROMPTS[0]])
    generate_cli.run(base_only)
    assert capsys.readouterr().out.strip() != on_the_fly.split("\n")[1].strip()  # the adapter changed the answer


def _eos_after(model, tok, messages) -> str:
    """Make the model end its greedy answer with <|im_end|> after a few tokens; return the text before it.

    Swapping lm_head rows of <|im_end|> and the k-th greedy token (one not seen before it) changes nothing
    before step k (untied embeddings), and at step k the model emits EOS instead.
    """
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    k = next(i for i in range(2, len(new)) if new[i] not in new[:i] + [tok.eos_token_id])
    with torch.no_grad():
        w = model.lm_head.weight
        w[[tok.eos_token_id, new[k]]] = w[[new[k], tok.eos_token_id]]
    return tok.decode(new[:k], skip_special_tokens=True).strip()


def test_chat_streams_and_stops_at_eos():
    model, tok = make_tiny_llama(), make_tiny_tokenizer()
    first = [{"role": "user", "content": "hello"}]
    expected = _eos_after(model, tok, first)
    stdout = io.StringIO()
    turns = chat_loop(model, tok, io.StringIO("hello\n\nsecond turn\n/exit\nnot read\n"), stdout,
                      max_new_tokens=40)
    assert turns == 2
    lines = stdout.getvalue().split("> ")
    assert lines[1].strip() == expected  # the first answer ends where the EOS token was
    assert len(lines) == 5 and lines[-1] == ""  # prompt, 2 answers, an empty line skipped, then /exit


def test_chat_answer_equals_plain_greedy():
    model, tok = make_tiny_llama(), make_tiny_tokenizer()
    msgs = [{"role": "user", "content": "hi"}]
    streamed = io.StringIO()
    answer = reply(model, tok, msgs, max_new_tokens=10, out=streamed)
    assert streamed.getvalue().strip() == answer and answer
    enc = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), return_tensors="pt",
              add_special_tokens=False)
    ref = model.generate(**enc, max_new_tokens=10, do_sample=False, eos_token_id=2, pad_token_id=0)
    assert tok.decode(ref[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() == answer


def test_chat_command_reads_stdin(base, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))  # EOF quits
    assert chat_cli.run(parse(chat_cli, [str(base), "--max-new-tokens", "4"])) == 0
    assert capsys.readouterr().out.count("> ") == 2



@pytest.mark.parametrize("command", ["generate", "chat"])
def test_max_new_tokens_below_one_is_a_one_line_error(base, monkeypatch, capsys, command):
    from tunelab.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    prompt = ["--prompt", "hi"] if command == "generate" else []
    assert main([command, str(base), *prompt, "--max-new-tokens", "0"]) == 2
    assert capsys.readouterr().err == f"tunelab {command}: error: --max-new-tokens must be 1 or more, got 0\n"


def test_truncated_base_weights_are_a_one_line_error(base, tmp_path, capsys):
    import shutil

    from tunelab.cli import main

    cut = shutil.copytree(base, tmp_path / "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["generate", str(cut), "--prompt", "hi"]) == 2
    assert f"{cut / 'model.safetensors'}: not a readable safetensors file" in capsys.readouterr().err

def _save_4bit(base, folder):
    """A 4-bit folder as `tunelab quantize --save` writes it: bitsandbytes Linear4bit keys in safetensors."""
    from transformers import AutoModelForCausalLM

    model = quantize_model(AutoModelForCausalLM.from_pretrained(base), **QUANT)
    folder.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return model


def test_4bit_folder_loads_back_as_linear4bit(base, tmp_path):
    from tunelab.quant import Linear4bit

    saved = _save_4bit(base, tmp_path / "q4")
    opened = open_model(str(tmp_path / "q4"))
    assert isinstance(opened.model.get_submodule("model.layers.0.self_attn.q_proj"), Linear4bit)
    assert torch.equal(logits(opened.model, ids()), logits(saved.eval(), ids()))
    run = make_run(base, tmp_path / "run")  # a QLoRA adapter on the 4-bit folder = the trained model
    on_4bit = open_model(str(tmp_path / "q4"), adapter=str(run / "adapter")).model
    assert (logits(on_4bit, ids()) - logits(open_model(str(run)).model, ids())).abs().max() <= 1e-5
    with pytest.raises(TunelabError, match="is 4-bit, so its original weights are not here"):
        open_model(str(run), base=str(tmp_path / "q4"), merge=True)


def test_4bit_folder_with_wrong_config_names_the_tensor(base, tmp_path):
    _save_4bit(base, tmp_path / "q4")
    make_tiny_llama(num_hidden_layers=1).config.save_pretrained(tmp_path / "q4")
    with pytest.raises(TunelabError, match="layers.1"):
        open_model(str(tmp_path / "q4"))


def test_kernels_switch_for_opened_models(base, tmp_path, capsys):
    """--kernels (as train.kernels) on a model opened to run: a QLoRA run with `auto` gets the fused LoRA
    autograd, the dequantize kernel and the fused modules on this instance only; its logits agree with `off`
    (the plain path) to float32 rounding (matmul_error_bound-sized: 1e-5 of the largest logit here); the
    generated text is the same; another model opened with `off` in the same process is untouched."""
    from tunelab.lora.layer import LoRALinear
    from tunelab.quant import Linear4bit

    run = make_run(base, tmp_path / "run")
    fast, plain = open_model(str(run), kernels="auto").model, open_model(str(run)).model
    lora = [m for m in fast.modules() if isinstance(m, LoRALinear)]
    assert lora and all(m.kernel is not None for m in lora)
    assert all(m.kernel is None for m in plain.modules() if isinstance(m, LoRALinear))
    assert all(m.dequant is None for m in plain.modules() if isinstance(m, Linear4bit))
    from tunelab.accel import fused

    assert (type(fast.model.norm) is not type(plain.model.norm)) == fused.available()  # the fused RMSNorm, per instance
    a, b = logits(fast, ids()), logits(plain, ids())
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    argv = [str(run), "--max-new-tokens", "12", "--prompt", PROMPTS[0]]
    generate_cli.run(parse(generate_cli, argv + ["--kernels", "off"]))
    off_text = capsys.readouterr().out
    generate_cli.run(parse(generate_cli, argv))  # the default: auto
    assert capsys.readouterr().out == off_text

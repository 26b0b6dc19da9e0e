"""tunelab export --gguf: llama tensors, rope permutation and tokenizer that transformers reads back exactly."""

import json

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support.export_helpers import ids, logits, make_adapter, parse, save_base
from tests.support.tiny_models import make_tiny_llama, make_tiny_tokenizer
from tunelab.errors import TunelabError
from tunelab.export.cli import export as export_cli
from tunelab.export.gguf import export_gguf, llama_permute
from tunelab.export.resolve import open_model

TOL = 1e-4
TEXTS = ["Hello world, 12345 ok!", "<|im_start|>user\nhi there<|im_end|>\n", "  two spaces\n\ttab ünïcode 日本"]


def reload(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_adapter_to_gguf_f32_round_trip(tied, tmp_path):
    base = save_base(tmp_path / "base", tie_word_embeddings=tied)
    adapter = make_adapter(base, tmp_path / "adapter")
    out = tmp_path / "m.gguf"
    assert export_cli.run(parse(export_cli, [str(adapter), "--gguf", str(out), "--dtype", "f32"])) == 0
    x = ids()
    on_the_fly = logits(open_model(str(adapter)).model.eval(), x)
    assert (logits(reload(out), x) - on_the_fly).abs().max() <= TOL
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert ("output.weight" in names) is not tied  # tied: llama.cpp reuses token_embd
    assert {"token_embd.weight", "blk.1.attn_q.weight", "blk.0.ffn_down.weight", "output_norm.weight"} <= names


def test_q8_0_and_f16_are_close_and_typed_as_llama_cpp_does(tmp_path):
    model, tok = make_tiny_llama(), make_tiny_tokenizer()
    x = ids()
    diffs = {}
    for dtype in ("f16", "q8_0"):
        path = export_gguf(model, tok, tmp_path / f"{dtype}.gguf", dtype)
        diffs[dtype] = (logits(reload(path), x) - logits(model, x)).abs().max().item()
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
        assert types["blk.0.attn_norm.weight"] == "F32"
        assert types["blk.0.attn_q.weight"] == dtype.upper()
    # q8_0 keeps 8 bits per weight plus an fp16 scale per 32: larger error than fp16, still small.
    assert 0 < diffs["f16"] < diffs["q8_0"] < 0.05, diffs


def test_tokenizer_round_trip(tmp_path):
    model, tok = make_tiny_llama(), make_tiny_tokenizer()
    path = export_gguf(model, tok, tmp_path / "t.gguf")
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        assert back(text)["input_ids"] == tok(text)["input_ids"], text
    assert (back.eos_token, back.pad_token, back.chat_template) == (tok.eos_token, tok.pad_token, tok.chat_template)
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt-2"


def test_vocab_padded_to_the_embedding_rows(tmp_path):
    model, tok = make_tiny_llama(vocab_size=544), make_tiny_tokenizer()  # 32 spare rows, as models often have
    path = export_gguf(model, tok, tmp_path / "p.gguf")
    tokens = gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 544 and tokens[-1] == "[PAD543]"
    assert (logits(reload(path), ids()) - logits(model, ids())).abs().max() <= TOL
    with pytest.raises(TunelabError, match="512 tokens but the model's embedding has only 256 rows"):
        export_gguf(make_tiny_llama(vocab_size=256), tok, tmp_path / "small.gguf")


def test_permutation_turns_half_rope_into_interleaved_rope():
    """Float64 reference: rotating HF's (i, i + d/2) pairs then permuting == permuting then rotating
    llama.cpp's (2i, 2i + 1) pairs, for every head, so the GGUF q/k give the same attention."""
    n_head, d, pos = 3, 8, 5.0
    q = torch.randn(n_head * d, dtype=torch.float64)
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d) * pos  # (d/2,)

    def rope_half(v):  # HF: rotate_half within each head
        h = v.view(n_head, d)
        a, b = h[:, : d // 2], h[:, d // 2:]
        return torch.cat([a * theta.cos() - b * theta.sin(), b * theta.cos() + a * theta.sin()], 1).reshape(-1)

    def rope_pairs(v):  # llama.cpp LLAMA_ROPE_TYPE_NORM: adjacent pairs
        h = v.view(n_head, d // 2, 2)
        a, b = h[..., 0], h[..., 1]
        return torch.stack([a * theta.cos() - b * theta.sin(), b * theta.cos() + a * theta.sin()], -1).reshape(-1)

    permute = lambda v: llama_permute(v.view(-1, 1), n_head).view(-1)  # noqa: E731
    assert torch.allclose(permute(rope_half(q)), rope_pairs(permute(q)), atol=1e-12)


def test_unsupported_inputs_name_what_is_wrong(tmp_path):
    from tunelab.lora import LoraConfig, apply_lora

    lora = apply_lora(make_tiny_llama(), LoraConfig(r=2, alpha=4), verbose=False)
    with pytest.raises(TunelabError, match="merge the adapter first"):
        export_gguf(lora, make_tiny_tokenizer(), tmp_path / "l.gguf")
    with pytest.raises(TunelabError, match="dtype must be one of"):
        export_gguf(make_tiny_llama(), make_tiny_tokenizer(), tmp_path / "x.gguf", "q4_k")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))


def test_an_earlier_gguf_is_replaced_anything_else_refused(tmp_path):
    model, tok = make_tiny_llama(), make_tiny_tokenizer()
    path = export_gguf(model, tok, tmp_path / "m.gguf", "f16")
    export_gguf(model, tok, path, "f32")  # a new export over an old one: replaced
    assert gguf.GGUFReader(path).tensors[0].tensor_type.name == "F32"
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(TunelabError, match="exists and is not a GGUF file"):
        export_gguf(model, tok, notes)
    with pytest.raises(TunelabError, match="is a folder"):
        export_gguf(model, tok, tmp_path)
    assert notes.read_text() == "my notes" and not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_sentencepiece_tokenizer_written_as_llama_cpps_converter_does(kind, tmp_path):
    """GGUF's `llama` tokenizer kind: tokens, scores = -(rank of the token's first merge), types (BYTE for <0xXX>,
    UNKNOWN, CONTROL), U+2581 prefix for Llama-2 style, not for Gemma; transformers' GGUF reader splits text
    the same way (llama.cpp itself: test_export_llamacpp.py)."""
    from tests.support.export_helpers import make_spm_tokenizer, tiny

    tok = make_spm_tokenizer(kind)  # transformers' reader picks the Gemma tokenizer by the GGUF architecture
    model = tiny("gemma2", head_dim=256, tie_word_embeddings=True) if kind == "gemma" else make_tiny_llama()
    path = export_gguf(model, tok, tmp_path / "s.gguf")
    fields = gguf.GGUFReader(path).fields
    assert (fields["tokenizer.ggml.model"].contents(), fields["tokenizer.ggml.pre"].contents()) == ("llama", "default")
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is (kind == "llama")
    tokens, scores = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.scores"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    merges = [a + b for a, b in json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]]
    first = {}
    for rank, merged in enumerate(merges):
        first.setdefault(merged, rank)
    assert tokens == [tok.convert_ids_to_tokens(i) for i in range(512)]
    assert scores == [-float(first.get(t, 0)) for t in tokens] and len(set(scores)) > 100
    assert types.count(gguf.TokenType.BYTE) == 256 and types[tokens.index("<0x41>")] == gguf.TokenType.BYTE
    assert types[tok.unk_token_id] == gguf.TokenType.UNKNOWN and types[tok.eos_token_id] == gguf.TokenType.CONTROL
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        if not text.startswith(" "):  # transformers' Metaspace and SentencePiece differ there (docs/export.md)
            assert back(text)["input_ids"] == tok(text)["input_ids"], text


def test_tokenizers_llama_cpp_would_split_differently_are_refused(tmp_path):
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import PreTrainedTokenizerFast

    from tests.support.export_helpers import make_spm_tokenizer

    with pytest.raises(TunelabError, match=r"merges leave out .* llama.cpp merges every pair whose concatenation"):
        export_gguf(make_tiny_llama(), make_spm_tokenizer(all_merges=False), tmp_path / "m.gguf")
    unigram = SentencePieceUnigramTokenizer()
    unigram.train_from_iterator(["some text to train on, and more text"] * 4, vocab_size=40, show_progress=False)
    with pytest.raises(TunelabError, match=r"supports byte-level BPE .* this tokenizer is Unigram .* not by Unigram"):
        export_gguf(make_tiny_llama(), PreTrainedTokenizerFast(tokenizer_object=unigram), tmp_path / "u.gguf")
    assert not list(tmp_path.iterdir())

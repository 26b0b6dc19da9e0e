"""A Hugging Face (tokenizers-backed) tokenizer as GGUF's tokenizer.ggml.* keys, in the two kinds llama.cpp runs
for the families we export:

- gpt2: byte-level BPE (Llama 3, Qwen, SmolLM): tokens, token types, merges, and the pre-tokenizer's name.
- llama: SentencePiece BPE with byte fallback (Llama-2, Mistral v0.1-v0.3, Gemma, Phi-3): tokens, scores and
  token types, as llama.cpp's convert_hf_to_gguf.py writes them from tokenizer.model. llama.cpp's SPM
  tokenizer (src/llama-vocab.cpp, llm_tokenizer_spm_session) turns spaces into U+2581, optionally puts one in
  front (`add_space_prefix`), splits the text into characters and keeps merging the adjacent pair whose
  concatenation is a token with the highest score (leftmost first); characters left that are not tokens
  become <0xXX> byte tokens. A tokenizer.json keeps no scores, only merges ranked as SentencePiece's scores
  were (transformers' generate_merges lists every split of every piece, ordered by the piece's score), so the
  score written is minus the rank of a token's first merge: the same merge order.

Unigram (T5-style SentencePiece) and WordPiece tokenizers are refused with one line: llama.cpp's llama kind
merges by score, which is not a Unigram segmentation.
"""

from __future__ import annotations

import json

from tunelab.errors import TunelabError

SPACE = "\u2581"  # SentencePiece's visible space
SUPPORTED = "byte-level BPE (GGUF's gpt2) and SentencePiece BPE with byte fallback (GGUF's llama)"


def write_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """tokenizer.ggml.* for `tokenizer`, the vocabulary padded to the model's vocab_size (embedding rows)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TunelabError(f"GGUF export needs a fast (tokenizers-backed) tokenizer; got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model["type"] == "BPE" and _is_byte_level(spec):
        _write_gpt2(writer, tokenizer, spec, vocab_size)
    elif model["type"] == "BPE" and model.get("byte_fallback") and _space_marker(spec):
        _write_sentencepiece(writer, tokenizer, spec, vocab_size)
    else:
        pre = (spec.get("pre_tokenizer") or {}).get("type")
        why = (": llama.cpp's SentencePiece kind merges pieces by score, not by Unigram's best segmentation, so the "
               "ids would differ" if model["type"] == "Unigram" else "")
        raise TunelabError(f"GGUF export supports {SUPPORTED} tokenizers; this tokenizer is {model['type']} "
                           f"(byte_fallback={model.get('byte_fallback')}, pre-tokenizer {pre}){why}")
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(_adds_bos(tokenizer))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _write_gpt2(writer, tokenizer, spec: dict, vocab_size: int) -> None:
    tokens, types = _vocab(tokenizer, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)


def _write_sentencepiece(writer, tokenizer, spec: dict, vocab_size: int) -> None:
    from gguf import TokenType

    tokens, types = _vocab(tokenizer, vocab_size)
    scores = merge_scores(spec["model"], tokens, {t.content for t in tokenizer.added_tokens_decoder.values()})
    for i, token in enumerate(tokens):
        if i == tokenizer.unk_token_id:
            types[i] = int(TokenType.UNKNOWN)  # as SentencePiece's IsUnknown (llama.cpp's converter)
        elif types[i] == TokenType.NORMAL and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types[i] = int(TokenType.BYTE)  # <0xXX>: what llama.cpp emits for characters no token covers
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(_space_marker(spec) == "prefix")


def merge_scores(model: dict, tokens: list[str], added: set[str]) -> list[float]:
    """SentencePiece scores for llama.cpp, one per token: -(rank of the token's first merge), 0 for tokens no
    merge makes (characters, bytes, special tokens: llama.cpp never merges into them by score alone).

    llama.cpp merges any adjacent pair whose concatenation is a token, HF's BPE only the pairs listed in
    `merges`: they split text the same way when every such pair is listed (as transformers' generate_merges
    lists them for a converted tokenizer.model); otherwise this is an error naming a missing pair.
    """
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    first_rank: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        first_rank.setdefault(left + right, rank)
    listed, vocab = set(merges), model["vocab"]
    for token in set(vocab) - added:  # every split of a token into two tokens must be a merge
        for cut in range(1, len(token)):
            pair = (token[:cut], token[cut:])
            if pair[0] in vocab and pair[1] in vocab and pair not in listed:
                raise TunelabError(
                    f"GGUF export: this SentencePiece-style tokenizer's merges leave out {pair[0]!r} + {pair[1]!r} -> "
                    f"{token!r}; llama.cpp merges every pair whose concatenation is a token, so it would split "
                    "some text differently (a tokenizer converted from a tokenizer.model lists every such pair)")
    return [-float(first_rank[t]) if t in first_rank else 0.0 for t in tokens]


def _space_marker(spec: dict) -> str | None:
    """How a SentencePiece-style tokenizer marks spaces: "prefix" (U+2581 for spaces and one in front: Llama-2,
    Mistral), "replace" (U+2581 for spaces only: Gemma), None (not SentencePiece-style)."""
    pre, norm = spec.get("pre_tokenizer") or {}, spec.get("normalizer") or {}
    if pre.get("type") == "Metaspace" and pre.get("replacement") == SPACE:
        return "replace" if pre.get("prepend_scheme", "always") == "never" else "prefix"
    steps = norm.get("normalizers", [norm])
    replaces = any(s.get("type") == "Replace" and s.get("pattern", {}).get("String") == " " and s.get("content") == SPACE
                   for s in steps)
    prepends = any(s.get("type") == "Prepend" and s.get("prepend") == SPACE for s in steps)
    return ("prefix" if prepends else "replace") if replaces else None


def _vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their GGUF types; ids past the tokenizer (embedding padding) are [PADi], UNUSED."""
    from gguf import TokenType

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise TunelabError(f"the tokenizer has {len(by_id)} tokens but the model's embedding has only "
                           f"{vocab_size} rows: this tokenizer does not belong to this model")
    added = tokenizer.added_tokens_decoder  # id -> AddedToken(special=...)
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL if i not in added else
                         TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
    return tokens, [int(t) for t in types]


def _is_byte_level(spec: dict) -> bool:
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    return any(p.get("type") == "ByteLevel" for p in parts)


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for how a byte-level tokenizer splits text before BPE.

    gpt-2: ByteLevel's own regex; smollm: single digits, then ByteLevel's regex; a Split regex + ByteLevel
    without regex: the name transformers' GGUF reader maps to that same regex (llama-bpe, qwen2, ...), so
    text splits the same way after a round trip.
    """
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    parts = (pre or {}).get("pretokenizers", [pre or {}])
    types = [p.get("type") for p in parts]
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if types == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = parts[0].get("pattern", {}).get("Regex")
        name = next((n for n, r in GGUF_PRE_TOKENIZER_SPLITS.items() if r == regex), None)
        if name is not None:
            return name
    raise TunelabError(f"GGUF export: this tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) matches no "
                       "pre-tokenizer that llama.cpp and transformers both know (gpt-2, smollm, llama-bpe, qwen2, ...)")


def _adds_bos(tokenizer) -> bool:
    """Whether encoding text puts BOS first (llama.cpp then adds it too)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]

"""Batched greedy generation with the KV cache, the one way every suite asks a model for answers.

Prompts are sorted by length and cut into batches so each batch pads little; batches are left-padded (the
new tokens of every row then start at the same position) and decoded by `model.generate` with the cache on.
Any Hugging Face causal LM works, including one whose linears were swapped for tunelab LoRA layers.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


def render_prompts(tokenizer, prompts: list[str], chat: bool = True, system: str | None = None) -> list[str]:
    """Each prompt as model input text: through the chat template (with the assistant header) or as is."""
    if not chat:
        return list(prompts)
    head = [{"role": "system", "content": system}] if system is not None else []
    return [
        tokenizer.apply_chat_template(head + [{"role": "user", "content": p}], tokenize=False,
                                      add_generation_prompt=True)
        for p in prompts
    ]


def _stop_ids(model, tokenizer) -> list[int]:
    """EOS ids from the tokenizer and the model's generation config (they may differ, e.g. ChatML's <|im_end|>)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    ids.discard(None)
    if not ids:
        raise ValueError("the tokenizer has no eos_token_id, so generation could not stop")
    return sorted(ids)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, chat: bool = True,
             batch_size: int = 16, system: str | None = None, progress: bool = True,
             stop_strings: list[str] | None = None, strip: bool = True,
             special_tokens: bool | None = None) -> list[str]:
    """Greedy continuations of `prompts`, in order, decoded without special tokens (and stripped if `strip`).

    Decoding stops per row at EOS (any of the tokenizer's or generation config's EOS ids), at any of
    `stop_strings` (the text is cut before it) or after `max_new_tokens`. `chat=True` wraps each prompt as
    a user turn in the tokenizer's chat template. `special_tokens`: whether encoding adds the tokenizer's
    special tokens such as BOS (default: only for plain text, since a chat template writes its own).
    """
    texts = render_prompts(tokenizer, prompts, chat, system)
    stop = _stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    device = next(model.parameters()).device
    special = not chat if special_tokens is None else special_tokens
    # stop strings: transformers ends a row once its text contains one; the cut itself is ours (below)
    by_string = {"stop_strings": stop_strings, "tokenizer": tokenizer} if stop_strings else {}
    lengths = [len(tokenizer(t, add_special_tokens=special)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])  # similar lengths share a batch
    outputs: list[str] = [""] * len(texts)
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch",
                          disable=not progress, leave=False):
            idx = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=special).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 eos_token_id=stop, pad_token_id=pad_id, temperature=None, top_p=None,
                                 top_k=None, **by_string)
            new = out[:, enc["input_ids"].shape[1]:]  # (B, <= max_new_tokens): only the continuation
            for i, row in zip(idx, new.tolist()):
                text = _cut(tokenizer.decode(_until_stop(row, stop), skip_special_tokens=True), stop_strings)
                outputs[i] = text.strip() if strip else text
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def _until_stop(ids: list[int], stop: list[int]) -> list[int]:
    """Tokens before the first stop id (rows that finished early are padded after their EOS)."""
    for j, t in enumerate(ids):
        if t in stop:
            return ids[:j]
    return ids


def _cut(text: str, stop_strings: list[str] | None) -> str:
    """`text` up to the first occurrence of any stop string (the whole text if none occurs)."""
    ends = [text.find(s) for s in stop_strings or [] if s and s in text]
    return text[:min(ends)] if ends else text

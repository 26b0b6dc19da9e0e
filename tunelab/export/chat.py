"""A terminal chat: the model's chat template, tokens streamed as they are decoded, a turn ends at EOS."""

from __future__ import annotations

from typing import TextIO

import torch

from tunelab.errors import TunelabError
from tunelab.export.resolve import stop_ids

EXIT = "/exit"


def _streamer(tokenizer, out: TextIO):
    """A transformers TextStreamer that writes the reply (not the prompt) to `out` as it grows."""
    from transformers import TextStreamer

    class _To(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return _To(tokenizer, skip_prompt=True, skip_special_tokens=True)


@torch.no_grad()
def reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 256, out: TextIO | None = None) -> str:
    """The model's greedy answer to `messages` (chat template + assistant header), streamed to `out`.

    Decoding stops at any EOS id of the tokenizer or the generation config, or after max_new_tokens.
    """
    if not tokenizer.chat_template:
        raise TunelabError("this tokenizer has no chat template: use `tunelab generate --no-chat` instead")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    stop = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    output = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                            pad_token_id=pad, temperature=None, top_p=None, top_k=None,
                            streamer=_streamer(tokenizer, out) if out is not None else None)
    return tokenizer.decode(output[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def chat_loop(model, tokenizer, stdin: TextIO, stdout: TextIO, system: str | None = None,
              max_new_tokens: int = 256, guard=None) -> int:
    """Read user lines from `stdin`, stream answers to `stdout`; `/exit` or end of input quits.

    The conversation so far is the context of every answer. `guard` (a tunelab.eval.guard.Guard) cleans each
    user turn before the model sees it. Returns the number of answered turns.
    """
    messages = [{"role": "system", "content": system}] if system else []
    model.eval()
    turns = 0
    stdout.write(f"chat: type a message, {EXIT} or Ctrl-D to quit\n")
    while True:
        stdout.write("> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == EXIT:
            stdout.write("\n" if not line else "")
            return turns
        if not line.strip():
            continue
        text = line.rstrip("\n")
        if guard is not None:
            from tunelab.eval.guard import guard_note

            text, before = guard.clean([text])[0], text
            stdout.write(f"[{guard_note([before], [text])}]\n")
        messages.append({"role": "user", "content": text})
        answer = reply(model, tokenizer, messages, max_new_tokens, out=stdout)
        messages.append({"role": "assistant", "content": answer})
        turns += 1

"""Side-by-side chat: the run's base model and its tuned model answer the same conversation, streamed.

Models load on first use (torch and transformers are imported then, not when the board starts) and stay
cached. A LoRA/QLoRA run loads once: the base answer is the same model with its adapters disabled
(tunelab.lora.disable_adapters), so both sides share the exact base weights. A full or freeze run loads
its saved model/ and, separately, the base named in its config. One generation runs at a time (a lock).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

from tunelab.board.runs import BoardError, read_config

MAX_NEW_TOKENS = 1024


class ChatModels:
    def __init__(self, cache_size: int = 2):
        self.cache: dict[str, tuple] = {}  # run folder -> (tuned, base or None, tokenizer)
        self.cache_size = cache_size
        self.lock = threading.Lock()

    def _load(self, run: Path) -> tuple:
        from tunelab.export.resolve import open_model

        key = str(run)
        if key not in self.cache:
            cfg, err = read_config(run)
            if cfg is None:
                raise BoardError(f"{err}: the board needs the run's config to load its models", 404)
            model_cfg = cfg.get("model") or {}
            if model_cfg.get("trust_remote_code"):
                raise BoardError("this run's model needs trust_remote_code, which the board never turns on: "
                                 "chat with it in the terminal (`tunelab chat RUN`)", 400)
            if not ((run / "adapter").is_dir() or (run / "model").is_dir()):
                raise BoardError(f"{run.name} has no adapter/ or model/ yet (still training, or it failed): "
                                 "nothing tuned to chat with", 404)
            tuned = open_model(str(run))
            base = None
            if tuned.source.adapter is None:  # a full/freeze run: the base is a second model
                base = open_model(str(model_cfg.get("source", "bundled"))).model.eval()
            if len(self.cache) >= self.cache_size:
                self.cache.pop(next(iter(self.cache)))
            self.cache[key] = (tuned.model.eval(), base, tuned.tokenizer)
        return self.cache[key]

    def template(self, run: Path, messages: list[dict]) -> dict:
        """The chat template and the prompt text it renders for `messages` (with the assistant header)."""
        _, _, tok = self._load(run)
        if not tok.chat_template:
            raise BoardError("this tokenizer has no chat template, so there is nothing to chat with: "
                             "use `tunelab generate --no-chat`", 400)
        return {"template": tok.chat_template,
                "prompt": tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)}

    def stream(self, run: Path, messages: list[dict], max_new_tokens: int = 128,
               temperature: float = 0.0) -> Iterator[dict]:
        """Events: {"side": "base"|"tuned", "text": piece} as tokens decode, then {"side", "done": True}."""
        import torch
        from transformers import TextIteratorStreamer

        from tunelab.export.resolve import stop_ids
        from tunelab.lora import disable_adapters

        check_messages(messages)
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS or not 0 <= temperature <= 2:
            raise BoardError(f"max_new_tokens must be 1..{MAX_NEW_TOKENS} and temperature 0..2")
        tuned, base, tok = self._load(run)
        text = self.template(run, messages)["prompt"]
        with self.lock:
            for side in ("base", "tuned"):
                model = base if side == "base" and base is not None else tuned
                off = disable_adapters(model) if side == "base" and base is None else nullcontext()
                enc = tok(text, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
                stop = stop_ids(model, tok)
                streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
                sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else \
                    {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
                errors = []

                def work():
                    try:
                        with off, torch.no_grad():
                            model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=stop, streamer=streamer,
                                           pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else stop[0],
                                           **sampling)
                    except Exception as e:  # noqa: BLE001 - shown in the panel; the server keeps running
                        errors.append(f"{type(e).__name__}: {e}")
                        streamer.end()

                thread = threading.Thread(target=work, daemon=True)
                thread.start()
                for piece in streamer:
                    if piece:
                        yield {"side": side, "text": piece}
                thread.join()
                yield {"side": side, "done": True, **({"error": errors[0]} if errors else {})}


def check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
            for m in messages):
        raise BoardError("messages must be a non-empty list of {role: system|user|assistant, content: text}")

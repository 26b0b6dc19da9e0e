"""lm-evaluation-harness integration: a tunelab model as the lm-eval model class `tunelab`.

Needs the optional `lm-eval` package (`pip install 'tunelab[lmeval]'`). Importing this module registers
the class, so from Python:

    import lm_eval
    import tunelab.eval.lmeval  # noqa: F401  (registers "tunelab")
    lm_eval.simple_evaluate(model="tunelab", model_args="model=bundled,adapter=runs/x/adapter",
                            tasks=["my_task"], task_manager=lm_eval.tasks.TaskManager(include_path="my_tasks"))

and from the shell, lm-eval's own command line with the class registered:

    python -m tunelab.eval.lmeval run --model tunelab --model_args model=bundled --tasks my_task \\
        --include_path my_tasks

`model` is `bundled`, a Hugging Face folder (e.g. a merged model), or a .gguf file; `adapter` a PEFT-layout
LoRA folder (tunelab's or PEFT's) loaded on top of it. An already-built (model, tokenizer) pair can be
passed as `TunelabLM(model=module, tokenizer=tok)`. Scoring follows lm-eval's Hugging Face class: text is
encoded without special tokens, an empty context is the BOS (else EOS) token, long inputs keep their last
`max_length` tokens, and generation is greedy (tunelab.eval.generate), cut at the task's `until` strings.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from tunelab.errors import TunelabError

try:
    import lm_eval.models  # noqa: F401  (the built-in model names, registered before ours)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # the optional extra is missing
    raise TunelabError(f"the lm-eval integration needs the lm-eval package ({e}); "
                       "install it with: pip install 'tunelab[lmeval]'") from None

# one request for _loglikelihood_tokens: ((context, continuation) or None, context ids, continuation ids)
Request = tuple[tuple[str, str] | None, list[int], list[int]]


@register_model("tunelab")
class TunelabLM(TemplateLM):
    """A tunelab model for lm-eval: loglikelihood, loglikelihood_rolling and generate_until, batched."""

    def __init__(self, model="bundled", adapter: str | None = None, tokenizer=None, batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, device: str | None = None,
                 max_batch_size: int | None = None) -> None:
        """`model`: a source for tunelab.models.load.load_pretrained or a torch module (then pass `tokenizer`);
        `adapter`: a LoRA folder to load on top; `max_length`: the longest input in tokens (default: the
        model's max_position_embeddings); `max_gen_toks`: the generation budget when a task sets none.
        lm-eval passes `max_batch_size` and `device` from its command line; the first is unused."""
        super().__init__()
        if isinstance(model, str):
            from tunelab.models.load import load_pretrained

            model, tokenizer = load_pretrained(model)
        elif tokenizer is None:
            raise TunelabError("TunelabLM(model=<a torch module>) needs tokenizer=<its tokenizer>")
        if adapter:
            from tunelab.lora import load_adapter

            model = load_adapter(model, adapter, verbose=False)
        if device and device.startswith("cuda") and not torch.cuda.is_available():  # lm-eval's CLI default
            print(f"tunelab: device={device} but CUDA is not available: running on the CPU", file=sys.stderr)
            device = None
        if str(batch_size).startswith("auto"):
            raise TunelabError("batch_size=auto is not supported by the tunelab lm-eval model: give a number")
        self.model = model.to(device) if device else model
        self.model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self._max_length = int(max_length) if max_length else getattr(model.config, "max_position_embeddings", 2048)
        self.max_gen_toks = int(max_gen_toks)
        self._device = next(self.model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per request.

        Rows are the context + continuation minus its last token, at most max_length tokens (the oldest
        dropped), sorted longest first and right-padded into batches of `batch_size`.
        """
        rows = []
        for _, ctx, cont in requests:
            if not cont:
                raise TunelabError("lm-eval asked for the log-likelihood of an empty continuation")
            rows.append(((ctx + cont)[-(self.max_length + 1):][:-1], cont))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            width = len(rows[idx[0]][0])
            ids = torch.full((len(idx), width), self.eot_token_id, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, :len(rows[i][0])] = torch.tensor(rows[i][0])
                mask[r, :len(rows[i][0])] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits  # (B, T, V)
            for r, i in enumerate(idx):
                n_in, cont = len(rows[i][0]), rows[i][1]
                x = logits[r, n_in - len(cont):n_in]  # (len(cont), V): the positions that predict cont
                logp = F.log_softmax(x.float() if x.dtype.itemsize < 4 else x, dim=-1)  # fp16/bf16 -> fp32
                target = torch.tensor(cont, device=logp.device)
                score = float(logp.gather(1, target[:, None]).sum())
                results[i] = (score, bool((logp.argmax(-1) == target).all()))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, after the prefix token, in lm-eval's disjoint windows of max_length."""
        windows, owner = [], []  # every window of every text, batched together; owner[k] = its text's index
        for i, req in enumerate(requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(req.args[0]), self.prefix_token_id, self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        out = [0.0] * len(requests)
        for i, (score, _) in zip(owner, self._loglikelihood_tokens(windows)):
            out[i] += score
        for req, total in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut before the first `until` string (or EOS), batched per generation setting."""
        from tunelab.eval.generate import generate

        eos = self.tokenizer.decode([self.eot_token_id])
        groups: dict[tuple, list[int]] = {}  # (until strings, max_gen_toks) -> request indices
        for i, req in enumerate(requests):
            kwargs = normalize_gen_kwargs(req.args[1], self.max_gen_toks)
            if kwargs.get("do_sample") or kwargs.get("temperature", 0) > 0:
                raise TunelabError(f"task {req.task_name!r} asks for sampling ({req.args[1]}); the tunelab "
                                   "lm-eval model decodes greedily only: set do_sample: false in the task")
            until = handle_stop_sequences(kwargs.get("until"), eos)
            groups.setdefault((tuple(until), kwargs["max_gen_toks"]), []).append(i)
        out = [""] * len(requests)
        for (until, max_new), idx in groups.items():
            texts = generate(self.model, self.tokenizer, [requests[i].args[0] for i in idx], max_new_tokens=max_new,
                             chat=False, batch_size=self.batch_size, progress=not disable_tqdm,
                             stop_strings=list(until), strip=False, special_tokens=False)
            for i, text in zip(idx, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


def main() -> None:
    """lm-eval's command line (`lm_eval ...`, arguments from sys.argv) with the `tunelab` model class registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()

"""Adapter + base -> a Hugging Face folder that transformers (and vLLM, llama.cpp's converter) load as is.

For a QLoRA adapter the merge goes into the original full-precision base weights, re-loaded from the
source, never into the de-quantized 4-bit weights unless asked: those carry every weight's rounding error
into the merged model. Both merges are measured against the trained model (4-bit base + adapter) so the
user sees the difference.
"""

from __future__ import annotations

import copy
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.export.resolve import Opened, merge_opened, open_model, stop_ids
from tunelab.heap import release_freed_memory

# A fixed probe for measuring how far two models' next-token logits are apart (a chat turn, as trained).
PROBE = "Explain in two sentences why the sky is blue, then give one example of Rayleigh scattering."


@dataclass
class MergeReport:
    """What `merge_to_folder` wrote and measured. diff_*: max |logits - trained model's logits| on PROBE."""

    out: Path
    qlora: bool
    from_quantized: bool
    diff_original: float | None = None
    diff_dequantized: float | None = None
    dtype: str = ""
    """The written weights' dtype, e.g. bfloat16."""


def probe_ids(tokenizer) -> torch.Tensor:
    """(1, T) ids of PROBE as a user turn in the chat template (plain text if the tokenizer has none)."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": PROBE}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return tokenizer(PROBE, return_tensors="pt")["input_ids"]


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids.to(next(model.parameters()).device)).logits.float().cpu()


def max_logit_diff(a: nn.Module, b: nn.Module, ids: torch.Tensor) -> float:
    """max |a(ids).logits - b(ids).logits| over every position and vocabulary entry, in fp32."""
    return (_logits(a, ids) - _logits(b, ids)).abs().max().item()


def save_hf_folder(model: nn.Module, tokenizer, out: str | os.PathLike) -> Path:
    """Write model (safetensors), config, tokenizer, chat template and generation config, atomically.

    The generation config's eos_token_id lists the tokenizer's EOS too (a chat model's turn end, e.g.
    ChatML's <|im_end|>), so transformers' generate stops where the chat template ends a turn.
    """
    from tunelab.atomic import atomic_folder, check_model_folder_dest

    out = Path(out)
    check_model_folder_dest(out)
    eos = stop_ids(model, tokenizer)
    model.generation_config.eos_token_id = eos[0] if len(eos) == 1 else eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]

    def write(tmp: Path):
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    atomic_folder(out, write)
    return out


def merge_to_folder(source: str, out: str | os.PathLike, base: str | None = None,
                    from_quantized: bool = False, dtype: torch.dtype | str = "base",
                    device: torch.device | str = "cpu") -> MergeReport:
    """Merge the adapter of `source` (a run or adapter folder) into its base and save an HF folder.

    dtype: the merged model's dtype (`base`: the base's own, see resolve.base_dtype; or bf16/fp16/fp32);
    each merged weight is summed in fp32 and rounded once. For a QLoRA adapter both merges are measured
    against the trained model (the one not written layer by layer, never built in full); the one written is
    into the original weights, or into the de-quantized ones if `from_quantized` (with a warning).
    """
    opened = open_model(source, base=base, dtype=dtype, device=device)
    if opened.source.adapter is None:
        raise TunelabError(f"{source} has no adapter to merge (give a lora/qlora run folder or an adapter folder)")
    if opened.source.quant is None:
        merge_opened(opened)
        report = MergeReport(save_hf_folder(opened.model, opened.tokenizer, out), qlora=False, from_quantized=False)
    else:
        report = _merge_qlora(opened, Path(out), from_quantized)
    report.dtype = str(next(opened.model.parameters()).dtype).removeprefix("torch.")
    return report


def _merge_qlora(trained: Opened, out: Path, from_quantized: bool) -> MergeReport:
    """Both merges measured against the trained model, with at most one merged model in memory.

    Memory (docs/export.md, "Merge memory"): the base's original linear weights (memory-mapped from its file
    by transformers) + the 4-bit trained model + the merged linears. The merge not written is only measured:
    its logits come from the trained model with each adapted or 4-bit layer computing with its merged weight,
    built for that call and dropped after (one layer's merge in memory at a time). Then the chosen merge is done
    in place, turning the trained model into the merged one layer by layer.
    """
    ids = probe_ids(trained.tokenizer)
    reference = _logits(trained.model, ids)  # (1, T, vocab): the trained 4-bit + adapter model
    other = not from_quantized
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the from_quantized warning is raised below, once, if chosen
        with merged_layer_by_layer(trained.model, None if other else trained.base_weights, from_quantized=other):
            other_logits = _logits(trained.model, ids)
        merge_in_place(trained, from_quantized)
    trained.base_weights.clear()  # the merged linears hold copies: free the originals before saving
    chosen_logits = _logits(trained.model, ids)
    diffs = {from_quantized: (chosen_logits - reference).abs().max().item(),
             other: (other_logits - reference).abs().max().item()}
    report = MergeReport(out, qlora=True, from_quantized=from_quantized, diff_original=diffs[False],
                         diff_dequantized=diffs[True])
    if from_quantized:
        warnings.warn(
            "merging into the de-quantized 4-bit weights (--from-quantized): every merged weight keeps its "
            f"4-bit rounding error; max |logits - original merge's| on a probe prompt: "
            f"{(chosen_logits - other_logits).abs().max().item():.4g}", stacklevel=2)
    save_hf_folder(trained.model, trained.tokenizer, out)
    return report


@contextmanager
def merged_layer_by_layer(model: nn.Module, base_weights: dict | None, from_quantized: bool):
    """Within the block, `model` computes as merge_lora(model, base_weights, from_quantized) would, without
    merging it: a forward hook on each outermost LoRA / 4-bit layer (linear or experts) replaces its output by
    that of a merged copy of the layer, made by merge_lora for the call and dropped after it."""
    def merged_output(path: str):
        def hook(module, args, kwargs, output):
            return _merge_one(_copy_linears(module), path, base_weights, from_quantized)(*args, **kwargs)
        return hook

    handles = [m.register_forward_hook(merged_output(p), with_kwargs=True) for p, m in _mergeable_layers(model)]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def merge_in_place(opened: Opened, from_quantized: bool) -> None:
    """merge_opened, one layer at a time, handing the freed pages back to the OS after each (glibc keeps the
    pages of blocks freed between live ones, which grew a QLoRA merge's peak by ~0.25x of the model)."""
    weights = None if from_quantized else opened.base_weights
    for path, layer in _mergeable_layers(opened.model):
        opened.model.set_submodule(path, _merge_one(layer, path, weights, from_quantized))
        release_freed_memory()
    merge_opened(opened, from_quantized)  # what is left: modules to save, the adapter's bookkeeping


def _mergeable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of each outermost LoRA or 4-bit layer (linear or experts): what merge_lora replaces."""
    from tunelab.lora import LoRALinear
    from tunelab.lora.experts import LoRAExperts
    from tunelab.lora.layer import is_quantized_linear
    from tunelab.quant.experts import Experts4bit

    found, outer = [], ()
    for path, m in model.named_modules():
        if (isinstance(m, (LoRALinear, LoRAExperts, Experts4bit)) or is_quantized_linear(m)) and \
                not path.startswith(outer):
            found.append((path, m))
            outer += (path + ".",)
    return found


def _merge_one(layer: nn.Module, path: str, base_weights: dict | None, from_quantized: bool) -> nn.Module:
    """merge_lora of the one layer at `path` of its model (its base_weights keys are under `path`.)."""
    from tunelab.lora import merge_lora

    holder, prefix = nn.Module(), path + "."
    holder.add_module("layer", layer)  # merge_lora replaces the layers under its root in place
    weights = None if base_weights is None else {
        "layer." + k[len(prefix):]: v for k, v in base_weights.items() if k.startswith(prefix)}
    merge_lora(holder, base_weights=weights, from_quantized=from_quantized)
    return holder.layer


def _copy_linears(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose tensors outside LoRA and 4-bit linears are shared, not copied: a merge
    replaces only those linears, so the copy costs the 4-bit weights and adapters, not the embeddings."""
    from tunelab.lora import LoRALinear
    from tunelab.lora.layer import is_quantized_linear

    own = {id(t) for m in model.modules() if isinstance(m, LoRALinear) or is_quantized_linear(m)
           for t in list(m.parameters()) + list(m.buffers())}
    shared = {id(t): t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in own}
    return copy.deepcopy(model, memo=dict(shared))

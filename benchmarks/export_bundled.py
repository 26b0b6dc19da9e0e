"""The export round trips on the bundled SmolLM2-135M-Instruct, numbers for docs/export.md.

    python benchmarks/export_bundled.py [--work DIR]

1. LoRA adapter (random B, so it changes the model) -> `merge` -> transformers logits vs on-the-fly logits.
2. merged folder -> GGUF f32 / q8_0 -> transformers(gguf_file=) logits; tokenizer round trip; GGUF keys
   vs the bundled GGUF that llama.cpp's own converter wrote.
3. QLoRA run (nf4 + double quant, random B) -> merge into original vs de-quantized weights, each measured
   against the trained 4-bit+adapter model; plus a PEFT/bitsandbytes-style merge that re-quantizes the
   merged weight to 4 bits.
4. Generation with the chat template stops at <|im_end|>; greedy answers on the fly == merged.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tunelab.export.chat import reply
from tunelab.export.gguf import export_gguf
from tunelab.export.merge import max_logit_diff, merge_to_folder, probe_ids
from tunelab.export.resolve import open_model
from tunelab.lora import LoraConfig, apply_lora, lora_layers, save_adapter
from tunelab.models.bundled import gguf_path, model_dir
from tunelab.models.load import load_pretrained
from tunelab.quant import quantize, quantize_model

QUANT = dict(quant_type="nf4", block_size=64, double_quant=True)
LORA = dict(r=16, alpha=32, target_modules="all-linear")
PROMPTS = ["What is the capital of France?", "Write one sentence about cats.", "List three primary colors."]
TEXTS = ["Hello world, 12345 ok!", "<|im_start|>user\nhi there<|im_end|>\n", "  two spaces\n\ttab ünïcode 日本"]


def make_adapter(dest: Path, quant: dict | None, seed: int = 1, std: float = 0.02) -> Path:
    model, _ = load_pretrained("bundled")
    model.name_or_path = "bundled"  # base_model_name_or_path in adapter_config.json
    if quant:
        quantize_model(model, **quant)
    apply_lora(model, LoraConfig(**LORA), verbose=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * std)
    return save_adapter(model, dest)


def qlora_run(run: Path) -> Path:
    run.mkdir(parents=True)
    make_adapter(run / "adapter", QUANT)
    cfg = {"method": "qlora", "model": {"source": "bundled"}, "quant": QUANT, "lora": LORA, "data": {}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def gguf_logit_diff(path: Path, reference, ids) -> float:
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return max_logit_diff(back, reference, ids)


def requantized_merge(trained) -> torch.nn.Module:
    """What merging into 4-bit weights does in PEFT + bitsandbytes: W' = Q(deQ(W) + s*B@A), stored 4-bit."""
    from tunelab.lora import merge_lora

    model = merge_lora(copy.deepcopy(trained), from_quantized=True)
    with torch.no_grad():
        for _, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and m is not model.lm_head:
                m.weight.copy_(quantize(m.weight, QUANT["quant_type"], QUANT["block_size"], QUANT["double_quant"])
                               .dequantize())
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default=None, help="folder for the adapters and exports (default: a temp dir)")
    work = Path(parser.parse_args().work or tempfile.mkdtemp(prefix="tunelab-export-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir()
    t0 = time.time()

    # 1. LoRA merge round trip
    adapter = make_adapter(work / "lora-adapter", None)
    merged_dir = merge_to_folder(str(adapter), work / "merged").out
    on_the_fly = open_model(str(adapter))
    ids = probe_ids(on_the_fly.tokenizer)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = open_model("bundled").model
    print(f"[1] probe tokens: {ids.shape[1]}")
    print(f"[1] merged folder (transformers) vs adapter on the fly: max |dlogits| = "
          f"{max_logit_diff(merged, on_the_fly.model, ids):.3g}  (adapter vs base: "
          f"{max_logit_diff(base, on_the_fly.model, ids):.3g})")

    # 2. GGUF round trips from the merged folder
    opened = open_model(str(merged_dir))
    for dtype in ("f32", "f16", "q8_0"):
        path = export_gguf(opened.model, opened.tokenizer, work / f"merged-{dtype}.gguf", dtype)
        print(f"[2] GGUF {dtype}: {path.stat().st_size / 2**20:.1f} MiB, transformers(gguf_file=) vs merged: "
              f"max |dlogits| = {gguf_logit_diff(path, merged, ids):.3g}")
    import gguf
    from transformers import AutoTokenizer

    back = AutoTokenizer.from_pretrained(work, gguf_file="merged-f32.gguf")
    same = [back(t)["input_ids"] == opened.tokenizer(t)["input_ids"] for t in TEXTS + PROMPTS]
    print(f"[2] tokenizer round trip: {sum(same)}/{len(same)} strings encode identically; eos {back.eos_token!r}, "
          f"chat template equal: {back.chat_template == opened.tokenizer.chat_template}")
    ours = set(gguf.GGUFReader(work / "merged-f32.gguf").fields)
    theirs = set(gguf.GGUFReader(gguf_path()).fields)
    print(f"[2] keys in llama.cpp's bundled GGUF missing from ours: {sorted(theirs - ours)}")

    # 3. QLoRA: which merge is closer to the trained model
    run = qlora_run(work / "qlora-run")
    report = merge_to_folder(str(run), work / "qlora-merged")
    trained = open_model(str(run)).model
    print(f"[3] QLoRA vs trained 4-bit+adapter model: merged into original weights {report.diff_original:.3g}, "
          f"into de-quantized weights {report.diff_dequantized:.3g}, re-quantized to 4 bits after merging "
          f"(PEFT+bnb style) {max_logit_diff(requantized_merge(trained), trained, ids):.3g}")

    # 4. generation: EOS and on the fly == merged
    tok = on_the_fly.tokenizer
    for prompt in PROMPTS:
        msgs = [{"role": "user", "content": prompt}]
        a = reply(on_the_fly.model, tok, msgs, max_new_tokens=96)
        b = reply(merged, tok, msgs, max_new_tokens=96)
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        out = merged.generate(**enc, max_new_tokens=96, do_sample=False, eos_token_id=[tok.eos_token_id],
                              pad_token_id=tok.pad_token_id)
        last = tok.convert_ids_to_tokens(out[0, -1].item())
        n = out.shape[1] - enc["input_ids"].shape[1]
        print(f"[4] {prompt!r}: {n} tokens, last {last!r}, on-the-fly == merged: {a == b}; answer: {b!r}")
    print(f"total {time.time() - t0:.0f} s; files in {work}")


if __name__ == "__main__":
    main()

"""The usage example in docs/lora.md: LoRA on the bundled SmolLM2-135M, a few LoRA+ steps, PEFT round trip, merge.

Run: python docs/lora_example.py
"""

import tempfile

import torch
from peft import PeftModel  # only to show that PEFT reads the adapter tunelab wrote
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.lora import LoraConfig, apply_lora, lora_param_groups, merge_lora, save_adapter
from tunelab.models.bundled import model_dir

torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(model_dir())
model = AutoModelForCausalLM.from_pretrained(model_dir())
cfg = LoraConfig(r=8, alpha=16, target_modules="all-linear", loraplus_ratio=16)
model = apply_lora(model, cfg)  # prints the trainable / total parameter line

batch = tok(["LoRA trains a low-rank update B @ A beside each frozen weight matrix."] * 2, return_tensors="pt")
opt = torch.optim.AdamW(lora_param_groups(model, lr=1e-3, loraplus_ratio=cfg.loraplus_ratio))
model.train()
for step in range(5):
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    print(f"step {step}: loss {loss.item():.4f}")
model.eval()

with torch.no_grad():
    ours = model(**batch).logits
    folder = tempfile.mkdtemp() + "/adapter"
    save_adapter(model, folder)
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir()), folder).eval()
    print(f"PEFT vs tunelab logits, max abs diff: {(theirs(**batch).logits - ours).abs().max():.2e}")
    merged = merge_lora(model)
    print(f"merged vs adapter logits, max abs diff: {(merged(**batch).logits - ours).abs().max():.2e}")
    print(type(merged.model.layers[0].self_attn.q_proj).__name__)

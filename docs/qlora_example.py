"""The QLoRA example in docs/lora.md: SmolLM2-135M quantized to NF4, LoRA trained on top, then merged two ways.

Run: python docs/qlora_example.py
"""

import tempfile
import warnings

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.lora import LoraConfig, apply_lora, load_adapter, lora_param_groups, merge_lora, save_adapter
from tunelab.models.bundled import model_dir
from tunelab.quant import Linear4bit, model_nbytes, quantize_model


def load():
    return AutoModelForCausalLM.from_pretrained(model_dir())


torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(model_dir())
batch = tok(["QLoRA trains LoRA adapters on top of a frozen 4-bit base model."] * 2, return_tensors="pt")
model = load()
base_weights = {k: v.clone() for k, v in model.state_dict().items()}  # kept for the merge
print(f"fp32 model: {model_nbytes(model) / 2**20:.1f} MiB")
quantize_model(model, "nf4", block_size=64, double_quant=True)
print(f"nf4 model:  {model_nbytes(model) / 2**20:.1f} MiB")
packed = [(m, m.qweight.data.clone()) for m in model.modules() if isinstance(m, Linear4bit)]

cfg = LoraConfig(r=8, alpha=16, target_modules="all-linear")
apply_lora(model, cfg)
opt = torch.optim.AdamW(lora_param_groups(model, lr=1e-3))
model.train()
for step in range(5):
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    print(f"step {step}: loss {loss.item():.4f}")
model.eval()
same = all(torch.equal(m.qweight.data, codes) for m, codes in packed)
print(f"4-bit codes unchanged by training: {same}")

held_out = tok(["The capital of France is Paris. Water boils at one hundred degrees Celsius at sea level. "
                "A week has seven days, and a year has twelve months."], return_tensors="pt")


def losses(m):
    """(loss on the training sentence, loss on a held-out sentence)."""
    return tuple(m(**b, labels=b["input_ids"]).loss.item() for b in (batch, held_out))


with torch.no_grad():
    folder = tempfile.mkdtemp() + "/adapter"
    save_adapter(model, folder)
    rows = {"fp32 base, no adapter": losses(load()),
            "QLoRA model (4-bit base + adapter)": losses(model),
            "adapter on the fp32 base (unmerged)": losses(load_adapter(load(), folder, verbose=False)),
            "merged into fp32 base_weights": losses(merge_lora(model, base_weights=base_weights))}
    lossy_model = load_adapter(quantize_model(load()), folder, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows["merged into de-quantized 4-bit"] = losses(merge_lora(lossy_model, from_quantized=True))
    print(f"{'model':38s} train-sentence loss  held-out loss")
    for name, (train, held) in rows.items():
        print(f"{name:38s} {train:19.4f}  {held:13.4f}")

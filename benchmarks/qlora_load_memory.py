"""Peak memory of loading a model for QLoRA two ways (docs/training.md, "Loading straight into 4 bits"):

    nice -n 19 python benchmarks/qlora_load_memory.py              # a random ~430 MB fp32 Llama, 5 shards

`whole`: transformers' from_pretrained in fp32, then prepare_method (quantize_model, LoRA): the path before.
`stream`: load_pretrained(..., quant=...) (meta model, shard by shard, each linear quantized as it is read),
then prepare_method (LoRA; nothing left to quantize): what `tunelab train` with method=qlora does now.
Each way runs in a fresh process; it reports peak RSS (VmHWM: includes the checkpoint pages mapped while
reading) and peak anonymous RSS (RssAnon sampled every 2 ms: the process's own memory, not the page cache),
and the RSS left after loading, all as growth over the process after imports, in MiB. Both ways are
checked to give identical state dicts (the 4-bit bytes and every float tensor).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(folder: str, way: str, out: str) -> None:
    """In this (fresh) process: load `folder` the given way; write the numbers and the state dict to `out`."""
    import torch

    from tunelab.config import RunConfig
    from tunelab.models.load import load_pretrained
    from tunelab.train.run import prepare_method

    cfg = RunConfig(method="qlora", data={"sources": [{"name": "unused", "path": "unused"}]})
    base_rss, base_anon = _status_kb("VmRSS"), _status_kb("RssAnon")
    peak, done = [base_anon], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _status_kb("RssAnon"))
            time.sleep(0.002)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.time()
    model, _ = load_pretrained(folder, quant=None if way == "whole" else cfg.quant)
    torch.manual_seed(0)  # the same LoRA initialisation both ways
    prepare_method(model, cfg)  # what `tunelab train` does next: quantize (whole only), own copies, LoRA
    seconds = time.time() - t0
    done.set()
    mib = lambda kb: round(kb / 1024)  # noqa: E731
    result = {"way": way, "seconds": round(seconds, 1), "peak_rss_mib": mib(_status_kb("VmHWM") - base_rss),
              "peak_anon_mib": mib(peak[0] - base_anon), "after_rss_mib": mib(_status_kb("VmRSS") - base_rss)}
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, out + ".pt")
    Path(out).write_text(json.dumps(result))


def make_model(folder: Path) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.support.tiny_models import make_tiny_tokenizer

    cfg = LlamaConfig(vocab_size=16000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                      num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder, max_shard_size="100MB")
    make_tiny_tokenizer().save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        n = make_model(folder)
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        print(f"random Llama: {n / 1e6:.0f}M parameters, {size / 2**20:.0f} MiB fp32 in "
              f"{len(list(folder.glob('*.safetensors')))} shards")
        results = {}
        for way in ("whole", "stream"):
            out = str(Path(tmp) / way)
            subprocess.run([sys.executable, __file__, "--measure", str(folder), way, out], check=True)
            results[way] = json.loads(Path(out).read_text())
            print(results[way], flush=True)
        a, b = torch.load(Path(tmp) / "whole.pt"), torch.load(Path(tmp) / "stream.pt")
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        print(f"identical state dicts: {same}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        measure(*sys.argv[2:5])
    else:
        main()

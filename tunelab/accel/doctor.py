"""`tunelab doctor`: the versions, the machine, and which speed-ups run here and why the others do not.

    tunelab doctor                  # for the Llama family (the bundled model), on this machine's device
    tunelab doctor --family gemma2  # what train.kernels=auto runs for another family of the table
"""

from __future__ import annotations

import platform
from importlib import metadata
from types import SimpleNamespace

PACKAGES = ("tunelab", "torch", "transformers", "peft", "bitsandbytes", "triton", "safetensors", "gguf")


def add_arguments(parser) -> None:
    from tunelab.models.families import FAMILIES

    parser.add_argument("--family", default="llama", choices=sorted(FAMILIES),
                        help="the model_type whose speed-ups to show (default llama: the bundled SmolLM2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when visible, else cpu")


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def report(family: str = "llama", device: str | None = None) -> list[str]:
    """The lines `tunelab doctor` prints."""
    import torch
    from transformers import AutoConfig

    from tunelab.accel import ckernels, dequant_c, dequant_triton, fused, kernels, malloc

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lines = ["versions: " + ", ".join(f"{p} {_version(p)}" for p in PACKAGES) + f", python {platform.python_version()}"]
    cc = ckernels.compiler()
    lines.append(f"CPU: {platform.machine()}, {torch.get_num_threads()} torch threads, torch SIMD "
                 f"{torch.backends.cpu.get_cpu_capability()}; C kernels built for {ckernels.isa_level() or 'the compiler default'} "
                 f"with {cc[1] if cc else 'no C compiler'}")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (torch sees no CUDA device)"
    lines.append(f"GPU: {gpu}; Triton {'importable' if dequant_triton.triton is not None else 'not installed'}")
    lines.append("malloc: " + ("glibc, tunelab's reuse-freed-memory setting applies in training"
                               if malloc.reuse_freed_memory() else "not glibc, or set in the environment: left as it is"))
    choice = kernels.choose(SimpleNamespace(config=AutoConfig.for_model(family)), "auto", device)
    cpu = device == "cpu"
    rows = [("chunked head + loss", choice.chunked_head, ""), ("last-layer shortcut", choice.last_layer, ""),
            ("fused RMSNorm", choice.norm, "C" if cpu else "Triton"), ("fused SwiGLU", choice.swiglu, "C" if cpu else "Triton"),
            ("fused rotary", choice.rotary, "C"), ("fused LoRA autograd", choice.fused_lora, ""),
            ("4-bit dequantize kernel", choice.dequant, "C" if cpu else "Triton"),
            ("shared prompt (preference pairs)", choice.shared_prompt, "")]
    lines.append(f"speed-ups for {family} on {device} (train.kernels=auto):")
    for name, on, how in rows:
        why = next((w.split(": ", 1)[1] for w in choice.off if w.startswith(name)), None)
        if not on and why is None and name.startswith("shared prompt") and choice.chunked_head:
            why = "sliding-window layers or attention other than SDPA (its own mask would be replaced)"
        if not on and why is None:
            why = f"{family}'s module has another formula than Llama's" if choice.chunked_head else "see below"
        lines.append(f"  {'on ' if on else 'off'}  {name}" + (f" ({how})" if on and how else f": {why}" if why else ""))
    lines += [f"  why off: {why}" for why in choice.off if not any(why.startswith(r[0]) for r in rows)]
    fused.available(), dequant_c.available()  # build (or load) both libraries, so their problems are known
    lines += [f"  C library {stem}: {why}" for stem, why in sorted(ckernels.problems.items())]
    return lines


def run(args) -> int:
    print("\n".join(report(args.family, args.device)))
    return 0

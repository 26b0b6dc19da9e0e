"""The kernels switch, `train.kernels: auto | off | strict`: which speed-ups one model instance runs.

The speed-ups and their reference twins (what `off` runs):
- chunked head + loss (tunelab/train/loss.py, with the family's logits transform inside) -> the model's own
  forward with labels, full logits (its loss is a mean; we take it times the label count, so the loop's
  normalisation is the same);
- last-layer shortcut (loss.py) -> the last decoder layer run whole; it is part of the chunked path;
- fused RMSNorm, SwiGLU, rotary (tunelab/accel/fused.py; C on CPU, Triton on CUDA for the first two) ->
  the model's own modules;
- fused LoRA autograd (tunelab/lora/layer.py `_FusedLoRA`) -> base(x) + scale * B(A(x)).

`auto` runs what the family table (tunelab.models.families) claims for this family and what can run here,
and prints one line naming what it turned off and why; a family not in the table runs the reference path.
`strict` raises a TunelabError naming the first speed-up that cannot run. The 4-bit dequantize kernels are
not switched here (they give PyTorch's bits; TUNELAB_C_KERNELS=0 / TUNELAB_TRITON=0 turn them off, and also
make the C / Triton kernels above unavailable, which `auto` reports and `strict` refuses).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.accel import fused
from tunelab.models.families import Family, family_of, logits_transform

MODES = ("auto", "off", "strict")


@dataclass(frozen=True)
class SpeedUp:
    """One entry of the registry: a speed-up, what it applies to, its reference twin and its parity test."""

    name: str
    """Its field in Kernels when train.kernels switches it; else a name of its own (switch says how)."""
    what: str
    applies_to: str
    """"all", or the family-table field (norm, mlp, attention, decoder) that must name a class."""
    reference: str
    """The twin it must equal: what runs when it is off."""
    test: str
    """The parity test (tests/...::name); tests/test_speedups.py checks that each exists."""
    needs: tuple[str, ...] = ()
    switch: str = "train.kernels"
    """How it is turned off; "train.kernels" for the fields of Kernels."""


REGISTRY: tuple[SpeedUp, ...] = (
    SpeedUp("chunked_head", "head + cross-entropy in chunks, the gradient formed in forward, no full-vocabulary "
            "logits; the family's softcap/scale inside (tunelab/train/loss.py)", "all",
            "the model's own forward with labels (full logits)", "tests/test_speedups.py::test_parity"),
    SpeedUp("last_layer", "the last decoder layer on labelled positions only (tunelab/train/loss.py)", "decoder",
            "the last decoder layer run whole", "tests/test_speedups.py::test_parity", needs=("chunked_head",)),
    SpeedUp("norm", "RMSNorm as one C loop each way on CPU, Triton on CUDA (tunelab/accel/fused.py)", "norm",
            "the family's own RMSNorm module", "tests/test_speedups.py::test_parity"),
    SpeedUp("swiglu", "SiLU(gate) * up as one C loop each way on CPU, Triton on CUDA (tunelab/accel/fused.py)",
            "mlp", "the family's own MLP module", "tests/test_speedups.py::test_parity"),
    SpeedUp("rotary", "the rotary embedding of q and k as one C loop each way (tunelab/accel/fused.py)",
            "attention", "transformers' apply_rotary_pos_emb", "tests/test_speedups.py::test_parity"),
    SpeedUp("fused_lora", "LoRA's fused autograd: scale folded into the GEMMs, addmm accumulation "
            "(tunelab/lora/layer.py _FusedLoRA)", "all", "base(x) + scale * B(A(dropout(x)))",
            "tests/test_speedups.py::test_parity"),
    SpeedUp("dequant_c", "4-bit dequantize as one C loop (tunelab/accel/dequant_c.py)", "all",
            "the PyTorch dequantize of tunelab/quant/blockwise.py",
            "tests/test_quant_cpu_kernels.py::test_same_bits_as_the_pytorch_path", switch="TUNELAB_C_KERNELS=0"),
    SpeedUp("dequant_triton", "4-bit dequantize in Triton on CUDA (tunelab/accel/dequant_triton.py)", "all",
            "the PyTorch dequantize of tunelab/quant/blockwise.py",
            "tests/test_quant_triton.py::test_interpreted_kernel_equals_pytorch_path_bit_for_bit",
            switch="TUNELAB_TRITON=0"),
    SpeedUp("malloc", "glibc keeps freed blocks for the next step (tunelab/accel/malloc.py)", "all",
            "glibc's default malloc", "tests/test_speedups.py::test_malloc_setting_changes_no_loss",
            switch="MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ in the environment"),
)


def claims(speedup: SpeedUp, family: Family | None) -> bool:
    """Whether the family table says `speedup` applies to `family` (an unknown family: none)."""
    return family is not None and (speedup.applies_to == "all" or getattr(family, speedup.applies_to) is not None)


def only(model: nn.Module, name: str, device: torch.device | str = "cpu") -> Kernels:
    """The Kernels of `auto` for this model with only `name` (and what it needs) on: one speed-up against
    its reference twin, as tests/test_speedups.py's generated parity suite runs them."""
    full = choose(model, "auto", device)
    entry = next(e for e in REGISTRY if e.name == name)
    on = {n: getattr(full, n) for n in (name, *entry.needs)}
    return Kernels("auto", full.family, logits=full.logits, router_aux=full.router_aux, **on)


@dataclass(frozen=True)
class Kernels:
    """The speed-ups one model instance runs (from `choose`); the loss and prepare_method read it."""

    mode: str
    family: Family | None
    chunked_head: bool = False
    last_layer: bool = False
    norm: bool = False
    swiglu: bool = False
    rotary: bool = False
    fused_lora: bool = False
    logits: tuple[str, float] | None = None
    """The family's logits transform as the chunked head applies it: ("softcap", cap), ("scale", s) or None."""
    router_aux: bool = False
    """Add the router's load-balancing loss as the model's forward does (output_router_logits is on)."""
    off: tuple[str, ...] = ()
    """"speed-up: why" for each one turned off."""


def _c_or_triton(device_type: str) -> str | None:
    """Why the fused RMSNorm / SwiGLU kernels cannot run on this device type, or None if they can."""
    if device_type == "cuda":
        return None if fused.gpu_kernels() else "no Triton (or TUNELAB_TRITON=0)"
    if fused.available():
        return None
    from tunelab.accel import ckernels

    return ckernels.problems.get("fused", "no C compiler (or TUNELAB_C_KERNELS=0)")  # the build's own reason


def choose(model: nn.Module, mode: str, device: torch.device | str | None = None) -> Kernels:
    """The speed-ups for `model` under train.kernels=`mode` on `device` (default: CUDA if visible, else CPU).

    Prints nothing; `report` says what `auto` turned off."""
    if mode not in MODES:
        raise TunelabError(f"train.kernels={mode!r}: use one of {', '.join(MODES)}")
    config = model.config
    family = family_of(config)
    if mode == "off":
        return Kernels(mode, family, off=("all: train.kernels=off",))
    device_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if family is None:
        why = (f"model_type {getattr(config, 'model_type', None)!r} is not in tunelab's family table "
               "(tunelab/models/families.py)")
        if mode == "strict":
            raise TunelabError(f"train.kernels=strict: {why}, so no speed-up can run; use train.kernels=auto "
                               "(the model's own forward) or add the family to the table")
        return Kernels(mode, None, fused_lora=True, off=(f"chunked head and fused modules: {why}; the loss is "
                                                          "the model's own forward",))
    on, off = {}, []
    missing = _c_or_triton(device_type)
    names = {"norm": "fused RMSNorm", "swiglu": "fused SwiGLU", "rotary": "fused rotary"}
    for key in names:
        if not claims(next(e for e in REGISTRY if e.name == key), family):
            continue  # the family's module has another formula: its own module is the only path
        why = "no CUDA kernel" if key == "rotary" and device_type == "cuda" else missing
        if why and mode == "strict" and not (key == "rotary" and device_type == "cuda"):
            raise TunelabError(f"train.kernels=strict: {names[key]} cannot run for {family.model_type} on "
                               f"{device_type}: {why}; use train.kernels=auto to run without it")
        on[key] = why is None
        if why:
            off.append(f"{names[key]}: {why}")
    router = family.router_aux and bool(getattr(config, "output_router_logits", False))
    return Kernels(mode, family, chunked_head=True, last_layer=family.decoder is not None, fused_lora=True,
                   logits=logits_transform(family, config), router_aux=router, off=tuple(off), **on)


def report(kernels: Kernels) -> None:
    """The one line `auto` prints when it turned something off (nothing when all runs)."""
    if kernels.mode == "auto" and kernels.off:
        print(f"tunelab: train.kernels=auto turned off: {'; '.join(kernels.off)}")


def apply(model: nn.Module, kernels: Kernels) -> int:
    """Give the model the fused modules `kernels` switches on (in place); returns how many modules."""
    if kernels.family is None:
        return 0
    return fused.fuse(model, norm=kernels.norm, swiglu=kernels.swiglu, rotary=kernels.rotary)

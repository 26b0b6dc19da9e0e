"""The kernels switch, `train.kernels: auto | off | strict`: which speed-ups one model instance runs, and the
registry of every speed-up with its reference twin (what `off` runs) and its parity test.

`choose(model, mode, device)` reads the family table (tunelab.models.families), what can run here, and the
environment (TUNELAB_C_KERNELS=0, TUNELAB_TRITON=0: read here and nowhere else, once per Kernels value);
`apply(model, kernels)` attaches what it chose to that instance: fused modules (a subclass in place), each
LoRALinear's `kernel`, each Linear4bit's `dequant`, and the process's malloc setting. The loss reads the
chunked head, the logits transform and the last-layer shortcut from the Kernels value.

`auto` runs what the family table claims for this family and what can run here, and prints one line naming
what it turned off and why; a family not in the table runs the model's own forward (the fused LoRA autograd,
the dequantize kernels and the malloc setting, which do not depend on the architecture, still run).
`strict` raises a TunelabError naming the first speed-up that cannot run.

A kernel that can run but fails while running (Triton compiling for a card it does not know) follows the same
switch, through the Guard `apply` gives the model instance (tunelab.accel.guard): `auto` warns once, naming
it and why, and runs its reference twin for that model from then on; `strict` raises. State that outlives a
model instance is process-wide only where what it records is: a compiled library, a build's error, the
allocator setting, constant tables (each says so where it is defined).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from tunelab.accel import fused, malloc
from tunelab.accel.guard import Guard
from tunelab.errors import TunelabError
from tunelab.models.families import Family, family_of, logits_transform

MODES = ("auto", "off", "strict")


@dataclass(frozen=True)
class SpeedUp:
    """One entry of the registry: a speed-up, what it applies to, its reference twin and its parity test."""

    name: str
    """Its field in Kernels (train.kernels switches every one)."""
    what: str
    applies_to: str
    """"all", or the family-table field (norm, mlp, attention, decoder) that must name a class."""
    reference: str
    """The twin it must equal: what runs when it is off."""
    test: str
    """The parity test (tests/...::name); tests/accel/test_speedups.py checks that each exists, and generates
    test_parity's cases (every family that claims it) for the entries that name it."""
    needs: tuple[str, ...] = ()


PARITY = "tests/accel/test_speedups.py::test_parity"
REGISTRY: tuple[SpeedUp, ...] = (
    SpeedUp("chunked_head", "head + cross-entropy in chunks, the gradient formed in forward, no full-vocabulary "
            "logits; the family's softcap/scale inside (tunelab/train/loss.py)", "all",
            "the model's own forward with labels (full logits)", PARITY),
    SpeedUp("last_layer", "the last decoder layer on labelled positions only (tunelab/accel/last_layer.py)",
            "decoder", "the last decoder layer run whole", PARITY, needs=("chunked_head",)),
    SpeedUp("norm", "RMSNorm as one C loop each way on CPU, Triton on CUDA (tunelab/accel/fused.py)", "norm",
            "the family's own RMSNorm module", PARITY),
    SpeedUp("swiglu", "SiLU(gate) * up as one C loop each way on CPU, Triton on CUDA (tunelab/accel/fused.py)",
            "mlp", "the family's own MLP module", PARITY),
    SpeedUp("rotary", "the rotary embedding of q and k as one C loop each way (tunelab/accel/fused.py)",
            "attention", "transformers' apply_rotary_pos_emb", PARITY),
    SpeedUp("fused_lora", "LoRA's fused autograd: scale folded into the GEMMs, addmm accumulation "
            "(tunelab/accel/lora.py)", "all", "LoRALinear's forward, base(x) + scale * B(A(dropout(x)))", PARITY),
    SpeedUp("dequant", "a 4-bit weight de-quantized in one pass, C on CPU (fp32; tunelab/accel/dequant_c.py), "
            "Triton on CUDA (tunelab/accel/dequant_triton.py, bit for bit in tests/accel/test_quant_triton.py), into "
            "one buffer reused by every layer (tunelab/accel/dequant.py)", "all",
            "QuantizedTensor.dequantize (tunelab/quant/tensor.py) into fresh memory", PARITY),
    SpeedUp("shared_prompt", "a preference pair's prompt run once for both responses, a 4-D mask keeping each "
            "response to the prompt and itself (tunelab/accel/shared_prompt.py)", "all",
            "chosen and rejected as two sequences (collate_pairs)",
            "tests/train/test_preference.py::test_shared_prompt_batches_equal_the_plain_layout", needs=("chunked_head",)),
    SpeedUp("malloc", "glibc keeps freed blocks for the next step (tunelab/accel/malloc.py; a malloc setting "
            "in the environment wins)", "all", "glibc's default malloc",
            "tests/accel/test_speedups.py::test_malloc_setting_changes_no_loss"),
)


def claims(speedup: SpeedUp, family: Family | None) -> bool:
    """Whether the family table says `speedup` applies to `family` (an unknown family: none)."""
    return family is not None and (speedup.applies_to == "all" or getattr(family, speedup.applies_to) is not None)


def only(model: nn.Module, name: str, device: torch.device | str = "cpu") -> Kernels:
    """The Kernels of `auto` for this model with only `name` (and what it needs) on: one speed-up against
    its reference twin, as tests/accel/test_speedups.py's generated parity suite runs them."""
    full = choose(model, "auto", device)
    entry = next(e for e in REGISTRY if e.name == name)
    on = {n: getattr(full, n) for n in (name, *entry.needs)}
    return Kernels("auto", full.family, logits=full.logits, router_aux=full.router_aux, **on)


@dataclass(frozen=True)
class Kernels:
    """The speed-ups one model instance runs (from `choose`); `apply` and the loss read it."""

    mode: str
    family: Family | None
    chunked_head: bool = False
    last_layer: bool = False
    norm: bool = False
    swiglu: bool = False
    rotary: bool = False
    fused_lora: bool = False
    dequant: bool = False
    malloc: bool = False
    shared_prompt: bool = False
    """Preference pairs: one sequence per pair (the prompt once) where the model takes a custom 4-D mask."""
    logits: tuple[str, float] | None = None
    """The family's logits transform as the chunked head applies it: ("softcap", cap), ("scale", s) or None."""
    router_aux: bool = False
    """Add the router's load-balancing loss as the model's forward does (output_router_logits is on)."""
    off: tuple[str, ...] = ()
    """"speed-up: why" for each one turned off."""

    def last_layer_from(self, body: nn.Module, batch: dict, start: int):
        """The context in which the body's last decoder layer computes positions start.. only (the last-layer
        shortcut, where it is on and applies), else one that changes nothing; its `.start` says which."""
        from tunelab.accel.last_layer import last_layer_from

        return last_layer_from(body, batch, start if self.last_layer else 0, rotary_kernel=self.rotary)


def _switched_off(device_type: str) -> str | None:
    """The environment variable that turns off this device's kernels (C on CPU, Triton on CUDA), if set."""
    name = "TUNELAB_TRITON" if device_type == "cuda" else "TUNELAB_C_KERNELS"
    return f"{name}=0" if os.environ.get(name, "1") == "0" else None


def _c_or_triton(device_type: str) -> str | None:
    """Why the fused RMSNorm / SwiGLU kernels cannot run on this device type, or None if they can."""
    if device_type == "cuda":
        return None if fused.gpu_kernels() else "no Triton"
    if fused.available():
        return None
    from tunelab.accel import ckernels

    return ckernels.problems.get("fused", "no C compiler")  # the build's own reason


def _dequant_missing(device_type: str) -> str | None:
    """Why the 4-bit dequantize kernel cannot run on this device type, or None if it can."""
    if device_type == "cuda":
        from tunelab.accel import dequant_triton  # imports Triton (seconds): only for a CUDA device

        return None if dequant_triton.AVAILABLE else "no Triton"
    from tunelab.accel import ckernels, dequant_c

    return None if dequant_c.available() else ckernels.problems.get("dequant4", "no C compiler")


def _refuse(mode: str, what: str, where: str, why: str) -> None:
    if mode == "strict":
        raise TunelabError(f"train.kernels=strict: {what} cannot run for {where}: {why}; use train.kernels=auto "
                           "to run without it")


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
    env = _switched_off(device_type)  # the one reading of TUNELAB_C_KERNELS / TUNELAB_TRITON
    no_dequant = env or _dequant_missing(device_type)
    on, off = {"dequant": no_dequant is None, "malloc": malloc.applies()}, []
    last = () if no_dequant is None else (f"4-bit dequantize kernel: {no_dequant}",)
    if family is None:
        why = (f"model_type {getattr(config, 'model_type', None)!r} is not in tunelab's family table "
               "(tunelab/models/families.py)")
        if mode == "strict":
            raise TunelabError(f"train.kernels=strict: {why}, so no speed-up can run; use train.kernels=auto "
                               "(the model's own forward) or add the family to the table")
        return Kernels(mode, None, fused_lora=True, off=(f"chunked head and fused modules: {why}; the loss is "
                                                          "the model's own forward", *last), **on)
    missing = env or _c_or_triton(device_type)
    names = {"norm": "fused RMSNorm", "swiglu": "fused SwiGLU", "rotary": "fused rotary"}
    for key in names:
        if not claims(next(e for e in REGISTRY if e.name == key), family):
            continue  # the family's module has another formula: its own module is the only path
        no_cuda = key == "rotary" and device_type == "cuda"  # C only: not a failure on CUDA
        why = "no CUDA kernel" if no_cuda else missing
        if why and not no_cuda:
            _refuse(mode, names[key], f"{family.model_type} on {device_type}", why)
        on[key] = why is None
        if why:
            off.append(f"{names[key]}: {why}")
    if no_dequant:
        _refuse(mode, "the 4-bit dequantize kernel", f"{family.model_type} on {device_type}", no_dequant)
    router = family.router_aux and bool(getattr(config, "output_router_logits", False))
    return Kernels(mode, family, chunked_head=True, last_layer=family.decoder is not None, fused_lora=True,
                   shared_prompt=_takes_custom_mask(config), logits=logits_transform(family, config),
                   router_aux=router, off=(*off, *last), **on)


def shared_prompt_collate(pairs: list[tuple[dict, dict]], pad_id: int, device) -> dict | None:
    """The shared prompt's batch of (chosen, rejected) pairs (tunelab.accel.shared_prompt.collate), for the
    core through this door; call it only where Kernels.shared_prompt is on."""
    from tunelab.accel import shared_prompt

    return shared_prompt.collate(pairs, pad_id, device)


def _takes_custom_mask(config) -> bool:
    """Whether a custom 4-D boolean attention mask gives this model exactly the attention it describes (the
    shared prompt's): SDPA attention, which transformers hands the mask as given, and no sliding window or
    other layer kind, whose own mask the custom one would replace. A bare config (tunelab doctor) has no
    attention chosen yet: transformers' default, SDPA."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return (getattr(config, "_attn_implementation", None) in ("sdpa", None) and getattr(text, "sliding_window", None) is None
            and all(t == "full_attention" for t in (getattr(text, "layer_types", None) or [])))


def report(kernels: Kernels) -> None:
    """The one line `auto` prints when it turned something off (nothing when all runs)."""
    if kernels.mode == "auto" and kernels.off:
        print(f"tunelab: train.kernels=auto turned off: {'; '.join(kernels.off)}")


def apply(model: nn.Module, kernels: Kernels) -> int:
    """Attach to this model instance (in place) what `kernels` switches on, and take off what it switches off
    from the LoRA and 4-bit layers: fused modules, each LoRALinear's fused autograd, each Linear4bit's
    dequantize kernel and workspace; and the process's malloc setting. Call it once the model has its
    adapters and 4-bit layers. Returns how many modules it changed."""
    from tunelab.accel import dequant, lora
    from tunelab.lora.layer import LoRALinear
    from tunelab.quant.linear import Linear4bit

    guard = Guard(kernels.mode)  # this instance's: a kernel failing while it runs warns (auto) or raises (strict)
    count = 0
    if kernels.family is not None:
        count = fused.fuse(model, norm=kernels.norm, swiglu=kernels.swiglu, rotary=kernels.rotary, guard=guard)
    dequantize = dequant.Dequant(guard) if kernels.dequant else None  # one workspace for the model's layers
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.kernel = lora.fused_forward if kernels.fused_lora else None
            count += kernels.fused_lora
        elif isinstance(module, Linear4bit):
            module.dequant = dequantize
            count += kernels.dequant
    if kernels.malloc:
        malloc.reuse_freed_memory()
    return count

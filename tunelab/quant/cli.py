"""`tunelab quantize MODEL`: quantize a model's linear weights and report what it costs in error and saves in memory.

    tunelab quantize bundled --quant-type nf4 --double-quant
    tunelab quantize path/to/hf-folder --quant-type int8 --scheme minmax --block-size 128 --save out/

Prints one line per quantized layer (shape, relative error ||W - Q(W)|| / ||W||, SQNR in dB), totals,
the model's weight memory before and after, and bits per quantized parameter. --save writes the model
in bitsandbytes' 4-bit layout (safetensors + config.json), which tunelab and bitsandbytes both load.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from tunelab.errors import TunelabError

QUANT_TYPES = ("nf4", "fp4", "int8", "int4")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a Hugging Face model folder, or 'bundled' for the bundled SmolLM2-135M")
    parser.add_argument("--quant-type", choices=QUANT_TYPES, default=None, help="code book (default nf4)")
    parser.add_argument("--dtype", choices=QUANT_TYPES, dest="old_dtype", help=argparse.SUPPRESS)  # its old name
    parser.add_argument("--scheme", choices=("absmax", "minmax"), default="absmax",
                        help="absmax (symmetric) or minmax (zero point, int4/int8 only); default absmax")
    parser.add_argument("--block-size", type=int, default=64, help="elements per scale, a power of two 32..4096")
    parser.add_argument("--double-quant", action="store_true", help="store the per-block scales in 8 bits too")
    parser.add_argument("--skip", nargs="*", default=["lm_head"], metavar="NAME",
                        help="linear layers to keep in full precision (default: lm_head)")
    parser.add_argument("--save", type=Path, metavar="DIR", help="write the quantized model here (nf4/fp4)")


def run(args: argparse.Namespace) -> int:
    from tunelab.quant.tensor import check_block_size

    check_block_size(args.block_size)  # fail before loading a model
    _old_flag(args)
    if args.scheme == "minmax" and args.quant_type not in ("int4", "int8"):
        raise TunelabError(f"--scheme minmax needs --quant-type int4 or int8 ({args.quant_type} is an absmax code "
                           "book)")
    if args.save and (args.quant_type not in ("nf4", "fp4") or args.scheme != "absmax"):
        raise TunelabError("--save writes bitsandbytes' 4-bit layout, which holds nf4/fp4 absmax weights; "
                           "drop --save or use --quant-type nf4/fp4")
    if args.save:  # before the model loads
        from tunelab.atomic import check_model_folder_dest

        check_model_folder_dest(args.save, "--save ")
    model_dir = _resolve(args.model)
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:  # safetensors only: a pickle (.bin) can run code when loaded
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError, SafetensorError) as e:  # e.g. a truncated or mislabelled .safetensors file
        raise TunelabError(f"{model_dir}: cannot load the model ({str(e).splitlines()[0]}); check that its "
                           "config.json and *.safetensors files are complete (download them again)") from e
    report = quantize_report(model, args.quant_type, args.block_size, args.double_quant, args.scheme,
                             tuple(args.skip))
    print_report(report, f"{args.quant_type} {args.scheme}, block {args.block_size}"
                 f"{', double quant' if args.double_quant else ''}: {model_dir}")
    if args.save:
        save_quantized(model, report["quantized"], args.save, args)
        print(f"saved: {args.save}")
    return 0


def _old_flag(args: argparse.Namespace) -> None:
    """--dtype, the old name of --quant-type (torch dtypes are --dtype elsewhere): still read, with a note."""
    if args.old_dtype is None:
        args.quant_type = args.quant_type or "nf4"
        return
    if args.quant_type is not None and args.quant_type != args.old_dtype:
        raise TunelabError(f"--dtype {args.old_dtype} is the old name of --quant-type, which says "
                           f"{args.quant_type}: give --quant-type only")
    print("tunelab quantize: --dtype is now --quant-type (the 4-bit format); --dtype still works for now",
          file=sys.stderr)
    args.quant_type = args.old_dtype


def _resolve(model: str) -> Path:
    if model == "bundled":
        from tunelab.models.bundled import model_dir

        return model_dir()
    path = Path(model)
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json (not a Hugging Face model folder)"
        raise TunelabError(f"model {path} {what}; pass a folder saved with save_pretrained, or 'bundled'")
    from tunelab.models.load import model_folder

    return model_folder(str(path))  # refuses a folder whose weights are pickle files only


def quantize_report(model, quant_type: str, block_size: int, double_quant: bool, scheme: str, skip: tuple[str, ...]):
    """Quantize every nn.Linear weight (except `skip`) and measure the error in float64.

    Returns {"rows": [(name, shape, rel_err, sqnr_db)], "quantized": {name: QuantizedTensor},
    "bytes_before", "bytes_after", "params_quantized", "rel_err", "sqnr_db"} (totals over all layers).
    """
    import torch
    from torch import nn

    from tunelab.quant.linear import is_skipped
    from tunelab.quant.tensor import quantize

    rows, quantized = [], {}
    signal = noise = 0.0
    before = _unique_bytes(model)
    after = before
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or is_skipped(name, skip):
            continue
        w = mod.weight.detach()
        qt = quantize(w, quant_type, block_size=block_size, double_quant=double_quant, scheme=scheme)
        w64, err = w.double(), (qt.dequantize(torch.float64) - w.double())
        s, e = float((w64 ** 2).sum()), float((err ** 2).sum())
        rows.append((name, tuple(w.shape), math.sqrt(e / s), _db(s, e)))
        signal, noise = signal + s, noise + e
        after += qt.nbytes - w.numel() * w.element_size()
        quantized[name] = qt
    if not quantized:
        raise TunelabError("the model has no nn.Linear layers to quantize (all skipped?)")
    params = sum(q.numel() for q in quantized.values())
    bits = 8 * sum(q.nbytes for q in quantized.values()) / params
    return {"rows": rows, "quantized": quantized, "bytes_before": before, "bytes_after": after,
            "params_quantized": params, "bits_per_param": bits, "rel_err": math.sqrt(noise / signal),
            "sqnr_db": _db(signal, noise)}


def _db(signal: float, noise: float) -> float:
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def _unique_bytes(model) -> int:
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def print_report(report: dict, title: str) -> None:
    width = max(len(r[0]) for r in report["rows"])
    print(title)
    print(f"{'layer':<{width}}  {'shape':>12}  {'rel err':>8}  {'SQNR dB':>7}")
    for name, shape, rel, db in report["rows"]:
        print(f"{name:<{width}}  {'x'.join(map(str, shape)):>12}  {rel:8.4f}  {db:7.2f}")
    mib = 2 ** 20
    print(f"{'all ' + str(len(report['rows'])) + ' layers':<{width}}  {report['params_quantized']:>12,}  "
          f"{report['rel_err']:8.4f}  {report['sqnr_db']:7.2f}")
    print(f"weights in memory: {report['bytes_before'] / mib:.1f} MiB -> {report['bytes_after'] / mib:.1f} MiB "
          f"({report['bytes_before'] / report['bytes_after']:.2f}x smaller); "
          f"quantized layers: {report['bits_per_param']:.3f} bits/param")


def save_quantized(model, quantized: dict, out: Path, args: argparse.Namespace) -> None:
    """safetensors in bitsandbytes' Linear4bit layout + config.json with a bitsandbytes quantization_config."""
    from safetensors.torch import save_file

    sd, seen = {}, set()
    quantized_keys = {f"{name}.weight" for name in quantized}
    for key, t in model.state_dict().items():
        if key in quantized_keys or t.data_ptr() in seen:  # quantized below; tied copies (lm_head) once
            continue
        seen.add(t.data_ptr())
        sd[key] = t.contiguous()
    for name, qt in quantized.items():
        sd.update({k: v.contiguous() for k, v in qt.to_bnb_state_dict(name + ".").items()})
    model.config.quantization_config = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": args.quant_type, "bnb_4bit_use_double_quant": bool(args.double_quant),
        "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": list(args.skip), "tunelab_block_size": args.block_size,
    }

    def write(tmp: Path):
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)

    from tunelab.atomic import atomic_folder

    atomic_folder(out, write)  # all files or none: a failed save leaves no half-written folder

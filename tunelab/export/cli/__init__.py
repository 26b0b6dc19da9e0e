"""Command modules for `tunelab merge`, `export`, `generate` and `chat`, and the arguments they share."""

from __future__ import annotations

import argparse

SOURCE_HELP = ("a run folder (config.yaml + adapter/ or model/), an adapter folder, a Hugging Face folder, "
               "a 4-bit folder from `tunelab quantize --save`, a .gguf file, or `bundled`")


def add_model_arguments(parser: argparse.ArgumentParser, merge_flag: bool = True) -> None:
    """MODEL_OR_RUN, --adapter, --base, [--merge], --from-quantized."""
    parser.add_argument("source", metavar="MODEL_OR_RUN", help=SOURCE_HELP)
    parser.add_argument("--adapter", help="a LoRA adapter folder to apply to MODEL_OR_RUN")
    parser.add_argument("--base", help="the base model of the adapter (default: the run's model.source or "
                                       "adapter_config.json's base_model_name_or_path)")
    if merge_flag:
        parser.add_argument("--merge", action="store_true",
                            help="merge the adapter into the weights (default: apply it on the fly)")
    parser.add_argument("--from-quantized", action="store_true",
                        help="QLoRA: merge into the de-quantized 4-bit weights instead of the original ones "
                             "(keeps their rounding error; not recommended)")


def add_placement_arguments(parser: argparse.ArgumentParser, merge: bool = False) -> None:
    """--device and --dtype. merge: the dtype written, default the base's own; else auto (fp32 on CPU, bf16
    on CUDA)."""
    parser.add_argument("--device", default="auto", help="auto (CUDA when torch sees a GPU, else CPU), cpu, "
                                                         "cuda or cuda:N")
    if not merge:
        add_kernels_argument(parser)
    if merge:
        parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="base",
                            help="dtype of the merged model (default: the base's own, from its config.json "
                                 "or the run's model.dtype); each weight is summed in fp32 and rounded once")
    else:
        parser.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                            help="weights' dtype (default auto: fp32 on CPU, bf16 on CUDA)")


def add_kernels_argument(parser: argparse.ArgumentParser) -> None:
    """--kernels, the speed-up switch of train.kernels for a model opened to run (tunelab.accel.kernels)."""
    parser.add_argument("--kernels", choices=("auto", "off", "strict"), default="auto",
                        help="speed-ups as train.kernels: auto (what works here; says what it turned off), off "
                             "(the plain reference path), strict (stop if one cannot run)")


def open_from_args(args: argparse.Namespace, merge: bool | None = None, dtype: str | None = None):
    """open_model(...) as the shared arguments say; `merge` overrides --merge, `dtype` --dtype."""
    from tunelab.export.resolve import open_model

    merge = getattr(args, "merge", False) if merge is None else merge
    return open_model(args.source, adapter=args.adapter, base=args.base, merge=merge or args.from_quantized,
                      from_quantized=args.from_quantized, dtype=dtype or args.dtype,
                      device=getattr(args, "device", "cpu"), kernels=getattr(args, "kernels", "off"))

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


def open_from_args(args: argparse.Namespace, merge: bool | None = None):
    """open_model(...) as the shared arguments say; `merge` overrides --merge."""
    from tunelab.export.resolve import open_model

    merge = getattr(args, "merge", False) if merge is None else merge
    return open_model(args.source, adapter=args.adapter, base=args.base, merge=merge or args.from_quantized,
                      from_quantized=args.from_quantized)

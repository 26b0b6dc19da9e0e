"""`tunelab merge ADAPTER_OR_RUN --out DIR`: adapter + base -> a Hugging Face folder."""

from __future__ import annotations

from tunelab.export.cli import add_placement_arguments


def add_arguments(parser) -> None:
    parser.add_argument("source", metavar="ADAPTER_OR_RUN", help="a lora/qlora run folder or an adapter folder")
    parser.add_argument("--base", help="the base model (default: the run's model.source or adapter_config.json's "
                                       "base_model_name_or_path)")
    parser.add_argument("--out", required=True, help="the Hugging Face folder to write")
    parser.add_argument("--from-quantized", action="store_true",
                        help="QLoRA: merge into the de-quantized 4-bit weights (keeps their rounding error)")
    add_placement_arguments(parser, merge=True)


def run(args) -> int:
    from tunelab.export.merge import merge_to_folder

    report = merge_to_folder(args.source, args.out, base=args.base, from_quantized=args.from_quantized,
                             dtype=args.dtype, device=args.device)
    if report.qlora:
        chosen = "de-quantized 4-bit" if report.from_quantized else "original full-precision"
        print(f"QLoRA adapter merged into the {chosen} base weights. max |logits - trained 4-bit+adapter "
              f"model's| on a probe prompt: original weights {report.diff_original:.4g}, de-quantized "
              f"weights {report.diff_dequantized:.4g}")
    print(f"wrote {report.out} ({report.dtype}; load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0

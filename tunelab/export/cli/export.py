"""`tunelab export MODEL_OR_RUN --gguf OUT.gguf [--dtype f32|f16|q8_0|q4_0|q4_k_m|q5_k_m|q6_k]
[--modelfile [--system TEXT]] [--lora-adapter]`: a GGUF file for llama.cpp / Ollama, and optionally an Ollama
Modelfile; with --lora-adapter only the adapter, as a GGUF LoRA adapter (llama.cpp's --lora)."""

from __future__ import annotations

from tunelab.export.cli import add_model_arguments
from tunelab.export.gguf import DTYPES, TRANSFORMERS_READS


def add_arguments(parser) -> None:
    add_model_arguments(parser, merge_flag=False)
    parser.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    parser.add_argument("--dtype", choices=DTYPES, default="f16",
                        help="weight type of the matrices (norms stay f32); default f16. q4_k_m, q5_k_m, q6_k: "
                             "llama.cpp's own quantizer, from the optional llama-cpp-python (tunelab[llamacpp])")
    parser.add_argument("--modelfile", action="store_true",
                        help="also write OUT.Modelfile for `ollama create NAME -f OUT.Modelfile`")
    parser.add_argument("--system", help="the Modelfile's SYSTEM prompt (with --modelfile)")
    parser.add_argument("--lora-adapter", action="store_true",
                        help="write only the LoRA adapter (dtype f32 or f16), for llama.cpp's --lora over the "
                             "base's own GGUF export")


def run(args) -> int:
    from tunelab.errors import TunelabError
    from tunelab.export.cli import open_from_args
    from tunelab.export.gguf import KQUANTS, export_gguf, llama_cpp_quantizer

    if args.system and not args.modelfile:  # before loading the model
        raise TunelabError("--system sets the Modelfile's system prompt: add --modelfile")
    if args.lora_adapter:
        return _run_adapter(args)
    if args.dtype in KQUANTS:
        llama_cpp_quantizer(args.dtype)  # a missing extra is said before loading the model

    # An adapter is always merged (GGUF holds plain weights), in fp32: the GGUF types are rounded from it.
    opened = open_from_args(args, merge=True, dtype="fp32")
    path = export_gguf(opened.model, opened.tokenizer, args.gguf, args.dtype)
    reads = opened.model.config.model_type in TRANSFORMERS_READS
    also = f"transformers with from_pretrained(folder, gguf_file={path.name!r}), " if reads else ""
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.dtype}); {also}llama.cpp loads it with "
          f"`llama-cli -m {path}`")
    if args.modelfile:
        from tunelab.export.modelfile import write_modelfile

        modelfile = write_modelfile(path, opened.model, opened.tokenizer, args.system)
        print(f"wrote {modelfile}; in Ollama: ollama create NAME -f {modelfile}")
    return 0


def _run_adapter(args) -> int:
    from tunelab.errors import TunelabError
    from tunelab.export.cli import open_from_args
    from tunelab.export.gguf_adapter import ADAPTER_DTYPES, export_gguf_adapter

    if args.dtype not in ADAPTER_DTYPES or args.modelfile:  # before loading the model
        raise TunelabError(f"--lora-adapter writes {' or '.join(ADAPTER_DTYPES)} (--dtype) and no Modelfile; got "
                           f"--dtype {args.dtype}{' --modelfile' if args.modelfile else ''}")
    opened = open_from_args(args, merge=False, dtype="fp32")
    path = export_gguf_adapter(opened.model, args.gguf, args.dtype)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB, {args.dtype} LoRA adapter); llama.cpp applies it "
          f"over the base's GGUF export: `llama-cli -m BASE.gguf --lora {path}`")
    return 0

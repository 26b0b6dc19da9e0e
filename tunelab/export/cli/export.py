"""`tunelab export MODEL_OR_RUN --gguf OUT.gguf [--dtype f32|f16|q8_0|q4_k_m|q5_k_m|q6_k]
[--modelfile [--system TEXT]]`: a GGUF file for llama.cpp / Ollama, and optionally an Ollama Modelfile."""

from __future__ import annotations

from tunelab.export.cli import add_model_arguments
from tunelab.export.gguf import DTYPES


def add_arguments(parser) -> None:
    add_model_arguments(parser, merge_flag=False)
    parser.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    parser.add_argument("--dtype", choices=DTYPES, default="f16",
                        help="weight type of the matrices (norms stay f32); default f16. q4_k_m, q5_k_m, q6_k: "
                             "llama.cpp's own quantizer, from the optional llama-cpp-python (tunelab[llamacpp])")
    parser.add_argument("--modelfile", action="store_true",
                        help="also write OUT.Modelfile for `ollama create NAME -f OUT.Modelfile`")
    parser.add_argument("--system", help="the Modelfile's SYSTEM prompt (with --modelfile)")


def run(args) -> int:
    from tunelab.errors import TunelabError
    from tunelab.export.cli import open_from_args
    from tunelab.export.gguf import KQUANTS, export_gguf, llama_cpp_quantizer

    if args.system and not args.modelfile:  # before loading the model
        raise TunelabError("--system sets the Modelfile's system prompt: add --modelfile")
    if args.dtype in KQUANTS:
        llama_cpp_quantizer(args.dtype)  # a missing extra is said before loading the model

    # An adapter is always merged (GGUF holds plain weights), in fp32: the GGUF types are rounded from it.
    opened = open_from_args(args, merge=True, dtype="fp32")
    path = export_gguf(opened.model, opened.tokenizer, args.gguf, args.dtype)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.dtype}); transformers loads it with "
          f"from_pretrained(folder, gguf_file={path.name!r}), llama.cpp with `llama-cli -m {path}`")
    if args.modelfile:
        from tunelab.export.modelfile import write_modelfile

        modelfile = write_modelfile(path, opened.model, opened.tokenizer, args.system)
        print(f"wrote {modelfile}; in Ollama: ollama create NAME -f {modelfile}")
    return 0

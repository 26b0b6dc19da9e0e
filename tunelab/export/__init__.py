"""Hand-off of tuned models: merged Hugging Face folders, GGUF files, generation and chat.

    opened = open_model("runs/qlora")                  # a run, adapter, HF folder, 4-bit folder, .gguf, `bundled`
    opened = open_model("runs/qlora", merge=True)      # QLoRA merges into the original fp weights
    merge_to_folder("runs/qlora", "out/merged")        # -> MergeReport (both QLoRA merges measured)
    export_gguf(opened.model, opened.tokenizer, "out/model.gguf", dtype="q8_0")
    chat_loop(model, tok, sys.stdin, sys.stdout)

Command modules (tunelab merge / export / generate / chat) live in tunelab.export.cli.
"""

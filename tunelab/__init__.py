"""tunelab: pretrain, fine-tune and evaluate language models (full, freeze, LoRA, QLoRA).

The public Python API is the names of `__all__` (docs/api.md has one example each), importable from `tunelab`
itself or from the module that defines them; the rest of the package may change between versions. The names are
imported on first use, so `import tunelab` (and `tunelab --help`) does not import torch.
"""

import importlib

__version__ = "0.1.0"

# name -> the module that defines it (docs/api.md groups them the same way)
_API = {
    # configuration
    "RunConfig": "tunelab.config", "load_config": "tunelab.config", "validate_config": "tunelab.config",
    # models and training
    "load_pretrained": "tunelab.models.load", "build_model": "tunelab.train.run",
    "prepare_method": "tunelab.train.run", "run_training": "tunelab.train.run",
    # data
    "build_datasets": "tunelab.data.pipeline",
    # adapters
    "LoraConfig": "tunelab.lora", "apply_lora": "tunelab.lora", "save_adapter": "tunelab.lora",
    "load_adapter": "tunelab.lora", "merge_lora": "tunelab.lora", "disable_adapters": "tunelab.lora",
    # quantization
    "quantize": "tunelab.quant", "quantize_model": "tunelab.quant", "QuantizedTensor": "tunelab.quant",
    # evaluation
    "generate": "tunelab.eval.generate", "perplexity": "tunelab.eval.perplexity", "run_suites": "tunelab.eval.suites",
    # export
    "open_model": "tunelab.export.resolve", "merge_to_folder": "tunelab.export.merge",
    "export_gguf": "tunelab.export.gguf", "write_modelfile": "tunelab.export.modelfile",
}
__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'tunelab' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])

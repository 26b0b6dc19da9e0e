"""Training data: sources, quality filters and dedup, mixtures, SFT formatting, packing.

Entry point for the trainer: `build_datasets(cfg, tokenizer, seq_len)` -> (train, eval) rows.
Names are imported on first use, so `tunelab data --help` (which imports tunelab.data.cli) stays instant.
"""

import importlib

_EXPORTS = {
    "Built": "tunelab.data.pipeline", "DataReport": "tunelab.data.pipeline", "build": "tunelab.data.pipeline",
    "build_datasets": "tunelab.data.pipeline", "DataConfig": "tunelab.data.config",
    "FilterConfig": "tunelab.data.config", "SourceConfig": "tunelab.data.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tunelab.data' has no attribute {name!r}")

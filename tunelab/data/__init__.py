"""Training data: sources, quality filters and dedup, mixtures, SFT formatting, packing.

Entry point for the trainer: `build_datasets(cfg, tokenizer, seq_len)` -> (train, eval) rows.
"""

from tunelab.data.build import Built, DataReport, build, build_datasets
from tunelab.data.config import DataConfig, FilterConfig, SourceConfig

__all__ = ["Built", "DataConfig", "DataReport", "FilterConfig", "SourceConfig", "build", "build_datasets"]

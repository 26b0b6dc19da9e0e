"""tunelab: pretrain, fine-tune and evaluate language models (full, freeze, LoRA, QLoRA)."""

__version__ = "0.1.0"

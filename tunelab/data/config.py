"""The typed data configuration: what to read, how to filter it, how to shape it for training.

A run's YAML has a `data:` section that is an instance of `DataConfig`; a wrong key or type is a clear
error (pydantic, `extra="forbid"`), never ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Format = Literal["auto", "text", "code", "jsonl", "json", "csv", "parquet", "hf", "hub"]


class SourceConfig(BaseModel):
    """One data source: a file, a folder, a saved Hugging Face dataset, a Hub dataset id, or a builtin `local:` corpus."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="a short name shown in reports")
    path: str = Field(
        description="a file or folder; a Hugging Face dataset id `owner/name` (read through the Hugging Face "
        "cache; HF_HUB_OFFLINE=1 reads the cache only); or a builtin local corpus: `local:code`, `local:prose`, "
        "`local:qa`; preference pairs `local:preference` (kto: `local:preference-unpaired`)"
    )
    revision: str | None = Field(None, description="Hub dataset id: a branch, tag or commit hash (default main)")
    split: str = Field("train", description="Hub dataset id: the split to read")
    subset: str | None = Field(None, description="Hub dataset id: the subset (config name), when it has several")
    kind: str = Field("web", description="what the text is (web, qa, code, ...); shown in reports")
    weight: float = Field(1.0, gt=0, description="share of mixture tokens, relative to the other sources")
    format: Format = Field(
        "auto",
        description="how to read `path`; `auto` picks by suffix (a folder: `hf` if it holds a saved dataset, else "
        "`code` for `extensions` files, else `text` for .txt/.md files; `hub` for an `owner/name` that is no "
        "local path)",
    )
    text_field: str = Field("text", description="which field holds the text in JSONL/JSON/CSV/Parquet/HF rows")
    extensions: list[str] = Field([".py"], description="file suffixes read from a code folder")
    epochs: float | None = Field(
        None, gt=0, description="most passes over this source in a mixture; None = repeat freely"
    )

    def hub(self) -> dict:
        """The keyword arguments of sources.iter_rows that pick a Hub dataset's snapshot, split and subset."""
        return {"revision": self.revision, "split": self.split, "subset": self.subset}


class FilterConfig(BaseModel):
    """Quality filters, each switchable. Defaults follow Gopher (Rae et al. 2021, appendix A) loosened
    so that source code and short SFT pairs pass; see docs/data.md for how each ratio is measured."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="False switches every filter off")
    exact_dedup: bool = Field(True, description="drop documents whose normalised text was seen before")
    near_dedup: bool = Field(False, description="drop near-duplicates (MinHash + LSH over character 5-grams)")
    near_dedup_threshold: float = Field(0.8, gt=0, lt=1, description="estimated Jaccard similarity that counts as a duplicate")
    min_chars: int = Field(16, ge=0, description="drop documents shorter than this (characters, after strip)")
    max_chars: int = Field(1_000_000, gt=0, description="drop documents longer than this (characters)")
    max_symbol_ratio: float | None = Field(
        0.3, description="drop if symbol characters (ASCII punctuation except .,;:!?'\"()-) / non-space characters is above; None = off"
    )
    min_alnum_ratio: float | None = Field(
        0.5, description="drop if letters+digits / non-space characters is below; None = off"
    )
    max_repeated_line_ratio: float | None = Field(
        0.3, description="drop if characters in repeated lines / all line characters is above (Gopher: 0.2-0.3); None = off"
    )
    max_repeated_ngram_ratio: float | None = Field(
        0.5, description="drop if characters covered by repeated word 5-grams / all word characters is above "
        "(Gopher: 0.15 for web prose; code repeats far more, median 0.14 in the stdlib); None = off"
    )
    empty_response: bool = Field(True, description="SFT: drop examples whose last response is empty")
    truncated_response: bool = Field(
        True, description="SFT: drop responses that look cut off (an unclosed ``` fence, or ending in ',', '...', etc.)"
    )
    eval_overlap: bool = Field(True, description="SFT: drop train examples whose prompt also appears in eval")


class DataConfig(BaseModel):
    """Where the training text comes from and how it becomes `input_ids`/`labels`/`position_ids`."""

    model_config = ConfigDict(extra="forbid")

    task: Literal["pretrain", "sft", "spans", "preference"] = Field(
        "sft", description="pretrain: a token mixture; sft: prompt->response pairs; spans: a token classifier "
        "over labelled character spans or BIO tags (tunelab/data/spans.py, docs/spans.md); preference: "
        "{prompt, chosen, rejected} pairs or unpaired {prompt, completion, label} (tunelab/data/preference.py, "
        "docs/preference.md)")
    preference: Literal["pairs", "unpaired"] = Field(
        "pairs", description="preference: the records' layout: `pairs` for dpo/ipo/orpo/simpo, `unpaired` for kto")
    sources: list[SourceConfig] = Field(min_length=1, description="one or more sources")
    sft_format: Literal["auto", "alpaca", "chat", "prompt_completion"] = Field(
        "auto", description="record layout for SFT; auto detects it per record"
    )
    template: str | None = Field(
        None, description="None = the tokenizer's chat template; else a named fallback (chatml or plain) or a .jinja file"
    )
    template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra variables for the chat template, as apply_chat_template takes them "
        "(e.g. {enable_thinking: false} for Qwen3's non-thinking mode); use the same at inference")
    turns: Literal["all", "last"] = Field(
        "all", description="SFT: which assistant messages are trained: all, or only the last (earlier ones are prompt)")
    packing: Literal["packed", "padded"] = Field(
        "padded", description="padded (the default): one example per row, <= seq_len; packed: rows of exactly "
        "seq_len tokens holding several examples, position ids restarting at each, attention kept inside each "
        "example (a block-diagonal causal mask; docs/data.md, Packing)"
    )
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="share of documents/records held out for eval")
    eval_path: str | None = Field(None, description="a separate eval file (same formats); overrides eval_fraction")
    max_tokens: int | None = Field(
        None, gt=0, description="pretrain: tokens to draw from the mixture; None = until a source runs out "
        "(a source with epochs=None counts as one pass for this)"
    )
    skip_bad_rows: bool = Field(False, description="skip (and count) malformed rows instead of stopping with an error")
    filters: FilterConfig = Field(default_factory=FilterConfig, description="quality filters")
    seed: int = Field(0, description="shuffling, eval split and mixture order")
    prepared: str | None = Field(
        None, description="folder of the prepared (tokenized) data: `tunelab data prepare` writes it, `tunelab "
        "train` reuses it while its manifest matches and rebuilds it when not; None = `output_dir/prepared`"
    )
    num_proc: int = Field(1, ge=1, description="processes that tokenize in parallel (1: in this process)")
    labels: list[str] | None = Field(
        None, description="spans: the span labels; a record with another label is an error. None = the labels "
        "found in the data")
    stride: int = Field(32, ge=0, description="spans: tokens by which windows of a document longer than "
                        "train.seq_len overlap (context only: each token is labelled once)")
    test_path: str | None = Field(
        None, description="spans: a test file, scored after training with the post-processing chosen on the "
        "validation split (eval_path or eval_fraction)")
    postprocess: Literal["per-label", "pooled"] = Field(
        "per-label", description="spans: how the post-processing (gap closing, snapping to words, minimum length) "
        "is chosen on the validation split: per-label (each label its own setting, by that label's span F1; a "
        "label without validation spans takes the pooled one) or pooled (one setting for all, by micro span F1)")

    @model_validator(mode="after")
    def _unique_names(self) -> DataConfig:
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"source names must be unique; repeated: {dup}")
        if self.task == "preference" and self.packing == "packed":
            raise ValueError("task preference needs packing: padded (one pair or response per row)")
        if self.task == "spans" and self.packing == "packed":
            raise ValueError("task spans needs packing: padded (one document window per row)")
        return self

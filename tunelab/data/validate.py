"""Check a data section in seconds, before any model loads: a typo should not cost an 8B model's load.

`check(cfg)` opens every source (and `eval_path`): the path exists, its format parses, and its first
records have what the task needs (a string `text_field` for pretraining; an SFT layout for SFT). With a
tokenizer, `check(cfg, tokenizer)` also renders those SFT records with the chat template (the template
exists, renders prefix by prefix and keeps the assistant's text). A problem is a DataError naming file and
line, or a ConfigError; rows past the first few are checked when the data is built.
"""

from __future__ import annotations

import itertools

from tunelab.data import sft, spans
from tunelab.data.config import DataConfig, SourceConfig
from tunelab.data.sources import field_text, iter_rows
from tunelab.errors import DataError

FIRST = 8  # records read per source: enough to catch a wrong field or layout, few enough to take no time


def _sources(cfg: DataConfig) -> list[SourceConfig]:
    """The sources, then eval_path read as the pipeline reads it (pretrain: the first source's text_field)."""
    extra = []
    if cfg.eval_path:
        field = cfg.sources[0].text_field if cfg.task == "pretrain" else "text"
        extra = [SourceConfig(name="eval", path=cfg.eval_path, text_field=field)]
    if cfg.task == "spans" and cfg.test_path:
        extra.append(SourceConfig(name="test", path=cfg.test_path))
    return list(cfg.sources) + extra


def _check_record(cfg: DataConfig, src: SourceConfig, line, row: dict, tokenizer) -> None:
    if cfg.task == "pretrain":
        field_text(row, src.text_field, src.path, line)
        return
    if cfg.task == "preference":
        from tunelab.data import preference

        unpaired = cfg.preference == "unpaired"
        try:
            if tokenizer is None:
                (preference.to_unpaired if unpaired else preference.to_pair)(row)
            else:
                (preference.encode_unpaired if unpaired else preference.encode_pair)(row, tokenizer, 1 << 30, cfg.template)
        except sft.RecordError as e:
            raise DataError(src.path, line, str(e)) from None
        return
    if cfg.task == "spans":
        try:
            spans.parse_record(row, cfg.labels)
        except ValueError as e:
            raise DataError(src.path, line, str(e)) from None
        return
    try:
        messages = sft.to_messages(row, cfg.sft_format)
        if tokenizer is not None:
            sft.segments(messages, tokenizer, **sft.options(cfg))
    except sft.RecordError as e:
        raise DataError(src.path, line, str(e)) from None


def check(cfg: DataConfig, tokenizer=None, first: int = FIRST) -> None:
    """Raise DataError/ConfigError for the first problem in the first `first` records of each source
    (with skip_bad_rows, bad records are left to the build, which skips and counts them)."""
    if tokenizer is not None and cfg.task in ("sft", "preference"):
        sft.chat_template(tokenizer, cfg.template)  # a missing or unknown template, even with no records
    for src in _sources(cfg):
        rows = iter_rows(src.path, src.format, src.text_field, cfg.skip_bad_rows, [], src.extensions, **src.hub())
        for line, row in itertools.islice(rows, first):
            try:
                _check_record(cfg, src, line, row, tokenizer)
            except DataError:
                if not cfg.skip_bad_rows:
                    raise

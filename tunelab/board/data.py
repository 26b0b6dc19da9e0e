"""A run's data as the model sees it: prepared rows token by token, the trained tokens (labels != -100)
marked, document starts (position 0 inside a packed row) and rows cut at train.seq_len marked, plus the
data report (planned vs realised mixture shares, filter and dedup counts) from the prepared manifest."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from tunelab.board.runs import BoardError, read_config

MAX_EXAMPLES = 50


def prepared_folder(run: Path, cfg: dict) -> Path:
    """Where the run's prepared rows are: data.prepared, else RUN/prepared (tunelab.train.run._data)."""
    given = (cfg.get("data") or {}).get("prepared")
    return Path(given) if given else run / "prepared"


@lru_cache(maxsize=8)
def _tokenizer(folder: str):
    from tunelab.models.load import load_tokenizer

    return load_tokenizer(folder)  # never trust_remote_code: the board runs no code shipped with a model


def tokenizer_folder(run: Path, cfg: dict) -> str:
    """The folder of the tokenizer the run trained with (its own model/ for full and freeze runs)."""
    from tunelab.models.load import model_folder

    model = cfg.get("model") or {}
    if model.get("trust_remote_code"):
        raise BoardError("this run's model needs trust_remote_code, which the board never turns on: "
                         "inspect it with `tunelab data` instead", 400)
    if (run / "model" / "tokenizer_config.json").is_file():
        return str(run / "model")
    source = model.get("source", "bundled")
    if source == "scratch":
        from tunelab.models.bundled import tokenizer_dir

        tok = (model.get("scratch") or {}).get("tokenizer", "bundled")
        return str(tokenizer_dir() if tok == "bundled" else tok)
    if str(source).endswith(".gguf"):
        raise BoardError(f"the tokenizer of a .gguf source ({source}) comes out of its conversion; "
                         "the board does not convert models", 400)
    return str(model_folder(source, model.get("revision")))


def examples(run: Path, split: str = "train", start: int = 0, n: int = 4) -> dict:
    """Rows start..start+n of a split: each a list of [text, trained, flags] tokens; plus the data report."""
    from tunelab.data import prepared

    if split not in ("train", "eval"):
        raise BoardError(f"split must be train or eval, got {split!r}")
    if not 1 <= n <= MAX_EXAMPLES or start < 0:
        raise BoardError(f"n must be 1..{MAX_EXAMPLES} and start >= 0, got n={n}, start={start}")
    cfg, err = read_config(run)
    if cfg is None:
        raise BoardError(f"{err}: the board needs the run's config to find its data and tokenizer", 404)
    folder = prepared_folder(run, cfg)
    manifest = prepared.read_manifest(folder)
    if manifest is None:
        raise BoardError(f"no prepared data in {folder} (manifest.json missing): it is written when the run "
                         "builds its data; `tunelab data build` makes it for a config", 404)
    train, eval_ = prepared.load(folder, manifest)
    rows = train if split == "train" else eval_
    tok = _tokenizer(tokenizer_folder(run, cfg))
    seq_len = (cfg.get("train") or {}).get("seq_len")
    padded = (cfg.get("data") or {}).get("packing") == "padded"
    shown = []
    for i in range(start, min(len(rows), start + n)):
        row = rows[i]
        ids, labels, pos = row["input_ids"], row["labels"], row["position_ids"]
        tokens = [[tok.decode([t]), lab != -100, k > 0 and p == 0] for k, (t, lab, p) in enumerate(zip(ids, labels, pos))]
        # padded rows hold one example each: one that fills seq_len was cut there (DataReport.truncated)
        shown.append({"index": i, "tokens": tokens, "length": len(ids), "trained": sum(l != -100 for l in labels),
                      "cut": bool(padded and seq_len and len(ids) >= seq_len)})
    return {"split": split, "rows": len(rows), "start": start, "examples": shown, "seq_len": seq_len,
            "packing": (cfg.get("data") or {}).get("packing"), "report": manifest.get("data_report"),
            "report_text": manifest.get("report"), "prepared": str(folder)}

"""A data source `path` as a Hugging Face dataset id, resolved through a local Hugging Face cache, offline."""

from __future__ import annotations

import json

import pytest

from tunelab.data.config import DataConfig
from tunelab.data.sources import read_records
from tunelab.errors import DataError, TunelabError

MAIN, V1 = "c" * 40, "d" * 40  # commit hashes of two snapshots
README = """---
configs:
- config_name: default
  data_files:
  - {split: train, path: train.jsonl}
  - {split: test, path: test.jsonl}
- config_name: extra
  data_files:
  - {split: train, path: extra/train.jsonl}
---
"""


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _qa(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding the dataset tiny-org/chat at two commits, laid out as huggingface_hub
    writes it (datasets--org--name/{refs,snapshots}): main has JSONL splits and a second subset named in
    its README, tag v1 one Parquet file; the Hub itself is switched off."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "datasets--tiny-org--chat"
    main = repo / "snapshots" / MAIN
    _jsonl(main / "train.jsonl", [_qa("Say one.", "one"), _qa("Say two.", "two")])
    _jsonl(main / "test.jsonl", [_qa("Say three.", "three")])
    _jsonl(main / "extra" / "train.jsonl", [_qa("Say four.", "four")])
    (main / "README.md").write_text(README)
    v1 = repo / "snapshots" / V1 / "data"
    v1.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"prompt": "Say five.", "completion": "five"}]), v1 / "train-00000-of-00001.parquet")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(V1)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo


def test_an_id_reads_its_split_subset_and_revision_from_the_cache(hub_cache):
    answers = lambda rows: [r["messages"][-1]["content"] for r in rows]  # noqa: E731
    assert answers(read_records("tiny-org/chat")) == ["one", "two"]
    assert answers(read_records("tiny-org/chat", split="test")) == ["three"]
    assert answers(read_records("tiny-org/chat", subset="extra")) == ["four"]
    assert list(read_records("tiny-org/chat", revision="v1")) == [{"prompt": "Say five.", "completion": "five"}]
    assert list(read_records("tiny-org/chat", revision=V1)) == [{"prompt": "Say five.", "completion": "five"}]


def test_not_cached_offline_or_a_missing_split_is_one_line(hub_cache):
    with pytest.raises(TunelabError, match=r"^data path: tiny-org/other is not in the Hugging Face cache .* "
                                           r"HF_HUB_OFFLINE=1 is set; fetch it .*`hf download tiny-org/other "
                                           r"--repo-type dataset --include 'README.md' "):
        list(read_records("tiny-org/other"))
    with pytest.raises(TunelabError, match=r"tiny-org/chat@v9 is not in the Hugging Face cache.*--revision v9"):
        list(read_records("tiny-org/chat", revision="v9"))
    with pytest.raises(DataError, match=r"^tiny-org/chat: cannot read split 'validation' of tiny-org/chat \("):
        list(read_records("tiny-org/chat", split="validation"))


def test_an_sft_build_and_its_fingerprint_from_an_id(hub_cache, tiny_tokenizer):
    from tunelab.data.pipeline import build
    from tunelab.data.prepared import fingerprint
    from tunelab.data.sft import encode

    cfg = DataConfig(sources=[{"name": "chat", "path": "tiny-org/chat", "revision": "v1"}], eval_fraction=0,
                     filters={"enabled": False})
    (row,) = build(cfg, tiny_tokenizer, 64).train
    want = encode({"prompt": "Say five.", "completion": "five"}, tiny_tokenizer, 64)
    assert (row["input_ids"], row["labels"]) == (want.input_ids, want.labels)
    other = cfg.model_copy(update={"sources": [cfg.sources[0].model_copy(update={"revision": None})]})
    # the prepared data's fingerprint follows the snapshot's contents
    assert fingerprint(cfg, tiny_tokenizer, 64, 0)["sources"] != fingerprint(other, tiny_tokenizer, 64, 0)["sources"]

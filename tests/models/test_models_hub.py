"""model.source as a Hugging Face Hub id, resolved through a local Hugging Face cache, offline."""

from __future__ import annotations

import pytest
import torch

from tests.support.tiny_models import make_tiny_llama, make_tiny_tokenizer
from tunelab.errors import TunelabError
from tunelab.models.load import load_pretrained, model_folder

MAIN, V1 = "a" * 40, "b" * 40  # commit hashes of two snapshots


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding tiny-org/tiny-llama at two commits (refs main and v1), laid out as
    huggingface_hub writes it (models--org--name/{refs,snapshots}); the Hub itself is switched off."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    tok = make_tiny_tokenizer()
    for ref, commit, seed in (("main", MAIN, 0), ("v1", V1, 1)):
        snap = repo / "snapshots" / commit
        make_tiny_llama(vocab_size=len(tok), seed=seed).save_pretrained(snap)
        tok.save_pretrained(snap)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo


def test_an_id_resolves_to_its_cached_snapshot_and_a_revision_pins_another(hub_cache):
    assert model_folder("tiny-org/tiny-llama") == hub_cache / "snapshots" / MAIN
    assert model_folder("tiny-org/tiny-llama", "v1") == hub_cache / "snapshots" / V1
    assert model_folder("tiny-org/tiny-llama", V1) == hub_cache / "snapshots" / V1
    main, _ = load_pretrained("tiny-org/tiny-llama")
    v1, _ = load_pretrained("tiny-org/tiny-llama", revision="v1")
    want = make_tiny_llama(vocab_size=main.config.vocab_size, seed=1)
    assert torch.equal(v1.lm_head.weight, want.lm_head.weight)
    assert not torch.equal(main.lm_head.weight, v1.lm_head.weight)


def test_an_id_that_is_not_cached_offline_is_one_line_saying_how_to_fetch_it(hub_cache):
    with pytest.raises(TunelabError, match=r"Qwen/Qwen2.5-0.5B-Instruct is not in the Hugging Face cache .* "
                                           r"HF_HUB_OFFLINE=1 is set; fetch it .*hf download Qwen/Qwen2.5-0.5B-Instruct"):
        model_folder("Qwen/Qwen2.5-0.5B-Instruct")
    with pytest.raises(TunelabError, match="tiny-org/tiny-llama@v9 is not in the Hugging Face cache"):
        model_folder("tiny-org/tiny-llama", "v9")


def test_a_mistyped_run_folder_is_named_as_a_path_first(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TunelabError, match=r"^model.source: runs/chat-2 is not in the Hugging Face cache"):
        model_folder("runs/chat-2")  # no runs/ here: read as a Hub id only
    (tmp_path / "runs" / "chat-1").mkdir(parents=True)
    with pytest.raises(TunelabError, match=r"^model.source: runs/chat-2 is not a local folder \(runs/ is one: a "
                                           r"typo\?\), and is not in the Hugging Face cache"):
        model_folder("runs/chat-2")


def test_tunelab_train_takes_an_id_and_its_revision(hub_cache, tmp_path):
    from tests.support.tiny_run import make_workspace, run_config
    from tunelab.cli import main

    ws = make_workspace(tmp_path / "ws")
    out = tmp_path / "run"
    cfg = run_config(ws, out, model={"source": "tiny-org/tiny-llama", "revision": "v1"},
                     train={"max_steps": 1})
    assert main(["train", str(cfg), "--no-progress"]) == 0
    assert "revision: v1" in (out / "config.yaml").read_text()

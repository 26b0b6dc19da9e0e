"""The main job, end to end on the real bundled model (converted from its GGUF on first use), shortened."""

import json

from tunelab.cli import main


def test_quickstart_smoke(tmp_path, capsys):
    from tunelab.eval.heldout import word_ngrams
    from tunelab.eval.heldout_prose import PARAGRAPHS
    from tunelab.eval.stats import bootstrap_interval, exact, wilson_interval
    from tunelab.quickstart import _pct, unseen_families

    out = tmp_path / "qs"
    args = ["quickstart", "--out", str(out), "--max-steps", "2", "--train-per-family", "4", "--eval-per-family", "2",
            "--unseen-per-family", "2", "--check-n", "1"]
    assert main(args) == 0
    text = capsys.readouterr().out
    result = json.loads((out / "quickstart.json").read_text())
    before, after = result["before"], result["after"]
    assert result["train"]["steps"] == 2 and after["eval_loss"] == result["train"]["eval_loss"]
    # on this fixed seed two steps lower the held-out loss (measured on the batches the loop evaluates after
    # training) and do not lower the held-out score
    assert after["eval_loss"] < before["eval_loss"] - 0.05
    assert after["test"]["accuracy"] >= before["test"]["accuracy"]
    assert f"| {before['eval_loss']:.3f} " in text and f"| {after['eval_loss']:.3f} " in text
    # every rate row carries its Wilson interval, computed from the per-item outcomes in quickstart.json
    n_test = len(before["test"]["scores"])
    assert n_test == 14 and len(before["attack_hits"]) == 5 and len(before["abstained"]) == 2
    for r in (before, after):
        hits = exact(r["test"]["scores"])
        assert _pct(sum(hits) / n_test, wilson_interval(int(sum(hits)), n_test)) in text
        assert _pct(sum(r["attack_hits"]) / 5, wilson_interval(int(sum(r["attack_hits"])), 5)) in text
        assert r["prose"]["tokens"] > 1000 and r["prose"]["ppl"] > 1
    # unseen: 2 items of each of the instruct collection's 11 held-out families; the change is paired over them
    assert [i.rsplit("-", 2)[0] for i in result["unseen_ids"]] == [f for f in unseen_families() for _ in range(2)]
    d = [y - x for x, y in zip(before["unseen"]["scores"], after["unseen"]["scores"])]
    lo, hi = bootstrap_interval(d)
    assert f"| {sum(d) / 22:+.1%} [{lo:+.1%}, {hi:+.1%}] " in text
    for row in ("score, partial credit (n=14)", "unseen families (transfer): score, partial credit (n=22)", "exact match", "constant-answer baseline", "attack success (n=5",
                "abstention (n=2", "held-out prose perplexity", f"0 of {len(set().union(*map(word_ngrams, PARAGRAPHS)))} "):
        assert row in text, row
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["base_model_name_or_path"]
    assert (out / "loss.png").stat().st_size > 1000 and (out / "quickstart.md").read_text().strip() in text


def test_bad_flags_fail_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--lr", "-1"]) == 2
    assert "`train.lr`" in capsys.readouterr().err and not out.exists()
    assert main(["quickstart", "--out", str(out), "--max-steps", "0"]) == 2
    assert "`train.max_steps`" in capsys.readouterr().err and not out.exists()
    assert main(["quickstart", "--out", str(out), "--check-n", "0"]) == 2
    assert "--check-n must be 1 or more" in capsys.readouterr().err and not out.exists()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    assert main(["quickstart", "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "mine\n"
    assert main(["quickstart", "--out", str(out), "--model", str(tmp_path / "no-such-model")]) == 2
    assert "no-such-model" in capsys.readouterr().err and not out.exists()  # checked before data is written

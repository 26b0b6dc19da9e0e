"""The main job, end to end on the real bundled model (converted from its GGUF on first use), shortened."""

import json

from tunelab.cli import main


def test_quickstart_smoke(tmp_path, capsys):
    out = tmp_path / "qs"
    args = ["quickstart", "--out", str(out), "--max-steps", "2", "--train-per-family", "4", "--eval-per-family", "1"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "held-out items, trained families" in text and "before" in text and "after" in text
    result = json.loads((out / "quickstart.json").read_text())
    assert 0.0 <= result["after"]["test"]["accuracy"] <= 1.0
    assert result["train"]["steps"] == 2
    # the loss before training is measured on the batches the loop evaluates after it; 2 steps move it a little
    before, after = result["before"]["eval_loss"], result["after"]["eval_loss"]
    assert after == result["train"]["eval_loss"] and 0 < abs(after - before) < 0.5 * before
    assert f"| {before:.3f} " in text and f"| {after:.3f} " in text
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["base_model_name_or_path"]
    assert (out / "loss.png").stat().st_size > 1000 and (out / "quickstart.md").exists()


def test_bad_flags_fail_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--lr", "-1"]) == 2
    assert "`train.lr`" in capsys.readouterr().err and not out.exists()
    assert main(["quickstart", "--out", str(out), "--max-steps", "0"]) == 2
    assert "`train.max_steps`" in capsys.readouterr().err and not out.exists()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    assert main(["quickstart", "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "mine\n"
    assert main(["quickstart", "--out", str(out), "--model", str(tmp_path / "no-such-model")]) == 2
    assert "no-such-model" in capsys.readouterr().err and not out.exists()  # checked before data is written

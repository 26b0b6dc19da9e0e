"""The quickstart's RunConfig, built from its flags in code, equals the one the `key=value` override path gave."""

import argparse
import copy

import pytest

from tunelab.config import load_config
from tunelab.errors import ConfigError
from tunelab.quickstart import QUICKSTART, add_arguments, quickstart_config


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def _through_overrides(args) -> dict:
    """What quickstart.run built before: QUICKSTART plus the flags as `key=value` strings (tunelab train's path)."""
    overrides = [f"method={args.method}", f"model.source={args.model}", f"train.lr={args.lr}",
                 f"train.epochs={args.epochs}"]
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    return load_config(None, overrides, base=QUICKSTART).model_dump()


@pytest.mark.parametrize("argv", [[], ["--method", "lora", "--max-steps", "3", "--lr", "2e-4", "--epochs", "2.5"],
                                  ["--model", "some/folder"]])
def test_config_equals_the_override_path(argv):
    args = _args(argv)
    assert quickstart_config(args).model_dump() == _through_overrides(args)


def test_default_config_by_hand():
    cfg = quickstart_config(_args([])).model_dump()
    assert cfg["method"] == "qlora" and cfg["model"]["source"] == "bundled"
    assert cfg["lora"]["r"] == 16 and cfg["lora"]["alpha"] == 32 and cfg["lora"]["target_modules"] == "all-linear"
    assert {k: cfg["train"][k] for k in ("batch_size", "epochs", "lr", "warmup_steps", "seq_len", "max_steps")} == \
        {"batch_size": 8, "epochs": 1.0, "lr": 1e-3, "warmup_steps": 4, "seq_len": 256, "max_steps": None}
    assert cfg["data"]["sources"][0]["path"] == "train.jsonl" and cfg["data"]["eval_path"] == "eval.jsonl"


def test_building_leaves_the_template_alone():
    before = copy.deepcopy(QUICKSTART)
    cfg = quickstart_config(_args(["--max-steps", "2"]))
    cfg.data.sources[0].path = "elsewhere.jsonl"  # what run() does with the run folder's paths
    cfg.train.lr = 0.5
    assert QUICKSTART == before


def test_a_bad_flag_names_the_key():
    with pytest.raises(ConfigError, match=r"^quickstart: `train.lr`"):
        quickstart_config(_args(["--lr", "-1"]))

"""Fuzzing with hypothesis: whatever a user feeds the config loader, the data readers or the quantizer, the
only exceptions are tunelab's own (ConfigError / DataError / QuantError, all TunelabError) or none."""

from __future__ import annotations

import math
import os

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunelab.config import load_config
from tunelab.data.sources import read_records
from tunelab.errors import ConfigError, DataError
from tunelab.quant import QuantError, quantize

# The same examples on every run (CI stays reproducible); TUNELAB_FUZZ_EXPLORE=1 draws new ones each run,
# which is how the two bugs pinned in test_data_sources.py and test_quant.py were found.
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck),
                derandomize=not os.environ.get("TUNELAB_FUZZ_EXPLORE"), database=None)
COUNTS: dict[str, int] = {}


def _count(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


# --- the config loader -------------------------------------------------------------------------------------------

KEYS = ["method", "model", "quant", "lora", "data", "train", "output_dir", "resume", "source", "dtype", "r",
        "alpha", "lr", "batch_size", "seq_len", "sources", "name", "path", "weight", "max_steps", "target_modules",
        "filters", "task", "block_size", "on_nonfinite", "bogus", ""]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["lora", "qlora", "full", "nf4", "auto", "x.jsonl", "-1"]))
trees = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                      st.dictionaries(st.sampled_from(KEYS), kids, max_size=5)),
                     max_leaves=20)
DOTTED = ["train.lr", "train.batch_size", "lora.r", "method", "data.sources", "model.source", "quant.block_size",
          "train", "x.y.z", "train.seq_len.deep", "resume", ""]
overrides = st.lists(st.one_of(st.text(max_size=20),
                               st.tuples(st.sampled_from(DOTTED), st.text(max_size=16)).map(lambda kv: "=".join(kv))),
                     max_size=4)


@FUZZ
@given(tree=st.dictionaries(st.sampled_from(KEYS), trees, max_size=6), items=overrides)
def test_config_loader_raises_only_config_errors(tree, items):
    try:
        load_config(None, items, base=tree)
    except ConfigError:
        pass
    _count("config trees + overrides")


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.builds(lambda t: yaml.safe_dump(t), trees)),
       raw=st.binary(max_size=64))
def test_config_files_raise_only_config_errors(tmp_path_factory, text, raw):
    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    for content in (text.encode("utf-8", "surrogatepass"), raw):
        path.write_bytes(content)
        try:
            load_config(path)
        except ConfigError:
            pass
        _count("config files")


# --- the data readers --------------------------------------------------------------------------------------------

JSONISH = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)),
                       lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=5), kids, max_size=3)),
                       max_leaves=8)
lines = st.lists(st.one_of(st.binary(max_size=40), st.builds(lambda v: __import__("json").dumps(v).encode(), JSONISH),
                           st.sampled_from([b"", b"{", b'{"text": "ok"}', b"\xff\xfe", b'a,b,"c', b"text"])),
                 max_size=8)


@FUZZ
@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
@given(rows=lines, skip=st.booleans())
def test_data_readers_raise_only_data_errors(tmp_path_factory, suffix, rows, skip):
    path = tmp_path_factory.mktemp("data") / f"f{suffix}"
    path.write_bytes(b"\n".join(rows))
    try:
        for record in read_records(path, skip_bad_rows=skip, skipped=[]):
            assert isinstance(record, dict)
    except DataError as e:
        assert str(path) in str(e)
    _count(f"data files {suffix}")


# --- the quantizer -----------------------------------------------------------------------------------------------

SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, 3e38, -3e38]


@st.composite
def tensors(draw):
    shape = draw(st.lists(st.integers(0, 70), max_size=3))
    dtype = draw(_mostly([torch.float32, torch.float16, torch.bfloat16], [torch.float64, torch.int32]))
    n = math.prod(shape)
    t = torch.randn(n, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16)))) * draw(st.sampled_from([1e-30, 1.0, 1e4]))
    for i in draw(st.lists(st.integers(0, max(n - 1, 0)), max_size=4)) if n else []:
        t[i] = draw(st.sampled_from(SPECIAL))
    return t.reshape(shape).to(dtype)


def _mostly(valid: list, invalid: list):
    """Valid values 4 times out of 5, so most draws reach the quantizer's arithmetic, not just its checks."""
    return st.one_of(*[st.sampled_from(valid)] * 4, st.sampled_from(invalid))


@settings(FUZZ, max_examples=200)
@given(t=tensors(), qtype=_mostly(["nf4", "fp4", "int4", "int8"], ["nf3", ""]),
       block=_mostly([32, 64, 4096], [0, -64, 3, 100, 8192]), double=st.booleans(),
       scheme=_mostly(["absmax", "minmax"], ["zero"]))
def test_quantizer_raises_only_quant_errors(t, qtype, block, double, scheme):
    try:
        qt = quantize(t, qtype, block_size=block, double_quant=double, scheme=scheme)
    except QuantError:
        _count("quantizer inputs refused")
        return
    back = qt.dequantize()
    assert back.shape == t.shape and back.dtype == t.dtype
    if torch.isfinite(t).all() and t.abs().max() < 6e4:  # finite input within fp16's range: finite output
        assert torch.isfinite(back).all()
    _count("quantizer inputs quantized")


def test_fuzz_summary():
    total = sum(COUNTS.values())
    print(f"\nfuzz: {total} generated inputs ({', '.join(f'{v} {k}' for k, v in sorted(COUNTS.items()))}), "
          "0 uncaught exceptions")
    assert total > 0

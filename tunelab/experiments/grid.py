"""Sweep grids: `key=spec` axes -> the cells of their cartesian product, each a set of config overrides.

    axes = parse_grid(["method=full,lora", "lr=1e-5:1e-2:log4", "batch_size=4,16"])
    cells = expand(axes)            # [{"method": "full", "train.lr": 1e-05, "train.batch_size": 4}, ...]
    slug(cells[0])                  # "method-full__lr-1e-05__batch_size-4": the cell's folder name

Keys are short aliases (ALIASES) or any dotted RunConfig key (`train.weight_decay`, `lora.dropout`).
Values are a comma list of YAML scalars (`full,lora`, `4,16,64`), or a range `lo:hi:logN` (N points spaced
evenly in log, both ends included) or `lo:hi:linN` (N evenly spaced points). Range points are rounded to 4
significant digits, so folder names and tables stay readable.

`data=a.jsonl,b.jsonl` swaps the training data: the cell trains on that one file (data.sources becomes
[{name: train, path: FILE}]); the other data settings (format, packing, eval split) stay the base config's.

`rank` sets `lora.r` only: alpha stays as the base config says (LoRA Without Regret, Schulman et al. 2025,
keep alpha=32 with the 1/r scale); sweep `alpha=...` as well to change it.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

from tunelab.config import _parse_value
from tunelab.errors import ConfigError

ALIASES = {
    "method": "method",
    "lr": "train.lr",
    "batch_size": "train.batch_size",
    "rank": "lora.r",
    "alpha": "lora.alpha",
    "seed": "train.seed",
    "data": "data",
}
SHORT = {v: k for k, v in ALIASES.items()}
# Keys that only mean something for some methods: a `full` cell ignores lora.* and quant.*, so cells that
# differ only there are the same run and are kept once.
ADAPTER_METHODS = ("lora", "qlora")

_RANGE = re.compile(r"^(?P<lo>[^:]+):(?P<hi>[^:]+):(?P<kind>log|lin)(?P<n>\d+)$")


def _number(text: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"grid `{spec}`: {text!r} is not a number") from None


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def _scalar(text: str) -> Any:
    """A YAML scalar, but `1e-4` is a float (YAML 1.1 reads exponents without a dot as strings)."""
    value = _parse_value(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def parse_values(spec: str) -> list[Any]:
    """`a,b,c` -> YAML scalars; `lo:hi:logN` / `lo:hi:linN` -> N points from lo to hi, both included."""
    m = _RANGE.match(spec.strip())
    if m:
        lo, hi, n = _number(m["lo"], spec), _number(m["hi"], spec), int(m["n"])
        if n < 2:
            raise ConfigError(f"grid `{spec}`: a range needs at least 2 points (e.g. 1e-5:1e-2:log8)")
        if m["kind"] == "log":
            if lo <= 0 or hi <= 0:
                raise ConfigError(f"grid `{spec}`: log ranges need positive ends; use linN for others")
            return [_round(lo * (hi / lo) ** (i / (n - 1))) for i in range(n)]
        return [_round(lo + (hi - lo) * i / (n - 1)) for i in range(n)]
    values = [_scalar(v.strip()) for v in spec.split(",") if v.strip()]
    if not values:
        raise ConfigError(f"grid value list `{spec}` is empty (e.g. method=full,lora or lr=1e-5:1e-2:log8)")
    if len(set(map(repr, values))) != len(values):
        raise ConfigError(f"grid value list `{spec}` repeats a value")
    return values


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """`["key=spec", ...]` -> {dotted config key: values}, in the order given."""
    axes: dict[str, list[Any]] = {}
    for item in items:
        key, sep, spec = item.partition("=")
        key = key.strip()
        if not sep or not key or not spec.strip():
            raise ConfigError(f"grid axis `{item}` is not key=values (e.g. lr=1e-5:1e-2:log8 or method=full,lora)")
        dotted = ALIASES.get(key, key)
        if dotted in axes:
            raise ConfigError(f"grid axis `{key}` is given twice")
        axes[dotted] = parse_values(spec)
    if not axes:
        raise ConfigError("an empty grid: give at least one axis, e.g. --grid method=full,lora lr=1e-5:1e-2:log8")
    return axes


def _applies(key: str, method: Any) -> bool:
    return method in ADAPTER_METHODS or not (key.startswith("lora.") or key.startswith("quant."))


def expand(axes: dict[str, list[Any]], base_method: str = "lora") -> list[dict[str, Any]]:
    """The cartesian product as override dicts, first axis slowest; adapter-only keys dropped (and the cell
    kept once) for methods without adapters."""
    cells, seen = [], set()
    for combo in itertools.product(*axes.values()):
        cell = dict(zip(axes, combo))
        method = cell.get("method", base_method)
        cell = {k: v for k, v in cell.items() if _applies(k, method)}
        if slug(cell) not in seen:
            seen.add(slug(cell))
            cells.append(cell)
    return cells


def format_value(v: Any, key: str = "") -> str:
    """Short, stable text for a value: floats in 4 significant digits (1e-05, 0.0003162, 16); data files by stem."""
    if key == "data":
        return Path(str(v)).stem
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def slug(cell: dict[str, Any]) -> str:
    """A folder name for a cell: `key-value` pairs joined by `__`, alias names where there is one."""
    parts = [f"{SHORT.get(k, k)}-{format_value(v, k)}" for k, v in cell.items()]
    return re.sub(r"[^A-Za-z0-9.+_=-]", "_", "__".join(parts)) or "base"


def overrides(cell: dict[str, Any]) -> list[str]:
    """The cell as `key=value` override strings for load_config."""
    out = []
    for k, v in cell.items():
        if k == "data":
            out.append(f"data.sources=[{{name: train, path: {json.dumps(str(v))}}}]")
        else:
            out.append(f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}")
    return out

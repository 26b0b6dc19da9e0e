"""The typed run configuration: YAML files are instances of `RunConfig`; `key=value` overrides are type-checked.

A wrong key, type or range is a `ConfigError` naming the key and what is allowed; nothing is ignored.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.data.config import DataConfig
from tunelab.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ScratchConfig(_Strict):
    """A Llama-style architecture trained from random weights (method `full`, task `pretrain`)."""

    hidden_size: int = Field(256, gt=0)
    intermediate_size: int = Field(688, gt=0)
    num_hidden_layers: int = Field(4, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    max_position_embeddings: int = Field(1024, gt=0)
    tie_word_embeddings: bool = True
    tokenizer: str = "bundled"
    """`bundled` (SmolLM2's 49k BPE) or a tokenizer folder (e.g. one saved by `tokenizers` + transformers)."""


class ModelConfig(_Strict):
    source: str = "bundled"
    """`bundled` (SmolLM2-135M-Instruct), a local Hugging Face folder, a Hugging Face Hub id (`org/name`,
    through the Hugging Face cache; HF_HUB_OFFLINE=1 uses the cache alone), a `.gguf` file, or `scratch`."""
    revision: str | None = None
    """For a Hub id: the branch, tag or commit hash to use (default: main). Pin a commit for reproducible runs."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights' dtype: `auto` is float32 on CPU (the fast path there) and bfloat16 on CUDA."""
    trust_remote_code: bool = False
    """Run Python code shipped with a model folder. Off by default: only turn on for folders you trust."""
    scratch: ScratchConfig = ScratchConfig()
    keep_layers: int | None = Field(None, gt=0)
    """data.task=spans: keep only the first N decoder layers under the token head (a cheaper detector)."""


class QuantConfig(_Strict):
    """How `qlora` stores the frozen linear weights."""

    quant_type: Literal["nf4", "fp4", "int4", "int8"] = "nf4"
    """The storage format (code book) of the 4-bit weights; torch dtypes are `dtype` keys (model.dtype).
    The old name of this key, `quant.dtype`, is still read, with a warning."""
    block_size: int = Field(64, ge=32, le=4096)
    """Weights per absmax scale: a power of two (the packed blocks tile every row evenly)."""
    double_quant: bool = True

    @model_validator(mode="before")
    @classmethod
    def _old_name(cls, data):
        """`quant.dtype` (before quant_type had its own name; run folders written then still have it)."""
        if isinstance(data, dict) and "dtype" in data:
            if "quant_type" in data:
                raise ValueError("quant.dtype is the old name of quant.quant_type: give quant_type only")
            warnings.warn("quant.dtype is now quant.quant_type (the 4-bit format; `dtype` names torch dtypes): "
                          "rename it in the config", FutureWarning, stacklevel=3)  # the caller of model_validate
            data = {("quant_type" if k == "dtype" else k): v for k, v in data.items()}
        return data

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError("must be a power of two: 32, 64, 128, ... 4096")
        return v


class LoraSection(_Strict):
    """LoRA adapter settings for `lora` and `qlora` (see tunelab.lora.LoraConfig)."""

    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    """`all-linear`, a list of module names (e.g. [q_proj, v_proj]) or a regex matched on full module paths."""
    use_rslora: bool = False
    use_dora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"
    modules_to_save: list[str] | None = None
    loraplus_ratio: float | None = Field(None, gt=0)
    """LoRA+: the learning rate of B is `lr * loraplus_ratio` (the paper suggests 16)."""
    target_experts: bool | list[str] = False
    """Mixture-of-experts models: also adapt the 3-D expert weights (true: all; or names such as [down_proj]),
    one update per expert, saved as PEFT's `target_parameters`; needs dropout 0, no DoRA. Default false (frozen)."""

    @model_validator(mode="after")
    def _check_experts(self) -> "LoraSection":
        from tunelab.lora.config import check_experts

        check_experts(self.target_experts, self.dropout, self.use_dora)  # a ConfigError: one line, exit 2
        return self


class EarlyStoppingConfig(_Strict):
    """Stop when the eval loss has not improved for `patience` evaluations in a row (train.eval_every apart)."""

    patience: int = Field(3, gt=0)
    """Evaluations without improvement before the run stops."""
    min_delta: float = Field(0.0, ge=0, allow_inf_nan=False)
    """An eval loss improves on the best so far only when lower by more than this (nats per token)."""


class TrainConfig(_Strict):
    lr: float = Field(2e-4, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, gt=0)
    """Examples per micro-batch on each process."""
    grad_accum: int = Field(1, gt=0)
    """Micro-batches per optimizer step; global batch = batch_size * grad_accum * processes."""
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps; overrides `epochs` when set."""
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Cosine decay ends at lr * min_lr_ratio."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    seq_len: int = Field(512, gt=1)
    """Longest sequence: packing length for pretraining, truncation length for SFT."""
    eval_every: int = Field(0, ge=0)
    """Steps between eval-loss measurements (0: only at the end)."""
    eval_batches: int = Field(8, gt=0)
    early_stopping: EarlyStoppingConfig | None = None
    """Stop on eval loss (`{patience: 3, min_delta: 0.0}`; needs eval_every > 0 and eval data); the best step's
    weights are kept in `best/` of the run folder (the layout of `adapter/` or `model/`, written atomically)
    and summary.json names its step. None: run every step."""
    save_every: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    """Steps between checkpoints; 0: only at the end; `auto`: about ten checkpoints a run, at most 500 steps
    apart (ceil(total_steps / 10), capped at 500), so a crash costs at most a tenth of the run."""
    keep_last: int = Field(2, gt=0)
    tracking: list[Literal["tensorboard", "mlflow"]] = ["tensorboard"]
    """Where metrics go besides metrics.jsonl: `tensorboard` (event files in tensorboard/, when the package is
    installed) and `mlflow` (needs `pip install mlflow-skinny`; params, metrics per step, the summary and adapter
    as artifacts; tunelab/train/tracking.py). `[]`: metrics.jsonl alone."""
    mlflow_uri: str | None = None
    """MLflow tracking URI (a server's http(s) address, ...); None: a local file store in <run folder>/mlruns."""
    mlflow_experiment: str = "tunelab"
    log_every: int = Field(1, gt=0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: `ddp` keeps a whole copy of the model and optimizer on each process; `fsdp` shards float
    parameters, gradients, AdamW moments and qlora's 4-bit weights across processes (FSDP2, per decoder layer;
    see docs/training.md)."""
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """`adamw8bit`: AdamW with its two moments stored in 8 bits, blockwise (tunelab/train/optim8bit.py): 2
    bytes of state per parameter instead of 8; one process or DDP (not FSDP)."""
    gradient_checkpointing: bool = False
    kernels: Literal["auto", "off", "strict"] = "auto"
    """Speed-ups (tunelab/accel/kernels.py): `auto` runs those the family table (docs/families.md) claims for
    this model and that can run here (a C compiler on CPU, Triton on CUDA), and prints one line naming what it
    turned off and why; a model family not in the table trains through the model's own forward. `off`: the
    reference path: the model's own modules, its own forward for the loss (full logits: more memory on a large
    vocabulary), plain LoRA layers and PyTorch's 4-bit dequantize. `strict`: like auto, but stop with an error
    on the first speed-up that cannot run. TUNELAB_C_KERNELS=0 / TUNELAB_TRITON=0 turn the C / Triton ones off
    through this setting."""

    @model_validator(mode="after")
    def _early_stopping_evaluates(self) -> "TrainConfig":
        if self.early_stopping is not None and not self.eval_every:
            raise ValueError("train.early_stopping decides on eval loss: set train.eval_every > 0 (steps between evaluations)")
        return self

    @field_validator("kernels", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        return "off" if v is False else v  # YAML reads a bare `off` as false

    loss_chunk_tokens: int = Field(256, gt=0)
    """Label tokens per chunk of head + cross-entropy when the head trains or runs in half precision (a frozen
    fp32 head, as in lora/qlora, uses fixed 1024 x 2048 tiles; tunelab/train/loss.py): full-vocabulary logits
    never all exist."""
    on_nonfinite: Literal["skip", "stop"] = "stop"
    """A NaN/Inf loss or gradient: skip that step, or stop (the last good checkpoint stays)."""
    objective: Literal["sft", "dpo", "ipo", "orpo", "simpo", "kto"] = "sft"
    """What the loop minimises: `sft` the next-token loss (pretraining, SFT); `dpo`, `ipo`, `orpo`, `simpo` a
    preference loss on chosen/rejected pairs, `kto` on unpaired responses (data.task=preference;
    docs/preference.md gives each one's paper). `batch_size` then counts pairs (kto: responses)."""
    beta: float | None = Field(None, gt=0, allow_inf_nan=False)
    """The preference objective's temperature (ORPO: its lambda); None: TRL's default, 2.0 for simpo, else 0.1."""
    label_smoothing: float | None = Field(None, ge=0, lt=0.5)
    """dpo, simpo: the probability that a preference label is flipped (conservative DPO); None: 0."""
    simpo_gamma: float | None = Field(None, ge=0)
    """simpo: the target reward margin gamma; None: 0.5."""
    kto_desirable_weight: float | None = Field(None, gt=0)
    """kto: the weight of a desirable response's loss; None: 1."""
    kto_undesirable_weight: float | None = Field(None, gt=0)
    """kto: the weight of an undesirable response's loss; None: 1."""
    precompute_ref: bool = False
    """dpo, ipo, kto: compute the reference log-probabilities once before training and store them in the run
    folder (reference_logps/, reused on resume); the reference model is then never run during training. kto:
    each response's KL-estimate partner is then fixed before training (TRL's pairing within consecutive
    batch_size rows of the data) instead of drawn from each batch."""
    ref_model_copy: bool = False
    """dpo, ipo, kto with method full or freeze: keep a frozen copy of the model as the reference (a second
    copy of every weight in memory); lora/qlora switch the adapter off instead and need no copy."""
    train_last_layers: int = Field(2, ge=0)
    """For method `freeze`: the last N decoder layers (and the final norm) train, everything else is frozen."""
    trainable: list[str] = []
    """For method `freeze`: extra regexes searched in parameter names; matching parameters train too."""


class RunConfig(_Strict):
    method: Literal["full", "freeze", "lora", "qlora"] = "lora"
    model: ModelConfig = ModelConfig()
    quant: QuantConfig = QuantConfig()
    lora: LoraSection = LoraSection()
    data: DataConfig
    train: TrainConfig = TrainConfig()
    output_dir: str | None = None
    """Where the run writes. None: a new folder `runs/<config name>-<UTC time>` for every run, with the symlink
    `runs/latest` to the newest. A folder that already holds a run is refused unless resume=true (continue it)
    or `tunelab train --overwrite` (replace it)."""
    resume: bool = False
    """Continue from the latest complete checkpoint in output_dir (unset: the newest run of this config name)."""

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.model.source == "scratch" and self.method != "full":
            raise ValueError("a `scratch` model starts from random weights: use method=full")
        if self.data.task == "spans" and self.method not in ("lora", "qlora"):
            raise ValueError("data.task=spans trains LoRA on the body and the new head in full: use method=lora "
                             "or qlora")
        if self.model.keep_layers and self.data.task != "spans":
            raise ValueError("model.keep_layers cuts the body under a token head: only for data.task=spans")
        _check_objective(self)
        return self


REFERENCE_OBJECTIVES = ("dpo", "ipo", "kto")  # the ones with a reference model (orpo and simpo have none)


def _check_objective(cfg: RunConfig) -> None:
    """train.objective against the data, the method and its own knobs: ValueError naming what to change."""
    t, obj = cfg.train, cfg.train.objective
    if obj == "sft":
        if cfg.data.task == "preference":
            raise ValueError("data.task=preference needs a preference objective: set train.objective to dpo, ipo, "
                             "orpo, simpo (pairs) or kto (unpaired)")
    elif cfg.data.task != "preference":
        raise ValueError(f"train.objective={obj} learns from preference data: set data.task=preference (records "
                         "{prompt, chosen, rejected}, or {prompt, completion, label} for kto)")
    elif obj == "kto" and cfg.data.preference != "unpaired":
        raise ValueError("train.objective=kto learns from unpaired responses: set data.preference=unpaired "
                         "(records {prompt, completion, label})")
    elif obj != "kto" and cfg.data.preference != "pairs":
        raise ValueError(f"train.objective={obj} compares chosen with rejected: set data.preference=pairs, or use "
                         "train.objective=kto for unpaired records")
    knobs = {"beta": ("dpo", "ipo", "orpo", "simpo", "kto"), "label_smoothing": ("dpo", "simpo"),
             "simpo_gamma": ("simpo",), "kto_desirable_weight": ("kto",), "kto_undesirable_weight": ("kto",)}
    for key, used_by in knobs.items():
        if getattr(t, key) is not None and obj not in used_by:
            raise ValueError(f"train.{key} is for train.objective {' or '.join(used_by)}, not {obj}: remove it")
    for key in ("precompute_ref", "ref_model_copy"):
        if getattr(t, key) and obj not in REFERENCE_OBJECTIVES:
            raise ValueError(f"train.{key}: train.objective={obj} has no reference model (only dpo, ipo and kto "
                             "do): remove it")
    if t.precompute_ref and t.ref_model_copy:
        raise ValueError("train.precompute_ref and train.ref_model_copy are two ways to get the reference: "
                         "choose one")
    if obj in REFERENCE_OBJECTIVES and cfg.method in ("lora", "qlora") and t.ref_model_copy:
        raise ValueError(f"train.ref_model_copy: method={cfg.method} computes the reference with the adapter "
                         "switched off, no copy needed: remove it")
    if obj in REFERENCE_OBJECTIVES and cfg.method in ("full", "freeze") and not (t.precompute_ref or t.ref_model_copy):
        raise ValueError(f"train.objective={obj} with method={cfg.method} needs a reference model, the weights "
                         "before training: set train.precompute_ref=true (computed once, no second model) or "
                         "train.ref_model_copy=true (a frozen copy: twice the weights' memory), or use method=lora")


def _explain(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key `{key}` (check its spelling; `tunelab train --show-config` lists the keys)")
        else:
            got = e.get("input")
            got = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
            lines.append(f"`{key}`: {e['msg']}{got}")
    return f"{origin}: " + "; ".join(lines)


def _parse_value(text: str) -> Any:
    """`key=value` values are YAML scalars or lists: 1e-4, true, [q_proj, v_proj], null."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override `{dotted}`: `{p}` is not a section")
        node = child
    node[leaf] = value


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """Read a YAML file (or start from `base`), apply `key=value` overrides, validate."""
    tree: dict = copy.deepcopy(base or {})  # overrides write into nested sections: never into the caller's
    origin = "config"
    if path is not None:
        path = Path(path)
        origin = str(path)
        if path.is_dir():
            raise ConfigError(f"{path} is a folder: give the YAML config file inside it")
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys (method:, model:, data:, train:)")
        tree.update(loaded)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override `{item}` is not key=value (e.g. train.lr=1e-4)")
        _set_path(tree, key.strip(), _parse_value(value))
    return validate_config(tree, origin)


def validate_config(tree: dict, origin: str = "config") -> RunConfig:
    """A RunConfig from nested dicts (a YAML file's tree, or one built in code); `origin` starts the error line."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_explain(e, origin)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

"""A whole training run from a RunConfig: model -> method -> data -> loop -> outputs beside the config."""

from __future__ import annotations

import json
import os
import re
from contextlib import suppress
from pathlib import Path

import torch

from tunelab.accel import kernels as accel
from tunelab.atomic import atomic_folder
from tunelab.config import RunConfig, dump_config
from tunelab.data.validate import check as check_data
from tunelab.errors import TunelabError
from tunelab.models.load import from_scratch, load_pretrained, load_tokenizer, model_folder, resolve_dtype
from tunelab.train import checkpoint, outdir, status
from tunelab.train.loop import train_loop
from tunelab.train.tracking import MLflowRun, flatten
from tunelab.train.tracking import check_available as check_tracking


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise TunelabError("train.device=cuda but no CUDA GPU is visible: use train.device=auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def init_distributed(device: torch.device) -> None:
    """Under torchrun (WORLD_SIZE > 1): gloo on CPU, NCCL on CUDA."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def _scratch_tokenizer(cfg: RunConfig):
    tok_src = cfg.model.scratch.tokenizer
    if tok_src == "bundled":
        from tunelab.models.bundled import tokenizer_dir

        tok_src = tokenizer_dir()
    return load_tokenizer(tok_src)


def build_model(cfg: RunConfig, device: torch.device):
    dtype = resolve_dtype(cfg.model.dtype, device)
    if cfg.model.source == "scratch":
        tok = _scratch_tokenizer(cfg)
        model = from_scratch(cfg.model.scratch, tok, dtype, cfg.train.seed)
    else:
        # qlora: quantized shard by shard as it loads, never whole in 16/32 bits (prepare_method then finds
        # the linears already 4-bit)
        quant = cfg.quant if cfg.method == "qlora" else None
        from tunelab.models.token_cls import is_encoder, load_encoder

        if cfg.data.task == "spans" and is_encoder(cfg.model.source):  # a BERT-family body (qlora: quantized later)
            return load_encoder(cfg.model.source, dtype)
        model, tok = load_pretrained(cfg.model.source, dtype, cfg.model.trust_remote_code, quant, cfg.model.revision)
    return model, tok


def early_tokenizer(cfg: RunConfig):
    """The run's tokenizer without its model, so the data can be checked and built before the model loads;
    None where that is not cheap or not safe: a .gguf source (its tokenizer comes out of the conversion) and
    trust_remote_code (load_pretrained warns before any shipped code runs)."""
    if cfg.model.source == "scratch":
        return _scratch_tokenizer(cfg)
    if cfg.model.trust_remote_code or Path(cfg.model.source).suffix == ".gguf":
        return None
    return load_tokenizer(model_folder(cfg.model.source, cfg.model.revision))


def _decay_groups(named_params, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not norms and biases), the usual AdamW practice."""
    decay = [p for n, p in named_params if p.ndim >= 2]
    rest = [p for n, p in named_params if p.ndim < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay, "name": "decay"},
                        {"params": rest, "weight_decay": 0.0, "name": "no_decay"}) if g["params"]]


def _freeze_patterns(model, cfg) -> list[str]:
    layer_ids = {int(m.group(1)) for n, _ in model.named_parameters() if (m := re.search(r"layers\.(\d+)\.", n))}
    last = sorted(layer_ids)[-cfg.train.train_last_layers:] if cfg.train.train_last_layers else []
    return [rf"layers\.{i}\." for i in last] + [r"(^|\.)norm\.weight$"] + list(cfg.train.trainable)


def enable_checkpointing(model) -> None:
    """transformers' non-reentrant activation checkpointing: each decoder layer is recomputed in backward."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name goes in v6
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare_method(model, cfg: RunConfig, kernels: accel.Kernels | None = None) -> list[dict]:
    """Freeze / quantize / add adapters as the method says; return AdamW parameter groups. `kernels`
    (default: tunelab.accel.kernels.choose for cfg.train.kernels, reported) says which speed-ups the model
    gets (tunelab.accel.kernels.apply, once the adapters and 4-bit layers are in)."""
    if kernels is None:
        kernels = accel.choose(model, cfg.train.kernels)
        accel.report(kernels)
    groups = _prepare(model, cfg)
    accel.apply(model, kernels)  # after quantizing and adding adapters: their layers get speed-ups too
    return groups


def _prepare(model, cfg: RunConfig) -> list[dict]:
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return _decay_groups(list(model.named_parameters()), cfg.train.weight_decay)
    if cfg.method == "freeze":
        patterns = [re.compile(p) for p in _freeze_patterns(model, cfg)]
        named = []
        for n, p in model.named_parameters():
            p.requires_grad_(any(r.search(n) for r in patterns))
            if p.requires_grad:
                named.append((n, p))
        if not named:
            raise TunelabError("method=freeze: no parameter matches train.train_last_layers / train.trainable")
        return _decay_groups(named, cfg.train.weight_decay)
    from tunelab.lora import LoraConfig, apply_lora, lora_param_groups
    from tunelab.quant import Linear4bit, quantize_model

    if cfg.method == "qlora" and not any(isinstance(m, Linear4bit) for m in model.modules()):
        # a float model (build_model loads qlora models already 4-bit, with their own copies of every tensor)
        q = cfg.quant
        quantize_model(model, q.quant_type, block_size=q.block_size, double_quant=q.double_quant)
        # The float parameters left (embeddings, norms) still point into the memory-mapped checkpoint, which
        # keeps every page read while quantizing resident (427 MiB on SmolLM2-135M): own copies free them.
        with torch.no_grad():
            for prm in model.parameters():
                if prm.dtype.is_floating_point:
                    prm.data = prm.data.clone()
    lcfg = LoraConfig(**cfg.lora.model_dump())
    _say_unadapted_experts(model, cfg)
    apply_lora(model, lcfg)
    return lora_param_groups(model, cfg.train.lr, cfg.train.weight_decay, lcfg.loraplus_ratio)


def _say_unadapted_experts(model, cfg: RunConfig) -> None:
    """One line where LoRA leaves the mixture-of-experts expert weights (3-D in transformers 5) without an
    adapter: `all-linear` and named targets adapt linear layers only; lora.target_experts adds the experts."""
    from tunelab.quant.experts import expert_modules, expert_weight_names

    if cfg.lora.target_experts:
        return
    experts = sorted({re.sub(r"\.\d+\.", ".N.", f"{p}.{n}") for p, m in expert_modules(model)
                      for n in expert_weight_names(m)})
    if experts:
        what = "4-bit and frozen" if cfg.method == "qlora" else "frozen"
        print(f"tunelab: method={cfg.method}: {', '.join(experts)} (expert weights) stay {what}, without LoRA; "
              "set lora.target_experts=true to adapt them too")


def inside(out: Path, name: str) -> Path:
    """`out / name`, refused when it resolves outside `out` (a symlink planted in the output folder)."""
    path = out / name
    real, root = path.resolve(), out.resolve()
    if real != root and root not in real.parents:
        raise TunelabError(f"{path} resolves to {real}, outside output_dir {root}: tunelab writes only inside "
                           "output_dir; remove the link or choose another output_dir")
    return path


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _gather_outputs(model, cfg: RunConfig) -> dict:
    """FSDP, every process: the tensors save_outputs writes, whole (the adapter's, or the model's state dict)."""
    from tunelab.train import fsdp

    if cfg.method in ("lora", "qlora"):
        from tunelab.lora.peft_format import adapter_state_dict

        return fsdp.whole_state(adapter_state_dict(model))
    return fsdp.whole_state(model.state_dict())


def save_outputs(model, tok, cfg: RunConfig, out: Path, whole: dict | None = None, name: str | None = None) -> Path:
    """lora/qlora: a PEFT-layout adapter; full/freeze: a Hugging Face folder. Both written atomically.

    `whole`: the tensors to write when the model's own are FSDP shards (from _gather_outputs).
    `name`: the folder in `out` (default `adapter` or `model`; `best` for early stopping's best step).
    """
    from safetensors import SafetensorError

    dest = inside(out, name or ("adapter" if cfg.method in ("lora", "qlora") else "model"))
    try:
        if cfg.method in ("lora", "qlora"):
            from tunelab.lora import save_adapter

            save_adapter(model, dest, state=whole)
        else:

            def write(tmp: Path):
                model.save_pretrained(tmp, safe_serialization=True, state_dict=whole)
                tok.save_pretrained(tmp)

            atomic_folder(dest, write)
    except (OSError, SafetensorError) as e:
        kept = checkpoint.latest(out / "checkpoints")
        raise checkpoint.write_error(e, dest, f"the final checkpoint {kept} is intact, so training is not "
                                     "repeated" if kept else "set train.save_every to keep checkpoints") from e
    return dest


def _data(cfg: RunConfig, tok, out: Path):
    """The checked (train, eval) rows: the prepared ones in data.prepared (default output_dir/prepared) when
    their manifest matches, so a resumed run never tokenizes again; else built, and written there by rank 0."""
    from tunelab.data import prepared

    check_data(cfg.data, tok)
    folder = Path(cfg.data.prepared) if cfg.data.prepared else inside(out, "prepared")
    return prepared.load_or_build(cfg.data, tok, cfg.train.seq_len, cfg.train.seed, folder,
                                  write_it=int(os.environ.get("RANK", "0")) == 0)


def _rank0_decides(fn):
    """fn() on rank 0, its result (or its TunelabError) shared with every process of a torchrun job, so that
    all of them write to the one folder rank 0 picked (run folders are named by the clock)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return fn()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", fn())]
        except TunelabError as e:
            box = [("error", str(e))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise TunelabError(value)
    return value


def run_training(cfg: RunConfig, progress: bool = True, model=None, name: str = "run", overwrite: bool = False):
    """Train as `cfg` says; returns (summary, trained model). `model=(model, tokenizer)` skips loading.

    The output folder is settled first (tunelab.train.outdir): `cfg.output_dir`, refused when it holds another
    run unless resume or `overwrite`; or, when unset, a new `runs/<name>-<UTC time>`.
    """
    device = pick_device(cfg.train.device)
    init_distributed(device)
    rank = int(os.environ.get("RANK", "0"))
    out, made = _rank0_decides(lambda: outdir.claim(cfg.output_dir, name, cfg.resume, overwrite))
    cfg = cfg.model_copy(update={"output_dir": str(out)})  # config.yaml records where the run is
    try:
        # the data first, in seconds: paths, formats, first records; then templates and the whole build with
        # the tokenizer alone; only then the model (minutes for a large one)
        check_data(cfg.data)
        check_tracking(cfg.train.tracking)
        early = model[1] if model else early_tokenizer(cfg)
        data = _data(cfg, early, out) if early is not None else None
        torch.manual_seed(cfg.train.seed)
        model, tok = model or build_model(cfg, device)
        train_set, eval_set = data or _data(cfg, tok, out)  # a .gguf source: its tokenizer came with the model
        task = None
        if cfg.data.task == "spans":  # the body under a new token head; speed-ups are for the LM loss
            from tunelab.train.spans import SpanTask, with_head

            if _world_size() > 1:
                raise TunelabError("data.task=spans runs on one process (torchrun is not supported for it yet)")
            cfg, task = with_head(cfg), SpanTask(cfg)
            model = task.model(model)
        kernels = accel.choose(model, "off" if task else cfg.train.kernels, device)  # the one reading of train.kernels
        if rank == 0:
            accel.report(kernels)
        groups = prepare_method(model, cfg, kernels)
    except BaseException:
        if made and rank == 0:
            with suppress(OSError):  # the new folder, still empty: nothing ran
                out.rmdir()
        raise
    model.to(device)
    if cfg.data.packing == "packed":  # before any step: a model that would mix packed examples is refused
        from tunelab.train.packed import check_attention

        check_attention(model, device)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(model)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for f in ("config.yaml", "checkpoints", "metrics.jsonl", "loss.png", "tensorboard", "summary.json", "spans.json",
                  "best", "mlruns", "mlflow.json", status.NAME, "reference_logps"):
            inside(out, f)  # every path a run writes; adapter/ or model/ are checked when written
        (out / "config.yaml").write_text(dump_config(cfg))
        if made:
            outdir.point_latest(out)
            print(f"tunelab: this run writes to {out} ({out.parent / 'latest'} points to it)")
    sharded = cfg.train.distributed == "fsdp" and _world_size() > 1

    def on_best(step: int) -> None:  # early stopping's new best: its weights to best/ (every process: FSDP gathers)
        whole = _gather_outputs(model, cfg) if sharded else None
        if rank == 0:
            save_outputs(model, tok, cfg, out, whole, name="best")

    mlflow = None
    if rank == 0 and "mlflow" in cfg.train.tracking:
        mlflow = MLflowRun(out, cfg.train.mlflow_uri, cfg.train.mlflow_experiment,
                           flatten(cfg.model_dump(mode="json")), cfg.resume)
    objective = task.objective(tok) if task else None
    if cfg.train.objective != "sft":  # the reference (adapter off, a copy, or precomputed now) and pair batches
        from tunelab.train import preference

        objective, train_set, eval_set = preference.setup(cfg, model, tok, kernels, out, train_set, eval_set, device)
    with status.tracking(out, enabled=rank == 0):  # status.json: running, then finished or failed
        try:
            summary = train_loop(model, train_set, eval_set, cfg.train, out, param_groups=groups,
                                 pad_id=tok.pad_token_id, resume=cfg.resume, device=device, progress=progress,
                                 kernels=kernels, objective=objective, on_best=on_best,
                                 on_log=mlflow.log if mlflow else None)
            if task and rank == 0:
                summary["spans"] = task.final(model, tok, out, summary["steps"])
            whole = _gather_outputs(model, cfg) if sharded else None
            if rank == 0:
                summary["output"] = str(save_outputs(model, tok, cfg, out, whole))
                if summary.get("early_stopping"):
                    summary["early_stopping"]["best"] = str(out / "best")
                summary["method"] = cfg.method
                (out / "summary.json").write_text(json.dumps(summary, indent=1))
        except BaseException:
            if mlflow:
                mlflow.fail()
            raise
    if mlflow:
        mlflow.finish(cfg.method)
    return summary, model

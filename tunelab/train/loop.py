"""The training loop, one for every method: accumulate, clip, step, schedule, log, evaluate, checkpoint."""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from tunelab.errors import ConfigError, TunelabError
from tunelab.quant.linear import packed_nbytes
from tunelab.train import checkpoint, faults, fsdp, status
from tunelab.train.early_stop import EarlyStopping
from tunelab.train.loss import IGNORE, NEXT_TOKEN, Objective
from tunelab.train.optim8bit import AdamW8bit


class _LossModule(nn.Module):
    """Wraps a causal LM so that DDP and FSDP see the loss computation as its forward."""

    def __init__(self, model, chunk: int, kernels, objective: Objective):
        super().__init__()
        self.model, self.chunk, self.kernels, self.objective = model, chunk, kernels, objective

    def forward(self, batch):
        return self.objective.loss_sum(self.model, batch, self.chunk, self.kernels)


def adamw(param_groups, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """torch's AdamW, with its fused kernel where every parameter allows it (floating point, CPU or CUDA):
    one pass over each tensor and no parameter-sized temporaries (the default foreach kernel makes one).
    9 ms against 33 for a LoRA step of the bundled model on CPU (benchmarks/adamw_step.py)."""
    params = [p for g in param_groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, fused=fused)


def collate(examples: list[dict], pad_id: int, device) -> dict:
    """Right-pad to the longest example: input pad_id, labels -100, attention mask 0 on padding.

    Packed rows (position ids restarting inside a row) get no attention mask: transformers then reads the
    examples off the position ids and keeps attention inside each (a block-diagonal causal mask; FlashAttention's
    varlen path on CUDA), which it does only when no 2-D mask is given. Their padding, if any, restarts the
    positions too and so is one more example of its own (labels -100) that nothing attends to."""
    T = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    pos = torch.arange(T).repeat(B, 1)
    mask = torch.zeros((B, T), dtype=torch.long)
    packed = False
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
        if "position_ids" in e:
            pos[i, :n] = torch.tensor(e["position_ids"])
            packed = packed or bool((pos[i, 1:n] == 0).any())
    if packed:
        pad = mask == 0
        pos[pad] = (pad.cumsum(1) - 1)[pad]  # 0, 1, ... from each row's first pad
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
    if not bool(mask.all()) and not packed:  # no mask at all lets attention take its fastest path
        batch["attention_mask"] = mask
    return {k: v.to(device) for k, v in batch.items()}


def save_interval(save_every: int | str, total_steps: int) -> int:
    """Steps between checkpoints: `auto` is ceil(total_steps / 10) capped at 500 (TrainConfig.save_every)."""
    if save_every == "auto":
        return max(1, min(500, math.ceil(total_steps / 10)))
    return save_every


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup - 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(x: float | int, device) -> float:
    rank, world = _world()
    if world == 1:
        return float(x)
    t = torch.tensor(float(x), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


def _nonfinite_groups(optimizer) -> list[str]:
    bad = []
    for i, g in enumerate(optimizer.param_groups):
        if any(p.grad is not None and not torch.isfinite(fsdp.local(p.grad)).all() for p in g["params"]):
            bad.append(g.get("name", f"group {i}"))
    return bad


@contextmanager
def _explain_oom(cfg, step: int):
    """CUDA out of memory -> a TunelabError that lists the settings which lower memory use."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise TunelabError(
            f"out of GPU memory at step {step + 1} (batch_size {cfg.batch_size}, seq_len {cfg.seq_len}): lower "
            f"train.batch_size and raise train.grad_accum (same global batch), set train.gradient_checkpointing=true, "
            f"use method=qlora (4-bit base weights), or shorten train.seq_len"
        ) from e


def _read_metrics(path: Path, upto: int) -> list[str]:
    """Lines of metrics.jsonl for steps <= upto; a line cut short by a crash is dropped."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= upto:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    return kept


def _plot(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


@torch.no_grad()
def evaluate_loss(model, examples: list[dict], batch_size: int, pad_id: int, device, chunk: int,
                  max_batches: int | None = None, kernels=None, objective: Objective | None = None) -> float:
    """Mean loss of the objective (default next-token; nats per label token) over the examples, in a fixed order."""
    objective = objective or NEXT_TOKEN
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    starts = list(range(0, len(examples), batch_size))[:max_batches]
    for i in starts:
        batch = (objective.collate or collate)(examples[i : i + batch_size], pad_id, device)
        with _autocast(device):
            s, n = objective.loss_sum(model, batch, chunk, kernels)
        total, count = total + float(s), count + n
    model.train(was_training)
    total, count = _all_sum(total, device), _all_sum(count, device)
    return total / max(count, 1)


def _tensorboard(out_dir: Path):
    """TensorBoard event files beside metrics.jsonl when the optional `tensorboard` package is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def _autocast(device):
    # bf16 autocast on CUDA; on CPU fp32 is the fast path (bf16 matmul is slow there)
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@dataclass
class _Run:
    """What the loop's parts share: fixed at setup (above the line) and what the steps change (below it)."""

    model: nn.Module
    net: nn.Module  # the loss as a module; DDP's or FSDP's wrapper of it under torchrun
    optimizer: torch.optim.Optimizer
    params: list  # every trained parameter, for the gradient norm
    cfg: object  # TrainConfig
    train_set: list[dict]
    eval_set: list[dict]
    objective: Objective
    kernels: object
    pad_id: int
    device: torch.device
    rank: int
    world: int
    sharded: bool  # FSDP: parameters are shards, checkpoints and evaluation gather them
    no_sync: object  # context manager: a micro-batch whose gradients are not yet synchronised
    steps_per_epoch: int
    global_batch: int
    total_steps: int
    save_every: int
    out_dir: Path
    stopper: EarlyStopping | None
    on_best: object
    on_log: object
    # ---- changed while training
    start: int = 0
    ckpt: Path | None = None  # the last checkpoint written or resumed from
    last_eval: float | None = None
    tokens_seen: int = 0
    t0: float = 0.0
    log: object = None  # metrics.jsonl, open for appending (rank 0)
    tb: object = None
    bar: object = None

    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"


def train_loop(model, train_set: list[dict], eval_set: list[dict], cfg, out_dir: Path, *, param_groups,
               pad_id: int, resume: bool = False, device=None, progress: bool = True, kernels=None,
               objective: Objective | None = None, on_best=None, on_log=None) -> dict:
    """Train `model` on tokenized examples; cfg is a TrainConfig. Returns a summary of the run.

    `kernels`: the speed-ups the loss runs (tunelab.accel.kernels.choose; default auto for the model).
    `objective`: next-token (default), token classification or a preference objective (tunelab.train.loss.Objective).
    `on_best(step)`: called on every process when cfg.early_stopping sees a new best eval loss (run.py writes
    the weights to best/ there). `on_log(record)`: called on rank 0 with each record written to metrics.jsonl
    (MLflow, tunelab.train.tracking).
    Examples are dicts of input_ids / labels (-100 = no loss) / optional position_ids. The example order of
    step s is a function of (seed, s) alone, so a resumed run sees exactly the batches it would have seen.
    """
    run = _setup(model, train_set, eval_set, cfg, Path(out_dir), param_groups, pad_id, device, kernels,
                 objective or NEXT_TOKEN, on_best, on_log)  # NEXT_TOKEN looked up now: tests replace it
    if resume:
        _resume(run)
    _open_outputs(run, progress)
    stopped = None
    model.train()
    for step in range(run.start, run.total_steps):
        record = _step(run, step)  # accumulate, clip, optimizer step (or skip a non-finite one), schedule
        done = step + 1
        faults.point("step")
        if cfg.eval_every and done % cfg.eval_every == 0 or done == run.total_steps:
            stopped = _evaluate(run, record, done)
        if run.log and (done % cfg.log_every == 0 or "eval_loss" in record or done == run.total_steps):
            _log(run, record, done)
        if run.bar:
            run.bar.update(1)
            run.bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "eval_loss", "tok_per_s") if k in record})
        if run.save_every and done % run.save_every == 0 or done == run.total_steps or stopped:
            _checkpoint(run, record, done)
        status.beat(run.out_dir, done, run.total_steps)  # status.json for `tunelab board` (when run.py tracks it)
        if stopped:
            if run.rank == 0:
                s = run.stopper
                print(f"tunelab: early stopping at step {done}: eval loss did not improve for {s.patience} "
                      f"evaluations; best {s.best_loss:.4g} at step {s.best_step}")
            break
    return _finish(run, stopped)


def _setup(model, train_set, eval_set, cfg, out_dir: Path, param_groups, pad_id, device, kernels, objective,
           on_best, on_log) -> _Run:
    """Sizes of the run, the loss module (wrapped by DDP/FSDP under torchrun), the optimizer, early stopping."""
    rank, world = _world()
    device = device or next(model.parameters()).device
    global_batch = cfg.batch_size * cfg.grad_accum * world
    steps_per_epoch = len(train_set) // global_batch
    if steps_per_epoch == 0:
        raise TunelabError(
            f"{len(train_set)} training examples are fewer than one global batch of {global_batch} "
            "(train.batch_size x train.grad_accum x processes): lower train.batch_size or add data"
        )
    total_steps = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))

    net = _LossModule(model, cfg.loss_chunk_tokens, kernels, objective)
    sharded = world > 1 and cfg.distributed == "fsdp"
    no_sync = nullcontext  # gradient accumulation without synchronising (one process: nothing to skip)
    if sharded:  # before the optimizer: FSDP replaces each parameter by its shard
        param_groups = fsdp.shard(net, model, param_groups)
        no_sync = partial(fsdp.no_sync, net)
    elif world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        no_sync = net.no_sync
    if cfg.optimizer == "adamw8bit" and sharded:
        raise ConfigError("train.optimizer=adamw8bit keeps whole-tensor 8-bit moments, which FSDP cannot shard; "
                          "use train.distributed=ddp or train.optimizer=adamw")
    make = AdamW8bit if cfg.optimizer == "adamw8bit" else adamw
    optimizer = make(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    for g in optimizer.param_groups:
        g["initial_lr"] = g["lr"]

    stopper = EarlyStopping(**cfg.early_stopping.model_dump()) if cfg.early_stopping else None
    if stopper and not eval_set:
        raise TunelabError("train.early_stopping needs eval data: set data.eval_fraction > 0 or data.eval_path")
    torch.manual_seed(cfg.seed)
    return _Run(model=model, net=net, optimizer=optimizer,
                params=[p for g in optimizer.param_groups for p in g["params"]], cfg=cfg, train_set=train_set,
                eval_set=eval_set, objective=objective, kernels=kernels, pad_id=pad_id, device=device, rank=rank,
                world=world, sharded=sharded, no_sync=no_sync, steps_per_epoch=steps_per_epoch,
                global_batch=global_batch, total_steps=total_steps,
                save_every=save_interval(cfg.save_every, total_steps), out_dir=out_dir, stopper=stopper,
                on_best=on_best, on_log=on_log)


def _resume(run: _Run) -> None:
    """Weights, optimizer, RNG and early-stopping state of the latest complete checkpoint, if there is one."""
    last = checkpoint.latest(run.ckpt_root)
    if last is None:
        print(f"tunelab: resume=true but no complete checkpoint in {run.ckpt_root}: starting from step 0")
        return
    state = checkpoint.load(last, run.model, run.optimizer)
    run.start, run.ckpt = state["step"], last
    if run.stopper:
        run.stopper.restore(state)
    if run.rank == 0:
        print(f"tunelab: resumed from {last} (step {run.start} of {run.total_steps})")


def _open_outputs(run: _Run, progress: bool) -> None:
    """Rank 0: the run folder, metrics.jsonl cut back to the resumed step, TensorBoard, the progress bar."""
    if run.rank == 0:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_partial(run.ckpt_root)  # temporary folders of a write that a crash cut short
        kept = []
        if run.start and run.metrics_path.exists():  # drop records past the checkpoint: the curve continues
            kept = _read_metrics(run.metrics_path, run.start)
        tmp = run.metrics_path.with_name(run.metrics_path.name + ".tmp")
        tmp.write_text("".join(l + "\n" for l in kept))
        os.replace(tmp, run.metrics_path)  # a crash here must not lose the records kept
        run.log = open(run.metrics_path, "a")
        run.tb = _tensorboard(run.out_dir) if "tensorboard" in run.cfg.tracking else None
        if progress:
            from tqdm.auto import tqdm

            run.bar = tqdm(total=run.total_steps, initial=run.start, desc="train", unit="step", dynamic_ncols=True)
    run.t0 = time.time()


def _micro_batches(run: _Run, step: int) -> list[dict]:
    """This process's micro-batches of `step`: a slice of the epoch's seeded permutation (resume-exact)."""
    cfg = run.cfg
    epoch, k = divmod(step, run.steps_per_epoch)
    order = torch.randperm(len(run.train_set), generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
    idx = order[k * run.global_batch : (k + 1) * run.global_batch]
    per_rank = cfg.batch_size * cfg.grad_accum
    mine = idx[run.rank * per_rank : (run.rank + 1) * per_rank]
    collate_fn = run.objective.collate or collate
    return [collate_fn([run.train_set[int(i)] for i in c], run.pad_id, run.device) for c in mine.split(cfg.batch_size)]


def _step(run: _Run, step: int) -> dict:
    """One optimizer step: schedule, accumulate the micro-batches, clip, step. Returns its metrics record."""
    cfg, optimizer, world = run.cfg, run.optimizer, run.world
    factor = lr_factor(step, run.total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor
    batches = _micro_batches(run, step)
    n_global = _all_sum(sum(run.objective.label_tokens(b["labels"]) for b in batches), run.device)
    loss_sum = 0.0
    for i, batch in enumerate(batches):
        sync = world == 1 or i == len(batches) - 1
        with _explain_oom(cfg, step), (nullcontext() if sync else run.no_sync()), _autocast(run.device):
            s, _ = run.net(batch)
            # sum over tokens / global token count = mean over the global batch; DDP/FSDP average ranks
            (s * (world / max(n_global, 1))).backward()
        loss_sum += float(s.detach())
        run.tokens_seen += int(batch["input_ids"].numel()) * world
    loss = _all_sum(loss_sum, run.device) / max(n_global, 1)
    # the norm first, clipping after the check: clipping by a NaN norm would spread NaN to every group
    norm = fsdp.full_tensor(torch.nn.utils.get_total_norm([p.grad for p in run.params if p.grad is not None]))
    finite = math.isfinite(loss) and bool(torch.isfinite(norm))
    if cfg.max_grad_norm and finite:
        torch.nn.utils.clip_grads_with_norm_(run.params, cfg.max_grad_norm, norm)
    if not finite:
        bad = _nonfinite_groups(optimizer) or ["(the loss itself)"]
        where = f"step {step + 1}: loss {loss}, non-finite gradients in {', '.join(bad)}"
        optimizer.zero_grad(set_to_none=True)
        if cfg.on_nonfinite == "stop":
            kept = f"; last good checkpoint: {run.ckpt}" if run.ckpt else ""
            raise TunelabError(f"{where}; stopped{kept} (train.on_nonfinite=skip skips such steps)")
        print(f"tunelab: {where}; step skipped")
        record = {"step": step + 1, "skipped": "non-finite"}
    else:
        with _explain_oom(cfg, step):  # AdamW allocates its moments on the first step
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.time() - run.t0
        record = {"step": step + 1, "loss": loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(norm),
                  "tokens": run.tokens_seen, "tok_per_s": run.tokens_seen / elapsed}
    if run.objective.step_metrics:  # e.g. a preference objective's rewards and margins: this step's means
        record.update(run.objective.step_metrics())
    return record


def _evaluate(run: _Run, record: dict, done: int) -> int | None:
    """Eval loss (and the objective's metrics) into `record`; early stopping. Returns the step to stop at, or None."""
    if not run.eval_set:
        return None
    cfg, stopper = run.cfg, run.stopper
    # evaluation calls the model's parts, not net.forward: gather the root's shards for it
    gathered = fsdp.root_gathered(run.net) if run.sharded else nullcontext()
    with _explain_oom(cfg, done - 1), gathered:
        run.last_eval = evaluate_loss(run.model, run.eval_set, cfg.batch_size, run.pad_id, run.device,
                                      cfg.loss_chunk_tokens, cfg.eval_batches, run.kernels, run.objective)
    record["eval_loss"] = run.last_eval
    if run.objective.metrics:
        record.update(run.objective.metrics(run.model))
    if stopper and stopper.update(done, run.last_eval):
        record["best"] = True
        if run.on_best:
            run.on_best(done)
    return done if stopper and stopper.stop and done < run.total_steps else None


def _log(run: _Run, record: dict, done: int) -> None:
    """Rank 0: one line of metrics.jsonl, TensorBoard scalars, the on_log hook (MLflow)."""
    try:
        run.log.write(json.dumps(record) + "\n")
        run.log.flush()
    except OSError as e:  # disk full: one clear line; on resume a record cut short is dropped
        kept = f"the checkpoint {run.ckpt} is intact" if run.ckpt else "no checkpoint was written yet"
        raise checkpoint.write_error(e, run.metrics_path, kept) from e
    for k, v in record.items():
        if run.tb and k != "step" and isinstance(v, float):
            run.tb.add_scalar(k, v, done)
    if run.on_log:
        run.on_log(record)


def _checkpoint(run: _Run, record: dict, done: int) -> None:
    """Weights, optimizer and loop state after step `done` (written atomically by rank 0; FSDP gathers first)."""
    tensors = checkpoint.gather(run.model, run.optimizer) if run.rank == 0 or run.sharded else None  # collective
    if run.rank == 0:
        state = {"total_steps": run.total_steps, "loss": record.get("loss"),
                 **(run.stopper.state() if run.stopper else {})}
        run.ckpt = checkpoint.save(run.ckpt_root, done, tensors, state, run.cfg.keep_last)
    if run.world > 1:
        dist.barrier()


def _finish(run: _Run, stopped: int | None) -> dict:
    """Close the outputs, draw loss.png, and summarise the run."""
    if run.bar:
        run.bar.close()
    if run.tb:
        run.tb.close()
    if run.log:
        run.log.close()
        _plot(run.metrics_path, run.out_dir / "loss.png")
    rows = [json.loads(l) for l in run.metrics_path.read_text().splitlines() if l.strip()] if run.rank == 0 else []
    losses = [r["loss"] for r in rows if "loss" in r]
    stopper, model, optimizer = run.stopper, run.model, run.optimizer
    # what each process stores (FSDP: its shards), the numbers docs/training.md and docs/scaling.md compare
    stored = {"parameters": fsdp.local_nbytes(model.parameters()),
              "quantized": packed_nbytes(model),  # qlora's 4-bit codes and scales
              "optimizer": fsdp.local_nbytes(v for st in optimizer.state.values() for v in st.values()
                                             if torch.is_tensor(v))}
    by_rank = [stored]
    if run.world > 1:  # collective: every process reaches the end of train()
        by_rank = [None] * run.world
        dist.all_gather_object(by_rank, stored)
    return {"steps": stopped or run.total_steps, "start_step": run.start,
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            "eval_loss": run.last_eval, "seconds": time.time() - run.t0, "tokens": run.tokens_seen,
            **({"early_stopping": stopper.summary(stopped)} if stopper else {}),
            "process_bytes": stored, "process_bytes_by_rank": by_rank}

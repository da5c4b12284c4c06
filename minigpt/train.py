"""The one training loop, used by pretraining and instruction tuning alike.

It knows nothing about poems: it takes a model, a function that returns the next batch, a fixed
list of val batches and an optional sampling hook. It owns the optimizer, the LR schedule
(warmup, then cosine decay fitted to a step count or a time budget), eval, the JSONL log and checkpoints.
"""
import json
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from minigpt.checkpoint import save_checkpoint
from minigpt.model import IGNORE_INDEX
from minigpt.plot import plot_losses


@dataclass
class TrainConfig:
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    max_steps: int = 5000
    max_minutes: float = 0.0  # a time budget; 0 means none. The LR schedule follows whichever ends first
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_batches: int = 20
    sample_every: int = 500
    log_every: int = 10
    seed: int = 1337
    dtype: str = "auto"  # float32, bfloat16 (autocast) or auto (bfloat16 where the hardware has it)
    compile: bool = False  # torch.compile the model for the training steps

    def __post_init__(self):
        for name in ("batch_size", "max_steps", "eval_every", "eval_batches", "sample_every", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "max_minutes", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.dtype not in ("float32", "bfloat16", "auto"):
            raise ValueError(f"dtype must be float32, bfloat16 or auto, got {self.dtype!r}")


def cpu_has_bfloat16():
    """True where the CPU has bfloat16 instructions (AVX512-BF16 or AMX), as Linux reports them."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(name, device):
    """The autocast dtype for training (None: plain float32). 'auto' picks bfloat16 where the hardware has it."""
    kind = device.split(":")[0]
    if name == "bfloat16" or (name == "auto" and kind == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    if name == "auto" and kind == "cpu" and cpu_has_bfloat16():
        return torch.bfloat16
    return None


def pick_device(name="auto"):
    """'auto' takes cuda, then mps, then cpu; any other name must be available here.
    Under torchrun, 'auto' and 'cuda' give each process the GPU of its local rank."""
    if name == "auto":
        if not torch.cuda.is_available():
            return "mps" if torch.backends.mps.is_available() else "cpu"
        name = "cuda"
    if name == "cuda" and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    ok = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    base = name.split(":")[0]
    if base not in ok:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    if not ok[base]:
        raise ValueError(f"device {name!r} is not available on this machine; use --device cpu or auto")
    return name


def make_optimizer(model, cfg):
    """AdamW; weight decay on matrices only (not on biases, LayerNorm gains or position-free vectors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lr_at(step, progress, cfg, warm_progress=0.0):
    """Linear warmup over warmup_steps, then cosine from lr down to min_lr as progress goes from
    warm_progress (where the warmup ended) to 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (progress - warm_progress) / max(1.0 - warm_progress, 1e-9)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))


@torch.no_grad()
def evaluate_loss(model, batches, device):
    """The mean loss per counted target over all batches (a batch with more counted targets weighs more)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        n = int((y != IGNORE_INDEX).sum())
        total += model(x.to(device), y.to(device))[1].item() * n
        count += n
    model.train(was_training)
    return total / count


class TrainingStopped(Exception):
    """Training ended early: interrupted (a checkpoint was saved) or diverged (the last good one is kept)."""

    def __init__(self, message, out_dir, exit_code, resumable=True):
        super().__init__(message)
        self.out_dir, self.exit_code, self.resumable = out_dir, exit_code, resumable


def _read_log_until(path, step):
    """The log records up to and including step: what a run resumed from that step's checkpoint keeps."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [line for line in f if line.strip() and json.loads(line)["step"] <= step]


def distributed(device):
    """(rank, world size): under torchrun this process joins the group (nccl on a GPU, gloo on a CPU); else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(device)  # nccl talks through this process's own GPU
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world


def train(model, cfg, get_batch, val_batches, out_dir, checkpoint_extra, sample=None, metrics=None, on_event=None,
          device="cpu", resume_from=None):
    """Train model in place; returns the last eval record.

    get_batch(generator) -> (x, y) on the CPU, the whole batch; val_batches: a fixed list of (x, y);
    checkpoint_extra: dict stored in every checkpoint (configs, tokenizer, stage);
    sample(model, step) -> dict of samples to log; metrics(model, step) -> dict added to each eval record;
    on_event(record) sees every log record; resume_from: a checkpoint dict of this run to continue.
    SIGINT / SIGTERM save a checkpoint and raise TrainingStopped; so does a loss that is not finite.
    Under torchrun each process trains on its share of every batch; process 0 evaluates, logs and saves."""
    rank, world = distributed(device)
    lead = rank == 0
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} does not split evenly over {world} processes")
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path, log_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "log.jsonl")
    torch.manual_seed(cfg.seed)
    data_gen = torch.Generator().manual_seed(cfg.seed)  # the same in every process: each takes its rows of one batch
    model.to(device).train()
    opt = make_optimizer(model, cfg)
    amp = autocast_dtype(cfg.dtype, device)  # eval and sampling stay in float32
    plain_model = DDP(model) if world > 1 else model  # DDP averages the gradients of all processes in backward()
    step_model = torch.compile(plain_model) if cfg.compile else plain_model
    step, tokens, elapsed, reserve, window, t_window = 0, 0, 0.0, 0.0, [], 0.0
    kept_log, warm_progress = [], None
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        opt.load_state_dict(resume_from["optimizer"])
        torch.set_rng_state(resume_from["rng"]["torch"].cpu())
        if "cuda" in resume_from["rng"] and device.startswith("cuda"):  # dropout on a GPU draws from the GPU's generator
            torch.cuda.set_rng_state(resume_from["rng"]["cuda"].cpu(), device)
        data_gen.set_state(resume_from["rng"]["data"].cpu())
        step, tokens, elapsed, reserve = resume_from["step"], resume_from["tokens"], resume_from["elapsed_s"], resume_from["reserve"]
        warm_progress = resume_from.get("warm_progress")
        window = list(resume_from["window"])  # losses since the last log line, so that line comes out the same
        kept_log = _read_log_until(log_path, step)
    if lead:
        log = open(log_path, "w", encoding="utf-8")
        log.writelines(kept_log)
    budget = cfg.max_minutes * 60
    t_start = time.time() - elapsed  # the time budget counts the time before an interruption too
    last_eval = next((r for r in map(json.loads, reversed(kept_log)) if r["kind"] == "eval"), None)
    saved_step = resume_from["step"] if resume_from is not None else None

    def emit(record):
        log.write(json.dumps(record, ensure_ascii=False) + "\n")
        log.flush()
        if on_event:
            on_event(record)

    def progress():
        by_time = (time.time() - t_start) / max(budget - reserve, 1e-9) if budget else 0.0
        return max(step / cfg.max_steps, by_time)

    def agree(value):
        """The largest value over all processes, so that they all stop (or go on) together."""
        if world == 1:
            return value
        t = torch.tensor([float(value)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def save():
        nonlocal saved_step
        if lead:
            save_checkpoint(ckpt_path, {
                **checkpoint_extra, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "train_config": asdict(cfg), "step": step, "tokens": tokens, "elapsed_s": time.time() - t_start,
                "reserve": reserve, "window": list(window), "warm_progress": warm_progress, "val_loss": last_eval["val_loss"] if last_eval else None,
                "rng": {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
                        **({"cuda": torch.cuda.get_rng_state(device)} if device.startswith("cuda") else {})},
            })
        saved_step = step

    def checkpoint_and_eval():
        nonlocal last_eval, reserve
        t = time.time()
        if lead:
            last_eval = {"kind": "eval", "step": step, "val_loss": evaluate_loss(model, val_batches, device),
                         "elapsed_s": round(t - t_start, 1), "tokens": tokens}
            if metrics is not None:
                last_eval.update(metrics(model, step))
            emit(last_eval)
            if sample is not None and (step % cfg.sample_every == 0 or progress() >= 1):
                emit({"kind": "sample", "step": step, **sample(model, step)})
        else:
            last_eval = {"kind": "eval", "step": step}
        # keep time at the end of the budget for the last eval (at most a quarter of the budget)
        reserve = agree(min(max(reserve, time.time() - t), budget / 4))
        save()

    signals = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda signum, frame: signals.append(signum))
    bar = None
    try:
        if last_eval is None:
            checkpoint_and_eval()  # step 0: what the model does before any training
        bar = tqdm(total=cfg.max_steps, initial=step, desc=checkpoint_extra.get("stage", "train"), unit="step",
                   dynamic_ncols=True, disable=not lead)
        while not agree(progress() >= 1 or bool(signals)):
            t0 = time.time()
            if step == cfg.warmup_steps and warm_progress is None:
                warm_progress = progress()  # the cosine starts at its top from here
            lr = lr_at(step, progress(), cfg, warm_progress or 0.0)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = get_batch(data_gen)
            x, y = x[rank::world].to(device), y[rank::world].to(device)  # this process's rows of the batch
            try:
                with torch.autocast(device.split(":")[0], dtype=amp or torch.float32, enabled=amp is not None):
                    _, loss = step_model(x, y)
            except Exception as e:  # torch.compile needs a C++ compiler (or Triton on GPU): without one, go on uncompiled
                if step_model is plain_model:
                    raise
                warnings.warn(f"torch.compile failed ({type(e).__name__}); training without it, or pass --no-compile")
                step_model = plain_model
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:  # the logged loss is the mean over all processes
                loss = loss.detach().clone()
                dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise TrainingStopped(
                    f"loss is {loss_value} at step {step + 1}: training diverged and stopped. The last good checkpoint "
                    f"(step {saved_step}) stays in {ckpt_path}; try a lower --lr or a longer --warmup-steps",
                    out_dir, exit_code=1, resumable=False)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            tokens += x.numel() * world
            window.append(loss_value)
            t_window += time.time() - t0
            bar.update(1)
            if budget and progress() > step / cfg.max_steps:  # the clock ends this run: show its estimated length
                bar.total = max(step, round(step / progress()))
            if step % cfg.log_every == 0:
                rate = len(window) * x.numel() * world / max(t_window, 1e-9)
                if lead:
                    emit({"kind": "train", "step": step, "loss": sum(window) / len(window), "lr": lr, "tok_per_s": round(rate)})
                bar.set_postfix(loss=f"{sum(window) / len(window):.3f}", lr=f"{lr:.1e}", tok_s=f"{rate:.0f}")
                window, t_window = [], 0.0
            if step % cfg.eval_every == 0 or step % cfg.sample_every == 0:
                checkpoint_and_eval()
        if agree(bool(signals)):
            save()
            name = signal.Signals(signals[0]).name if signals else "a signal to another process"
            raise TrainingStopped(f"{name} at step {step}: checkpoint saved in {ckpt_path}", out_dir,
                                  exit_code=128 + (signals[0] if signals else signal.SIGTERM))
        if last_eval["step"] != step:
            checkpoint_and_eval()
    finally:
        if bar is not None:
            bar.close()
        if lead:
            log.close()
        for sig, old in handlers.items():
            signal.signal(sig, old)
    if lead:
        plot_losses(log_path, os.path.join(out_dir, "loss.png"), title=f"{checkpoint_extra.get('stage', 'training')}: loss")
    return last_eval

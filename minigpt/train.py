"""The one training loop, shared by every stage: pretraining, instruction tuning and preference tuning.

Read `train_step` and the loop in `train` first: they are the textbook loop (batch, forward, backward, clip, step).
A stage supplies its batches, its loss (`lm_loss` unless it brings its own) and its hooks. Everything after
`train` is machinery a first reading can skip, each job in a part of its own: the LR schedule and the time budget
(`Clock`), the log (`Log`), evals and checkpoints (`Run`), signals (`Signals`), and several processes under
torchrun (`Processes`).
"""
import contextlib
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

from minigpt.checkpoint import replace_durably, save_checkpoint
from minigpt.lora import adapter_state, load_trained
from minigpt.loss_eval import evaluate_loss
from minigpt.model import IGNORE_INDEX


def train_step(model, opt, batch, loss_fn, grad_clip, autocast=contextlib.nullcontext):
    """One step of gradient descent on one batch; returns the loss."""
    with autocast():
        loss = loss_fn(model, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()  # the gradients (under DDP, averaged over the processes as they are computed)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)  # one huge gradient cannot throw the weights far
    opt.step()
    return loss.detach()


def lm_loss(model, batch):
    """The language-model loss of pretraining and SFT: cross-entropy of each next token, averaged over the
    targets that count (SFT's mask sets the rest to IGNORE_INDEX). Returns (mean, how many targets it averages)."""
    x, y = batch
    _, loss = model(x, y)
    return loss, (y != IGNORE_INDEX).sum()


def train(model, cfg, get_batch, val_batches, out_dir, checkpoint_extra, sample=None, metrics=None, on_event=None,
          device="cpu", resume_from=None, loss_fn=lm_loss):
    """Train model in place; returns the last eval record.

    get_batch(generator) -> the whole batch, a tuple of tensors with one row per example (lm_loss: (x, y));
    val_batches: a fixed list of (x, y), or model -> val loss for a stage whose loss is not the LM's; checkpoint_extra: dict stored in every checkpoint (configs, tokenizer, stage);
    sample(model, step) -> dict of samples to log; metrics(model, step) -> dict added to each eval record;
    on_event(record) sees every log record; resume_from: a checkpoint dict of this run to continue;
    loss_fn(model, batch) -> (mean loss, count of what it averages). Ctrl-C, SIGTERM or a loss that is not finite
    raise TrainingStopped. Under torchrun each process trains on its rows of every batch; process 0 evaluates,
    logs and saves."""
    procs = Processes(device, cfg.batch_size)
    torch.manual_seed(cfg.seed + procs.rank)  # dropout draws its own masks in every process
    data_gen = torch.Generator().manual_seed(cfg.seed)  # the same data order in every process: each takes its rows
    model.to(device).train()
    opt = make_optimizer(model, cfg)
    run = Run(cfg, procs, model, opt, data_gen, out_dir, checkpoint_extra, Evals(val_batches, sample, metrics, cfg),
              on_event, resume_from)
    step_model = procs.wrap(model)  # DDP averages the gradients of all processes in backward()
    # compiled: the model and its loss as one graph whose only outputs are the loss and its count, so that the
    # (B, T, V) logits are never written out (compiling the model alone returns them: a fifth more per step)
    step_loss = procs.weighted(CompiledOrNot(loss_fn) if cfg.compile else loss_fn)  # one process: the loss as it is
    autocast = make_autocast(cfg.dtype, device)  # eval and sampling stay in float32

    with run:  # catches Ctrl-C and SIGTERM, shows a progress bar, closes the log
        if resume_from is None:
            run.evaluate_and_save()  # step 0: what the model does before any training
        while True:
            progress = run.progress_or_stop()  # steps or time, from 0 to 1; a signal saves a checkpoint and stops
            if progress >= 1:
                break
            lr = run.set_lr(progress)
            batch = procs.rows(get_batch(data_gen))
            loss = procs.mean(train_step(step_model, opt, batch, step_loss, cfg.grad_clip, autocast))
            run.after_step(loss.item(), lr, batch[0].numel() * procs.world)  # log, eval, checkpoint
        run.finish()
    return run.last_eval


# ---- everything below is machinery: a first reading can stop here ----


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
    early_evals: bool = False  # also evaluate at steps 10, 25, 50, 100, ... below eval_every: how fast a change comes
    eval_batches: int = 20
    sample_every: int = 500
    log_every: int = 10
    seed: int = 1337
    dtype: str = "auto"  # float32, bfloat16 (autocast) or auto (bfloat16 where the hardware has it)
    compile: bool = False  # torch.compile the model for the training steps
    optimizer: str = "adamw"  # adamw, or muon: Muon for the blocks' weight matrices, AdamW for the rest (minigpt.optim)
    muon_lr: float = 0.02  # Muon's learning rate at the top of the schedule (it follows the same warmup and cosine)
    keep_snapshots: bool = False  # also keep the model of every eval, snapshots/step_N.pt (tools/time_to_rhyme.py)

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
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be adamw or muon, got {self.optimizer!r}")


def make_optimizer(model, cfg):
    """AdamW; weight decay on matrices only (not on biases, LayerNorm gains or position-free vectors). With
    cfg.optimizer muon, the blocks' weight matrices go to Muon instead. Every group's lr_scale says how its learning
    rate stands to cfg.lr, so that one schedule moves them all."""
    from minigpt.optim import Muon, Optimizers
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if cfg.optimizer == "muon" and n.startswith("blocks.") and p.dim() == 2]
    to_muon = {id(p) for p in hidden}
    rest = [p for _, p in named if id(p) not in to_muon]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    if not hidden:
        return adamw
    return Optimizers(Muon([{"params": hidden, "lr_scale": cfg.muon_lr / cfg.lr}], lr=cfg.muon_lr), adamw)


def lr_at(step, progress, cfg, warm_progress=0.0):
    """Linear warmup over warmup_steps, then cosine from lr down to min_lr as progress goes from
    warm_progress (where the warmup ended) to 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (progress - warm_progress) / max(1.0 - warm_progress, 1e-9)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))


class TrainingStopped(Exception):
    """Training ended early: interrupted (a checkpoint was saved) or diverged (the last good one is kept)."""

    def __init__(self, message, out_dir, exit_code, resumable=True):
        super().__init__(message)
        self.out_dir, self.exit_code, self.resumable = out_dir, exit_code, resumable


class Clock:
    """The schedule's progress from 0 to 1: the larger of steps / max_steps and time / budget. The budget keeps a
    reserve at its end for the last eval (as long as the longest eval so far, at most a quarter of the budget)."""

    def __init__(self, cfg):
        self.cfg, self.budget = cfg, cfg.max_minutes * 60
        self.t_start, self.reserve, self.warm_progress = time.time(), 0.0, None

    def progress(self, step):
        """This process's own progress at step."""
        by_time = (time.time() - self.t_start) / max(self.budget - self.reserve, 1e-9) if self.budget else 0.0
        return max(step / self.cfg.max_steps, by_time)

    def lr(self, step, progress):
        if step == self.cfg.warmup_steps and self.warm_progress is None:
            self.warm_progress = progress  # the cosine starts at its top from here
        return lr_at(step, progress, self.cfg, self.warm_progress or 0.0)

    def reserve_for(self, eval_seconds):
        """The reserve once an eval took eval_seconds."""
        return min(max(self.reserve, eval_seconds), self.budget / 4)

    def state(self):
        return {"elapsed_s": time.time() - self.t_start, "reserve": self.reserve, "warm_progress": self.warm_progress}

    def restore(self, ckpt):
        self.t_start = time.time() - ckpt["elapsed_s"]  # the time budget counts the time before the interruption
        self.reserve, self.warm_progress = ckpt["reserve"], ckpt.get("warm_progress")


class Log:
    """log.jsonl, one JSON record a line, written by process 0 alone; on_event sees every record too."""

    def __init__(self, path, lead, on_event):
        self.path, self.lead, self.on_event, self.file = path, lead, on_event, None

    def open(self, resumed_at=None):
        """A new log, or (resumed_at a step) the old one cut back to that step's records and continued."""
        if not self.lead:
            return
        if resumed_at is not None:
            keep_log_until(self.path, resumed_at)
        self.file = open(self.path, "a" if resumed_at is not None else "w", encoding="utf-8")

    def emit(self, record):
        if not self.lead:
            return
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        if self.on_event:
            self.on_event(record)

    def close(self):
        if self.file is not None:
            self.file.close()


class Signals:
    """Ctrl-C and SIGTERM noted instead of ending the process at once, so that the run saves a checkpoint first
    (handlers can only be set in the main thread; elsewhere the defaults stay)."""

    def __init__(self):
        self.caught, self.handlers = [], {}

    def install(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.handlers[sig] = signal.signal(sig, lambda signum, frame: self.caught.append(signum))

    def uninstall(self):
        for sig, old in self.handlers.items():
            signal.signal(sig, old)

    def stopped(self, step, ckpt_path, out_dir):
        """The TrainingStopped to raise: the signal's name and the exit status a shell expects (128 + its number)."""
        name = signal.Signals(self.caught[0]).name if self.caught else "a signal to another process"
        return TrainingStopped(f"{name} at step {step}: checkpoint saved in {ckpt_path}", out_dir,
                               exit_code=128 + (self.caught[0] if self.caught else signal.SIGTERM))


class Evals:
    """What an eval measures, and at which steps: the val loss, the stage's metrics and (when due) its samples."""

    def __init__(self, val_batches, sample, metrics, cfg):
        self.val_batches, self.sample, self.metrics, self.cfg = val_batches, sample, metrics, cfg

    def due(self, step):
        """Every eval_every and sample_every steps, and at the early ones."""
        return self.early(step) or step % self.cfg.eval_every == 0 or step % self.cfg.sample_every == 0

    def early(self, step):
        """With early_evals, the log-spaced steps before the first regular eval (they get samples too)."""
        return self.cfg.early_evals and step in early_eval_steps(self.cfg.eval_every)

    def measure(self, model, step, device):
        val_loss = self.val_batches(model) if callable(self.val_batches) else evaluate_loss(model, self.val_batches, device)
        out = {"val_loss": val_loss}
        return {**out, **(self.metrics(model, step) if self.metrics is not None else {})}

    def samples(self, model, step, last):
        """The samples record, when this eval has samples (and the stage makes them), else None."""
        if self.sample is None or not (step % self.cfg.sample_every == 0 or self.early(step) or last):
            return None
        return {"kind": "sample", "step": step, **self.sample(model, step)}


class Run:
    """A run between its steps: the count, the log line, evals, checkpoints, resume and the end. Every process keeps
    one; only process 0 writes. Whatever ends or times the run is agreed by all processes."""

    def __init__(self, cfg, procs, model, opt, data_gen, out_dir, extra, evals, on_event, resume_from):
        self.cfg, self.procs, self.model, self.opt, self.data_gen, self.out_dir, self.extra, self.evals = (
            cfg, procs, model, opt, data_gen, out_dir, extra, evals)
        os.makedirs(out_dir, exist_ok=True)
        self.ckpt_path = os.path.join(out_dir, "ckpt.pt")
        self.clock, self.signals = Clock(cfg), Signals()
        self.log = Log(os.path.join(out_dir, "log.jsonl"), procs.lead, on_event)
        self.step, self.tokens, self.window, self.t_window, self.t_step, self.progress = 0, 0, [], 0.0, 0.0, 0.0
        self.last_eval, self.saved_step, self.bar = None, None, None
        if resume_from is not None:
            self.resume(resume_from)

    def resume(self, ckpt):
        """Everything comes from the checkpoint, in every process."""
        load_trained(self.model, ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.procs.set_rng_state(ckpt["rng"], self.cfg.seed + ckpt["step"])
        self.data_gen.set_state(ckpt["rng"]["data"].cpu())
        self.clock.restore(ckpt)
        self.step, self.tokens, self.saved_step = ckpt["step"], ckpt["tokens"], ckpt["step"]
        self.window = list(ckpt["window"])  # losses since the last log line, so that line comes out the same
        self.last_eval = ckpt.get("last_eval") or {"kind": "eval", "step": -1, "val_loss": ckpt.get("val_loss")}

    def __enter__(self):
        self.log.open(resumed_at=self.saved_step)
        self.signals.install()
        self.bar = tqdm(total=self.cfg.max_steps, initial=self.step, desc=self.extra.get("stage", "train"),
                        unit="step", dynamic_ncols=True, disable=not self.procs.lead)
        return self

    def __exit__(self, *exc):
        self.bar.close()
        self.log.close()
        self.signals.uninstall()

    def progress_or_stop(self):
        """The progress, agreed by all processes (the largest wins, so that every one of them uses the same LR and
        stops at the same step). A signal to any of them saves a checkpoint and raises TrainingStopped."""
        self.progress, signalled = self.procs.largest(self.clock.progress(self.step), float(bool(self.signals.caught)))
        if signalled:
            self.save()
            raise self.signals.stopped(self.step, self.ckpt_path, self.out_dir)
        self.t_step = time.time()  # the step's own time, for tokens per second
        return self.progress

    def set_lr(self, progress):
        lr = self.clock.lr(self.step, progress)
        for group in self.opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's groups run at their own scale of the schedule
        return lr

    def after_step(self, loss, lr, n_tokens):
        """Count the step; stop on a loss that is not finite; log every log_every steps; eval and save when due."""
        if not math.isfinite(loss):
            raise TrainingStopped(
                f"loss is {loss} at step {self.step + 1}: training diverged and stopped. The last good checkpoint "
                f"(step {self.saved_step}) stays in {self.ckpt_path}; try a lower --lr or a longer --warmup-steps",
                self.out_dir, exit_code=1, resumable=False)
        self.step += 1
        self.tokens += n_tokens
        self.window.append(loss)
        self.t_window += time.time() - self.t_step
        self.bar.update(1)
        if self.clock.budget and self.progress > self.step / self.cfg.max_steps:  # the clock ends it: its estimated length
            self.bar.total = max(self.step, round(self.step / max(self.progress, 1e-9)))
        if self.step % self.cfg.log_every == 0:
            self._log_line(lr, n_tokens)
        if self.evals.due(self.step):
            self.evaluate_and_save()

    def _log_line(self, lr, n_tokens):
        """The mean loss and the speed since the last log line."""
        mean, rate = sum(self.window) / len(self.window), len(self.window) * n_tokens / max(self.t_window, 1e-9)
        self.log.emit({"kind": "train", "step": self.step, "loss": mean, "lr": lr, "tok_per_s": round(rate),
                       "step_ms": round(1000 * self.t_window / len(self.window), 1)})
        self.bar.set_postfix(loss=f"{mean:.3f}", lr=f"{lr:.1e}", tok_s=f"{rate:.0f}")
        self.window, self.t_window = [], 0.0

    def finish(self):
        """The last eval, unless the last step had one."""
        if self.last_eval["step"] != self.step:
            self.evaluate_and_save()

    def evaluate_and_save(self):
        """Process 0 measures the val loss (and the stage's metrics, and samples when due) and logs them; then
        every process takes part in the checkpoint."""
        t = time.time()
        self.last_eval = {"kind": "eval", "step": self.step}
        if self.procs.lead:
            measured = self.evals.measure(self.model, self.step, self.procs.device)
            self.last_eval.update({"val_loss": measured.pop("val_loss"), "elapsed_s": round(t - self.clock.t_start, 1),
                                   "tokens": self.tokens, **measured})
            self.log.emit(self.last_eval)
            samples = self.evals.samples(self.model, self.step, last=self.clock.progress(self.step) >= 1)
            if samples is not None:
                self.log.emit(samples)
        self.clock.reserve = self.procs.largest(self.clock.reserve_for(time.time() - t))[0]
        self.save()

    def save(self):
        """A checkpoint of everything a resumed run needs, in every process (each one's random state included)."""
        rng = self.procs.rng_states()
        if self.procs.lead:
            payload = {**self.extra, "model": saved_state(self.model), "train_config": asdict(self.cfg),
                       "step": self.step, "last_eval": json.loads(json.dumps(self.last_eval))}
            save_checkpoint(self.ckpt_path, {
                **payload, "optimizer": self.opt.state_dict(), "tokens": self.tokens, **self.clock.state(),
                "window": list(self.window), "val_loss": self.last_eval.get("val_loss"),
                "rng": {**rng, "data": self.data_gen.get_state()}})
            if self.cfg.keep_snapshots:  # the model alone, loadable as a checkpoint: what it was at this eval
                folder = os.path.join(os.path.dirname(self.ckpt_path), "snapshots")
                os.makedirs(folder, exist_ok=True)
                save_checkpoint(os.path.join(folder, f"step_{self.step}.pt"), payload)
        self.saved_step = self.step


def saved_state(model):
    """What a checkpoint keeps of the model: its state_dict, or where part of it is frozen (LoRA, --train-only) only
    the tensors that train, an adapter for the base the checkpoint names (minigpt.checkpoint.on_its_base)."""
    return model.state_dict() if all(p.requires_grad for p in model.parameters()) else adapter_state(model)


def early_eval_steps(eval_every):
    """The steps 10, 25, 50, 100, 250, 500, ... that come before eval_every: evals spaced out logarithmically."""
    steps, scale = [], 10
    while True:
        for m in (1, 2.5, 5):
            if m * scale >= eval_every:
                return steps
            steps.append(int(m * scale))
        scale *= 10


def keep_log_until(path, step):
    """Cut the log back to the records up to step, what a run resumed from that step's checkpoint keeps. The new
    log goes to a temporary file that is renamed into place: a kill meanwhile leaves the old log whole. A torn
    last line (the process was killed while writing it) is dropped."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                warnings.warn(f"{path}: line {i + 1} is damaged and left out")
            continue
        if record["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    replace_durably(path, lambda f: f.write("".join(kept).encode("utf-8")))


class CompiledOrNot:
    """torch.compile(loss_fn), falling back to loss_fn itself where compiling fails: it needs a C++ compiler on a
    CPU (Triton on a GPU). The failed batch is run again uncompiled."""

    def __init__(self, loss_fn):
        self.loss_fn, self.compiled = loss_fn, torch.compile(loss_fn)

    def __call__(self, model, batch):
        if self.compiled is not None:
            try:
                return self.compiled(model, batch)
            except Exception as e:
                warnings.warn(f"torch.compile failed ({type(e).__name__}); training without it, or pass --no-compile")
                self.compiled = None
        return self.loss_fn(model, batch)


class Processes:
    """This process among the ones torchrun started (rank 0 of 1 without torchrun, where every method is trivial).
    Every process draws the same batch and trains on its rows of it; these are the numbers they must agree on."""

    def __init__(self, device, batch_size):
        self.device = device
        self.rank, self.world = distributed(device)
        self.lead = self.rank == 0
        if batch_size % self.world:
            raise ValueError(f"batch_size {batch_size} does not split evenly over {self.world} processes")

    def wrap(self, model):
        return DDP(model) if self.world > 1 else model

    def rows(self, batch):
        """This process's rows of the whole batch (a tuple of tensors, or a named one whose other fields, None or a
        flag, are kept as they are), on its device."""
        rows = (t[self.rank::self.world].to(self.device) if torch.is_tensor(t) else t for t in batch)
        return batch._make(rows) if hasattr(batch, "_make") else tuple(rows)

    def weighted(self, loss_fn):
        """The stage's loss_fn(model, batch) -> (mean, count) as the step's loss. One process: the mean. Several: each
        one's mean times its count over the mean count of all processes; DDP averages the gradients, so these average
        to the loss over all counted targets of the global batch."""
        if self.world == 1:
            return lambda model, batch: loss_fn(model, batch)[0]

        def share_of_all(model, batch):
            loss, count = loss_fn(model, batch)
            total = count.detach().to(torch.float32).clone()
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            return loss * (count.to(torch.float32) * self.world / total)
        return share_of_all

    def mean(self, value):
        if self.world == 1:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG)
        return value

    def largest(self, *values):
        """Each value's largest over all processes, in one call."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def rng_states(self):
        """The random states of every process (dropout draws from them), for the checkpoint."""
        mine = {"torch": torch.get_rng_state(),
                **({"cuda": torch.cuda.get_rng_state(self.device)} if self.device.startswith("cuda") else {})}
        every = [mine]
        if self.world > 1:
            every = [None] * self.world
            dist.all_gather_object(every, mine)
        return {**every[0], "ranks": every}

    def set_rng_state(self, rng, fallback_seed):
        """Each process takes its own saved state back; a run resumed on another number of processes seeds afresh."""
        ranks = rng.get("ranks", [rng])
        if len(ranks) != self.world:
            warnings.warn(f"saved by {len(ranks)} processes, resumed by {self.world}: dropout draws new masks")
            torch.manual_seed(fallback_seed + self.rank)
            return
        torch.set_rng_state(ranks[self.rank]["torch"].cpu())
        if "cuda" in ranks[self.rank] and self.device.startswith("cuda"):
            torch.cuda.set_rng_state(ranks[self.rank]["cuda"].cpu(), self.device)


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


def cpu_has_bfloat16():
    """True where the CPU has bfloat16 instructions (AVX512-BF16 or AMX), as Linux reports them."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def make_autocast(name, device):
    """A function that opens the autocast context for training steps (a no-op in float32)."""
    amp = autocast_dtype(name, device)
    return lambda: torch.autocast(device.split(":")[0], dtype=amp or torch.float32, enabled=amp is not None)


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

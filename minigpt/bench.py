"""Speed figures for this machine, printed (not a test): training throughput and achieved GFLOP/s against the
measured matrix-multiply peak (the model FLOPs utilisation), generation with and without the KV cache, a DPO step
with one forward pass a pair against both sides, and the SFT metrics' cost.

    python -m minigpt.bench                  # a few minutes on 2 CPU cores
    python -m minigpt.bench --device cuda    # the same on a GPU, with the gpu preset as the larger model
    python -m minigpt.bench --tiny           # seconds: checks that it runs
    python -m minigpt.bench --time-to-loss default "lr 6e-3" --minutes 7   # pretraining variants, back to back

The time-to-loss benchmark trains each variant of the pretraining (flags of train_pretrain.py on top of a preset) for
the same wall-clock budget, one after the other on this machine, and prints the val loss each reaches at fixed
minutes and the minutes each needs to reach given val losses, with a plot of val loss against minutes. Nothing else
should run meanwhile: a budget fixes minutes, not steps.
"""
import argparse
import contextlib
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from minigpt.generate import generate
from minigpt.model import GPT, GPTConfig
from minigpt.train import TrainConfig, autocast_dtype, make_optimizer, pick_device


def sync(device):
    """Wait until the device has done the work queued so far: GPU kernels run asynchronously, so a clock read
    without this measures only how fast Python queues them."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    elif device == "mps":
        torch.mps.synchronize()


def matmul_peak(dtype, device="cpu", n=1024, seconds=1.0):
    """GFLOP/s of a square matmul in dtype: the ceiling the model's own GFLOP/s is compared with."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b  # warm up
    sync(device)
    reps, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ b
        reps += 1
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def flops_per_token(cfg, T):
    """Training FLOPs per token: 6 per parameter (forward + backward) plus the attention maps (nanoGPT's estimate)."""
    n = 12 * cfg.n_layer * cfg.n_embd ** 2 + cfg.vocab_size * cfg.n_embd
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * T


def train_rate(cfg, batch_size, steps, dtype=None, compile=False, warmup=3, device="cpu", optimizer="adamw"):
    """Tokens per second of full training steps (forward, backward, optimizer) on random ids."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device).train()
    x = torch.randint(cfg.vocab_size, (batch_size, cfg.block_size), device=device)
    return step_rate(model, make_optimizer(model, TrainConfig(optimizer=optimizer)), x, steps, dtype, compile, warmup,
                     device)


def step_rate(model, opt, x, steps, dtype=None, compile=False, warmup=3, device="cpu", grad_clip=0.0):
    """Tokens per second of `steps` training steps of any model whose forward(ids, targets) returns (logits, loss),
    on the batch x, after `warmup` steps; and the seconds the warmup took (the compile, when there is one)."""
    if compile:
        torch._dynamo.reset()  # a fresh compile for each row: past 8 shapes and models, dynamo stops compiling
    loss_of = lambda ids: model(ids, ids)[1]  # as training does: the loss alone leaves a compiled graph
    step_loss = torch.compile(loss_of) if compile else loss_of
    amp = torch.autocast(device.split(":")[0], dtype=dtype) if dtype else contextlib.nullcontext()
    t_compile = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t_compile, t = time.perf_counter() - t_compile, time.perf_counter()
        with amp:
            loss = step_loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
    sync(device)
    return x.numel() * steps / (time.perf_counter() - t), t_compile


def generation_rate(cfg, batch_size, new_tokens, use_cache, device="cpu"):
    torch.manual_seed(0)
    model = GPT(cfg).to(device).eval()
    prompts = [[7, 8, 9, 10]] * batch_size
    gen = torch.Generator(device=device).manual_seed(0)
    sync(device)
    t = time.perf_counter()
    generate(model, prompts, new_tokens, temperature=1.0, use_cache=use_cache, generator=gen)
    sync(device)
    return batch_size * new_tokens / (time.perf_counter() - t)


def dpo_step_time(cfg, pairs, steps, shared, device="cpu", prompt=16):
    """Seconds per DPO step (forward, backward, optimizer) on random pairs shaped like ending pairs (the two sides the
    same but for one target, counted up to it) with as many real rows for the SFT term: the chosen rows alone
    (shared, as pair_batch marks such pairs) or both sides run."""
    from minigpt.dpo import PairBatch, dpo_loss
    from minigpt.model import IGNORE_INDEX
    torch.manual_seed(0)
    model = GPT(cfg).to(device).train()
    opt = make_optimizer(model, TrainConfig(optimizer="adamw"))
    n, T, rows = pairs, cfg.block_size, torch.arange(pairs)
    ids = torch.randint(cfg.vocab_size, (2 * n, T + 1))
    x, y = ids[:, :-1].clone(), ids[:, 1:].clone()
    y[:, :prompt] = IGNORE_INDEX  # the prompt, masked; the real rows count every answer target
    change = torch.randint(T // 3, T - 1, (n,))  # where the two sides differ: the last counted target
    y[:n][torch.arange(T) > change[:, None]] = IGNORE_INDEX
    rejected_y = y[:n].clone()
    rejected_y[rows, change] = (y[rows, change] + 1) % cfg.vocab_size
    rejected_x = x[:n].clone()
    rejected_x[rows, change + 1] = rejected_y[rows, change]
    zeros = torch.zeros(n)
    batch = PairBatch(x[:n], y[:n], rejected_x, rejected_y, zeros, zeros, shared, x[n:], y[n:])
    batch = batch._make(t.to(device) if torch.is_tensor(t) else t for t in batch)
    for i in range(2 + steps):
        if i == 2:
            sync(device)
            t = time.perf_counter()
        loss, _ = dpo_loss(model, batch, beta=0.3, sft_weight=1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return (time.perf_counter() - t) / steps


def sft_metrics_time(n_titles, max_new_tokens, device="cpu"):
    """Seconds to measure the SFT metrics on n titles, with runs/sft when it exists
    (else an untrained model: the worst case, since it never stops)."""
    from minigpt.checkpoint import CheckpointError, load_checkpoint
    from minigpt.data import load_poems, split_poems
    from minigpt.evaluate import eval_set, measure
    from minigpt.metrics import Yardstick
    splits = split_poems(load_poems())
    try:
        model, tok, _ = load_checkpoint("runs/sft", device)
        which = "runs/sft"
    except CheckpointError:
        from minigpt.data import build_tokenizer
        tok = build_tokenizer(splits["train"])
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_embd=128)).to(device)
        which = "an untrained model (never stops)"
    titles, yard = eval_set(splits["val"], splits["train"], n_titles).titles, Yardstick(splits["train"])
    sync(device)
    t = time.perf_counter()
    measure(model, tok, titles, yard, max_new_tokens=max_new_tokens)
    sync(device)
    return time.perf_counter() - t, which


# (name, model, batch): the cpu preset, then a larger model; on a GPU the larger one is the gpu preset
VOCAB = 9017  # the Tang corpus's vocabulary
CPU_PRESET = ("cpu preset (4x128, T=128, batch 8)", GPTConfig(VOCAB, block_size=128, n_layer=4, n_head=4, n_embd=128), 8)
LARGER = ("larger (6x256, T=128, batch 16)", GPTConfig(VOCAB, block_size=128, n_layer=6, n_head=8, n_embd=256), 16)
GPU_PRESET = ("gpu preset (8x512, T=256, batch 64)", GPTConfig(VOCAB, block_size=256, n_layer=8, n_head=8, n_embd=512), 64)
TINY = ("tiny (2x32, T=32, batch 4)", GPTConfig(500, block_size=32, n_layer=2, n_head=2, n_embd=32), 4)


# ---- where one pretraining step's time goes ----

def _median_ms(fn, reps):
    """The median milliseconds of fn() over reps calls, after two that warm up."""
    times = []
    for i in range(reps + 2):
        t = time.perf_counter()
        fn()
        if i >= 2:
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def _part_forwards(model, x, h0):
    """{part: (its forward, its input, whether it returns the loss)} of one pretraining step."""
    from minigpt.model import IGNORE_INDEX
    (B, T), V = x.shape, model.config.vocab_size

    def blocks(h):  # the blocks and the final LayerNorm
        for block in model.blocks:
            h = block(h)
        return model.ln_f(h)

    return {
        "embedding": (lambda i: model.tok_emb(i) + model.pos_emb(torch.arange(T, device=i.device)), x, False),
        "blocks (attention + MLP, every layer)": (blocks, h0, False),
        "output layer: matmul": (lambda h: model.lm_head(h), h0, False),
        "output layer + loss": (lambda h: F.cross_entropy(model.lm_head(h).view(B * T, V), x.view(B * T),
                                                           ignore_index=IGNORE_INDEX), h0, True),
        "whole model + loss": (lambda i: model(i, i)[1], x, True),
    }


def _forward_backward(forward, inp, is_loss, amp):
    """A call that runs forward on inp and its backward, from the loss or from a gradient drawn once (drawing 37
    million numbers each time would cost more than the matmul)."""
    grad = {}

    def go():
        h = inp.clone().requires_grad_(True) if inp.is_floating_point() else inp
        with amp():
            out = forward(h)
        if not is_loss and "g" not in grad:
            grad["g"] = torch.randn_like(out)
        out.backward(None if is_loss else grad["g"])
    return go


def step_profile(cfg, batch_size, dtype=None, compile=False, reps=10, device="cpu", data=None):
    """Milliseconds of each part of one pretraining step: {part: ms}. Each part runs its forward (compiled on its own
    when compile is set, as training compiles the model with its loss) and its backward alone, with a random gradient
    arriving from above, so the parts add up to about the whole step; `data`: a PretrainData (None: no data row)."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device).train()
    opt = make_optimizer(model, TrainConfig(optimizer="muon"))
    x = torch.randint(cfg.vocab_size, (batch_size, cfg.block_size), device=device)
    h0 = torch.randn(batch_size, cfg.block_size, cfg.n_embd, device=device)
    amp = (lambda: torch.autocast(device.split(":")[0], dtype=dtype)) if dtype else contextlib.nullcontext
    if compile:
        torch._dynamo.reset()
    fast = torch.compile if compile else (lambda f: f)
    parts = {name: _forward_backward(fast(f), inp, is_loss, amp)
             for name, (f, inp, is_loss) in _part_forwards(model, x, h0).items()}
    whole_model = parts["whole model + loss"]
    whole_model()  # every parameter has a gradient for the optimizer's step
    parts["optimizer (Muon + AdamW)"] = opt.step

    def whole():
        opt.zero_grad(set_to_none=True)
        whole_model()
        opt.step()

    parts["whole step"] = whole
    if data is not None:
        parts = {"data (a batch of windows)": lambda: data.get_batch(batch_size, cfg.block_size), **parts}
    return {name: _median_ms(fn, reps) for name, fn in parts.items()}


def profile_main(args, device):
    """The printed profile: the default's shape, batch and dtype, with the corpus's own batches, uncompiled and
    compiled (the default)."""
    from minigpt.data import PretrainData, build_tokenizer, load_poems, split_poems
    splits = split_poems(load_poems())
    data = PretrainData(splits, build_tokenizer(splits["train"]))
    cfg = GPTConfig(VOCAB, block_size=128, n_layer=4, n_head=4, n_embd=128, use_sdpa=False)
    dtype, batch, reps = autocast_dtype("auto", device), 4 if args.tiny else 32, 3 if args.tiny else 10
    runs = {comp: step_profile(cfg, batch, dtype, comp, reps, device, data)
            for comp in ((False,) if args.no_compile else (False, True))}
    print(f"one pretraining step: the cpu preset's model, batch {batch}, {'bfloat16 autocast' if dtype else 'float32'}; "
          f"each part forward and backward alone, median of {reps} (ms, and share of the whole step)")
    print(f"  {'':38s}" + "".join(f"{'compiled' if comp else 'uncompiled':>20s}" for comp in runs))
    for name in runs[False]:
        print(f"  {name:38s}" + "".join(f"{ms[name]:10.1f} ms {ms[name] / ms['whole step']:6.0%}  " for ms in runs.values()))
    return runs


# ---- time to loss: pretraining variants on one budget, back to back ----

def _batch(n):
    """Flags for batch n that keep the val text (the same 320 windows of 128) and the evals' spacing in windows."""
    return ["--batch-size", str(n), "--eval-batches", str(320 // n), "--eval-every", str(3200 // n)]


ADAMW_8 = ["--optimizer", "adamw", *_batch(8)]  # the default until Muon at batch 32 replaced it (docs/log.md)
VARIANTS = {  # name: flags of train_pretrain.py on top of the preset (the flags come after the benchmark's own)
    "default": [],  # Muon for the blocks' matrices, batch 32
    "adamw batch 8": ADAMW_8,
    "lr 6e-3": [*ADAMW_8, "--lr", "6e-3", "--min-lr", "6e-4"],
    "lr 1.5e-3": [*ADAMW_8, "--lr", "1.5e-3", "--min-lr", "1.5e-4"],
    "batch 16": ["--optimizer", "adamw", *_batch(16)],
    "batch 32": ["--optimizer", "adamw", *_batch(32)],
    "float32": ["--dtype", "float32"],
    "muon": _batch(8),
    "muon lr 0.04": [*_batch(8), "--muon-lr", "0.04"],
    "muon to 0": [*_batch(8), "--min-lr", "0"],
    "muon batch 16": _batch(16),
    "muon batch 32": _batch(32),
    "muon batch 64": _batch(64),
}


def time_to_loss(names, minutes, out_root, seed=1337, preset="cpu", eval_every=100, extra=()):
    """Train each named variant for `minutes`, one after the other; {name: [(minutes, val loss)]} from its evals."""
    import train_pretrain  # the script itself, so that a variant is exactly what a learner would run
    curves = {}
    for name in names:
        out = os.path.join(out_root, name.replace(" ", "_"))
        train_pretrain.main(["--preset", preset, "--max-minutes", str(minutes), "--seed", str(seed), "--out-dir", out,
                             "--overwrite", "--eval-every", str(eval_every), "--sample-every", "1000000000",
                             *VARIANTS[name], *extra])
        with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as f:
            evals = [r for r in map(json.loads, f) if r["kind"] == "eval"]
        curves[name] = [(r["elapsed_s"] / 60, r["val_loss"]) for r in evals]
    return curves


def loss_at(curve, t):
    """The val loss at minute t, interpolated between evals; at the budget's end the last eval's (it comes a few
    seconds before the end); None where the curve does not reach."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if t0 <= t <= t1:
            return l0 + (l1 - l0) * (t - t0) / max(t1 - t0, 1e-9)
    return curve[-1][1] if curve and 0 <= t - curve[-1][0] < 0.03 * t else None


def minutes_to(curve, loss):
    """The first minute at which the val loss reaches `loss`, interpolated (None if it never does)."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= loss:
            return t0 + (t1 - t0) * (l0 - loss) / max(l0 - l1, 1e-9) if l0 > loss else t0
    return None


def time_to_loss_table(curves, minutes, losses):
    """The benchmark's printout: val loss at a quarter, half and all of the budget; minutes to each loss."""
    times = [minutes / 4, minutes / 2, minutes]
    fmt = lambda v, spec: "—" if v is None else format(v, spec)
    lines = [f"{'variant':24s}" + "".join(f"{f'loss @ {t:g} min':>16s}" for t in times)
             + "".join(f"{f'min to {x:g}':>12s}" for x in losses)]
    for name, curve in curves.items():
        lines.append(f"{name:24s}" + "".join(f"{fmt(loss_at(curve, t), '.3f'):>16s}" for t in times)
                     + "".join(f"{fmt(minutes_to(curve, x), '.2f'):>12s}" for x in losses))
    return "\n".join(lines)


def time_to_loss_main(args):
    from minigpt.plot import plot_curves
    unknown = [n for n in args.time_to_loss if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variant {unknown[0]!r}; pick from {', '.join(VARIANTS)}")
    out_root = os.path.join("runs", "time_to_loss")
    curves = time_to_loss(args.time_to_loss, args.minutes, out_root, args.seed, args.preset,
                          extra=["--device", args.device])
    print("\n" + time_to_loss_table(curves, args.minutes, args.losses))
    png = plot_curves(curves, os.path.join(out_root, "val_loss.png"), "minutes (wall clock)", "val loss (nats/char)",
                      f"pretraining, {args.minutes:g} minutes each, back to back")
    print(f"plot: {png}")
    return curves


def rate_row(name, label, rate, cfg, peak, base, note=""):
    """One printed row of the training table: tokens/s, achieved GFLOP/s, its share of the peak and the ratio to the
    first row of its group; returns (name, label, tokens/s, GFLOP/s, share of peak, ratio)."""
    gflops = rate * flops_per_token(cfg, cfg.block_size) / 1e9
    print(f"  {name} {label} {rate:9.0f} tok/s {gflops:8.1f} GFLOP/s {gflops / peak:5.0%} of peak  x{rate / base:.2f}"
          + note, flush=True)
    return name.strip(), label.strip(), rate, gflops, gflops / peak, rate / base


def optimizer_rows(cfg, steps, peak, device):
    """The pretraining default's path (hand-written attention, bfloat16 where there is one, compiled) with the
    previous default's optimizer and batch (AdamW, 8) and today's (Muon, 32): the optimizer's cost and the batch's."""
    cfg, dtype = GPTConfig(**{**cfg.__dict__, "use_sdpa": False}), autocast_dtype("auto", device)
    pk = peak["bfloat16" if dtype else "float32"]
    print("\nthe optimizer and the batch (cpu preset, the default path): tokens/s and share of the peak")
    rows, base = [], None
    for optimizer, batch in (("adamw", 8), ("muon", 8), ("adamw", 32), ("muon", 32)):
        rate, _ = train_rate(cfg, batch, steps, dtype, True, device=device, optimizer=optimizer)
        base = base or rate
        note = "  (the default)" if (optimizer, batch) == ("muon", 32) else ""
        rows.append(rate_row(f"{'cpu preset':36s}", f"{f'{optimizer}, batch {batch}':48s}", rate, cfg, pk, base, note))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny sizes: checks that every part runs")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows (they compile for a minute)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps; on a GPU the larger model is the gpu preset")
    p.add_argument("--time-to-loss", nargs="+", metavar="VARIANT",
                   help=f"train these pretraining variants back to back instead ({', '.join(VARIANTS)})")
    p.add_argument("--minutes", type=float, default=7.0, help="--time-to-loss: each variant's budget")
    p.add_argument("--preset", default="cpu", help="--time-to-loss: the preset the variants change")
    p.add_argument("--seed", type=int, default=1337, help="--time-to-loss: the seed of every variant")
    p.add_argument("--losses", type=float, nargs="+", default=[5.0, 4.8, 4.6, 4.5],
                   help="--time-to-loss: the val losses whose minutes are reported")
    p.add_argument("--profile", action="store_true", help="where one pretraining step's time goes, part by part")
    args = p.parse_args(argv)
    if args.time_to_loss:
        return time_to_loss_main(args)
    try:
        device = pick_device(args.device)
    except ValueError as e:
        p.error(str(e))
    if args.profile:
        return profile_main(args, device)
    tiny, gpu = args.tiny, device.startswith("cuda")
    where = torch.cuda.get_device_name(device) if gpu else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {where}; bfloat16 autocast here: "
          f"{'yes' if autocast_dtype('auto', device) else 'no (no bfloat16 instructions found)'}")
    n, seconds = (256, 0.2) if tiny else (8192 if gpu else 1024, 1.0)  # a GPU needs big matrices to reach its peak
    peak = {"float32": matmul_peak(torch.float32, device, n, seconds),
            "bfloat16": matmul_peak(torch.bfloat16, device, n, seconds)}
    print(f"matmul peak: float32 {peak['float32']:.1f} GFLOP/s, bfloat16 {peak['bfloat16']:.1f} GFLOP/s")

    models = [TINY] if tiny else [CPU_PRESET, GPU_PRESET if gpu else LARGER]
    steps = 2 if tiny else 50 if gpu else 12
    print("\ntraining: tokens/s, achieved GFLOP/s, and its share of the matmul peak in the same dtype "
          "(model FLOPs utilisation)")
    rows = []
    for name, cfg, batch in models:
        base = None
        for sdpa in (False, True):
            for dtype in (None, torch.bfloat16):
                for comp in ((False,) if args.no_compile or tiny else (False, True)):
                    c = GPTConfig(**{**cfg.__dict__, "use_sdpa": sdpa})
                    rate, t_comp = train_rate(c, batch, steps, dtype, comp, device=device)
                    base = base or rate
                    label = (f"{'sdpa' if sdpa else 'hand-written'} attention, "
                             f"{'bfloat16 autocast' if dtype else 'float32'}{', compiled' if comp else ''}")
                    pk = peak["bfloat16" if dtype else "float32"]
                    rows.append(rate_row(f"{name:36s}", f"{label:48s}", rate, c, pk, base,
                                         f"  (compile {t_comp:.0f} s)" if comp else ""))

    if not (tiny or args.no_compile):
        rows += optimizer_rows(models[0][1], steps, peak, device)

    # within the context only: past it the two paths keep different windows (the cache restarts from the last
    # half, recomputing slides by one), which would compare two algorithms rather than the cache alone
    gen_cfg = models[0][1]
    n_new = gen_cfg.block_size - 4
    print(f"\ngeneration: new tokens per second, {n_new} new tokens after a 4-token prompt (the whole context, "
          f"{gen_cfg.block_size}), median of 3 runs")
    for batch in (1, 32):  # three runs each, taken in turns so that both see the machine alike; the medians
        runs = [(generation_rate(gen_cfg, batch, n_new, True, device), generation_rate(gen_cfg, batch, n_new, False, device))
                for _ in range(3)]
        with_cache, without = (statistics.median(r) for r in zip(*runs))
        print(f"  batch {batch:2d}: KV cache {with_cache:8.0f} tok/s, recomputing {without:8.0f} tok/s, "
              f"x{with_cache / without:.1f}")

    pairs = 4 if tiny else 16
    print(f"\nDPO step ({models[0][0].split(' (')[0]}, {pairs} pairs that differ in one token + {pairs} real poems), "
          "median of 3 runs")
    runs = [(dpo_step_time(gen_cfg, pairs, steps, True, device), dpo_step_time(gen_cfg, pairs, steps, False, device))
            for _ in range(3)]
    one, both = (statistics.median(r) for r in zip(*runs))
    print(f"  one forward pass a pair {one * 1000:6.0f} ms, both sides {both * 1000:6.0f} ms, x{both / one:.2f}")

    n_titles = 4 if tiny else 200
    seconds, which = sft_metrics_time(n_titles, 16 if tiny else 256, device)
    print(f"\nSFT metrics on {n_titles} titles with {which}: {seconds:.1f} s")
    return rows


if __name__ == "__main__":
    main()

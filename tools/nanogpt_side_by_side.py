"""nanoGPT beside minigpt, back to back on this machine: nanoGPT's own model (its model.py, from a checkout you give)
trained with the recipe its README gives for a CPU (4 layers, 4 heads, width 128, context 64, batch 12, AdamW from
1e-3 to 1e-4 with beta2 0.99, 100 warmup steps, weight decay 0.1, gradient clip 1, no dropout, no compile), on
minigpt's corpus, tokenizer and wall-clock budget; then minigpt's default pretraining for the same minutes. Both val
losses are nats per character of the same val text: minigpt's 320 windows of 128 characters, which nanoGPT's
64-character context reads as two windows of 64 each (so its second halves see less context: that is its recipe).

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT    # once; nothing is downloaded here
    python tools/nanogpt_side_by_side.py --nanogpt /tmp/nanoGPT --minutes 14
    python tools/nanogpt_side_by_side.py --nanogpt /tmp/nanoGPT --throughput    # a minute: steps at the same shapes

nanoGPT's schedule counts steps; its step count is fitted to the budget from the speed of its first 50 steps.
--throughput times training steps instead, both models at minigpt's cpu preset shapes (4 x 128, context 128, batch
32, 9,017 characters) on random ids: nanoGPT's model as its CPU recipe runs it (float32, uncompiled, AdamW), nanoGPT's
model with minigpt's precision and compile (bfloat16 autocast where the CPU has it, the loss compiled), and minigpt's
default step (the same, with Muon), interleaved over rounds so that a machine's drift falls on every row alike.
"""
import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minigpt.bench import step_rate, train_rate  # noqa: E402
from minigpt.data import PretrainData, build_tokenizer, load_poems, split_poems  # noqa: E402
from minigpt.model import GPTConfig  # noqa: E402
from minigpt.train import autocast_dtype  # noqa: E402

RECIPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, lr=1e-3, min_lr=1e-4, warmup=100,
              betas=(0.9, 0.99), weight_decay=0.1, grad_clip=1.0, dropout=0.0)  # nanoGPT's README, "on a CPU"


def load_nanogpt(path):
    """nanoGPT's model.py as a module, from a checkout."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", os.path.join(path, "model.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["nanogpt_model"] = module  # torch.compile imports the module it traces
    spec.loader.exec_module(module)
    return module


def nanogpt_lr(it, max_iters):
    """nanoGPT's get_lr: linear warmup, then cosine from lr to min_lr at max_iters."""
    r = RECIPE
    if it < r["warmup"]:
        return r["lr"] * (it + 1) / (r["warmup"] + 1)
    ratio = min(1.0, (it - r["warmup"]) / max(1, max_iters - r["warmup"]))
    return r["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (r["lr"] - r["min_lr"])


@torch.no_grad()
def val_loss(model, val_batches, block):
    """Mean nats per character over minigpt's val windows, each cut into windows of `block` for this model."""
    model.eval()
    total, n = 0.0, 0
    for x, y in val_batches:
        for s in range(0, x.size(1), block):
            xs, ys = x[:, s:s + block].contiguous(), y[:, s:s + block].contiguous()
            _, loss = model(xs, ys)
            total, n = total + loss.item() * ys.numel(), n + ys.numel()
    model.train()
    return total / n


def train_nanogpt(module, data, vocab_size, minutes, val_batches, seed=1337):
    """nanoGPT's model and recipe for `minutes` of wall time; returns [(minutes, step, val loss)]."""
    r = RECIPE
    torch.manual_seed(seed)
    cfg = module.GPTConfig(block_size=r["block_size"], vocab_size=vocab_size, n_layer=r["n_layer"], n_head=r["n_head"],
                           n_embd=r["n_embd"], dropout=r["dropout"], bias=True)
    model = module.GPT(cfg)
    opt = model.configure_optimizers(r["weight_decay"], r["lr"], r["betas"], "cpu")
    gen = torch.Generator().manual_seed(seed)
    start, max_iters, curve, it = time.perf_counter(), None, [], 0
    while max_iters is None or it < max_iters:
        if it == 50:  # fit the step count to the budget, keeping 3% for the evals
            per_step = (time.perf_counter() - start) / 50
            max_iters = 50 + int((0.97 * minutes * 60 - (time.perf_counter() - start)) / per_step)
            print(f"nanoGPT: {per_step * 1e3:.0f} ms a step; {max_iters} steps in {minutes} minutes")
        for g in opt.param_groups:
            g["lr"] = nanogpt_lr(it, max_iters or 10 ** 9)
        x, y = data.get_batch(r["batch_size"], r["block_size"], gen)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r["grad_clip"])
        opt.step()
        it += 1
        if max_iters and (it % max(1, max_iters // 4) == 0 or it == max_iters):
            curve.append(((time.perf_counter() - start) / 60, it, val_loss(model, val_batches, r["block_size"])))
            print(f"nanoGPT: step {it}, {curve[-1][0]:.2f} min, val loss {curve[-1][2]:.3f}")
    return curve


def nanogpt_rate(module, shapes, vocab_size, batch_size, steps, dtype=None, compile=False):
    """Tokens per second of nanoGPT's model training at minigpt's shapes: its own optimizer and clip, random ids."""
    torch.manual_seed(0)
    cfg = module.GPTConfig(block_size=shapes["block_size"], vocab_size=vocab_size, n_layer=shapes["n_layer"],
                           n_head=shapes["n_head"], n_embd=shapes["n_embd"], dropout=0.0, bias=True)
    model = module.GPT(cfg).train()
    opt = model.configure_optimizers(RECIPE["weight_decay"], RECIPE["lr"], RECIPE["betas"], "cpu")
    x = torch.randint(vocab_size, (batch_size, shapes["block_size"]))
    return step_rate(model, opt, x, steps, dtype, compile, grad_clip=RECIPE["grad_clip"])[0]


def throughput(module, vocab_size, steps=30, rounds=3):
    """Training tokens per second at minigpt's cpu preset shapes, nanoGPT's model and minigpt's, median of rounds."""
    import train_pretrain
    ours = train_pretrain.PRESETS["cpu"]
    shapes, batch, dtype = ours["model"], ours["batch_size"], autocast_dtype("auto", "cpu")
    cfg = GPTConfig(vocab_size=vocab_size, **shapes)
    rows = {"nanoGPT's model, its CPU recipe (float32, uncompiled, AdamW)":
            lambda: nanogpt_rate(module, shapes, vocab_size, batch, steps),
            f"nanoGPT's model, {'bfloat16 autocast' if dtype else 'float32'}, loss compiled, AdamW":
            lambda: nanogpt_rate(module, shapes, vocab_size, batch, steps, dtype, compile=True),
            f"minigpt's default step ({'bfloat16 autocast' if dtype else 'float32'}, loss compiled, Muon)":
            lambda: train_rate(cfg, batch, steps, dtype, compile=True, optimizer=ours["optimizer"])[0]}
    rates = {name: [] for name in rows}
    for r in range(rounds):
        for name, run in rows.items():
            rates[name].append(run())
            print(f"round {r + 1}: {name}: {rates[name][-1]:,.0f} tokens/s", flush=True)
    base = statistics.median(next(iter(rates.values())))
    print(f"\n{shapes['n_layer']} x {shapes['n_embd']}, context {shapes['block_size']}, batch {batch}, vocab "
          f"{vocab_size}; {steps} steps a round, median of {rounds} rounds (range)")
    for name, xs in rates.items():
        m = statistics.median(xs)
        print(f"  {name:72s} {m:8,.0f} tokens/s ({min(xs):,.0f}-{max(xs):,.0f})  x{m / base:.2f}")
    return {name: statistics.median(xs) for name, xs in rates.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanogpt", required=True, help="a checkout of github.com/karpathy/nanoGPT (its model.py is read)")
    p.add_argument("--minutes", type=float, default=14.0, help="the wall-clock budget of each run")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--minigpt-out", default=os.path.join("runs", "side_by_side", "minigpt"),
                   help="where minigpt's run goes (runs/pretrain makes it the quick start's model)")
    p.add_argument("--throughput", action="store_true", help="time training steps at the same shapes instead")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.nanogpt, "model.py")):
        raise SystemExit(f"error: no model.py in {args.nanogpt}; clone https://github.com/karpathy/nanoGPT and pass its folder")
    if args.throughput:
        return throughput(load_nanogpt(args.nanogpt), build_tokenizer(split_poems(load_poems())["train"]).vocab_size)
    import train_pretrain
    splits = split_poems(load_poems())
    tokenizer = build_tokenizer(splits["train"])
    data = PretrainData(splits, tokenizer)
    ours = train_pretrain.PRESETS["cpu"]
    val_batches = data.val_batches(ours["eval_batches"], ours["batch_size"], ours["model"]["block_size"])
    nano = train_nanogpt(load_nanogpt(args.nanogpt), data, tokenizer.vocab_size, args.minutes, val_batches, args.seed)
    result = train_pretrain.main(["--max-minutes", str(args.minutes), "--seed", str(args.seed),
                                  "--out-dir", args.minigpt_out, "--overwrite"])
    print(f"\n{'':12}{'val loss':>10}{'steps':>8}")
    print(f"{'nanoGPT':12}{nano[-1][2]:>10.3f}{nano[-1][1]:>8}")
    print(f"{'minigpt':12}{result['val_loss']:>10.3f}{result['step']:>8}")
    print(f"difference: {nano[-1][2] - result['val_loss']:+.3f} nats per character (nanoGPT - minigpt)")
    os.makedirs(os.path.join("runs", "side_by_side"), exist_ok=True)
    with open(os.path.join("runs", "side_by_side", "result.json"), "w", encoding="utf-8") as f:
        json.dump({"nanogpt": nano, "minigpt": result, "minutes": args.minutes, "seed": args.seed}, f)


if __name__ == "__main__":
    main()

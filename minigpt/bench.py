"""Speed figures for this machine, printed (not a test): training throughput and achieved GFLOP/s against the
measured matrix-multiply peak (the model FLOPs utilisation), generation with and without the KV cache, and the
SFT metrics' cost.

    python -m minigpt.bench                  # a few minutes on 2 CPU cores
    python -m minigpt.bench --device cuda    # the same on a GPU, with the gpu preset as the larger model
    python -m minigpt.bench --tiny           # seconds: checks that it runs
"""
import argparse
import contextlib
import statistics
import time

import torch

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


def train_rate(cfg, batch_size, steps, dtype=None, compile=False, warmup=3, device="cpu"):
    """Tokens per second of full training steps (forward, backward, AdamW) on random ids."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device).train()
    opt = make_optimizer(model, TrainConfig())
    step_model = torch.compile(model) if compile else model
    x = torch.randint(cfg.vocab_size, (batch_size, cfg.block_size), device=device)
    amp = torch.autocast(device.split(":")[0], dtype=dtype) if dtype else contextlib.nullcontext()
    t_compile = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t_compile, t = time.perf_counter() - t_compile, time.perf_counter()
        with amp:
            _, loss = step_model(x, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return batch_size * cfg.block_size * steps / (time.perf_counter() - t), t_compile


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny sizes: checks that every part runs")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows (they compile for a minute)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps; on a GPU the larger model is the gpu preset")
    args = p.parse_args(argv)
    try:
        device = pick_device(args.device)
    except ValueError as e:
        p.error(str(e))
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
                    gflops = rate * flops_per_token(c, c.block_size) / 1e9
                    label = (f"{'sdpa' if sdpa else 'hand-written'} attention, "
                             f"{'bfloat16 autocast' if dtype else 'float32'}{', compiled' if comp else ''}")
                    pk = peak["bfloat16" if dtype else "float32"]
                    rows.append((name, label, rate, gflops, gflops / pk, rate / base))
                    print(f"  {name:36s} {label:48s} {rate:9.0f} tok/s {gflops:8.1f} GFLOP/s {gflops / pk:5.0%} of peak"
                          f"  x{rate / base:.2f}" + (f"  (compile {t_comp:.0f} s)" if comp else ""), flush=True)

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

    n_titles = 4 if tiny else 200
    seconds, which = sft_metrics_time(n_titles, 16 if tiny else 256, device)
    print(f"\nSFT metrics on {n_titles} titles with {which}: {seconds:.1f} s")
    return rows


if __name__ == "__main__":
    main()

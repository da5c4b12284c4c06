"""Speed figures for this machine, printed (not a test): training throughput and achieved GFLOP/s against the
measured matrix-multiply peak, generation with and without the KV cache, and the SFT metrics' cost.

    python -m minigpt.bench            # a few minutes on 2 CPU cores
    python -m minigpt.bench --tiny     # seconds: checks that it runs
"""
import argparse
import contextlib
import time

import torch

from minigpt.model import GPT, GPTConfig
from minigpt.train import TrainConfig, autocast_dtype, make_optimizer


def matmul_peak(dtype, n=1024, seconds=1.0):
    """GFLOP/s of a square matmul in dtype: the ceiling the model's own GFLOP/s is compared with."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm up
    reps, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ b
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def flops_per_token(cfg, T):
    """Training FLOPs per token: 6 per parameter (forward + backward) plus the attention maps (nanoGPT's estimate)."""
    n = 12 * cfg.n_layer * cfg.n_embd ** 2 + cfg.vocab_size * cfg.n_embd
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * T


def train_rate(cfg, batch_size, steps, dtype=None, compile=False, warmup=3):
    """Tokens per second of full training steps (forward, backward, AdamW) on random ids."""
    torch.manual_seed(0)
    model = GPT(cfg).train()
    opt = make_optimizer(model, TrainConfig())
    step_model = torch.compile(model) if compile else model
    x = torch.randint(cfg.vocab_size, (batch_size, cfg.block_size))
    amp = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
    t_compile = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            t_compile, t = time.perf_counter() - t_compile, time.perf_counter()
        with amp:
            _, loss = step_model(x, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch_size * cfg.block_size * steps / (time.perf_counter() - t), t_compile


def generation_rate(cfg, batch_size, new_tokens, use_cache):
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    prompts = [[7, 8, 9, 10]] * batch_size
    t = time.perf_counter()
    model.generate(prompts, new_tokens, temperature=1.0, use_cache=use_cache, generator=torch.Generator().manual_seed(0))
    return batch_size * new_tokens / (time.perf_counter() - t)


def sft_metrics_time(n_titles, max_new_tokens):
    """Seconds to measure the SFT metrics on n titles, with runs/sft when it exists (else a random model, the worst case)."""
    from minigpt.checkpoint import CheckpointError, load_checkpoint
    from minigpt.data import load_poems, split_poems
    from minigpt.evaluate import eval_titles, measure
    splits = split_poems(load_poems())
    try:
        model, tok, _ = load_checkpoint("runs/sft")
        which = "runs/sft"
    except CheckpointError:
        from minigpt.data import build_tokenizer
        tok = build_tokenizer(splits["train"])
        model, which = GPT(GPTConfig(vocab_size=tok.vocab_size, n_embd=128)), "an untrained model (never stops)"
    titles = eval_titles(splits["test"], n_titles)
    t = time.perf_counter()
    measure(model, tok, titles, max_new_tokens=max_new_tokens)
    return time.perf_counter() - t, which


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny sizes: checks that every part runs")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows (they compile for a minute)")
    args = p.parse_args(argv)
    tiny = args.tiny
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; bfloat16 autocast here: "
          f"{'yes' if autocast_dtype('auto', 'cpu') else 'no (no bfloat16 instructions found)'}")
    peak = {"float32": matmul_peak(torch.float32, 256 if tiny else 1024, 0.2 if tiny else 1.0),
            "bfloat16": matmul_peak(torch.bfloat16, 256 if tiny else 1024, 0.2 if tiny else 1.0)}
    print(f"matmul peak: float32 {peak['float32']:.1f} GFLOP/s, bfloat16 {peak['bfloat16']:.1f} GFLOP/s")

    vocab = 9413
    models = [("cpu preset (4x128, T=128, batch 8)", GPTConfig(vocab_size=vocab, block_size=128, n_layer=4, n_head=4, n_embd=128), 8),
              ("larger (6x256, T=128, batch 16)", GPTConfig(vocab_size=vocab, block_size=128, n_layer=6, n_head=8, n_embd=256), 16)]
    if tiny:
        models = [("tiny (2x32, T=32, batch 4)", GPTConfig(vocab_size=500, block_size=32, n_layer=2, n_head=2, n_embd=32), 4)]
    steps = 2 if tiny else 12
    print("\ntraining: tokens/s, achieved GFLOP/s and share of the matmul peak in the same dtype")
    rows = []
    for name, cfg, batch in models:
        base = None
        for sdpa in (False, True):
            for dtype in (None, torch.bfloat16):
                for comp in ((False,) if args.no_compile or tiny else (False, True)):
                    c = GPTConfig(**{**cfg.__dict__, "use_sdpa": sdpa})
                    rate, t_comp = train_rate(c, batch, steps, dtype, comp)
                    base = base or rate
                    gflops = rate * flops_per_token(c, c.block_size) / 1e9
                    label = f"{'sdpa' if sdpa else 'hand-written'} attention, {'bfloat16 autocast' if dtype else 'float32'}" + (", compiled" if comp else "")
                    pk = peak["bfloat16" if dtype else "float32"]
                    rows.append((name, label, rate, gflops, gflops / pk, rate / base))
                    print(f"  {name:36s} {label:48s} {rate:9.0f} tok/s {gflops:7.1f} GFLOP/s {gflops / pk:5.0%} of peak"
                          f"  x{rate / base:.2f}" + (f"  (compile {t_comp:.0f} s)" if comp else ""), flush=True)

    print("\ngeneration: new tokens per second, 256 new tokens after a 4-token prompt")
    gen_cfg = models[0][1]
    n_new = 16 if tiny else 256
    for batch in (1, 32):
        with_cache = generation_rate(gen_cfg, batch, n_new, True)
        without = generation_rate(gen_cfg, batch, n_new, False)
        print(f"  batch {batch:2d}: KV cache {with_cache:8.0f} tok/s, recomputing {without:8.0f} tok/s, x{with_cache / without:.1f}")

    n_titles = 4 if tiny else 200
    seconds, which = sft_metrics_time(n_titles, 16 if tiny else 256)
    print(f"\nSFT metrics on {n_titles} titles with {which}: {seconds:.1f} s")
    return rows


if __name__ == "__main__":
    main()

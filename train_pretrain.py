"""Stage 1: pretrain the GPT on Tang poems written one after another.

    python train_pretrain.py                  # the laptop preset, 14 minutes on 2 CPU cores
    python train_pretrain.py --preset class   # 5 minutes, for a lesson: then python train_sft.py --preset class
    python train_pretrain.py --preset tiny    # seconds: a smoke test

Every few hundred steps it prints what the model writes after a few titles: it never stops on its own.
"""
import json
import os
from dataclasses import asdict, dataclass

import torch

from minigpt import cli
from minigpt.checkpoint import CheckpointError
from minigpt.data import DEFAULT_CORPUS, PretrainData, build_tokenizer, load_poems, split_poems
from minigpt.generate import Sampling, write
from minigpt.model import GPT, GPTConfig
from minigpt.plot import plot_losses
from minigpt.train import TrainConfig, train

PROMPTS = ["春夜喜雨\n", "靜夜思\n", "登高\n", "送友人\n"]  # titles, in the pretraining format: a title and a newline

@dataclass
class PretrainSettings:
    """What pretraining adds to the model and training settings; kept whole in the checkpoint."""
    sample_chars: int = 120  # characters written after each sampling prompt

    def __post_init__(self):
        if self.sample_chars <= 0:
            raise ValueError(f"--sample-chars must be positive, got {self.sample_chars}")


PRESETS = {
    "tiny": dict(model=dict(n_layer=2, n_head=2, n_embd=32, block_size=64, dropout=0.0),
                 batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=5, max_steps=20, eval_every=10,
                 sample_every=10, eval_batches=2, log_every=5, sample_chars=24, dtype="float32"),
    # bfloat16 autocast where the CPU has it, compiled, hand-written attention: the fastest here (python -m minigpt.bench);
    # Muon for the blocks' matrices at batch 32: the same val loss in half the minutes of AdamW at batch 8 (docs/log.md)
    "cpu": dict(model=dict(n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.0, use_sdpa=False),
                batch_size=32, optimizer="muon", lr=3e-3, min_lr=3e-4, warmup_steps=100, max_steps=1000000,
                max_minutes=14.0, eval_every=375, sample_every=1125, eval_batches=10, log_every=10, sample_chars=120,
                compile=True),
    # the cpu preset in 5 minutes, so that both stages fit a lesson (the val loss it reaches: README)
    "class": dict(model=dict(n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.0, use_sdpa=False),
                  batch_size=32, optimizer="muon", lr=3e-3, min_lr=3e-4, warmup_steps=100, max_steps=1000000,
                  max_minutes=5.0, eval_every=250, sample_every=500, eval_batches=10, log_every=10, sample_chars=120,
                  compile=True),
    "gpu": dict(model=dict(n_layer=8, n_head=8, n_embd=512, block_size=256, dropout=0.1),
                batch_size=64, lr=6e-4, min_lr=6e-5, warmup_steps=200, max_steps=20000, max_minutes=15.0,
                eval_every=500, sample_every=1000, eval_batches=40, log_every=50, sample_chars=200, compile=True),
}


def main(argv=None):
    parser = cli.make_parser(__doc__, PRESETS, os.path.join("runs", "pretrain"))
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help="poems, one JSON object a line (.jsonl or .jsonl.gz)")
    parser.add_argument("--sample-chars", type=int, help="characters to write after each sampling prompt")
    args = parser.parse_args(argv)
    model_kw, cfg, device, extra = cli.resolve(args, PRESETS)
    settings = cli.stage_settings(PretrainSettings, args, extra)
    resumed = cli.resume_point(args)

    splits = split_poems(load_poems(args.corpus))
    tokenizer = build_tokenizer(splits["train"])
    if resumed:  # the run goes on with its own settings
        model, saved_tokenizer, ckpt = resumed
        if saved_tokenizer.itos != tokenizer.itos:
            raise CheckpointError(f"{args.out_dir} was trained on another corpus than {args.corpus}; pass that one with --corpus")
        cfg, model_cfg = TrainConfig(**ckpt["train_config"]), model.config
        settings = cli.resumed_settings(PretrainSettings, ckpt, args.out_dir)
        print(f"resuming {args.out_dir} at step {ckpt['step']}")
    else:
        model_cfg = cli.model_config(GPTConfig, vocab_size=tokenizer.vocab_size, **model_kw)
        torch.manual_seed(cfg.seed)  # the same seed, the same initial weights
        model = GPT(model_cfg)
    data = PretrainData(splits, tokenizer)
    print(f"corpus: {', '.join(f'{k} {len(v)} poems' for k, v in splits.items())}; train {len(data.train):,} characters")
    print(f"model: {model.num_params():,} parameters, vocab {tokenizer.vocab_size}, device {device}; writing to {args.out_dir}")

    def sample(m, step):
        texts = [a.text for a in write(m, tokenizer, PROMPTS, settings.sample_chars, stop=None,
                                       sampling=Sampling(seed=cfg.seed))]
        return {"samples": [{"prompt": p, "text": t, "shown": p + t} for p, t in zip(PROMPTS, texts)]}

    extra_ckpt = {"stage": "pretrain", "model_config": model_cfg.__dict__.copy(), "tokenizer": tokenizer.to_list(),
                  "settings": asdict(settings)}
    result = train(model, cfg, lambda g: data.get_batch(cfg.batch_size, model_cfg.block_size, g),
                   data.val_batches(cfg.eval_batches, cfg.batch_size, model_cfg.block_size),
                   args.out_dir, extra_ckpt, sample=sample, on_event=cli.print_event, device=device,
                   resume_from=resumed[2] if resumed else None)
    if not cli.is_lead():
        return result
    plot_losses(os.path.join(args.out_dir, "log.jsonl"), os.path.join(args.out_dir, "loss.png"), title="pretrain: loss")
    print(f"done: step {result['step']}, val loss {result['val_loss']:.3f}, {result['elapsed_s']:.0f} s; "
          f"checkpoint {os.path.join(args.out_dir, 'ckpt.pt')}, plot {os.path.join(args.out_dir, 'loss.png')}")
    with open(os.path.join(args.out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({**result, "params": model.num_params()}, f)
    return result


if __name__ == "__main__":
    cli.run(main, None, "train_pretrain.py")

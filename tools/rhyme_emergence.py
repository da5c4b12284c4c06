"""When does the skill to rhyme arrive in pretraining, and how surely? Trains a preset's model for a fixed number of
steps (steps, not minutes, so that runs on any machine compare) once per seed, and reads the rhyme probe
(tools/rhyme_probe.py) every few hundred steps: the loss where a later line ending is guessed.

    python tools/rhyme_emergence.py --seeds 1 2 3                        # windows from titles, as train_pretrain.py
    python tools/rhyme_emergence.py --seeds 1 2 3 --windows anywhere     # windows from any character
    python tools/rhyme_emergence.py --seeds 1 2 3 --lr 6e-3              # another AdamW learning rate

The cpu preset makes about 2,500 steps in its 14 minutes on a 2-core laptop; a run of 2,500 steps takes about three
minutes on one GPU, and several seeds can run side by side as separate commands. A run "rhymes" when its later endings
cost at least 1 nat less than its first ending (which nothing before it decides); docs/pretrain.md shows both kinds.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]

import train_pretrain  # noqa: E402
from minigpt.data import DEFAULT_CORPUS, CorpusError, PretrainData, build_tokenizer, load_poems, split_poems  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402
from minigpt.train import TrainConfig, pick_device, train  # noqa: E402
from minigpt.verse import is_regular  # noqa: E402
from rhyme_probe import ending_losses  # noqa: E402

RHYMES_BY = 1.0  # nats the later endings must cost less than the first ending


class WindowsAnywhere(PretrainData):
    """Training windows that start at any character, mid-poem included (val windows still start at titles)."""

    def get_batch(self, batch_size, block_size, generator=None):
        starts = torch.randint(len(self.train) - block_size - 1, (batch_size,), generator=generator)
        return self._windows(self.train, starts, block_size)


def emergence(data, tokenizer, poems, model_kw, cfg, device):
    """One run: [{'step', 'first ending', 'later endings', 'other characters'}] every cfg.eval_every steps, and the
    final val loss."""
    probes = []

    def metrics(model, step):
        probes.append({"step": step, **ending_losses(model, tokenizer, poems)})
        return {"later_endings": probes[-1]["later endings"]}

    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, **model_kw))
    T = model_kw["block_size"]
    with tempfile.TemporaryDirectory() as out_dir:
        result = train(model, cfg, lambda g: data.get_batch(cfg.batch_size, T, g),
                       data.val_batches(cfg.eval_batches, cfg.batch_size, T), out_dir, {"stage": "pretrain"},
                       metrics=metrics, device=device)
    return probes, result["val_loss"]


def rhymes(probe):
    return probe["later endings"] <= probe["first ending"] - RHYMES_BY


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(train_pretrain.PRESETS), default="cpu", help="train_pretrain.py's preset")
    p.add_argument("--seeds", type=int, nargs="+", default=[1337], help="one run per seed")
    p.add_argument("--steps", type=int, default=2500, help="training steps of each run")
    p.add_argument("--every", type=int, default=250, help="steps between probes")
    p.add_argument("--windows", choices=("titles", "anywhere"), default="titles", help="where training windows start")
    p.add_argument("--lr", type=float, help="AdamW's learning rate (embeddings, head, gains)")
    p.add_argument("--muon-lr", type=float, help="Muon's learning rate (the blocks' matrices)")
    p.add_argument("--min-lr", type=float, help="AdamW's learning rate at the end of the cosine (--lr: no decay)")
    p.add_argument("--batch-size", type=int, help="windows per step")
    p.add_argument("--poems", type=int, default=200, help="regular val poems the probe reads")
    p.add_argument("--corpus", default=DEFAULT_CORPUS)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    for name in ("steps", "every", "poems"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    preset = dict(train_pretrain.PRESETS[args.preset])
    model_kw = preset.pop("model")
    preset.pop("sample_chars", None)
    given = {k: getattr(args, k) for k in ("lr", "muon_lr", "min_lr", "batch_size") if getattr(args, k) is not None}
    if "lr" in given and "min_lr" not in given:
        given["min_lr"] = min(preset.get("min_lr", 0.0), given["lr"])
    try:
        device = pick_device(args.device)
        TrainConfig(**{**preset, **given})
    except ValueError as e:
        p.error(str(e))
    try:
        splits = split_poems(load_poems(args.corpus))
    except CorpusError as e:
        p.error(str(e))
    tokenizer = build_tokenizer(splits["train"])
    data = (WindowsAnywhere if args.windows == "anywhere" else PretrainData)(splits, tokenizer)
    poems = [q for q in splits["val"] if is_regular(q.body)][:args.poems]
    print(f"{args.preset} preset, {args.steps} steps, windows from {args.windows}, {device}; later-ending loss (nats) "
          f"on {len(poems)} regular val poems every {args.every} steps")
    runs = {}
    for seed in args.seeds:
        cfg = TrainConfig(**{**preset, **given, "max_minutes": 0.0, "max_steps": args.steps, "eval_every": args.every,
                             "sample_every": 10 ** 9, "seed": seed, "compile": False})
        t = time.time()
        probes, val_loss = emergence(data, tokenizer, poems, model_kw, cfg, device)
        runs[seed] = probes
        last = probes[-1]
        print(f"  seed {seed}: " + " ".join(f"{q['later endings']:.2f}" for q in probes) +
              f" | first ending {last['first ending']:.2f}, val loss {val_loss:.3f}, "
              f"{'rhymes' if rhymes(last) else 'does not rhyme'} ({time.time() - t:.0f} s)")
    print(f"{sum(rhymes(q[-1]) for q in runs.values())} of {len(runs)} runs rhyme at step {args.steps} "
          f"(later endings at least {RHYMES_BY:g} nat below the first)")
    return runs


if __name__ == "__main__":
    main()

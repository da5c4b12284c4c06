"""Where a pretrained model that rhymes differs from one that does not: its loss (nats) at the line endings that must
rhyme (each couplet's last character from the second couplet on), at the first couplet's ending (free: it sets the
rhyme), and at every other character of regular val poems, read in the pretraining format.

    python tools/rhyme_probe.py runs/pretrain runs/pretrain_run2

A model that has learnt to rhyme is far less surprised at the later endings than at the first one, and no better
elsewhere; the val loss hides this in its average (the endings are about one character in twenty).
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minigpt.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from minigpt.data import DEFAULT_CORPUS, PLAIN, load_poems, split_poems  # noqa: E402
from minigpt.loss_eval import evaluating  # noqa: E402
from minigpt.verse import ending_places, is_regular  # noqa: E402


@torch.no_grad()
def ending_losses(model, tokenizer, poems):
    """{'first ending', 'later endings', 'other characters'}: the mean loss of the model's next-character guesses there,
    over the poems' bodies (title and format as in pretraining; a poem past the context is cut)."""
    parts = {"first ending": [], "later endings": [], "other characters": []}
    with evaluating(model):
        for p in poems:
            prompt, body = tokenizer.encode(PLAIN.prompt(p.title), unknown="unk"), tokenizer.encode(p.body, unknown="unk")
            ids = (prompt + body)[:model.config.block_size + 1]
            logits, _ = model(torch.tensor([ids[:-1]], device=model.device))
            nll = F.cross_entropy(logits[0].float(), torch.tensor(ids[1:], device=model.device), reduction="none").tolist()
            ends = [len(prompt) + i - 1 for i in ending_places([tokenizer.itos[i] for i in body])]  # guessing each one
            for j in range(len(prompt) - 1, len(nll)):
                key = "first ending" if ends and j == ends[0] else "later endings" if j in ends else "other characters"
                parts[key].append(nll[j])
    return {k: sum(v) / len(v) if v else float("nan") for k, v in parts.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (or checkpoints) of train_pretrain.py")
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help="the corpus the models were trained on")
    p.add_argument("--poems", type=int, default=600, help="regular val poems to read")
    args = p.parse_args(argv)
    if args.poems <= 0:
        p.error(f"--poems must be positive, got {args.poems}")
    poems = [q for q in split_poems(load_poems(args.corpus))["val"] if is_regular(q.body)][:args.poems]
    out = {}
    print(f"mean loss (nats) on {len(poems)} regular val poems: at the first couplet's ending, at the later ones "
          "(which rhyme with it), at every other character")
    for run in args.runs:
        try:
            model, tokenizer, _ = load_checkpoint(run, made_by="python train_pretrain.py")
        except CheckpointError as e:
            raise SystemExit(f"error: {e}") from None
        out[run] = losses = ending_losses(model, tokenizer, poems)
        print(f"  {run:32s} " + "   ".join(f"{k} {v:.3f}" for k, v in losses.items()))
    return out


if __name__ == "__main__":
    main()

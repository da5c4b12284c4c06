"""Preference tuning by DPO (Direct Preference Optimization): the loss first, then what it is measured by.

A pair is (prompt, chosen, rejected) for the same prompt (minigpt.pairs makes them from the model's own answers).
DPO raises the chosen answer's log-probability against the rejected one's, each measured relative to a frozen copy of
the fine-tuned (SFT) model, the reference:

    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

where log pi(answer) is the sum of the answer tokens' log-probabilities given the prompt (the prompt is masked
as in SFT). When the policy is the reference the bracket is 0 and the loss is log 2.

    python -m minigpt.dpo runs/dpo      # where a finished run's margins come from
"""
import collections
import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from minigpt.data import TITLE_TO_POEM, render, sft_batch
from minigpt.loss_eval import evaluating
from minigpt.model import IGNORE_INDEX

# ---- the loss ----


def token_logprobs(model, x, y):
    """(B, T) log p(target) at each position; 0 where the target does not count (y == IGNORE_INDEX)."""
    logits, _ = model(x)  # (B, T, V)
    return target_logprobs(logits, y)


def target_logprobs(logits, y):
    """(B, T) log p(target) under logits (B, T, V) at each position; 0 where the target does not count (computed at the
    counted positions alone: a log-softmax over the vocabulary is the costly part)."""
    counted = y != IGNORE_INDEX
    logp = -F.cross_entropy(logits[counted].float(), y[counted], reduction="none")
    return torch.zeros(y.shape, dtype=logp.dtype, device=logp.device).masked_scatter(counted, logp)


def sequence_logprobs(model, x, y):
    """(B,) the sum over each row of log p(target) where the target counts: log p(answer | prompt)."""
    return token_logprobs(model, x, y).sum(dim=1)


def implicit_rewards(logp, ref_c, ref_r, beta):
    """(reward of chosen, reward of rejected), each beta * (log pi - log ref) per pair; logp (2B,): the policy's
    log-probabilities of the B chosen answers, then of the B rejected ones."""
    n = ref_c.size(0)
    return beta * (logp[:n] - ref_c), beta * (logp[n:2 * n] - ref_r)


class PairBatch(NamedTuple):
    """B pairs as tensors: each side's inputs and targets (B, T) (targets only on the answer and its end marker), the
    reference's log-probabilities (B,), whether the two sides share their inputs (shared: see pair_batch), and
    optionally real training poems (x, y) for the SFT term."""
    chosen_x: torch.Tensor
    chosen_y: torch.Tensor
    rejected_x: torch.Tensor
    rejected_y: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    shared: bool = False
    real_x: torch.Tensor = None
    real_y: torch.Tensor = None


def pair_token_logprobs(model, batch, extra=(), device=None):
    """(2B, T) per-token log-probabilities of a PairBatch's chosen rows, then its rejected rows (0 where the target
    does not count), and [(rows, T)] of each extra (x, y), from one forward pass on device (the batch's). A shared batch
    runs its chosen rows alone: there the rejected rows' counted targets see the very inputs the chosen rows hold, so
    the same logits score both sides (half the work for pairs that differ in one token)."""
    sides = [(batch.chosen_x, batch.chosen_y)] + [(batch.rejected_x, batch.rejected_y)] * (not batch.shared) + list(extra)
    T = max(x.size(1) for x, _ in sides)
    device = device or batch.chosen_x.device
    logits, _ = model(torch.cat([F.pad(x, (0, T - x.size(1))) for x, _ in sides]).to(device))  # padded on the right
    n = batch.chosen_x.size(0)
    y = lambda t: F.pad(t, (0, T - t.size(1)), value=IGNORE_INDEX).to(device)
    pairs = torch.cat([target_logprobs(logits[:n], y(batch.chosen_y)),
                       target_logprobs(logits[:n] if batch.shared else logits[n:2 * n], y(batch.rejected_y))])
    rest, start = [], n * (1 if batch.shared else 2)
    for ex, ey in extra:
        rest.append(target_logprobs(logits[start:start + ex.size(0)], y(ey)))
        start += ex.size(0)
    return pairs, rest


def dpo_loss(model, batch, beta=0.1, sft_weight=0.0):
    """The DPO loss averaged over the pairs of a PairBatch; with sft_weight, plus that times the SFT loss (nats per
    token) on the batch's real training poems, which holds the model to the poems it was tuned on. One forward pass
    for all rows. Returns (mean, number of pairs), as the training loop asks."""
    real = [(batch.real_x, batch.real_y)] if batch.real_x is not None and sft_weight else []
    per_token, rest = pair_token_logprobs(model, batch, real)  # (2B, T)
    n = batch.chosen_x.size(0)
    chosen, rejected = implicit_rewards(per_token.sum(dim=1), batch.ref_chosen, batch.ref_rejected, beta)
    loss = -F.logsigmoid(chosen - rejected).mean()
    if real:
        loss = loss + sft_weight * -rest[0].sum() / (batch.real_y != IGNORE_INDEX).sum()
    return loss, torch.tensor(n)


def pair_batch(pairs, tokenizer, fmt=TITLE_TO_POEM):
    """A PairBatch of pairs: both sides padded to one length, targets only on the answer and its end marker, where it
    wrote one (the prompt masked as in SFT), or on the answer's first p.upto tokens; cut after the last target that
    counts. shared when in every pair both sides hold the same inputs up to their last counted target (a pair that
    differs in one token and counts up to it): no counted target then sees where they differ."""
    rendered = [render(tokenizer, p.prompt, p.chosen + fmt.end) for p in pairs] + \
               [render(tokenizer, p.prompt, p.rejected + fmt.end * p.rejected_stopped) for p in pairs]
    x, y = sft_batch(rendered, tokenizer.pad_id)
    n = len(pairs)
    for b, p in enumerate(pairs + pairs):  # a pair that counts only up to its change: nothing after it is a target
        if p.upto:
            y[b, (y[b] != IGNORE_INDEX).nonzero()[p.upto:, 0]] = IGNORE_INDEX
    counted = y != IGNORE_INDEX
    last = counted.any(0).nonzero().max().item() + 1 if counted.any() else 1
    x, y, counted = x[:, :last], y[:, :last], counted[:, :last]
    seen = (counted[:n] | counted[n:]).flip(1).cummax(1).values.flip(1)  # (n, T) inputs a counted target sees
    shared = bool(((x[:n] == x[n:]) | ~seen).all())
    refs = torch.tensor([[p.ref_chosen, p.ref_rejected] for p in pairs], dtype=torch.float32)
    return PairBatch(x[:n], y[:n], x[n:], y[n:], refs[:, 0], refs[:, 1], shared)


@torch.no_grad()
def fill_reference(reference, pairs, tokenizer, fmt=TITLE_TO_POEM, batch_size=64, autocast=contextlib.nullcontext):
    """Write the reference model's log-probabilities into the pairs (once: the reference never changes), in eval mode
    (no dropout) and in the precision autocast gives, the training steps'."""
    with evaluating(reference):
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            with autocast():
                logp = pair_token_logprobs(reference, pair_batch(chunk, tokenizer, fmt), device=reference.device)[0].sum(1)
            logp = logp.float().cpu()
            for p, c, r in zip(chunk, logp[:len(chunk)].tolist(), logp[len(chunk):].tolist()):
                p.ref_chosen, p.ref_rejected = c, r
    return pairs


@torch.no_grad()
def preference_metrics(model, batches, beta):
    """On held-out pairs: the DPO loss, the preference accuracy (chosen's implicit reward above rejected's; a tie
    counts half, so the reference itself scores 50%, chance) and the mean reward margin."""
    losses, right, margins = [], 0, []
    with evaluating(model):
        for batch in batches:
            logp = pair_token_logprobs(model, batch, device=model.device)[0].sum(dim=1)  # (2B,)
            chosen, rejected = implicit_rewards(logp, batch.ref_chosen.to(model.device),
                                                batch.ref_rejected.to(model.device), beta)
            margin = chosen - rejected
            losses.append(-F.logsigmoid(margin))
            right += float(_right(margin).sum())
            margins.append(margin)
    margin = torch.cat(margins)
    return {"pref_loss": torch.cat(losses).mean().item(), "pref_accuracy": right / margin.numel(),
            "reward_margin": margin.mean().item()}


# ---- where a margin comes from: what the preference reads, or the pairs remembered ----

TRAIN_PAIRS_CHECKED = 400  # the training pairs whose margins are split (the first ones): enough for a share


@torch.no_grad()
def margin_parts(model, reference, pairs, tokenizer, yard, prefer, fmt=TITLE_TO_POEM, batch_size=64):
    """[(at the places the preference reads, everywhere else)] per pair: the log-ratio log pi - log ref of the chosen
    answer minus the rejected one's, split by where the tokens are (the two parts add up to the margin over beta). A
    preference that was learnt shows at those places (a rhyme's line endings) on pairs never trained on; a margin made
    elsewhere on the training pairs alone is the chosen answers remembered."""
    out = []
    with evaluating(model), evaluating(reference):
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            batch = pair_batch(chunk, tokenizer, fmt)
            ratio = (pair_token_logprobs(model, batch, device=model.device)[0]
                     - pair_token_logprobs(reference, batch, device=model.device)[0]).cpu()  # (2B, T), 0 off the answer
            y = torch.cat([batch.chosen_y, batch.rejected_y])
            sides = [(p.chosen, p) for p in chunk] + [(p.rejected, p) for p in chunk]
            parts = [_split(row[target != IGNORE_INDEX], answer, p.title, tokenizer, yard, prefer)
                     for row, (answer, p), target in zip(ratio, sides, y.cpu())]
            n = len(chunk)
            out += [(c[0] - r[0], c[1] - r[1]) for c, r in zip(parts[:n], parts[n:])]
    return out


def _split(on_answer, answer, title, tokenizer, yard, prefer):
    """(the log-ratio at the places the preference reads, the rest); on_answer: per answer token, then the end marker."""
    tokens = [tokenizer.itos[i] for i in tokenizer.encode(answer, unknown="unk")]
    at = torch.zeros(len(on_answer), dtype=torch.bool)
    at[[i for i in prefer.places(tokens, title, yard) if i < len(on_answer)]] = True  # the counted ones
    # each part summed on its own: tokens the two sides share then add up to the same value on both, to the last bit
    return on_answer[at].sum().item(), on_answer[~at].sum().item()


def margin_shares(parts):
    """The share of pairs whose margin is above 0: in all, at the preference's places alone, elsewhere alone (ties
    count half, as in preference_metrics)."""
    right = lambda values: sum(map(_right, values)) / len(values)
    return {"all": right([e + r for e, r in parts]), "at": right([e for e, _ in parts]),
            "elsewhere": right([r for _, r in parts])}


def _right(margin):
    """1 where a margin is above 0, 0.5 at a tie, else 0: how preference_metrics counts a pair."""
    return (margin > 0) + 0.5 * (margin == 0)


def standard_error(right, groups):
    """The standard error of the share mean(right), counted by group: pairs of one group (one prompt's answer, whose
    endings give several pairs) are not independent, so the sum of a group's deviations is squared, not each pair's.
    right: per pair, 1, 0 or 0.5 (a tie); groups: per pair, its prompt."""
    share = sum(right) / len(right)
    by_group = collections.defaultdict(float)
    for r, g in zip(right, groups):
        by_group[g] += r - share
    return math.sqrt(sum(d * d for d in by_group.values())) / len(right)


def main(argv=None):
    """python -m minigpt.dpo runs/dpo: where a finished run's margins come from, on its held-out and training pairs."""
    import argparse
    import os
    import sys

    from minigpt.checkpoint import CheckpointError, load_checkpoint, settings_of
    from minigpt.metrics import PREFERENCES
    from minigpt.pairs import load_pairs
    from minigpt.tasks import CHAT
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("run", help="a train_dpo.py run folder (its ckpt.pt, pairs.json and val_pairs.json)")
    p.add_argument("--train-pairs", type=int, default=TRAIN_PAIRS_CHECKED,
                   help="training pairs to look at (the first ones)")
    p.add_argument("--held-out-from", help="another run folder whose held-out pairs to read (one made from the same "
                   "start, e.g. with more val prompts)")
    args = p.parse_args(argv)
    if args.train_pairs <= 0:
        p.error(f"--train-pairs must be positive, got {args.train_pairs}")
    try:
        if not os.path.isdir(args.run):
            raise CheckpointError(f"{args.run} is not a run folder; pass the --out-dir of python train_dpo.py")
        model, tokenizer, ckpt = load_checkpoint(args.run, made_by="python train_dpo.py")
        if ckpt.get("stage") != "dpo":
            raise CheckpointError(f"{args.run} is a {ckpt.get('stage', 'pretraining')} run, not a DPO one; pass the "
                                  "--out-dir of python train_dpo.py")
        settings = settings_of(ckpt)
        reference, _, _ = load_checkpoint(settings["init_from"], made_by="python train_sft.py")
        held_path = os.path.join(args.held_out_from or args.run, "val_pairs.json")
        if not os.path.exists(held_path):
            raise CheckpointError(f"no held-out pairs at {held_path}; --held-out-from takes the --out-dir of a "
                                  "python train_dpo.py run")
        held, _ = load_pairs(held_path)
        train, _ = load_pairs(os.path.join(args.run, "pairs.json"))
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    fmt = CHAT if settings.get("format") == "chat" else TITLE_TO_POEM
    prefer = PREFERENCES[settings.get("prefer", "rhyme")]
    print(f"{args.run} against its reference {settings['init_from']}: share of pairs whose chosen answer gained more "
          "log-ratio than the rejected one")
    out = {}
    for name, pairs in (("held-out val pairs", held), ("training pairs", train[:args.train_pairs])):
        # yard None: where every preference reads (line endings, the title's characters) needs the answer alone
        parts = margin_parts(model, reference, pairs, tokenizer, None, prefer, fmt)
        s = out[name] = margin_shares(parts)
        s["error"] = standard_error([_right(e + r) for e, r in parts], [p.prompt for p in pairs])
        print(f"  {len(pairs):5d} {name:<20} in all {s['all']:6.1%} (± {s['error']:.1%})   at {prefer.where} alone "
              f"{s['at']:6.1%}   elsewhere {s['elsewhere']:6.1%}")
    print("  (±: the standard error of the share in all, counted by prompt: one prompt's pairs share its answer)")
    return out


if __name__ == "__main__":
    main()

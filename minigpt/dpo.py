"""Preference tuning by DPO (Direct Preference Optimization), on preferences a program can check.

For each training prompt the fine-tuned (SFT) model writes several answers; the checkers score them, and a pair
is (prompt, chosen, rejected): chosen passes the gates and the preference (a poem whose line endings rhyme),
rejected does not, for the *same* prompt. DPO then raises the chosen answer's log-probability against the
rejected one's, each measured relative to a frozen copy of the SFT model (the reference):

    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

where log pi(answer) is the sum of the answer tokens' log-probabilities given the prompt (the prompt is masked
as in SFT). When the policy is the reference the bracket is 0 and the loss is log 2.
"""
import collections
import json
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from minigpt.checkpoint import replace_durably
from minigpt.data import MEANINGLESS_TITLES, REGULAR_LINE, TITLE_TO_POEM, clauses, clean_title, is_regular, render, sft_batch
from minigpt.evaluate import (LINE_PUNCTUATION, SAMPLING, complete, first_poem, line_endings, mentions_title, repeats_clause,
                              rhymes)
from minigpt.model import IGNORE_INDEX
from minigpt.tasks import BY_NAME, Example, examples, prompt_text

# ---- what is preferred: a checker of one answer ----

@dataclass(frozen=True)
class Preference:
    name: str
    passes: Callable  # (answer, example, yardstick) -> bool
    what: str


RHYME = Preference("rhyme", lambda answer, ex, yard: rhymes(answer, yard.rhyme_groups),
                   "its line endings are different characters of one rhyme group")
PREFERENCES = {p.name: p for p in (
    RHYME,
    Preference("title", lambda answer, ex, yard: mentions_title(ex.input, answer),
               "it holds a content character of its title"),
    Preference("rhyme+title", lambda answer, ex, yard: rhymes(answer, yard.rhyme_groups) and mentions_title(ex.input, answer),
               "it rhymes and holds a content character of its title: rhyme not paid for in relevance"),
)}


def gate(answer, stopped, example, yard):
    """Why an answer cannot be chosen whatever the preference ('' if it can): no end marker, the task's own
    constraint not met (one regular poem, the asked form ...), a clause written twice, a clause copied from a
    training poem."""
    if not stopped:
        return "no end marker"
    if answer != first_poem(answer) or not is_regular(answer) or not BY_NAME[example.task].check(answer, example):
        return "not what the task asks"
    if repeats_clause(answer):
        return "repeats a clause"
    if any(c in yard.train_clauses for c in clauses(answer)):
        return "copies a training clause"
    return ""


def judge(answer, stopped, example, yard, prefer):
    """'' when the answer passes the gates and the preference, else why not."""
    return gate(answer, stopped, example, yard) or ("" if prefer.passes(answer, example, yard) else f"not {prefer.name}")


# ---- the prompts, and pairs sampled from the model ----

def dpo_prompts(poems, tasks, rhyme_groups, fmt=TITLE_TO_POEM):
    """The prompts of the split for the tasks the SFT model was trained on that answer with a whole poem: one per
    distinct title for title -> poem (the one fixed instruction), the tasks' trained phrasings for the others."""
    if [t.name for t in tasks] == ["poem"]:
        seen, out = set(), []
        for p in poems:
            title = clean_title(p.title)
            if title not in MEANINGLESS_TITLES and title not in seen:
                seen.add(title)
                out.append(Example("poem", TITLE_TO_POEM.instruction, title, p.body))
        return out
    return examples(poems, [t for t in tasks if t.poem_answer], rhyme_groups, fmt=fmt)


@dataclass
class Pair:
    task: str
    prompt: str  # the whole prompt text, markers included
    chosen: str
    rejected: str
    why_rejected: str  # what the rejected answer fails: the preference alone, or a gate
    rejected_stopped: bool = True  # the rejected answer ended with the end marker (else it ran to the cap)
    ref_chosen: float = 0.0  # the reference model's log-probability of the answer (and end marker) given the prompt
    ref_rejected: float = 0.0


def make_pairs(model, tokenizer, exs, yard, prefer, fmt=TITLE_TO_POEM, samples=8, per_prompt=2, max_new_tokens=128,
               seed=0, batch_size=512, shared_start=True, hold=None):
    """Sample `samples` answers per example with the evaluation's sampling settings, and pair them (pair_up).
    shared_start: the model first writes one answer per prompt; its first line (couplet), if regular, then starts
    all the samples of that prompt, so that a pair differs only after it, where the rhyme is decided (the shared
    tokens add the same log-probability to both sides, and cancel in the loss). hold: see pair_up. Returns (pairs,
    counts)."""
    prompts = [prompt_text(ex, fmt) for ex in exs]
    starts = [""] * len(exs)
    if shared_start:
        first = complete(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size, stop=fmt.end, seed=seed + 1)
        lines = [a.split("\n") for a, _ in first]
        starts = [ls[0] + "\n" if len(ls) > 1 and REGULAR_LINE.match(ls[0]) else "" for ls in lines]
    written = complete(model, tokenizer, [p + s for p, s in zip(prompts, starts) for _ in range(samples)],
                       max_new_tokens, batch_size=batch_size, stop=fmt.end, seed=seed)
    room = model.config.block_size + 1 - len(tokenizer.encode(fmt.end))
    answers = [[(s + a, stopped) for a, stopped in written[i * samples:(i + 1) * samples]] for i, s in enumerate(starts)]
    return pair_up(exs, prompts, answers, yard, prefer, lambda text: len(tokenizer.encode(text, unknown="unk")) <= room,
                   per_prompt, hold)


def pair_up(exs, prompts, written, yard, prefer, fits=lambda text: True, per_prompt=2, hold=None):
    """Judge each prompt's answers and pair passing with failing ones: up to per_prompt pairs, each failing answer used
    once, the passing ones in turn. The rejected answer is the nearest miss first: one that passes every gate and
    fails only the preference; such an answer must have the chosen one's length (絕句 or 律詩), so that the pair
    differs in what is preferred and not in length. Then answers that fail a gate.
    hold: a second Preference the pairs must not work against (what the preferred one is not to be paid for with):
    chosen answers that have it serve first, and an answer that has it is never rejected for one that lacks it.
    Returns (pairs, counts)."""
    pairs, counts = [], collections.Counter(prompts=len(exs), samples=sum(map(len, written)))
    for ex, prompt, answers in zip(exs, prompts, written):
        judged, stops = {}, {}  # distinct answers only
        for answer, stopped in answers:
            if not fits(prompt + answer):
                counts["too long for the context"] += 1  # a pair is scored on whole sequences only
                continue
            judged.setdefault(answer, judge(answer, stopped, ex, yard, prefer))
            stops[answer] = stopped
        counts.update(why or "passes" for why in judged.values())
        good, bad, before = [a for a, why in judged.items() if not why], [a for a, why in judged.items() if why], len(pairs)
        held = {a: not hold or hold.passes(a, ex, yard) for a in judged}
        good.sort(key=lambda a: not held[a])  # stable: otherwise in the order written
        for k in range(per_prompt if good else 0):  # passing answers are rare: each serves in turn
            chosen = good[k % len(good)]
            # a near miss of another length would teach the length: only a gate failure may differ in it
            fair = [a for a in bad if (judged[a] != f"not {prefer.name}" or a.count("\n") == chosen.count("\n"))
                    and (held[chosen] or not held[a])]
            if not fair:
                break
            rejected = min(fair, key=lambda a: judged[a] != f"not {prefer.name}")
            bad.remove(rejected)
            pairs.append(Pair(ex.task, prompt, chosen, rejected, judged[rejected], stops[rejected]))
        counts["prompts_with_a_pair"] += len(pairs) > before
    counts["pairs"] = len(pairs)
    return pairs, dict(counts)


@torch.no_grad()
def ending_pairs(model, tokenizer, exs, yard, fmt=TITLE_TO_POEM, per_prompt=4, max_new_tokens=128, seed=0, batch_size=512,
                 hold=None, temperature=SAMPLING["temperature"], top_k=SAMPLING["top_k"]):
    """Rhyme pairs that differ in one line ending, where the rhyme is decided. The model writes one answer per prompt;
    in one that passes the gates, at each line ending after the first whose earlier endings rhyme, the model's own
    next-character choices there (its top_k, as in sampling) give two characters, drawn by its probabilities: one of
    the earlier endings' rhyme group, not used yet, and one outside it. The rest of the answer is kept on both sides,
    so a pair's log-ratios differ at that character and barely after it. The one with the rhyming character is chosen
    when it passes the checkers whole (gates and rhyme: its later endings rhyme too), against the other, which fails
    the rhyme alone. hold: as in pair_up.
    Returns (pairs, counts)."""
    prompts = [prompt_text(ex, fmt) for ex in exs]
    written = complete(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size, stop=fmt.end, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    groups, device, room = yard.rhyme_groups, model.tok_emb.weight.device, model.config.block_size + 1
    was_training = model.training
    model.eval()
    pairs, counts = [], collections.Counter(prompts=len(exs), samples=len(exs))
    for ex, prompt, (answer, stopped) in zip(exs, prompts, written):
        prompt_ids, ids = tokenizer.encode(prompt, unknown="unk"), tokenizer.encode(answer, unknown="unk")
        why = gate(answer, stopped, ex, yard) or ("too long for the context" if len(prompt_ids) + len(ids) + 1 > room
                                                   else "")  # a pair is scored on whole sequences only
        if why:
            counts[why] += 1
            continue
        tokens = [tokenizer.itos[i] for i in ids]
        places = ending_places(tokens)
        ends = [tokens[p] for p in places]
        group = groups.get(ends[0]) if ends else None
        if group is None:
            counts["first ending in no rhyme group"] += 1
            continue
        logits, _ = model(torch.tensor([prompt_ids + ids], device=device))
        before = len(pairs)
        for k in range(1, len(places)):
            if len(pairs) - before == per_prompt or k > 1 and not rhymes("\n".join(ends[:k]), groups):
                break  # enough, or the endings so far no longer rhyme: no ending after them can keep a rhyme
            top = torch.topk(logits[0, len(prompt_ids) + places[k] - 1].float() / temperature,
                             min(top_k, logits.size(-1)))
            options = [(tokenizer.itos[i], v) for v, i in zip(top.values.tolist(), top.indices.tolist())
                       if len(tokenizer.itos[i]) == 1 and tokenizer.itos[i] not in LINE_PUNCTUATION + "\n"
                       and tokenizer.itos[i] not in ends[:k] + ends[k + 1:]]  # the endings stay distinct
            sides = [[o for o in options if groups.get(o[0]) == group], [o for o in options if groups.get(o[0]) != group]]
            if not all(sides):
                counts["no rhyming and unrhyming choice"] += 1
                continue
            picks = [side[torch.multinomial(torch.softmax(torch.tensor([v for _, v in side]), 0), 1,
                                            generator=gen).item()][0] for side in sides]
            chosen, rejected = ("".join(tokens[:places[k]]) + c + "".join(tokens[places[k] + 1:]) for c in picks)
            if judge(chosen, True, ex, yard, RHYME):  # a later ending breaks the rhyme, or a gate fails after the change
                counts["chosen not a passing answer"] += 1
                continue
            worked_against = hold and hold.passes(rejected, ex, yard) and not hold.passes(chosen, ex, yard)
            if gate(rejected, True, ex, yard) or worked_against:
                counts["rejected fails more than the rhyme"] += 1
                continue
            pairs.append(Pair(ex.task, prompt, chosen, rejected, f"not rhyme (line {k + 1})"))
        counts["prompts_with_a_pair"] += len(pairs) > before
    model.train(was_training)
    counts["pairs"] = len(pairs)
    return pairs, dict(counts)


# ---- the loss ----

def pair_batch(pairs, tokenizer, fmt=TITLE_TO_POEM):
    """(x_chosen, y_chosen, x_rejected, y_rejected, ref_chosen, ref_rejected): both sides padded to one length,
    targets only on the answer and its end marker, where it wrote one (the prompt masked as in SFT)."""
    rendered = [render(tokenizer, p.prompt, p.chosen + fmt.end) for p in pairs] + \
               [render(tokenizer, p.prompt, p.rejected + fmt.end * p.rejected_stopped) for p in pairs]
    x, y = sft_batch(rendered, tokenizer.pad_id)
    n = len(pairs)
    refs = torch.tensor([[p.ref_chosen, p.ref_rejected] for p in pairs], dtype=torch.float32)
    return x[:n], y[:n], x[n:], y[n:], refs[:, 0], refs[:, 1]


def token_logprobs(model, x, y):
    """(B, T) log p(target) at each position; 0 where the target does not count (y == IGNORE_INDEX)."""
    logits, _ = model(x)  # (B, T, V)
    return -F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=IGNORE_INDEX, reduction="none")  # (B, T)


def sequence_logprobs(model, x, y):
    """(B,) the sum over each row of log p(target) where the target counts: log p(answer | prompt)."""
    return token_logprobs(model, x, y).sum(dim=1)


def implicit_rewards(logp, ref_c, ref_r, beta):
    """(reward of chosen, reward of rejected), each beta * (log pi - log ref) per pair; logp (2B,): the policy's
    log-probabilities of the B chosen answers, then of the B rejected ones."""
    n = ref_c.size(0)
    return beta * (logp[:n] - ref_c), beta * (logp[n:2 * n] - ref_r)


def dpo_loss(model, batch, beta=0.1, sft_weight=0.0):
    """The DPO loss averaged over the pairs of the batch; with sft_weight, plus that times the SFT loss (nats per
    token) on the real training poems of the batch's last two tensors, which holds the model to the poems it was
    tuned on. One forward pass for all rows. Returns (mean, number of pairs), as the training loop asks."""
    xc, yc, xr, yr, ref_c, ref_r, *real = batch
    xs, ys = [xc, xr] + real[:1], [yc, yr] + real[1:]
    T = max(x.size(1) for x in xs)
    x = torch.cat([F.pad(x, (0, T - x.size(1))) for x in xs])  # (rows, T), padded on the right
    y = torch.cat([F.pad(y, (0, T - y.size(1)), value=IGNORE_INDEX) for y in ys])
    per_token = token_logprobs(model, x, y)  # (rows, T)
    n = xc.size(0)
    chosen, rejected = implicit_rewards(per_token[:2 * n].sum(dim=1), ref_c, ref_r, beta)
    loss = -F.logsigmoid(chosen - rejected).mean()
    if real and sft_weight:
        loss = loss + sft_weight * -per_token[2 * n:].sum() / (y[2 * n:] != IGNORE_INDEX).sum()
    return loss, torch.tensor(n)


@torch.no_grad()
def fill_reference(reference, pairs, tokenizer, fmt=TITLE_TO_POEM, batch_size=64):
    """Write the reference model's log-probabilities into the pairs (once: the reference never changes)."""
    was_training = reference.training
    reference.eval()
    device = reference.tok_emb.weight.device
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        xc, yc, xr, yr, _, _ = pair_batch(chunk, tokenizer, fmt)
        logp = sequence_logprobs(reference, torch.cat([xc, xr]).to(device), torch.cat([yc, yr]).to(device)).cpu()
        for p, c, r in zip(chunk, logp[:len(chunk)].tolist(), logp[len(chunk):].tolist()):
            p.ref_chosen, p.ref_rejected = c, r
    reference.train(was_training)
    return pairs


@torch.no_grad()
def preference_metrics(model, batches, beta):
    """On held-out pairs: the DPO loss, the preference accuracy (chosen's implicit reward above rejected's; a tie
    counts half, so the reference itself scores 50%, chance) and the mean reward margin."""
    was_training = model.training
    model.eval()
    device = model.tok_emb.weight.device
    losses, right, margins = [], 0, []
    for batch in batches:
        xc, yc, xr, yr, ref_c, ref_r = [t.to(device) for t in batch]
        logp = sequence_logprobs(model, torch.cat([xc, xr]), torch.cat([yc, yr]))  # (2B,)
        chosen, rejected = implicit_rewards(logp, ref_c, ref_r, beta)
        margin = chosen - rejected
        losses.append(-F.logsigmoid(margin))
        right += float((margin > 0).sum() + 0.5 * (margin == 0).sum())
        margins.append(margin)
    model.train(was_training)
    margin = torch.cat(margins)
    return {"pref_loss": torch.cat(losses).mean().item(), "pref_accuracy": right / margin.numel(),
            "reward_margin": margin.mean().item()}


# ---- where a margin comes from: the rhyme learnt, or the pairs remembered ----

TRAIN_PAIRS_CHECKED = 400  # the training pairs whose margins are split (the first ones): enough for a share

def ending_places(pieces):
    """Where in the answer the characters that the rhyme checker reads are: each line's last before its punctuation.
    pieces: the answer as a string, or as its tokens (a marker the model wrote inside an answer, <AST>, is one)."""
    places, line = [], []
    for i, piece in enumerate(list(pieces) + ["\n"]):
        if piece != "\n":
            line.append(i)
            continue
        while line and pieces[line[-1]] in LINE_PUNCTUATION:  # a marker (<AST>) is never inside it
            line.pop()
        places += line[-1:]
        line = []
    return places


@torch.no_grad()
def margin_parts(model, reference, pairs, tokenizer, fmt=TITLE_TO_POEM, batch_size=64):
    """[(at the line endings, everywhere else)] per pair: the log-ratio log pi - log ref of the chosen answer minus the
    rejected one's, split by where the tokens are (the two parts add up to the margin over beta). A rhyme preference
    that was learnt shows at the line endings of pairs never trained on; a margin made elsewhere on the training pairs
    alone is the chosen answers remembered."""
    was_training = model.training
    model.eval()
    device = model.tok_emb.weight.device
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        xc, yc, xr, yr, _, _ = pair_batch(chunk, tokenizer, fmt)
        x, y = torch.cat([xc, xr]).to(device), torch.cat([yc, yr]).to(device)
        ratio = (token_logprobs(model, x, y) - token_logprobs(reference, x, y)).cpu()  # (2B, T), 0 off the answer
        answers = [p.chosen for p in chunk] + [p.rejected for p in chunk]
        parts = []
        for row, answer, target in zip(ratio, answers, y.cpu()):
            on_answer = row[target != IGNORE_INDEX]  # the answer's characters in order, then its end marker
            tokens = [tokenizer.itos[i] for i in tokenizer.encode(answer, unknown="unk")]
            at_endings = on_answer[ending_places(tokens)].sum().item()
            parts.append((at_endings, on_answer.sum().item() - at_endings))
        n = len(chunk)
        out += [(c[0] - r[0], c[1] - r[1]) for c, r in zip(parts[:n], parts[n:])]
    model.train(was_training)
    return out


def margin_shares(parts):
    """The share of pairs whose margin is above 0: in all, at the line endings alone, elsewhere alone (ties count
    half, as in preference_metrics)."""
    right = lambda values: sum((v > 0) + 0.5 * (v == 0) for v in values) / len(values)
    return {"all": right([e + r for e, r in parts]), "endings": right([e for e, _ in parts]),
            "elsewhere": right([r for _, r in parts])}


# ---- showing the rhyme ----

def mark_endings(answer, groups):
    """The answer with each line's last character in brackets, and what the rhyme checker says of them."""
    marked = []
    for line in answer.split("\n"):
        body = line.rstrip(LINE_PUNCTUATION)
        marked.append(f"{body[:-1]}[{body[-1:]}]{line[len(body):]}" if body else line)
    ends = line_endings(answer)
    verdict = "rhymes" if rhymes(answer, groups) else \
        "no rhyme (" + " ".join(f"{c}:{groups.get(c, '?')}" for c in ends) + ")"
    return "\n".join(marked) + f"   <- {verdict}"


# ---- pairs on disk: a resumed run trains on the same pairs ----

def save_pairs(path, pairs, counts):
    """Written whole or not at all (a temporary file renamed into place)."""
    text = json.dumps({"counts": counts, "pairs": [asdict(p) for p in pairs]}, ensure_ascii=False, indent=0)
    replace_durably(path, lambda f: f.write(text.encode("utf-8")))


def load_pairs(path):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return [Pair(**p) for p in data["pairs"]], data["counts"]


def main(argv=None):
    """python -m minigpt.dpo runs/dpo: where a finished run's margins come from, on its held-out and training pairs."""
    import argparse
    import os
    import sys

    from minigpt.checkpoint import CheckpointError, load_checkpoint
    from minigpt.tasks import CHAT
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("run", help="a train_dpo.py run folder (its ckpt.pt, pairs.json and val_pairs.json)")
    p.add_argument("--train-pairs", type=int, default=TRAIN_PAIRS_CHECKED,
                   help="training pairs to look at (the first ones)")
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
        reference, _, _ = load_checkpoint(ckpt["init_from"], made_by="python train_sft.py")
        held, _ = load_pairs(os.path.join(args.run, "val_pairs.json"))
        train, _ = load_pairs(os.path.join(args.run, "pairs.json"))
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    fmt = CHAT if ckpt.get("format") == "chat" else TITLE_TO_POEM
    print(f"{args.run} against its reference {ckpt['init_from']}: share of pairs whose chosen answer gained more "
          "log-ratio than the rejected one")
    out = {}
    for name, pairs in (("held-out val pairs", held), ("training pairs", train[:args.train_pairs])):
        s = out[name] = margin_shares(margin_parts(model, reference, pairs, tokenizer, fmt))
        print(f"  {len(pairs):5d} {name:<20} in all {s['all']:6.1%}   at the line endings alone {s['endings']:6.1%}   "
              f"elsewhere {s['elsewhere']:6.1%}")
    return out


if __name__ == "__main__":
    main()

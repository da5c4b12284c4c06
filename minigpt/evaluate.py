"""Instruction following, measured without a judge: does the answer stop, is it one regular poem, is it about its
title, does it copy, repeat itself, rhyme? Every table puts the real held-out poems beside the models.

    python -m minigpt.evaluate --base runs/pretrain --sft runs/sft    # the table for any two checkpoints

Develop on val, report on test: training measures on val titles; only this table (and the one at the end of
train_sft.py) uses test titles. Titles that are also training titles are left out of both lists.
"""
import argparse
import collections
import itertools
import re
import sys
import textwrap
import time
from dataclasses import dataclass

import torch

from minigpt.data import (DEFAULT_CORPUS, MEANINGLESS_TITLES, PLAIN, TITLE_TO_POEM, clauses, clean_title, is_regular,
                          join_groups, load_poems, sft_batch, split_poems, spread)
from minigpt.tokenizer import ROLE_TOKENS, SPECIAL_TOKENS

MAX_NEW_TOKENS = 256
SAMPLING = dict(temperature=0.8, top_k=50, seed=1234)
_TITLE_LIKE = re.compile(r"^[^，。？！；：、]+$")  # a line with no punctuation at all: a title, not verse
# characters that say little about what a poem is about: numbers, and the words of occasion and form in titles
FUNCTION_CHARS = set("一二三四五六七八九十百千首詩題作和奉同之與及其於以爲者也而韻得字賦詠應制上下中後前初")


# ---- what is held out ----

@dataclass
class EvalSet:
    titles: list  # distinct meaningful titles of one held-out split, none of them a training title
    poems: list  # for each title, the real held-out poem under it: the reference column
    left_out: int  # distinct titles of the split left out because a training poem has the same title


def eval_set(held_out, train, n=200):
    """n titles spread evenly over a held-out split (the corpus runs by period and poet, so the first n alone would
    be mostly court hymns), each with its first real poem. The same on every run."""
    train_titles = {clean_title(p.title) for p in train}
    first, left_out = {}, set()
    for p in held_out:
        title = clean_title(p.title)
        if title in MEANINGLESS_TITLES:
            continue
        if title in train_titles:
            left_out.add(title)
            continue
        first.setdefault(title, p.body)
    titles = spread(list(first), n)
    return EvalSet(titles, [first[t] for t in titles], len(left_out))


def write_answers(model, tokenizer, titles, fmt=TITLE_TO_POEM, max_new_tokens=MAX_NEW_TOKENS, **sampling):
    """One answer per title: (text without the stop token, whether it stopped at the format's end marker)."""
    stop = fmt.end if fmt.end in tokenizer.stoi else "<END>"  # the plain format ends with a blank line: no one id
    return complete(model, tokenizer, [fmt.prompt(t) for t in titles], max_new_tokens, stop=stop, **sampling)


def complete(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=100, stop="<END>",
             temperature=SAMPLING["temperature"], top_k=SAMPLING["top_k"], seed=SAMPLING["seed"]):
    """What the model writes after each prompt text: (text without the stop token, whether it stopped there)."""
    stop_id = tokenizer.stoi[stop]
    gen = torch.Generator(device=model.tok_emb.weight.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    answers = []
    for i in range(0, len(prompts), batch_size):
        ids_in = [tokenizer.encode(p, unknown="unk") for p in prompts[i:i + batch_size]]
        for ids in model.generate(ids_in, max_new_tokens, temperature=temperature, top_k=top_k,
                                  stop_ids=[stop_id], pad_id=tokenizer.pad_id, generator=gen):
            stopped = bool(ids) and ids[-1] == stop_id
            answers.append((tokenizer.decode(ids[:-1] if stopped else ids), stopped))
    model.train(was_training)
    return answers


# ---- the metrics: pure functions of strings ----

def _poem_end(lines):
    """Where the first poem of these lines ends: at a blank line, or at a title-like line (no punctuation) that
    follows verse and is followed by more: the next poem's title, as in the pretraining text."""
    for i, line in enumerate(lines):
        if not line.strip() or (0 < i < len(lines) - 1 and _TITLE_LIKE.match(line)):
            return i
    return len(lines)


def first_poem(text):
    """The text up to the end of its first poem: the answer that is scored, whatever the model wrote after it."""
    lines = text.strip("\n").split("\n")
    return "\n".join(lines[:_poem_end(lines)])


def runs_on(text):
    """The text goes on past its first poem (a blank line or a new title, then more), or holds another example's
    marker."""
    lines = text.strip("\n").split("\n")
    return bool("".join(lines[_poem_end(lines):]).strip()) or any(t in text for t in SPECIAL_TOKENS + ROLE_TOKENS)


def content_chars(title):
    """The title's characters that can say what a poem is about: Chinese characters, less FUNCTION_CHARS."""
    return {c for c in title if "\u3400" <= c <= "\u9fff" and c not in FUNCTION_CHARS}


def mentions_title(title, answer):
    """The answer holds a content character of the title; a line that is only the title repeated does not count."""
    lines = [line for line in answer.split("\n") if line.strip() != title.strip()]
    return bool(content_chars(title) & set("".join(lines)))


def relevance(titles, answers):
    """(share of answers that mention their own title, share that mention a shuffled title, the lift between them).
    The shuffled title of answer i is the title half the list away: any poem mentions some titles by chance."""
    n = len(answers)
    own = sum(map(mentions_title, titles, answers)) / n
    shuffled = sum(mentions_title(titles[(i + n // 2) % n], a) for i, a in enumerate(answers)) / n
    return own, shuffled, own - shuffled


def copy_rate(answers, train_clauses):
    """The share of the answers' clauses that stand verbatim among the training poems' clauses."""
    cs = [c for a in answers for c in clauses(a)]
    return sum(c in train_clauses for c in cs) / max(len(cs), 1)


def repeats_clause(answer):
    """The answer writes some clause twice."""
    cs = clauses(answer)
    return len(set(cs)) < len(cs)


def distinct_clauses(answers):
    """Distinct clauses over all clauses of all answers: 1.0 when no clause is ever written twice."""
    cs = [c for a in answers for c in clauses(a)]
    return len(set(cs)) / max(len(cs), 1)


LINE_PUNCTUATION = "，。？！；：、"  # what may close a line after its last character


def line_endings(text):
    """The last character of each line (each couplet, in regular verse), before its punctuation."""
    return [line.rstrip(LINE_PUNCTUATION)[-1:] for line in text.split("\n") if line.rstrip(LINE_PUNCTUATION)]


def learn_rhyme_groups(poems, strong=5, weak=2):
    """{character: rhyme group}, learnt from regular poems, whose line endings rhyme together. Characters that end
    lines of one poem at least `strong` times are joined (union-find); a character seen less often joins the group
    it ends lines with most, if at least `weak` times. Calibrated in the README: real poems against shuffled endings."""
    pairs = collections.Counter()
    for p in poems:
        if is_regular(p.body):
            pairs.update(itertools.combinations(sorted(set(line_endings(p.body))), 2))
    groups = join_groups(pair for pair, n in pairs.items() if n >= strong)
    votes = collections.defaultdict(collections.Counter)
    for (a, b), n in pairs.items():
        for c, d in ((a, b), (b, a)):
            if c not in groups and d in groups:
                votes[c][groups[d]] += n
    for c, v in sorted(votes.items()):
        group, n = v.most_common(1)[0]
        if n >= weak:
            groups[c] = group
    return groups


def rhymes(text, groups):
    """The line endings are different characters, all of one rhyme group."""
    ends = line_endings(text)
    return len(ends) >= 2 and len(set(ends)) == len(ends) and len({groups.get(c, c + "?") for c in ends}) == 1


class Yardstick:
    """What the metrics need from the training poems: their clauses (copying) and rhyme groups."""

    def __init__(self, train_poems):
        self.train_clauses = {c for p in train_poems for c in clauses(p.body)}
        self.rhyme_groups = learn_rhyme_groups(train_poems)

    def score(self, titles, texts, stopped=None):
        """The rates over answers (fractions 0-1). texts: what was written up to the end marker or the cap;
        the answer scored is its first poem. stopped: per answer, whether it wrote the end marker (None: the
        format has none)."""
        n = len(texts)
        answers = [first_poem(t) for t in texts]
        regular = [a for a in answers if is_regular(a)]
        own, shuffled, lift = relevance(titles, answers)
        return {
            "stop_rate": None if stopped is None else sum(stopped) / n,
            "run_on_rate": sum(map(runs_on, texts)) / n,
            "regular_rate": len(regular) / n,
            "mean_length": sum(map(len, answers)) / n,
            "relevance": own, "relevance_shuffled": shuffled, "relevance_lift": lift,
            "copy_rate": copy_rate(answers, self.train_clauses),
            "repeat_rate": sum(map(repeats_clause, answers)) / n,
            "distinct_clauses": distinct_clauses(answers),
            "rhyme_rate": self.rhyme_rate(regular),
            # by length: two line endings (絕句) rhyme by chance far more often than four (律詩)
            "rhyme_rate_jueju": self.rhyme_rate([a for a in regular if a.count("\n") == 1]),
            "rhyme_rate_lushi": self.rhyme_rate([a for a in regular if a.count("\n") == 3]),
            "share_jueju": sum(a.count("\n") == 1 for a in regular) / len(regular) if regular else None,
        }

    def rhyme_rate(self, poems):
        """The share of the poems that rhyme, None for none."""
        return sum(rhymes(a, self.rhyme_groups) for a in poems) / len(poems) if poems else None

    def calibrate(self, poems, seed=0):
        """(rhyme rate on real regular poems, on the same poems with line endings drawn from other poems)."""
        real = [p.body for p in poems if is_regular(p.body)]
        pool = [c for text in real for c in line_endings(text)]
        gen = torch.Generator().manual_seed(seed)
        shuffled = [[pool[i] for i in torch.randint(len(pool), (len(line_endings(t)),), generator=gen).tolist()]
                    for t in real]
        return (sum(rhymes(t, self.rhyme_groups) for t in real) / len(real),
                sum(rhymes("\n".join(e + "。" for e in ends), self.rhyme_groups) for ends in shuffled) / len(real))


# ---- the loss on held-out answers ----

def val_sample(val_poems, tokenizer, block_size, n=256):
    """n (title, poem) pairs spread evenly over the val split, each fitting the context in the SFT format:
    the same poems in every column and at every eval."""
    fits = []
    for p in val_poems:
        title = clean_title(p.title)
        if title in MEANINGLESS_TITLES:
            continue
        if len(tokenizer.encode(TITLE_TO_POEM.prompt(title) + p.body + TITLE_TO_POEM.end, unknown="unk")) <= block_size + 1:
            fits.append((title, p.body))
    if not fits:
        raise ValueError("no held-out poem fits the context; use a larger block_size")
    return spread(fits, n)


def answer_val_batches(tokenizer, sample, fmt=TITLE_TO_POEM, part="poem", batch_size=32):
    """Batches of the sample in fmt whose targets are the poem's tokens only (part='poem') or only the end
    marker's (part='end': <END>, or the blank line in the pretraining text)."""
    examples = []
    for title, body in sample:
        prompt, poem = tokenizer.encode(fmt.prompt(title), unknown="unk"), tokenizer.encode(body, unknown="unk")
        end = tokenizer.encode(fmt.end, unknown="unk")
        examples.append((prompt + poem + end, [0] * len(prompt) + [part == "poem"] * len(poem) + [part == "end"] * len(end)))
    return [sft_batch(examples[i:i + batch_size], tokenizer.pad_id) for i in range(0, len(examples), batch_size)]


def loss_batches(tokenizer, sample, fmt=TITLE_TO_POEM, batch_size=32):
    """The sample in fmt, batched once for every eval: targets on the poem's tokens, and on the end marker's."""
    return {"poem": answer_val_batches(tokenizer, sample, fmt, "poem", batch_size),
            "end": answer_val_batches(tokenizer, sample, fmt, "end", batch_size),
            "end_tokens": len(tokenizer.encode(fmt.end, unknown="unk"))}


def answer_losses(model, val):
    """{'val_answer_loss': nats per poem token, 'val_end_loss': nats to end the poem where it ends (per poem)};
    val: what loss_batches returns."""
    from minigpt.train import evaluate_loss
    device = model.tok_emb.weight.device
    return {"val_answer_loss": evaluate_loss(model, val["poem"], device),
            "val_end_loss": val["end_tokens"] * evaluate_loss(model, val["end"], device)}


def measure(model, tokenizer, titles, yardstick, fmt=TITLE_TO_POEM, val=None, max_new_tokens=MAX_NEW_TOKENS):
    """The metrics of one model in one format, three example answers and (given loss_batches in the same format)
    its answer losses."""
    answers = write_answers(model, tokenizer, titles, fmt, max_new_tokens)
    texts = [t for t, _ in answers]
    out = {**yardstick.score(titles, texts, [s for _, s in answers] if fmt.end in tokenizer.stoi else None),
           "examples": [{"title": t, "answer": a, "stopped": s} for t, (a, s) in zip(titles[:3], answers[:3])]}
    if val is not None:
        out.update(answer_losses(model, val))
    return out


# ---- the table ----

ROWS = [("stop_rate", "stops at the end marker", "{:.1%}"), ("run_on_rate", "runs on past one poem", "{:.1%}"),
        ("regular_rate", "regular shape (絕句/律詩)", "{:.1%}"), ("mean_length", "mean length (chars)", "{:.1f}"),
        ("relevance", "mentions its title", "{:.1%}"), ("relevance_shuffled", "mentions a shuffled title", "{:.1%}"),
        ("relevance_lift", "title relevance lift (points)", "{:+.1f}"), ("copy_rate", "clauses copied from train", "{:.1%}"),
        ("repeat_rate", "repeats a clause", "{:.1%}"), ("distinct_clauses", "distinct clauses", "{:.1%}"),
        ("rhyme_rate", "rhymes (of regular answers)", "{:.1%}"), ("share_jueju", "絕句 (of regular answers)", "{:.1%}"),
        ("rhyme_rate_jueju", "rhymes, 絕句 answers", "{:.1%}"), ("rhyme_rate_lushi", "rhymes, 律詩 answers", "{:.1%}"),
        ("val_answer_loss", "val loss per poem token", "{:.3f}"),
        ("val_end_loss", "val loss of the end marker", "{:.3f}")]


def format_table(columns, note=""):
    """columns: list of (name, measure() result) -> a plain-text table, then example answers. '—': does not apply."""
    width = max(len(name) for name, _ in columns) + 2
    lines = [" " * 32 + "".join(name.rjust(width) for name, _ in columns)]
    for key, label, fmt in ROWS:
        cells = [m.get(key) for _, m in columns]
        if all(c is None for c in cells):
            continue
        cells = ["—" if c is None else fmt.format(100 * c if key == "relevance_lift" else c) for c in cells]
        lines.append(label.ljust(32) + "".join(c.rjust(width) for c in cells))
    if note:
        lines.append(textwrap.fill(note, 116))
    for name, m in columns:
        if m.get("examples"):
            lines.append(f"\n== {name} ==")
            for ex in m["examples"]:
                end = "<END>" if ex["stopped"] else " ...(no <END>)"
                lines.append(f"[{ex['title']}]\n{ex['answer']}{end}")
    return "\n".join(lines)


def reference(yardstick, evalset):
    """The real held-out poems under their own titles, scored like answers: the column every rate is read against."""
    return {**yardstick.score(evalset.titles, evalset.poems), "examples": []}


def compare(base, sft, tokenizer, splits, n_titles=200, max_new_tokens=MAX_NEW_TOKENS, held_out="test", yardstick=None,
            fmt=TITLE_TO_POEM):
    """The four columns: real poems, the base model in its own format and given the SFT prompt, the fine-tuned
    model; all on the same titles, the same val poems for the losses. fmt: the SFT prompt (the chat one for a chat
    model). Returns (columns, evalset, yardstick)."""
    yard = yardstick or Yardstick(splits["train"])
    evalset = eval_set(splits[held_out], splits["train"], n_titles)
    sample = val_sample(splits["val"], tokenizer, base.config.block_size)
    plain, sft_format = loss_batches(tokenizer, sample, PLAIN), loss_batches(tokenizer, sample, fmt)  # the same poems
    columns = [("real poems", reference(yard, evalset)),
               ("base, own format", measure(base, tokenizer, evalset.titles, yard, PLAIN, plain, max_new_tokens)),
               ("base, SFT prompt", measure(base, tokenizer, evalset.titles, yard, fmt, sft_format, max_new_tokens)),
               ("fine-tuned", measure(sft, tokenizer, evalset.titles, yard, fmt, sft_format, max_new_tokens))]
    return columns, evalset, yard


def table_note(evalset, yard, splits, held_out="test"):
    rhyme_real, rhyme_shuffled = yard.calibrate(splits["val"])
    return (f"({len(evalset.titles)} {held_out} titles; {evalset.left_out} {held_out} titles left out because a training "
            f"poem has the same title. The base model never saw <END>, so it cannot stop: its answer is its first poem, "
            f"cut where a poem ends in its training text (a blank line, or the next title). Rhyme checker on val: "
            f"real regular poems "
            f"{rhyme_real:.1%}, their line endings shuffled across poems {rhyme_shuffled:.1%}.)")


def main(argv=None):
    from minigpt.checkpoint import CheckpointError, load_checkpoint
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="runs/pretrain", help="pretrained run folder or checkpoint")
    p.add_argument("--sft", default="runs/sft", help="fine-tuned run folder or checkpoint")
    p.add_argument("--corpus", default=DEFAULT_CORPUS)
    p.add_argument("--n-titles", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    args = p.parse_args(argv)
    try:
        if args.n_titles <= 0 or args.max_new_tokens <= 0:
            raise ValueError("--n-titles and --max-new-tokens must be positive")
        base, tokenizer, _ = load_checkpoint(args.base)
        sft, sft_tok, _ = load_checkpoint(args.sft)
        if sft_tok.itos != tokenizer.itos:
            raise CheckpointError(f"{args.base} and {args.sft} have different vocabularies; compare checkpoints of one lineage")
        splits = split_poems(load_poems(args.corpus))
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    t = time.time()
    columns, evalset, yard = compare(base, sft, tokenizer, splits, args.n_titles, args.max_new_tokens)
    print(format_table(columns, table_note(evalset, yard, splits)))
    print(f"\n({time.time() - t:.0f} s)")
    return columns


if __name__ == "__main__":
    main()

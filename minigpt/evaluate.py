"""Instruction following, measured without a judge: does the answer stop, is it one regular poem, is it about its
title, does it copy, repeat itself, rhyme? Every table puts the real held-out poems beside the models.

    python -m minigpt.evaluate --base runs/pretrain --sft runs/sft    # the table for any two checkpoints

Develop on val, report on test: training measures on val titles; only this table (and the one at the end of
train_sft.py) uses test titles. Titles that are also training titles are left out of both lists.
"""
import argparse
import sys
import textwrap
import time
from dataclasses import dataclass

from minigpt.data import DEFAULT_CORPUS, PLAIN, TITLE_TO_POEM, load_poems, sft_batch, split_poems, spread
from minigpt.generate import EVAL_SAMPLING, write
from minigpt.loss_eval import evaluate_loss
from minigpt.metrics import METRICS, Yardstick
from minigpt.verse import MEANINGLESS_TITLES, clean_title

MAX_NEW_TOKENS = 256


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


def write_answers(model, tokenizer, titles, fmt=TITLE_TO_POEM, max_new_tokens=MAX_NEW_TOKENS, sampling=EVAL_SAMPLING):
    """One Answer(text, stopped) per title in fmt (by default with the evaluation's sampling); the plain format has no
    end marker."""
    return write(model, tokenizer, [fmt.prompt(t) for t in titles], max_new_tokens, stop=fmt.end, sampling=sampling)


# ---- the loss on held-out answers ----

def val_sample(val_poems, tokenizer, block_size, n=256, fmt=TITLE_TO_POEM):
    """n (title, poem) pairs spread evenly over the val split, each fitting the context in the format fmt (the longest
    format they will be given in): the same poems in every column and at every eval."""
    fits = []
    for p in val_poems:
        title = clean_title(p.title)
        if title in MEANINGLESS_TITLES:
            continue
        if len(tokenizer.encode(fmt.prompt(title) + p.body + fmt.end, unknown="unk")) <= block_size + 1:
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
    device = model.device
    return {"val_answer_loss": evaluate_loss(model, val["poem"], device),
            "val_end_loss": val["end_tokens"] * evaluate_loss(model, val["end"], device)}


def measure(model, tokenizer, titles, yardstick, fmt=TITLE_TO_POEM, val=None, max_new_tokens=MAX_NEW_TOKENS):
    """The metrics of one model in one format, three example answers and (given loss_batches in the same format)
    its answer losses."""
    answers = write_answers(model, tokenizer, titles, fmt, max_new_tokens)
    stopped = [a.stopped for a in answers] if fmt.end in tokenizer.stoi else None
    out = {**yardstick.score(titles, [a.text for a in answers], stopped),
           "examples": [{"title": t, "answer": a, "stopped": s} for t, (a, s) in zip(titles[:3], answers[:3])]}
    if val is not None:
        out.update(answer_losses(model, val))
    return out


# ---- the table ----

def format_table(columns, note="", metrics=METRICS):
    """columns: list of (name, measure() result) -> a plain-text table of the metrics, then example answers. '—': does
    not apply."""
    width = max(len(name) for name, _ in columns) + 2
    lines = [" " * 32 + "".join(name.rjust(width) for name, _ in columns)]
    for metric in metrics:
        cells = [m.get(metric.key) for _, m in columns]
        if all(c is None for c in cells):
            continue
        lines.append(metric.label.ljust(32) + "".join(metric.table(c).rjust(width) for c in cells))
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
    sample = val_sample(splits["val"], tokenizer, base.config.block_size, fmt=fmt)
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

"""Instruction following, measured without a judge: does the answer stop, is it one regular poem, does it run on?

    python -m minigpt.evaluate --base runs/pretrain --sft runs/sft    # the table for any two checkpoints

Answers are sampled with a fixed seed for a fixed list of held-out (test split) titles.
"""
import argparse
import re
import sys
import time

import torch

from minigpt.data import (DEFAULT_CORPUS, MEANINGLESS_TITLES, PLAIN, TITLE_TO_POEM, SFTData, clean_title,
                          is_regular, load_poems, split_poems)
from minigpt.tokenizer import SPECIAL_TOKENS

MAX_NEW_TOKENS = 256
SAMPLING = dict(temperature=0.8, top_k=50, seed=1234)
_TITLE_LIKE = re.compile(r"^[^，。？！；：、]+$")  # a line with no punctuation at all: a title, not verse


def eval_titles(test_poems, n=200):
    """n distinct meaningful titles spread evenly over the test split (the corpus runs roughly by period and
    poet, so the first n alone would be mostly court hymns). The same on every run."""
    titles = list(dict.fromkeys(t for t in map(clean_title, (p.title for p in test_poems)) if t not in MEANINGLESS_TITLES))
    if len(titles) <= n:
        return titles
    return [titles[i * len(titles) // n] for i in range(n)]


def write_answers(model, tokenizer, titles, fmt=TITLE_TO_POEM, max_new_tokens=MAX_NEW_TOKENS, batch_size=100,
                  temperature=SAMPLING["temperature"], top_k=SAMPLING["top_k"], seed=SAMPLING["seed"]):
    """One answer per title: (text without the stop token, whether it stopped at <END>)."""
    gen = torch.Generator(device=model.tok_emb.weight.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    answers = []
    for i in range(0, len(titles), batch_size):
        prompts = [tokenizer.encode(fmt.prompt(t), unknown="unk") for t in titles[i:i + batch_size]]
        for ids in model.generate(prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                                  stop_ids=[tokenizer.end_id], pad_id=tokenizer.pad_id, generator=gen):
            stopped = bool(ids) and ids[-1] == tokenizer.end_id
            answers.append((tokenizer.decode(ids[:-1] if stopped else ids), stopped))
    model.train(was_training)
    return answers


def runs_on(text):
    """The answer starts another poem: a blank line, another example's marker, or a title-like line then more."""
    lines = text.split("\n")
    new_title = any(_TITLE_LIKE.match(line) for line in lines[:-1] if line)
    return "\n\n" in text or any(t in text for t in SPECIAL_TOKENS) or new_title


def echoes_title(title, text):
    first = text.split("\n")[0]
    return first.strip() == title or (len(title) >= 2 and title in text)


def behaviour(answers, titles):
    """Rates over the answers (fractions 0-1) and the mean answer length in characters."""
    n = len(answers)
    return {
        "stop_rate": sum(s for _, s in answers) / n,
        "regular_rate": sum(s and is_regular(t) for t, s in answers) / n,
        "run_on_rate": sum(runs_on(t) for t, _ in answers) / n,
        "mean_length": sum(len(t) for t, _ in answers) / n,
        "title_echo_rate": sum(echoes_title(ti, t) for ti, (t, _) in zip(titles, answers)) / n,
    }


def answer_val_batches(tokenizer, val_poems, block_size, fmt=TITLE_TO_POEM, n_batches=8, batch_size=32):
    """Fixed val batches whose loss counts answer tokens (and the end marker) only."""
    return SFTData(val_poems, tokenizer, block_size, fmt=fmt).val_batches(n_batches, batch_size, tokenizer.pad_id)


def measure(model, tokenizer, titles, fmt=TITLE_TO_POEM, val_batches=None, max_new_tokens=MAX_NEW_TOKENS):
    """Behaviour rates, three example answers and (given val_batches) the val loss on answers."""
    from minigpt.train import evaluate_loss
    answers = write_answers(model, tokenizer, titles, fmt, max_new_tokens)
    out = {**behaviour(answers, titles),
           "examples": [{"title": t, "answer": a, "stopped": s} for t, (a, s) in zip(titles[:3], answers[:3])]}
    if val_batches is not None:
        out["val_answer_loss"] = evaluate_loss(model, val_batches, model.tok_emb.weight.device)
    return out


ROWS = [("stop_rate", "stop rate", "{:.1%}"), ("regular_rate", "regular form (絕句/律詩)", "{:.1%}"),
        ("run_on_rate", "runs on into another poem", "{:.1%}"), ("mean_length", "mean answer length (chars)", "{:.1f}"),
        ("title_echo_rate", "echoes the title", "{:.1%}"), ("val_answer_loss", "val loss on answers", "{:.3f}")]


def format_table(columns, corpus_regular_rate=None):
    """columns: list of (name, measure() result) -> a plain-text table, then example answers."""
    width = max(len(name) for name, _ in columns) + 2
    lines = [" " * 30 + "".join(name.rjust(width) for name, _ in columns)]
    for key, label, fmt in ROWS:
        lines.append(label.ljust(30) + "".join(fmt.format(m[key]).rjust(width) for _, m in columns))
    if corpus_regular_rate is not None:
        lines.append(f"(in the corpus itself {corpus_regular_rate:.0%} of poems are of the regular form)")
    for name, m in columns:
        lines.append(f"\n== {name} ==")
        for ex in m["examples"]:
            end = "<END>" if ex["stopped"] else " ...(no <END>)"
            lines.append(f"[{ex['title']}]\n{ex['answer']}{end}")
    return "\n".join(lines)


def corpus_regular_rate(splits):
    return sum(is_regular(p.body) for ps in splits.values() for p in ps) / sum(map(len, splits.values()))


def compare(base, sft, tokenizer, splits, n_titles=200):
    """The three-column comparison: base prompted as in pretraining, base given the SFT prompt, the fine-tuned model."""
    titles = eval_titles(splits["test"], n_titles)
    T = base.config.block_size
    sft_val = answer_val_batches(tokenizer, splits["val"], T)  # the same answers, scored under both models
    return [("base, plain prompt", measure(base, tokenizer, titles, PLAIN, answer_val_batches(tokenizer, splits["val"], T, PLAIN))),
            ("base, SFT prompt", measure(base, tokenizer, titles, val_batches=sft_val)),
            ("fine-tuned", measure(sft, tokenizer, titles, val_batches=sft_val))]


def main(argv=None):
    from minigpt.checkpoint import CheckpointError, load_checkpoint
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="runs/pretrain", help="pretrained run folder or checkpoint")
    p.add_argument("--sft", default="runs/sft", help="fine-tuned run folder or checkpoint")
    p.add_argument("--corpus", default=DEFAULT_CORPUS)
    p.add_argument("--n-titles", type=int, default=200)
    args = p.parse_args(argv)
    try:
        base, tokenizer, _ = load_checkpoint(args.base)
        sft, sft_tok, _ = load_checkpoint(args.sft)
        if sft_tok.itos != tokenizer.itos:
            raise CheckpointError(f"{args.base} and {args.sft} have different vocabularies; compare checkpoints of one lineage")
        splits = split_poems(load_poems(args.corpus))
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    t = time.time()
    columns = compare(base, sft, tokenizer, splits, args.n_titles)
    print(format_table(columns, corpus_regular_rate(splits)))
    print(f"\n({args.n_titles} test titles, {time.time() - t:.0f} s)")
    return columns


if __name__ == "__main__":
    main()

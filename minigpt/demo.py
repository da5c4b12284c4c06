"""A demo for the front of the class: type a title, and the base model (left) and the fine-tuned model (right)
write side by side as the characters come. The fine-tuned one stops at its end marker; the base one runs on,
poem after poem, until the cap. An empty line or Ctrl-C ends it.

    python -m minigpt.demo                     # runs/pretrain and runs/sft
"""
import argparse
import os
import shutil
import sys
import time
import unicodedata

import torch

from minigpt.data import PLAIN
from minigpt.generate import stream
from minigpt.sample import TitleError, check_title, load_pair, shown_conversion, to_simplified


def width(text):
    """Columns a terminal gives text: two for a Chinese character (wide or full-width), one for the rest."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def wrap(text, cols):
    """The text's lines, each cut into pieces at most cols wide."""
    out = []
    for line in text.split("\n"):
        piece = ""
        for c in line:
            if width(piece + c) > cols:
                out.append(piece)
                piece = ""
            piece += c
        out.append(piece)
    return out


def side_by_side(left, right, cols):
    """Two texts as two columns of cols each, as lines of one string."""
    a, b = wrap(left, cols), wrap(right, cols)
    rows = [(a[i] if i < len(a) else "", b[i] if i < len(b) else "") for i in range(max(len(a), len(b)))]
    return [x + " " * (cols - width(x)) + " │ " + y for x, y in rows]


class Writer:
    """One model writing one text, a token each step: minigpt.generate's stream with the KV cache, so each step reads
    one new position. A stop of None (a base model's blank line is two tokens) lets it run to the cap."""

    def __init__(self, model, tokenizer, prompt, stop, cap, temperature, top_k, seed):
        self.tokenizer, self.cap, self.text, self.done, self.stopped = tokenizer, cap, "", False, False
        self.stop_id = tokenizer.stoi.get(stop) if stop else None
        gen = torch.Generator(device=model.device).manual_seed(seed)
        self.tokens = stream(model.eval(), [tokenizer.encode(prompt)], cap, temperature=temperature, top_k=top_k,
                             stop_ids=[] if self.stop_id is None else [self.stop_id], pad_id=tokenizer.pad_id,
                             generator=gen)

    def step(self):
        if self.done:
            return
        _, (new,) = next(self.tokens, (None, (None,)))  # None: it wrote cap tokens
        if new is None:
            self.done = True
            return
        if new == self.stop_id:
            self.done = self.stopped = True
            return
        self.text += self.tokenizer.decode([new])
        self.done = len(self.text) >= self.cap


def show_both(base, sft, out, cols, rows, delay, simplified, live):
    """Step both writers until both are done, redrawing the two columns after every character when live (only the
    last rows lines while writing: the cursor cannot go back above the top of the terminal)."""
    show = to_simplified if simplified else str
    drawn = 0
    while True:
        base.step()
        sft.step()
        finished = base.done and sft.done
        if live or finished:
            lines = side_by_side(show(base.text), show(sft.text), cols)
            if live and drawn:
                out.write(f"\x1b[{drawn}F\x1b[J")  # back to the first line drawn, and clear what follows
            lines = lines if finished else lines[-rows:]
            out.write("\n".join(lines) + "\n")
            out.flush()
            drawn = len(lines)
        if finished:
            break
        if delay:
            time.sleep(delay)
    ends = (f"(no end: {len(base.text)} characters, the cap)", "(stopped at its end marker)" if sft.stopped else
            f"(no end marker within {len(sft.text)} characters)")
    out.write(ends[0] + " " * max(1, cols - width(ends[0])) + " │ " + ends[1] + "\n\n")


def main(argv=None, read=input, out=None):
    from minigpt.checkpoint import CheckpointError
    out = out or sys.stdout
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain", default=os.path.join("runs", "pretrain"), help="the base model's run folder")
    p.add_argument("--sft", default=os.path.join("runs", "sft"), help="the fine-tuned model's run folder")
    p.add_argument("--cap", type=int, default=160, help="characters the base model writes before it is cut off")
    p.add_argument("--delay", type=float, default=0.03, help="seconds between characters, so the class can follow")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--simplified", action="store_true", help="show the poems in simplified characters")
    args = p.parse_args(argv)
    try:
        if args.cap <= 0 or args.temperature <= 0 or args.top_k <= 0 or args.delay < 0:
            raise TitleError("--cap, --temperature and --top-k must be positive and --delay not negative")
        base, sft, tokenizer, fmt = load_pair(args.pretrain, args.sft)
    except (CheckpointError, TitleError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    live = getattr(out, "isatty", lambda: False)()  # a terminal redraws as the characters come; a pipe gets the end
    size = shutil.get_terminal_size((100, 24))
    cols, rows = max(16, (size.columns - 3) // 2), max(4, size.lines - 4)
    out.write(f"left: the base model ({args.pretrain}), right: the fine-tuned one ({args.sft}). "
              "Titles may be simplified; an empty line ends.\n")
    shown = 0
    while True:
        try:
            typed = read("题目 / title: ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not typed:
            break
        try:
            title = check_title(typed, tokenizer, sft.config.block_size, fmt)
        except TitleError as e:
            out.write(f"error: {e}\n")
            continue
        converted = shown_conversion(typed, title)
        if converted:
            out.write(converted + "\n")
        head = ("base: " + PLAIN.prompt(title).strip(), "fine-tuned: " + fmt.prompt(title))
        out.write(head[0] + " " * max(1, cols - width(head[0])) + " │ " + head[1] + "\n")
        room = sft.config.block_size - len(tokenizer.encode(fmt.prompt(title))) - 1
        writers = (Writer(base, tokenizer, PLAIN.prompt(title), None, args.cap, args.temperature, args.top_k, args.seed),
                   Writer(sft, tokenizer, fmt.prompt(title), fmt.end, room, args.temperature, args.top_k, args.seed))
        try:
            show_both(*writers, out, cols, rows, args.delay, args.simplified, live)
        except KeyboardInterrupt:
            out.write("\n")
            break
        shown += 1
    out.write("bye\n")
    return shown


if __name__ == "__main__":
    main()

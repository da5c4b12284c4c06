"""Poems in, tensors out: corpus loading, the train/val/test split, pretraining windows, SFT examples as (ids, mask).

Poems that share a couplet form one group (a poem recorded twice with a character changed, or under two titles),
and a whole group goes to one split, by a hash: the same on every run and machine, and no couplet of val or test
stands in train.
"""
import gzip
import hashlib
import json
import os
from dataclasses import dataclass

import torch

from minigpt.verse import clauses, couplet_keys, join_groups

DEFAULT_CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "poems", "tang.jsonl.gz")
SPLITS = {"train": 90, "val": 95, "test": 100}  # a poem's bucket (0-99) below 90 trains, 90-94 validates, 95-99 tests


class CorpusError(ValueError):
    """A corpus file that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Poem:
    title: str
    author: str
    lines: tuple

    @property
    def body(self):
        return "\n".join(self.lines)


def load_poems(path=DEFAULT_CORPUS):
    """Read a corpus of one JSON poem per line ({"title", "author", "lines"}), gzipped or not."""
    opener = gzip.open if path.endswith(".gz") else open
    poems = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    poem = Poem(str(d["title"]), str(d.get("author", "")), tuple(str(s) for s in d["lines"]))
                except (ValueError, KeyError, TypeError) as e:
                    raise CorpusError(f"{path}, line {n}: not a poem record ({type(e).__name__}: {e}); rebuild it with poems/build_corpus.py") from None
                if not poem.lines:
                    raise CorpusError(f"{path}, line {n}: poem has no lines")
                poems.append(poem)
    except FileNotFoundError:
        raise CorpusError(f"corpus file not found: {path}") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise CorpusError(f"{path}: cannot read it ({e}); the file is damaged or truncated, restore it with git or rebuild it") from None
    if not poems:
        raise CorpusError(f"{path}: no poems in it")
    return poems


def split_of(key):
    """'train', 'val' or 'test', from an MD5 hash of a text (stable across runs, machines, Python versions)."""
    bucket = int(hashlib.md5(key.encode("utf-8")).hexdigest(), 16) % 100
    return next(name for name, upper in SPLITS.items() if bucket < upper)


def poem_groups(poems):
    """A group per poem: poems that share a couplet are in one group, and so, in turn, are poems that share a
    couplet with any of them. One poem recorded twice with a character changed is one group."""
    first_with = {}  # couplet -> the first poem that has it
    groups = join_groups((i, first_with.setdefault(key, i)) for i, p in enumerate(poems) for key in couplet_keys(p.lines))
    return [groups.get(i, i) for i in range(len(poems))]


def spread(items, n):
    """n items taken evenly from first to last (all of them if there are no more than n): the same on every run."""
    return list(items) if len(items) <= n else [items[i * len(items) // n] for i in range(n)]


def split_poems(poems):
    """{'train', 'val', 'test': poems}. A whole group goes to one split, decided by the hash of the group's first
    body in sorted order, so the split does not depend on the order of the file."""
    groups = poem_groups(poems)
    first_body = {}
    for g, p in zip(groups, poems):
        first_body[g] = min(first_body.get(g, p.body), p.body)
    out = {name: [] for name in SPLITS}
    for g, p in zip(groups, poems):
        out[split_of(first_body[g])].append(p)
    return out


def leak(splits, held_out="test"):
    """What of a held-out split stands verbatim in train: the share of its couplets, the share of its clauses
    (the halves of a couplet, split at punctuation), and how many of its poems have half or more couplets in train."""
    train_couplets = {k for p in splits["train"] for k in couplet_keys(p.lines)}
    train_clauses = {c for p in splits["train"] for c in clauses(p.body)}
    held = [[k in train_couplets for k in couplet_keys(p.lines)] for p in splits[held_out]]  # per poem: each couplet in train?
    held_clauses = [c in train_clauses for p in splits[held_out] for c in clauses(p.body)]
    return {"couplets": sum(map(sum, held)) / max(sum(map(len, held)), 1),
            "clauses": sum(held_clauses) / max(len(held_clauses), 1),
            "poems_half_in_train": sum(2 * sum(ks) >= len(ks) for ks in held)}


# ---- prompt formats: what goes around a title and a poem ----

@dataclass(frozen=True)
class PromptFormat:
    """One instruction template: the markers and the instruction text, nothing else."""
    instruction: str = "請用以下題目寫一首詩"
    ins: str = "<INS>"
    inp: str = "<INP>"
    res: str = "<RES>"
    end: str = "<END>"

    def prompt(self, input_text):
        return f"{self.ins}{self.instruction}{self.inp}{input_text}{self.res}"


TITLE_TO_POEM = PromptFormat()  # <INS>請用以下題目寫一首詩<INP>{title}<RES>{poem}<END>
PLAIN = PromptFormat(instruction="", ins="", inp="", res="\n", end="\n\n")  # pretraining text: {title}\n{poem}\n\n
CHAT_POEM = PromptFormat(ins="<USR>", inp="\n", res="<EOT><AST>", end="<EOT>")  # title -> poem with chat roles


# ---- pretraining: poems written one after another, as plain text ----

def pretrain_text(poem):
    """The pretraining form of a poem: title, newline, its lines, a blank line before the next poem."""
    return PLAIN.prompt(poem.title) + poem.body + PLAIN.end


def build_tokenizer(train_poems, formats=None):
    """Every character of the training poems, and of the instruction templates, so prompts never hold <UNK>."""
    from minigpt.tokenizer import CharTokenizer
    formats = formats or [TITLE_TO_POEM]
    return CharTokenizer.from_texts([*(pretrain_text(p) for p in train_poems), *(f.instruction for f in formats)])


class PretrainData:
    """The train and val poems as two long id streams, cut into windows that each start at a poem's title: random
    poems for training, a fixed set spread evenly over val. The model always reads a poem from its title, as it will
    when it writes one; a window longer than its poem runs on into the next. (With windows from any character the
    skill to rhyme came in one 14-minute pretraining run of three; from titles, in every run measured: docs/log.md.)"""

    def __init__(self, splits, tokenizer):
        self.train, self.train_starts = self._stream(splits["train"], tokenizer, "error")
        self.val, self.val_starts = self._stream(splits["val"], tokenizer, "unk")

    @staticmethod
    def _stream(poems, tokenizer, unknown):
        encoded = [tokenizer.encode(pretrain_text(p), unknown=unknown) for p in poems]
        lengths = torch.tensor([len(e) for e in encoded], dtype=torch.long)
        return torch.tensor([i for e in encoded for i in e]), torch.cumsum(lengths, 0) - lengths  # and where titles begin

    def get_batch(self, batch_size, block_size, generator=None):
        """Windows from random titles: inputs x (B, T) and targets y (B, T), y being x shifted left by one."""
        starts = self._fitting(self.train_starts, self.train, block_size, "train")
        return self._windows(self.train, starts[torch.randint(len(starts), (batch_size,), generator=generator)], block_size)

    def val_batches(self, n_batches, batch_size, block_size):
        """A fixed set of val windows, from titles spread evenly over the val stream, so every eval sees the same text."""
        starts = self._fitting(self.val_starts, self.val, block_size, "val")
        picked = starts[torch.linspace(0, len(starts) - 1, n_batches * batch_size).round().long()]
        return [self._windows(self.val, s, block_size) for s in picked.split(batch_size)]

    @staticmethod
    def _fitting(starts, stream, block_size, split):
        """The titles a whole window (block_size + 1 ids, for the shifted targets) can start at."""
        fit = starts[starts + block_size + 1 <= len(stream)]
        if not len(fit):
            raise CorpusError(f"the {split} poems hold {len(stream)} characters, fewer than one window of "
                              f"{block_size + 1}; use a larger corpus or a smaller --block-size")
        return fit

    @staticmethod
    def _windows(stream, starts, block_size):
        x = torch.stack([stream[s:s + block_size] for s in starts.tolist()])  # (B, T)
        y = torch.stack([stream[s + 1:s + 1 + block_size] for s in starts.tolist()])  # (B, T)
        return x, y


# ---- instruction tuning: <INS>instruction<INP>input<RES>answer<END> ----

def render_sft(tokenizer, title, answer, fmt=TITLE_TO_POEM):
    """(ids, mask): the whole example as ids, and 1 where the id is one the model must learn to write
    (the answer and its <END>), 0 over the prompt. Token i is predicted from tokens before it."""
    return render(tokenizer, fmt.prompt(title), answer + fmt.end)


def render(tokenizer, prompt, reply):
    """(ids, mask) of a prompt and the reply that follows it: the mask is 1 over the reply only."""
    prompt, reply = tokenizer.encode(prompt, unknown="unk"), tokenizer.encode(reply, unknown="unk")
    return prompt + reply, [0] * len(prompt) + [1] * len(reply)


def sft_batch(examples, pad_id, train_on_prompt=False):
    """Pad (ids, mask) examples on the right into x (B, T) and y (B, T); y is IGNORE_INDEX where no loss counts."""
    from minigpt.model import IGNORE_INDEX
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        x[b, :n] = torch.tensor(ids[:-1])
        targets = torch.tensor(ids[1:])
        keep = torch.ones(n, dtype=torch.bool) if train_on_prompt else torch.tensor(mask[1:], dtype=torch.bool)
        y[b, :n] = torch.where(keep, targets, torch.full_like(targets, IGNORE_INDEX))
    return x, y


class SFTData:
    """Rendered (ids, mask) examples (minigpt.tasks.task_data makes them from poems), drawn at random into batches.
    counts says what was kept and what was left out, and why."""

    def __init__(self, examples, counts):
        self.examples, self.counts = examples, counts

    def get_batch(self, batch_size, pad_id, generator=None, train_on_prompt=False):
        picks = torch.randint(len(self.examples), (batch_size,), generator=generator).tolist()
        return sft_batch([self.examples[i] for i in picks], pad_id, train_on_prompt)

    def val_batches(self, n_batches, batch_size, pad_id):
        """The first n_batches * batch_size examples, in order: the same every eval. Loss on answers only."""
        ex = self.examples[: n_batches * batch_size]
        if not ex:
            raise ValueError("no held-out example fits the context; use a larger block_size")
        return [sft_batch(ex[i:i + batch_size], pad_id) for i in range(0, len(ex), batch_size)]

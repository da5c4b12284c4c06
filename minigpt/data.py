"""Poems in, tensors out: corpus loading, the train/val/test split, pretraining windows, SFT examples.

The split is decided per poem by a hash of its lines, so it is the same on every run and machine,
and a poem that appears twice under two titles lands in one split only.
"""
import gzip
import hashlib
import json
import os
from dataclasses import dataclass

import torch

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


def split_of(poem):
    """'train', 'val' or 'test', from a hash of the poem's lines (stable across runs, machines, Python versions)."""
    bucket = int(hashlib.md5(poem.body.encode("utf-8")).hexdigest(), 16) % 100
    return next(name for name, upper in SPLITS.items() if bucket < upper)


def split_poems(poems):
    out = {name: [] for name in SPLITS}
    for p in poems:
        out[split_of(p)].append(p)
    return out


# ---- pretraining: poems written one after another, as plain text ----

def pretrain_text(poem):
    """The pretraining form of a poem: title, newline, its lines, a blank line before the next poem."""
    return f"{poem.title}\n{poem.body}\n\n"


def build_tokenizer(train_poems):
    from minigpt.tokenizer import CharTokenizer
    return CharTokenizer.from_texts(pretrain_text(p) for p in train_poems)


class PretrainData:
    """The train and val poems as two long id streams, cut into random (train) or fixed (val) windows."""

    def __init__(self, splits, tokenizer):
        self.train = torch.tensor(tokenizer.encode("".join(map(pretrain_text, splits["train"])), unknown="error"))
        self.val = torch.tensor(tokenizer.encode("".join(map(pretrain_text, splits["val"])), unknown="unk"))

    def get_batch(self, batch_size, block_size, generator=None):
        """Random windows: inputs x (B, T) and targets y (B, T), y being x shifted left by one."""
        return self._windows(self.train, torch.randint(len(self.train) - block_size - 1, (batch_size,), generator=generator), block_size)

    def val_batches(self, n_batches, batch_size, block_size):
        """A fixed set of val windows, spread evenly over the val stream, so every eval sees the same text."""
        n = n_batches * batch_size
        starts = torch.linspace(0, len(self.val) - block_size - 2, n).long()
        return [self._windows(self.val, s, block_size) for s in starts.split(batch_size)]

    @staticmethod
    def _windows(stream, starts, block_size):
        x = torch.stack([stream[s:s + block_size] for s in starts.tolist()])  # (B, T)
        y = torch.stack([stream[s + 1:s + 1 + block_size] for s in starts.tolist()])  # (B, T)
        return x, y

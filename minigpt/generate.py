"""Writing with the model, fast: the KV cache, left padding for prompts of different lengths, per-row stop and sampling
(temperature, top-k, top-p). `write` is the one function every caller uses to get answers as text.

model.py keeps a plain `generate` to read first; this module does the same job without recomputing the past:
each layer keeps the keys and values it has seen, so a new token costs one position, not the whole window.
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn: greedy at temperature 0, else from the softmax after the top-k / top-p cuts."""
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = None
    seed: int = 1234


EVAL_SAMPLING = Sampling()  # what every measurement and the training samples use


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One id per row from logits (B, V): greedy at temperature 0, else sampled after top-k / top-p cuts."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature  # softmax and running sums in float32, whatever the model's dtype
    if top_k is not None:
        # exactly k ids stay, even where several share the k-th value
        top = torch.topk(logits, min(top_k, logits.size(-1))).indices  # (B, k)
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top, True)  # (B, V)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p is not None:
        # nucleus: keep the most likely ids until their probabilities add up to top_p, and no more
        sorted_logits, order = torch.sort(logits, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the ids before it already reach top_p
        drop[:, 0] = False  # the most likely id always stays
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    # inverse CDF: one uniform number u in (0, total] per row; the first id whose running sum of probabilities
    # reaches u is drawn. A cut id adds nothing to the sum, so it is never the first to reach u.
    # (torch.multinomial draws a random number for every id of the vocabulary: far slower.)
    cum = F.softmax(logits, dim=-1).cumsum(dim=-1)  # (B, V)
    u = (1 - torch.rand(cum.size(0), 1, generator=generator, device=cum.device)) * cum[:, -1:]  # (B, 1)
    return torch.searchsorted(cum, u).squeeze(1)  # (B,)


class LayerCache:
    """One layer's keys and values of every position seen so far, (B, nh, S, hs) each; attention appends to it."""

    def __init__(self):
        self.k = self.v = None

    def update(self, k, v):
        """Append the new positions' k, v (B, nh, T, hs); returns all of them, (B, nh, S + T, hs)."""
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v

    def keep(self, rows):
        """Only these rows (a bool mask over the batch) go on: finished rows leave the cache."""
        self.k, self.v = self.k[rows], self.v[rows]


class Window:
    """The tokens a batch of prompts is writing, left-padded so that every row's newest token is in the last column,
    and the caches of what the model has already read of them."""

    def __init__(self, model, prompts, pad_id, use_cache):
        self.model, self.use_cache, self.W = model, use_cache, model.config.block_size
        L, device = max(len(p) for p in prompts), model.device
        self.idx = torch.tensor([[pad_id] * (L - len(p)) + list(p) for p in prompts], device=device)  # (B, L)
        self.real = None  # (B, L) False at padding, kept only while some row is padded
        if any(len(p) < L for p in prompts):
            self.real = torch.tensor([[False] * (L - len(p)) + [True] * len(p) for p in prompts], device=device)
        self.caches = None

    def logits(self):
        """(B, V) the next token's logits for every row: only the newest token goes through when the cache holds the
        rest; else the whole window (the first pass, no cache, or a full window, which restarts from its last half)."""
        if self.caches is not None and self.idx.size(1) <= self.W:
            return self._forward(self.idx[:, -1:])[:, -1]
        keep = self.W if not self.use_cache or self.caches is None else self.W // 2
        self.idx = self.idx[:, -keep:]
        if self.real is not None:
            self.real = self.real[:, -keep:] if not self.real[:, -keep:].all() else None
        self.caches = [LayerCache() for _ in self.model.blocks] if self.use_cache else None
        return self._forward(self.idx)[:, -1]

    def _forward(self, idx):
        """Logits for idx (B, T), the newest T tokens of the window, with the padding hidden and given no position."""
        T, S = idx.size(1), self.idx.size(1) - idx.size(1)  # S: tokens before them, already in the cache
        if self.real is None:
            pos = torch.arange(S, S + T, device=idx.device)  # (T,)
            return self.model(idx, caches=self.caches, pos=pos)[0]
        pos = (self.real.long().cumsum(dim=1) - 1).clamp(min=0)[:, -T:]  # (B, T): padding takes no position
        # query i (at S + i) sees keys 0 .. S + i, never the future and never padding; itself always (no empty row)
        causal = torch.ones(T, S + T, dtype=torch.bool, device=idx.device).tril(diagonal=S)  # (T, S + T)
        itself = torch.arange(S, S + T, device=idx.device)[:, None] == torch.arange(S + T, device=idx.device)
        mask = causal & self.real[:, None, None, :] | itself  # (B, 1, T, S + T)
        return self.model(idx, mask=mask, caches=self.caches, pos=pos)[0]

    def append(self, next_id):
        self.idx = torch.cat([self.idx, next_id[:, None]], dim=1)  # (B, T + 1)
        if self.real is not None:
            self.real = torch.cat([self.real, torch.ones_like(self.real[:, :1])], dim=1)

    def keep(self, rows):
        """Only these rows (a bool mask) go on writing."""
        self.idx = self.idx[rows]
        self.real = self.real[rows] if self.real is not None else None
        for c in self.caches or []:
            c.keep(rows)


@torch.no_grad()
def stream(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_ids=(), pad_id=0,
           use_cache=True, generator=None):
    """Sample continuations for a batch of prompts (lists of ids, any lengths), one token a step: yields (rows, ids),
    the prompts that got a token and their tokens. A row ends at its first stop id, which it still yields.
    With the cache, a full window restarts from its last half; without, it slides by one token."""
    window = Window(model, prompts, pad_id, use_cache)
    rows = torch.arange(len(prompts), device=model.device)  # which prompts are still being written
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=model.device)
    for _ in range(max_new_tokens):
        next_id = sample_next(window.logits(), temperature, top_k, top_p, generator)  # (B,)
        yield rows.tolist(), next_id.tolist()
        window.append(next_id)
        if len(stop):
            going = ~torch.isin(next_id, stop)
            if not going.all():  # finished rows leave the batch, and their cache rows with them
                rows = rows[going]
                window.keep(going)
                if len(rows) == 0:
                    return


def generate(model, prompts, max_new_tokens, **kw):
    """One list of new ids per prompt (the arguments of stream); a row ends at its first stop id, which is kept."""
    out = [[] for _ in prompts]
    for rows, ids in stream(model, prompts, max_new_tokens, **kw):
        for b, t in zip(rows, ids):
            out[b].append(t)
    return out


class Answer(NamedTuple):
    text: str  # what the model wrote, without the stop token
    stopped: bool  # it ended with the stop token (else it reached max_new_tokens)


def write(model, tokenizer, prompts, max_new_tokens, stop="<END>", sampling=EVAL_SAMPLING, batch_size=100,
          unknown="unk"):
    """What the model writes after each prompt text, as [Answer(text, stopped)], in batches of batch_size. stop: the
    token that ends an answer (None, or a marker that is not one token such as the plain text's blank line: none).
    The model is put in eval mode for the writing and given back as it was."""
    from minigpt.loss_eval import evaluating
    stop_id = tokenizer.stoi.get(stop) if stop else None
    gen = torch.Generator(device=model.device).manual_seed(sampling.seed)
    answers = []
    with evaluating(model):
        for i in range(0, len(prompts), batch_size):
            ids_in = [tokenizer.encode(p, unknown=unknown) for p in prompts[i:i + batch_size]]
            for ids in generate(model, ids_in, max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
                                top_p=sampling.top_p, stop_ids=[] if stop_id is None else [stop_id],
                                pad_id=tokenizer.pad_id, generator=gen):
                stopped = bool(ids) and ids[-1] == stop_id
                answers.append(Answer(tokenizer.decode(ids[:-1] if stopped else ids), stopped))
    return answers

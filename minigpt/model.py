"""The GPT: a decoder-only transformer written out by hand, small enough to read in one sitting.

Flow: token ids -> token + position embeddings -> n_layer pre-norm blocks (attention, MLP)
-> final LayerNorm -> logits over the vocabulary. `generate` samples from it with a KV cache.

Shape legend: B batch, T time (tokens), C channels (n_embd), nh heads, hs head size (C // nh),
V vocabulary size, S cached length (tokens already in the KV cache).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets with this id do not count in the loss (prompt and padding in SFT)


@dataclass
class GPTConfig:
    vocab_size: int = 10000
    block_size: int = 128  # the longest context the model can see
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    use_sdpa: bool = True  # fast path: F.scaled_dot_product_attention; False runs the hand-written maths

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); pick e.g. n_head={math.gcd(self.n_embd, 8)}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)  # widen 4x, as in GPT-2
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x))))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.use_sdpa, self.dropout = cfg.n_head, cfg.use_sdpa, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # queries, keys and values in one matmul
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cache=None, key_mask=None):
        """x (B, T, C). cache: None or a dict holding this layer's past keys and values, which grows.
        key_mask: None or (B, S + T) bool, False at left padding that no query may look at."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)  # (B, nh, S + T, hs)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        S = k.size(2) - T  # how many earlier tokens the new ones may also look at
        # SDPA's own causal path for a plain window (no cache offset, no padding) lets it pick its fastest kernel
        # (flash attention on a GPU); then no mask is built at all
        sdpa_causal = self.use_sdpa and S == 0 and key_mask is None and T > 1
        allowed = None  # a single newest token may look at every key: no mask to build
        if (T > 1 or key_mask is not None) and not sdpa_causal:
            # causal mask: query i (at absolute position S + i) sees keys 0 .. S + i, never the future
            allowed = torch.ones(T, S + T, dtype=torch.bool, device=x.device).tril(diagonal=S)  # (T, S + T)
        if key_mask is not None:
            # padding is hidden from every query; each query still sees itself, so no row is empty
            itself = torch.arange(S, S + T, device=x.device)[:, None] == torch.arange(S + T, device=x.device)  # (T, S + T)
            allowed = allowed & key_mask[:, None, None, :] | itself  # (B, 1, T, S + T)
        p_drop = self.dropout if self.training else 0.0
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p_drop, is_causal=sdpa_causal)
        else:
            # scores scaled by 1/sqrt(hs) so that their variance stays near 1 whatever the head size
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, nh, T, S + T)
            if allowed is not None:
                att = att.masked_fill(~allowed, float("-inf"))
            att = F.dropout(F.softmax(att, dim=-1), p_drop, self.training)
            y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.drop(self.proj(y))


class Block(nn.Module):
    """Pre-norm block: normalise, transform, add back. The residual path keeps gradients flowing."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.n_embd), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.n_embd), MLP(cfg)

    def forward(self, x, cache=None, key_mask=None):
        x = x + self.attn(self.ln_1(x), cache, key_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)  # learned positions
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # weight tying: reading a character and writing it share one table (fewer parameters, better fit)
        self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                # each block adds two outputs to the residual stream: scale them down so its variance stays put
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self):
        """Parameters, counting the tied embedding once and leaving out positions."""
        return sum(p.numel() for p in self.parameters()) - self.pos_emb.weight.numel()

    def forward(self, idx, targets=None, caches=None, key_mask=None, pos=None):
        """idx (B, T) token ids -> (logits (B, T, V), loss or None). targets (B, T), IGNORE_INDEX where
        no loss is wanted. caches/key_mask/pos are for generation: per-layer KV caches, padding mask, positions."""
        B, T = idx.shape
        if pos is None:
            start = caches[0]["k"].size(2) if caches and "k" in caches[0] else 0
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}")
            pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches else None, key_mask)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=IGNORE_INDEX)
        return logits, loss

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 stop_ids=(), pad_id=0, use_cache=True, generator=None):
        """Sample continuations for a batch of prompts (lists of ids, any lengths).
        Returns one list of new ids per prompt; a row ends at its first stop id, which is kept.
        With the cache, a full window restarts from its last half; without, it slides by one token."""
        device = self.tok_emb.weight.device
        L, W = max(len(p) for p in prompts), self.config.block_size
        # left padding lines the prompts up at the right, so every row's next token is in the last column
        idx = torch.tensor([[pad_id] * (L - len(p)) + list(p) for p in prompts], device=device)  # (B, L)
        real = None  # padding mask (B, L), kept only while some row is padded
        if any(len(p) < L for p in prompts):
            real = torch.tensor([[False] * (L - len(p)) + [True] * len(p) for p in prompts], device=device)
        out = [[] for _ in prompts]
        rows = torch.arange(len(prompts), device=device)  # which prompts are still being written
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
        caches = None
        for _ in range(max_new_tokens):
            if caches is not None and idx.size(1) <= W:
                logits = self._step(idx[:, -1:], real, caches)  # only the newest token goes through
            else:  # first pass, no cache, or a full window
                keep = W if not use_cache or caches is None else W // 2
                idx = idx[:, -keep:]
                real = real[:, -keep:] if real is not None and not real[:, -keep:].all() else None
                caches = [{} for _ in self.blocks] if use_cache else None
                logits = self._step(idx, real, caches)
            next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B,)
            for b, t in zip(rows.tolist(), next_id.tolist()):
                out[b].append(t)
            idx = torch.cat([idx, next_id[:, None]], dim=1)  # (B, T + 1)
            if real is not None:
                real = torch.cat([real, torch.ones_like(real[:, :1])], dim=1)
            if len(stop):
                going = ~torch.isin(next_id, stop)
                if not going.all():  # finished rows leave the batch, and their cache rows with them
                    rows, idx = rows[going], idx[going]
                    real = real[going] if real is not None else None
                    for c in caches or []:
                        c["k"], c["v"] = c["k"][going], c["v"][going]
                    if len(rows) == 0:
                        break
        return out

    def _step(self, idx, real, caches):
        """Logits for idx (B, T), the newest T tokens of the window; real (B, W) marks its padding, or is None."""
        if real is None:
            return self(idx, caches=caches)[0]
        pos = (real.long().cumsum(dim=1) - 1).clamp(min=0)[:, -idx.size(1):]  # (B, T): padding takes no position
        return self(idx, caches=caches, key_mask=real, pos=pos)[0]


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


def grow_vocab(model, vocab_size):
    """A copy of model whose vocabulary has grown to vocab_size (new tokens appended, such as chat roles): the old
    rows stay; each new row starts at the mean of the old ones, so that a new token starts as an average one."""
    old = model.tok_emb.weight.data
    grown = GPT(GPTConfig(**{**model.config.__dict__, "vocab_size": vocab_size})).to(old.device)
    state = dict(model.state_dict())
    rows = old.mean(dim=0, keepdim=True).expand(vocab_size - old.size(0), -1)  # (new, C)
    state["tok_emb.weight"] = state["lm_head.weight"] = torch.cat([old, rows])  # tied: one table
    grown.load_state_dict(state)
    return grown

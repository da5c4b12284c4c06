"""The GPT: a decoder-only transformer written out by hand, small enough to read in one sitting.

Flow: token ids -> token + position embeddings -> n_layer pre-norm blocks (attention, MLP)
-> final LayerNorm -> logits over the vocabulary. `generate` samples from it, plainly; minigpt.generate is the
fast way (KV cache, padding, stop) that every caller uses.

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

    def forward(self, x, mask=None, cache=None):
        """x (B, T, C). mask: None (causal) or bool, True where a query may look at a key, (T, S + T) or
        (B, 1, T, S + T). cache: None, or what keeps this layer's past keys and values (minigpt.generate)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nh, S + T, hs): the S earlier positions' keys and values come first
        p_drop = self.dropout if self.training else 0.0
        if self.use_sdpa:
            # with a cache the new tokens come one at a time (T = 1), and the newest token may see every key
            return self.drop(self.proj(self._merge(F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p_drop, is_causal=mask is None and T > 1))))
        # scores scaled by 1/sqrt(hs) so that their variance stays near 1 whatever the head size
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, nh, T, S + T)
        if mask is None and T > 1:
            # causal mask: query i (at position S + i) sees keys 0 .. S + i, never the future
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=k.size(2) - T)
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        att = F.dropout(F.softmax(att, dim=-1), p_drop, self.training)
        return self.drop(self.proj(self._merge(att @ v)))  # att @ v: (B, nh, T, hs)

    @staticmethod
    def _merge(y):
        B, nh, T, hs = y.shape
        return y.transpose(1, 2).contiguous().view(B, T, nh * hs)  # (B, T, C): heads side by side again


class Block(nn.Module):
    """Pre-norm block: normalise, transform, add back. The residual path keeps gradients flowing."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.n_embd), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.n_embd), MLP(cfg)

    def forward(self, x, mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), mask, cache)
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

    @property
    def device(self):
        return self.tok_emb.weight.device

    def forward(self, idx, targets=None, mask=None, caches=None, pos=None):
        """idx (B, T) token ids -> (logits (B, T, V), loss or None). targets (B, T), IGNORE_INDEX where no loss is
        wanted. For generation (minigpt.generate): an attention mask, per-layer KV caches and the positions (T,) or
        (B, T), 0 .. T-1 if none are given."""
        B, T = idx.shape
        logits = self.lm_head(self.features(idx, mask, caches, pos))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=IGNORE_INDEX)
        return logits, loss

    def features(self, idx, mask=None, caches=None, pos=None):
        """(B, T, C): what the blocks make of idx, after the final LayerNorm; the LM head reads it (a reward model
        reads it with a head of its own, minigpt.reward)."""
        T = idx.size(1)
        if pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, caches[i] if caches else None)
        return self.ln_f(x)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """idx (B, T) -> (B, T + max_new_tokens): sample one token at a time, reading the whole window again for each
        one. Plain and slow; minigpt.generate does the same with a KV cache, padding and a stop token."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])  # the last block_size tokens at most
            logits = logits[:, -1, :] / temperature  # (B, V): only the last position predicts the next token
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = float("-inf")  # only the k likeliest stay
            probs = F.softmax(logits, dim=-1)
            next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, next_id], dim=1)  # (B, T + 1)
        return idx

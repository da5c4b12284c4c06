import math

import pytest
import torch
import torch.nn.functional as F

from minigpt.model import GPT, IGNORE_INDEX, CausalSelfAttention, GPTConfig


def test_loss_at_init_is_close_to_uniform(model, tiny_config):
    idx, targets = torch.randint(tiny_config.vocab_size, (2, 8, 32))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(tiny_config.vocab_size)) < 0.1


def test_changing_a_later_token_leaves_earlier_logits_alone(model, tiny_config):
    idx = torch.randint(tiny_config.vocab_size, (2, 20))
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % tiny_config.vocab_size
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("n_head", [1, 2, 4])
def test_hand_written_attention_equals_sdpa(n_head):
    cfg = GPTConfig(vocab_size=10, block_size=16, n_layer=1, n_head=n_head, n_embd=32, use_sdpa=False)
    attn = CausalSelfAttention(cfg).eval()
    x = torch.randn(3, 16, 32)
    manual = attn(x)
    attn.use_sdpa = True
    assert torch.allclose(manual, attn(x), atol=1e-5)
    # and against SDPA called directly on the same projections
    q, k, v = attn.qkv(x).split(32, dim=2)
    q, k, v = (t.view(3, 16, n_head, 32 // n_head).transpose(1, 2) for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(3, 16, 32)
    assert torch.allclose(manual, attn.proj(ref), atol=1e-5)


def test_sdpa_takes_its_causal_path_when_there_is_no_cache_and_no_padding(monkeypatch):
    """Attention builds no mask of its own on the SDPA path: a window without padding is SDPA's causal path, a single
    newest token sees every key, and only padding brings a mask (the generation module's)."""
    from minigpt.generate import generate
    model = GPT(GPTConfig(vocab_size=10, block_size=16, n_layer=1, n_head=2, n_embd=32, use_sdpa=True)).eval()
    calls, real = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append((kw.get("is_causal", False), kw.get("attn_mask"))) or real(*a, **kw))
    model(torch.randint(10, (2, 6)))  # a training window
    assert calls == [(True, None)]
    generate(model, [[1, 2, 3], [4, 5, 6]], 3, temperature=0)  # same lengths: the prompt, then one token at a time
    assert calls[1:] == [(True, None), (False, None), (False, None)]
    del calls[:]
    generate(model, [[1, 2, 3], [4, 5]], 3, temperature=0)  # padded: every call is given its mask
    assert len(calls) == 3 and all(not causal and mask is not None for causal, mask in calls)


def test_whole_model_same_with_and_without_sdpa(tiny_config):
    m = GPT(tiny_config).eval()
    idx = torch.randint(tiny_config.vocab_size, (2, 32))
    a, _ = m(idx)
    for block in m.blocks:
        block.attn.use_sdpa = False
    b, _ = m(idx)
    assert torch.allclose(a, b, atol=1e-5)


def test_ignored_targets_do_not_count(model, tiny_config):
    idx = torch.randint(tiny_config.vocab_size, (1, 10))
    targets = idx.clone()
    targets[0, :5] = IGNORE_INDEX
    logits, loss = model(idx, targets)
    assert torch.isclose(loss, F.cross_entropy(logits[0, 5:], idx[0, 5:]))


def test_one_batch_overfits(tiny_config):
    m = GPT(tiny_config).train()
    idx = torch.randint(tiny_config.vocab_size, (4, 32))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = m(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_bad_configs_say_what_to_fix():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="block_size"):
        GPTConfig(block_size=0)


def test_too_long_input_is_refused(model):
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_hand_written_attention_equals_sdpa_with_padding_and_a_cache():
    cfg = GPTConfig(vocab_size=10, block_size=16, n_layer=1, n_head=2, n_embd=32, use_sdpa=False)
    from minigpt.generate import LayerCache
    attn = CausalSelfAttention(cfg).eval()
    x = torch.randn(2, 7, 32)
    real = torch.tensor([[False, False, True, True, True, True, True], [True] * 7])  # row 0 left-padded

    def mask(T, S):  # causal, no padding, and each query itself (so no row is empty)
        causal = torch.ones(T, S + T, dtype=torch.bool).tril(diagonal=S)
        itself = torch.arange(S, S + T)[:, None] == torch.arange(S + T)
        return causal & real[:, None, None, :S + T] | itself  # (B, 1, T, S + T)

    out = {}
    for use_sdpa in (False, True):
        attn.use_sdpa = use_sdpa
        cache = LayerCache()
        first = attn(x[:, :6], mask(6, 0), cache)  # the prompt, then one new token against the cache
        out[use_sdpa] = (first, attn(x[:, 6:], mask(1, 6), cache))
        assert cache.k.shape == (2, 2, 7, 16)
    assert torch.allclose(out[False][0], out[True][0], atol=1e-5) and torch.allclose(out[False][1], out[True][1], atol=1e-5)
    # the padded positions change nothing that a real token sees
    x2 = x.clone()
    x2[0, :2] = torch.randn(2, 32)
    attn.use_sdpa = False
    assert torch.allclose(attn(x2[:, :6], mask(6, 0))[0, 2:], out[False][0][0, 2:], atol=1e-5)
    assert not torch.allclose(attn(x2[:, :6])[0, 2:], out[False][0][0, 2:], atol=1e-5)  # without the mask it does


def test_a_grown_vocabulary_keeps_what_the_model_did(model):
    from minigpt.checkpoint import grow_vocab
    V = model.config.vocab_size
    grown = grow_vocab(model, V + 4).eval()
    idx = torch.randint(V, (2, 10))
    assert torch.allclose(grown(idx)[0][..., :V], model(idx)[0], atol=1e-6)
    assert torch.allclose(grown.tok_emb.weight[V:], model.tok_emb.weight.mean(0).expand(4, -1))
    assert grown.lm_head.weight is grown.tok_emb.weight  # still tied

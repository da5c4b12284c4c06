import torch

from minigpt.model import sample_next


def prompts_of(lengths, vocab):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(6, vocab, (n,), generator=g).tolist() for n in lengths]


def test_kv_cache_gives_the_same_tokens_as_recomputing(model, tiny_config):
    prompts = prompts_of([3, 7, 1], tiny_config.vocab_size)
    for temperature in (0, 1.0):
        a = model.generate(prompts, 25, temperature=temperature, generator=torch.Generator().manual_seed(5))
        b = model.generate(prompts, 25, temperature=temperature, use_cache=False, generator=torch.Generator().manual_seed(5))
        assert a == b


def test_a_batch_of_prompts_equals_each_prompt_alone(model, tiny_config):
    prompts = prompts_of([2, 9, 5], tiny_config.vocab_size)
    batch = model.generate(prompts, 20, temperature=0)
    assert batch == [model.generate([p], 20, temperature=0)[0] for p in prompts]


def test_generation_stops_per_row(model, tiny_config):
    prompts = prompts_of([4, 4, 6], tiny_config.vocab_size)
    free = model.generate(prompts, 20, temperature=0)
    stop = free[0][2]  # the third token row 0 writes becomes a stop token
    out = model.generate(prompts, 20, temperature=0, stop_ids=[stop])
    for row, full in zip(out, free):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert row == full[:cut]  # each row ends at its own first stop token, the others run on
    assert len(out[0]) <= 3 and out[0][-1] == stop


def test_generation_runs_past_the_context(model, tiny_config):
    out = model.generate(prompts_of([5], tiny_config.vocab_size), 80, temperature=1.0)
    assert len(out[0]) == 80
    out = model.generate(prompts_of([5], tiny_config.vocab_size), 80, temperature=1.0, use_cache=False)
    assert len(out[0]) == 80


def test_top_k_and_top_p_keep_only_the_likely_ids():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) <= {0, 1}
    # probabilities about .72, .27, ...: top_p 0.5 keeps id 0 only, 0.9 keeps ids 0 and 1
    assert set(sample_next(logits, top_p=0.5, generator=g).tolist()) == {0}
    assert set(sample_next(logits, top_p=0.9, generator=g).tolist()) <= {0, 1}
    assert sample_next(logits, temperature=0).tolist() == [0] * 200


def test_sampling_follows_the_softmax_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.log().repeat(40000, 1)  # log 0 = -inf: an id that must never come out
    ids = sample_next(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=5).float() / len(ids)
    assert freq[4] == 0 and torch.allclose(freq, probs, atol=0.01), freq  # 4 standard errors at most
    hot = sample_next(logits, temperature=0.5, generator=torch.Generator().manual_seed(0))
    sharpened = probs ** 2 / (probs ** 2).sum()  # temperature 0.5 squares the probabilities
    assert torch.allclose(torch.bincount(hot, minlength=5).float() / len(hot), sharpened, atol=0.01)

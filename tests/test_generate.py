import pytest
import torch

from minigpt.generate import Answer, generate, sample_next, write
from minigpt.model import GPT, GPTConfig


def prompts_of(lengths, vocab):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(6, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("use_sdpa", [True, False])  # the cpu preset runs the hand-written attention
def test_kv_cache_gives_the_same_tokens_as_recomputing(tiny_config, use_sdpa):
    model = GPT(GPTConfig(**{**tiny_config.__dict__, "use_sdpa": use_sdpa})).eval()
    prompts = prompts_of([3, 7, 1], tiny_config.vocab_size)  # left padding and a cache, together
    for temperature in (0, 1.0):
        a = generate(model, prompts, 25, temperature=temperature, generator=torch.Generator().manual_seed(5))
        b = generate(model, prompts, 25, temperature=temperature, use_cache=False, generator=torch.Generator().manual_seed(5))
        assert a == b


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_a_batch_of_prompts_equals_each_prompt_alone(tiny_config, use_sdpa):
    model = GPT(GPTConfig(**{**tiny_config.__dict__, "use_sdpa": use_sdpa})).eval()
    prompts = prompts_of([2, 9, 5], tiny_config.vocab_size)
    batch = generate(model, prompts, 20, temperature=0)
    assert batch == [generate(model, [p], 20, temperature=0)[0] for p in prompts]


def test_generation_stops_per_row(model, tiny_config):
    prompts = prompts_of([4, 4, 6], tiny_config.vocab_size)
    free = generate(model, prompts, 20, temperature=0)
    stop = free[0][2]  # the third token row 0 writes becomes a stop token
    out = generate(model, prompts, 20, temperature=0, stop_ids=[stop])
    for row, full in zip(out, free):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert row == full[:cut]  # each row ends at its own first stop token, the others run on
    assert len(out[0]) <= 3 and out[0][-1] == stop


def test_generation_runs_past_the_context(model, tiny_config):
    W, prompt = tiny_config.block_size, prompts_of([5], tiny_config.vocab_size)[0]
    torch.manual_seed(3)
    for p in model.parameters():  # large weights: the greedy choice depends on the context, not one token over and over
        p.data.normal_(0, 0.5)

    def by_hand(restart_to):
        """Greedy decoding step by step: when the window is full, keep its last restart_to tokens."""
        ids, start = list(prompt), 0
        for _ in range(80):
            if len(ids) - start > W:
                start = len(ids) - restart_to
            logits, _ = model(torch.tensor([ids[start:]]))
            ids.append(int(logits[0, -1].argmax()))
        return ids[len(prompt):]

    # without the cache the window slides by one token; with it, a full window restarts from its last half
    assert generate(model, [prompt], 80, temperature=0, use_cache=False)[0] == by_hand(W)
    assert generate(model, [prompt], 80, temperature=0)[0] == by_hand(W // 2)
    assert by_hand(W) != by_hand(W // 2)  # the model reads its context, so the two policies write different tokens


def test_top_k_and_top_p_keep_exactly_the_likely_ids():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) == {0, 1}
    # probabilities about .72, .27, ...: top_p 0.5 keeps id 0 only, 0.9 keeps ids 0 and 1
    assert set(sample_next(logits, top_p=0.5, generator=g).tolist()) == {0}
    assert set(sample_next(logits, top_p=0.9, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, top_p=0.99, generator=g).tolist()) == {0, 1, 2}
    assert sample_next(logits, temperature=0).tolist() == [0] * 2000


def test_top_k_and_top_p_at_exact_ties():
    g = torch.Generator().manual_seed(0)
    halves = torch.tensor([[0.5, 0.25, 0.25]]).log().repeat(2000, 1)
    assert set(sample_next(halves, top_p=0.5, generator=g).tolist()) == {0}  # id 0 alone reaches 0.5
    assert set(sample_next(halves, top_p=0.75, generator=g).tolist()) == {0, 1}
    tied = torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(2000, 1)
    assert len(set(sample_next(tied, top_k=2, generator=g).tolist())) == 2  # two of the three tied ids, not three


def test_sampling_runs_in_float32_whatever_the_logits_dtype():
    logits = torch.randn(64, 500).bfloat16()
    a = sample_next(logits, top_k=50, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = sample_next(logits.float(), top_k=50, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_sampling_follows_the_softmax_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.log().repeat(40000, 1)  # log 0 = -inf: an id that must never come out
    ids = sample_next(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=5).float() / len(ids)
    assert freq[4] == 0 and torch.allclose(freq, probs, atol=0.01), freq  # 4 standard errors at most
    hot = sample_next(logits, temperature=0.5, generator=torch.Generator().manual_seed(0))
    sharpened = probs ** 2 / (probs ** 2).sum()  # temperature 0.5 squares the probabilities
    assert torch.allclose(torch.bincount(hot, minlength=5).float() / len(hot), sharpened, atol=0.01)


def test_the_plain_generate_of_model_py_writes_what_the_cached_one_writes(model, tiny_config):
    """model.generate reads the whole window again for every token; at top_k=1 it is greedy, as temperature 0 is."""
    prompt = prompts_of([5], tiny_config.vocab_size)[0]
    plain = model.generate(torch.tensor([prompt]), 20, top_k=1)  # (1, 5 + 20)
    assert plain.shape == (1, 25) and plain[0, :5].tolist() == prompt
    assert plain[0, 5:].tolist() == generate(model, [prompt], 20, temperature=0)[0]
    sampled = model.generate(torch.tensor([prompt] * 3), 60, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (3, 65)  # past the context of 32: the window slides


def test_write_gives_each_answer_without_its_stop_and_whether_it_stopped(model, tokenizer):
    model.train()
    free = write(model, tokenizer, ["春", "秋"], 12, stop=None)
    assert all(isinstance(a, Answer) and not a.stopped for a in free) and model.training  # its mode given back
    stop = free[0].text[3]  # a character the first answer writes becomes the stop
    answers = write(model, tokenizer, ["春", "秋"], 12, stop=stop)
    assert answers[0] == Answer(free[0].text[:free[0].text.index(stop)], True)
    assert write(model, tokenizer, ["春"], 12, stop="\n\n") == write(model, tokenizer, ["春"], 12, stop=None)[:1]

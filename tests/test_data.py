import gzip
import json

import pytest
import torch

from minigpt.data import (PLAIN, TITLE_TO_POEM, CorpusError, Poem, PretrainData, clauses, leak, load_poems, poem_groups,
                          pretrain_text, render_sft, sft_batch, split_poems)
from minigpt.verse import MEANINGLESS_TITLES, clean_title, is_regular
from minigpt.model import GPT, IGNORE_INDEX

from conftest import FIXTURE_CORPUS


def test_split_is_deterministic_and_roughly_90_5_5(splits):
    assert split_poems(load_poems(FIXTURE_CORPUS)) == splits
    # the fixture was picked per split; on many made-up poems the buckets come out near 90/5/5
    made_up = [Poem(str(i), "", (f"{i}，{i * 7}。",)) for i in range(4000)]
    counts = {k: len(v) for k, v in split_poems(made_up).items()}
    assert 3500 < counts["train"] < 3700 and 150 < counts["val"] < 250 and 150 < counts["test"] < 250


def test_poems_that_share_a_couplet_land_in_one_split():
    # 200 poems, each a near-copy of the one before: one couplet kept, one changed by a character
    chain = [Poem(f"題{i}", "", (f"山{i}水{i}，雲{i}月{i}。", f"山{i + 1}水{i + 1}，雲{i + 1}月{i + 1}。")) for i in range(200)]
    loners = [Poem(f"獨{i}", "", (f"花{i}，鳥{i}。",)) for i in range(300)]
    groups = poem_groups(chain + loners)
    assert len(set(groups[:200])) == 1 and len(set(groups[200:])) == 300
    splits = split_poems(chain + loners)
    assert sum(chain[0] in ps for ps in splits.values()) == 1
    home = next(name for name, ps in splits.items() if chain[0] in ps)
    assert all(p in splits[home] for p in chain)
    assert {name: len(ps) > 0 for name, ps in splits.items()} == {"train": True, "val": True, "test": True}
    # punctuation does not hide a copy, and the order of the file does not move a poem
    copy = Poem("另一題", "", ("山0水0？雲0月0！",))
    assert poem_groups([chain[0], copy]) == [0, 0]
    assert split_poems(list(reversed(chain + loners)))["test"] == list(reversed(splits["test"]))


def test_leak_counts_couplets_clauses_and_poems_of_a_held_out_split():
    splits = {"train": [Poem("a", "", ("白日依山盡，黃河入海流。", "欲窮千里目，更上一層樓。"))],
              "test": [Poem("b", "", ("白日依山盡，黃河入海流！", "欲窮千里目，更上二層樓。")),
                       Poem("c", "", ("春眠不覺曉，處處聞啼鳥。", "夜來風雨聲，花落知多少。"))]}
    out = leak(splits, "test")
    assert out["couplets"] == 0.25  # 1 of the 4 held-out couplets, punctuation aside
    assert out["clauses"] == 3 / 8  # 白日依山盡, 黃河入海流, 欲窮千里目
    assert out["poems_half_in_train"] == 1
    assert clauses("白日依山盡，黃河入海流。\n《欲窮》千里目") == ["白日依山盡", "黃河入海流", "欲窮千里目"]


def test_pretraining_text_is_poems_one_after_another(splits, tokenizer):
    data = PretrainData(splits, tokenizer)
    first = splits["train"][0]
    assert tokenizer.decode(data.train[:len(first.title) + 1].tolist()) == first.title + "\n"
    assert PLAIN.prompt("春曉") + "x" + PLAIN.end == "春曉\nx\n\n"
    assert len(data.train_starts) == len(splits["train"]) and len(data.val_starts) == len(splits["val"])
    for start, poem in zip(data.train_starts.tolist(), splits["train"]):  # each start is where a poem's text begins
        assert tokenizer.decode(data.train[start:start + len(poem.title) + len(poem.body) + 3].tolist()) == pretrain_text(poem)


def test_every_pretraining_window_starts_at_a_title(splits, tokenizer):
    data = PretrainData(splits, tokenizer)
    x, y = data.get_batch(64, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (64, 16) and torch.equal(x[:, 1:], y[:, :-1])
    titles = {tokenizer.decode(data.train[s:s + 16].tolist()) for s in data.train_starts.tolist()}
    assert all(tokenizer.decode(row.tolist()) in titles for row in x)
    assert len({tokenizer.decode(row.tolist()) for row in x}) > 32  # random poems, not one
    after = {s - 1 for s in data.train_starts.tolist()} & set(range(len(data.train)))
    assert all(tokenizer.itos[data.train[s].item()] == "\n" for s in after)  # a blank line ends the poem before
    val = data.val_batches(2, 3, 16)  # six fixed windows from titles spread over the val stream, first to last
    assert [len(b[0]) for b in val] == [3, 3] and torch.equal(val[0][0][0], data.val[:16])
    last = data.val_starts[data.val_starts + 17 <= len(data.val)][-1]
    assert torch.equal(val[1][0][2], data.val[last:last + 16]) and torch.equal(val[1][1][2], data.val[last + 1:last + 17])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(val, data.val_batches(2, 3, 16)))  # the same every time


def test_a_corpus_shorter_than_one_window_is_named(splits, tokenizer):
    data = PretrainData(splits, tokenizer)
    with pytest.raises(CorpusError, match=r"the val poems hold \d+ characters, fewer than one window of \d+; use a larger"):
        data.val_batches(1, 2, len(data.val))


def test_bad_corpus_lines_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "a", "author": "", "lines": ["一"]}\n{"title": "b", "lines": \n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad.jsonl, line 2"):
        load_poems(str(bad))
    with pytest.raises(CorpusError, match="not found"):
        load_poems(str(tmp_path / "missing.jsonl"))
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(json.dumps({"title": "a", "lines": ["一"]}).encode() * 50)[:30])
    with pytest.raises(CorpusError, match="damaged or truncated"):
        load_poems(str(truncated))




def test_sft_example_format_and_mask(tokenizer):
    ids, mask = render_sft(tokenizer, "春", "山，水。")
    assert tokenizer.decode(ids) == "<INS>請用以下題目寫一首詩<INP>春<RES>山，水。<END>"
    n_prompt = len(tokenizer.encode(TITLE_TO_POEM.prompt("春"), unknown="unk"))
    assert mask == [0] * n_prompt + [1] * 5  # the answer's 4 characters and <END>
    assert ids[n_prompt - 1] == tokenizer.res_id and ids[-1] == tokenizer.end_id


def test_padded_batch_masks_exactly_the_prompt_and_the_padding(tokenizer):
    examples = [render_sft(tokenizer, "春", "山，水。"), render_sft(tokenizer, "春夜", "山，水。\n山，水。")]
    x, y = sft_batch(examples, tokenizer.pad_id)
    for b, (ids, mask) in enumerate(examples):
        trained = (y[b] != IGNORE_INDEX).tolist()
        assert trained == [bool(m) for m in mask[1:]] + [False] * (x.size(1) - len(ids) + 1)
        assert tokenizer.decode(y[b][y[b] != IGNORE_INDEX].tolist()) == tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert (x[0, len(examples[0][0]) - 1:] == tokenizer.pad_id).all()
    x, y = sft_batch(examples, tokenizer.pad_id, train_on_prompt=True)
    assert (y[1] != IGNORE_INDEX).all() and (y[0] != IGNORE_INDEX).sum() == len(examples[0][0]) - 1


def test_padded_batch_gives_the_same_loss_as_examples_one_by_one(tokenizer, tiny_config):
    model = GPT(tiny_config).eval()
    examples = [render_sft(tokenizer, "春", "山，水。"), render_sft(tokenizer, "春夜", "山，水。\n山，水。"), render_sft(tokenizer, "秋", "月。")]
    x, y = sft_batch(examples, tokenizer.pad_id)
    logits, batch_loss = model(x, y)
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    alone = []
    for ex in examples:
        xi, yi = sft_batch([ex], tokenizer.pad_id)
        li, loss_i = model(xi, yi)
        alone.append((loss_i * (yi != IGNORE_INDEX).sum(), (yi != IGNORE_INDEX).sum()))
    total, count = sum(a for a, _ in alone), sum(n for _, n in alone)
    assert torch.allclose(per_token, total, atol=1e-4)
    assert torch.allclose(batch_loss, total / count, atol=1e-5)


def test_sft_data_leaves_out_meaningless_titles_and_what_does_not_fit(splits, tokenizer):
    from minigpt.tasks import single_poem_task, task_data
    train = splits["train"]
    data = task_data(train, tokenizer, 64, [single_poem_task("all")], {})
    meaningless = sum(clean_title(p.title) in MEANINGLESS_TITLES for p in train)
    assert meaningless >= 3 and data.counts["too_long"] > 0
    assert data.counts["poem"] + meaningless + data.counts["too_long"] == len(train) == data.counts["poems"]
    assert all(len(ids) <= 65 and ids[-1] == tokenizer.end_id for ids, _ in data.examples)
    regular = task_data(train, tokenizer, 64, [single_poem_task("regular")], {})
    answers = [tokenizer.decode([i for i, m in zip(ids, mask) if m][:-1]) for ids, mask in regular.examples]
    assert 0 < len(answers) < data.counts["poem"] and all(is_regular(a) for a in answers)


@pytest.mark.slow
def test_no_couplet_of_val_or_test_stands_in_train_on_the_real_corpus():
    splits = split_poems(load_poems())  # the full corpus in poems/: the figure poems/README.md reports
    for held_out in ("val", "test"):
        share = leak(splits, held_out)
        assert share["couplets"] < 0.005 and share["poems_half_in_train"] == 0, (held_out, share)
        assert share["clauses"] < 0.02, (held_out, share)  # stock phrases only: about 1%
        assert 0.04 < len(splits[held_out]) / sum(map(len, splits.values())) < 0.06

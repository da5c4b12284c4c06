import gzip
import json

import pytest
import torch

from minigpt.data import (PLAIN, TITLE_TO_POEM, CorpusError, Poem, PretrainData, SFTData, clean_title, is_regular,
                          load_poems, render_sft, sft_batch, split_of, split_poems)
from minigpt.model import GPT, IGNORE_INDEX

from conftest import FIXTURE_CORPUS


def test_split_is_deterministic_disjoint_and_roughly_90_5_5(splits):
    again = split_poems(load_poems(FIXTURE_CORPUS))
    assert again == splits
    bodies = {name: {p.body for p in ps} for name, ps in splits.items()}
    assert not bodies["train"] & bodies["val"] and not bodies["train"] & bodies["test"] and not bodies["val"] & bodies["test"]
    # the fixture was picked per split; on many made-up poems the buckets come out near 90/5/5
    made_up = [Poem(str(i), "", (f"{i}，{i * 7}。",)) for i in range(4000)]
    counts = {k: len(v) for k, v in split_poems(made_up).items()}
    assert 3500 < counts["train"] < 3700 and 150 < counts["val"] < 250 and 150 < counts["test"] < 250


def test_split_depends_on_the_lines_only():
    a = Poem("題一", "甲", ("白日依山盡，黃河入海流。",))
    b = Poem("另一題", "乙", ("白日依山盡，黃河入海流。",))
    assert split_of(a) == split_of(b)


def test_pretraining_text_is_poems_one_after_another(splits, tokenizer):
    data = PretrainData(splits, tokenizer)
    first = splits["train"][0]
    assert tokenizer.decode(data.train[:len(first.title) + 1].tolist()) == first.title + "\n"
    assert PLAIN.prompt("春曉") + "x" + PLAIN.end == "春曉\nx\n\n"
    x, y = data.get_batch(4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(data.val_batches(2, 3, 16), data.val_batches(2, 3, 16)))


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


def test_titles_lose_numbering_only():
    assert clean_title("帝京篇十首 一") == "帝京篇十首"
    assert clean_title("雜詩 第三") == "雜詩"
    assert clean_title("秋興八首 十二") == "秋興八首"
    assert clean_title("郊廟歌辭 享太廟樂章 雍和") == "郊廟歌辭 享太廟樂章 雍和"
    assert clean_title("十五夜望月") == "十五夜望月"


def test_regular_form():
    assert is_regular("白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。")
    assert is_regular("\n".join(["朝辭白帝彩雲間，千里江陵一日還。"] * 4))
    assert not is_regular("白日依山盡，黃河入海流。")  # one line
    assert not is_regular("白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓")  # no closing 。
    assert not is_regular("白日依山盡，黃河入海流。\n朝辭白帝彩雲間，千里江陵一日還。")  # 5 and 7 mixed
    assert not is_regular("白日依山盡，黃河入海流。\n\n欲窮千里目，更上一層樓。")


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
    data = SFTData(splits["train"], tokenizer, block_size=64)
    assert data.counts["meaningless_title"] >= 3 and data.counts["too_long"] > 0
    assert data.counts["kept"] + data.counts["meaningless_title"] + data.counts["too_long"] == len(splits["train"])
    assert all(len(ids) <= 65 and ids[-1] == tokenizer.end_id for ids, _ in data.examples)
    assert not {"", "句", "失題"} & set(data.titles)
    regular = SFTData(splits["train"], tokenizer, block_size=64, regular_only=True)
    assert regular.counts["not_regular"] > 0 and all(is_regular(a) for a in regular.answers)

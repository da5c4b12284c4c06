"""The pictures of the decision to stop (python -m minigpt.explain) and the classroom demo (python -m minigpt.demo)."""
import io

import pytest
import torch
import torch.nn.functional as F

import train_pretrain
import train_sft
from minigpt import demo, explain
from minigpt.data import PLAIN, TITLE_TO_POEM
from minigpt.model import GPT
from minigpt.sample import to_simplified

from conftest import FIXTURE_CORPUS


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pre, sft = tmp_path_factory.mktemp("pre"), tmp_path_factory.mktemp("sft")
    train_pretrain.main(["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--out-dir", str(pre), "--overwrite"])
    train_sft.main(["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--init-from", str(pre), "--out-dir", str(sft), "--overwrite"])
    return str(pre), str(sft)


@pytest.fixture(scope="module")
def title(splits):
    """A train title with a character that simplified Chinese writes otherwise."""
    return next(w for p in splits["train"] for w in [p.title.split()[0][:4]] if to_simplified(w) != w)


@pytest.mark.parametrize("use_sdpa", [False, True])
def test_attention_maps_are_the_weights_the_model_uses(tiny_config, tokenizer, use_sdpa):
    tiny_config.use_sdpa = use_sdpa
    model = GPT(tiny_config).eval()
    ids = tokenizer.encode("春山不見人，處處聞啼鳥。")
    seen = []  # each layer's values and output, as the model computes them
    hooks = [b.attn.register_forward_hook(lambda m, args, out: seen.append((args[0], out))) for b in model.blocks]
    maps = explain.attention_maps(model, ids)
    for h in hooks:
        h.remove()
    T, nh = len(ids), tiny_config.n_head
    assert maps.shape == (tiny_config.n_layer, nh, T, T)
    assert torch.allclose(maps.sum(-1), torch.ones(tiny_config.n_layer, nh, T), atol=1e-5)  # each row is a distribution
    assert (maps.triu(diagonal=1) == 0).all()  # nothing from the future
    for block, att, (x, out) in zip(model.blocks, maps, seen):
        v = block.attn.qkv(x).split(tiny_config.n_embd, dim=2)[2].view(1, T, nh, -1).transpose(1, 2)  # (1, nh, T, hs)
        y = (att[None] @ v).transpose(1, 2).reshape(1, T, -1)  # the weights, applied to the values
        assert torch.allclose(block.attn.proj(y), out, atol=1e-5)


def test_end_probabilities_are_the_models_own(model, tokenizer):
    prompt, answer = TITLE_TO_POEM.prompt("春"), "山光，水色。"
    p = explain.end_probabilities(model, tokenizer, prompt, answer, "<END>")
    ids = torch.tensor([tokenizer.encode(prompt + answer)])
    probs = F.softmax(model(ids)[0][0], dim=-1)[:, tokenizer.stoi["<END>"]]  # (T,)
    n = len(tokenizer.encode(prompt))
    assert len(p) == len(answer) + 1 and torch.allclose(torch.tensor(p), probs[n - 1:], atol=1e-5)
    # two tokens: the blank line that ends a poem in the base model's text is one newline, then another
    q = explain.end_probabilities(model, tokenizer, PLAIN.prompt("春"), answer, "\n\n")
    nl = tokenizer.stoi["\n"]
    by_hand = F.softmax(model(torch.tensor([tokenizer.encode("春\n山光\n")]))[0][0], dim=-1)
    assert q[2] == pytest.approx((by_hand[-2, nl] * by_hand[-1, nl]).item(), rel=1e-4)


def test_next_chars_follow_the_temperature(model, tokenizer):
    tops = explain.next_chars(model, tokenizer, "春山不見", temperatures=(0.5, 2.0), k=10)
    logits = model(torch.tensor([tokenizer.encode("春山不見")]))[0][0, -1]
    sharp, flat = tops[0.5], tops[2.0]
    assert [c for c, _ in sharp] == [c for c, _ in flat]  # the same order, other weights
    assert sharp[0][1] == pytest.approx(F.softmax(logits / 0.5, -1).max().item(), rel=1e-5)
    assert sharp[0][1] > flat[0][1] and sum(p for _, p in flat) < sum(p for _, p in sharp) <= 1 + 1e-6


def test_explain_writes_three_pictures(runs, tmp_path, title, capsys):
    pre, sft = runs
    out = explain.main(["--title", to_simplified(title), "--pretrain", pre, "--sft", sft, "--out-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert f"({to_simplified(title)} -> {title})" in printed  # typed simplified, read traditional, shown
    for name in ("end_probability.png", "next_char.png", "attention.png"):
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(out["p_end_sft"]) == len(out["answer"]) + 1 and out["position"] == len(out["answer"])
    assert out["attention"].shape[2:] == (len(out["answer"]), len(title))
    for position, expected in ((3, 3), (-1, len(out["answer"])), (-2, len(out["answer"]) - 1), (999, len(out["answer"]))):
        again = explain.main(["--title", title, "--pretrain", pre, "--sft", sft, "--out-dir", str(tmp_path),
                              "--position", str(position)])
        assert again["position"] == expected and again["answer"] == out["answer"]  # the same seed, the same answer


@pytest.mark.parametrize("which, message", [("pretrain", "run python train_pretrain.py first"),
                                            ("sft", "run python train_sft.py first")])
def test_explain_and_demo_name_the_missing_run(runs, tmp_path, capsys, which, message):
    folders = dict(zip(("pretrain", "sft"), runs), **{which: str(tmp_path / "none")})
    for tool, extra in ((explain, ["--title", "春"]), (demo, [])):
        with pytest.raises(SystemExit) as e:
            tool.main(["--pretrain", folders["pretrain"], "--sft", folders["sft"], *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and message in err[0]


def test_demo_writes_both_side_by_side(runs, title):
    pre, sft = runs
    typed = iter([to_simplified(title), "xyz", title, ""])
    out = io.StringIO()
    shown = demo.main(["--pretrain", pre, "--sft", sft, "--cap", "30", "--delay", "0"], read=lambda _: next(typed), out=out)
    text = out.getvalue()
    assert shown == 2  # the unknown title is refused in one line and the demo goes on; the empty line ends it
    assert f"({to_simplified(title)} -> {title})" in text and "never saw: x y z" in text
    assert text.count("(no end: 30 characters, the cap)") == 2  # the base model runs on to the cap
    assert "fine-tuned: <INS>請用以下題目寫一首詩<INP>" in text and text.endswith("bye\n")


def test_demo_ends_on_ctrl_c(runs):
    def interrupted(_):
        raise KeyboardInterrupt
    out = io.StringIO()
    assert demo.main(["--pretrain", runs[0], "--sft", runs[1]], read=interrupted, out=out) == 0
    assert out.getvalue().endswith("bye\n")


def test_columns_count_chinese_characters_as_two():
    assert demo.width("春a") == 3
    assert demo.wrap("春山不見人", 4) == ["春山", "不見", "人"]
    lines = demo.side_by_side("春山\n不見人", "山", 6)
    assert lines == ["春山   │ 山", "不見人 │ "]
    assert len({demo.width(line.split("│")[0]) for line in lines}) == 1  # the divider lines up


def test_demo_redraws_in_a_terminal(runs, title):
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    typed = iter([title, ""])
    out = Terminal()
    demo.main(["--pretrain", runs[0], "--sft", runs[1], "--cap", "12", "--delay", "0"], read=lambda _: next(typed), out=out)
    text = out.getvalue()
    assert text.count("\x1b[J") >= 11  # the columns are drawn again after each character
    assert "(no end: 12 characters, the cap)" in text

"""The user-facing writer: python -m minigpt.sample, and the title checks behind it."""
import pytest

import train_pretrain
import train_sft
from minigpt import sample
from minigpt.sample import TitleError, check_title, to_simplified, to_traditional

from conftest import FIXTURE_CORPUS


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pre, sft = tmp_path_factory.mktemp("pre"), tmp_path_factory.mktemp("sft")
    train_pretrain.main(["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--out-dir", str(pre), "--overwrite"])
    train_sft.main(["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--init-from", str(pre), "--out-dir", str(sft), "--overwrite"])
    return pre, sft


def test_simplified_titles_become_the_corpus_characters():
    assert to_traditional("登鹳雀楼") == "登鸛雀樓" and to_traditional("黄鹤楼送别") == "黃鶴樓送別"
    assert to_traditional("春夜喜雨") == "春夜喜雨" and to_traditional("登鸛雀樓") == "登鸛雀樓"  # traditional stays
    assert to_simplified("白日依山盡，黃河入海流。") == "白日依山尽，黄河入海流。"


def test_titles_are_checked(tokenizer, splits):
    title = splits["train"][0].title.split()[0][:4]
    assert check_title(f"  {title} ", tokenizer, 64) == title
    with pytest.raises(TitleError, match="empty title"):
        check_title("   ", tokenizer, 64)
    with pytest.raises(TitleError, match="control marker <END>"):
        check_title("<END>" + title, tokenizer, 64)
    with pytest.raises(TitleError, match="too long"):
        check_title(title * 20, tokenizer, 64)
    other = next(w for p in splits["train"] for w in [p.title.split()[0][:4]] if to_simplified(w) != w)
    assert check_title(to_simplified(other), tokenizer, 64) == other  # typed in simplified, read in traditional
    with pytest.raises(TitleError, match=r"never saw: x"):
        check_title(title + "x", tokenizer, 64)
    assert check_title(title + "x", tokenizer, 64, allow_unknown=True) == title + "x"


def test_each_stage_is_prompted_in_the_format_it_learnt():
    from minigpt.tasks import CHAT_POEM
    assert sample.answer_format({"stage": "pretrain"}).prompt("春") == "春\n"
    for stage in ("sft", "dpo"):
        assert sample.answer_format({"stage": stage}).prompt("春") == "<INS>請用以下題目寫一首詩<INP>春<RES>"
        assert sample.answer_format({"stage": stage, "format": "chat"}) == CHAT_POEM


def test_sample_writes_for_each_title(runs, capsys, tokenizer, splits):
    _, sft = runs
    title = splits["train"][0].title.split()[0][:4]
    other = next(w for p in splits["train"] for w in [p.title.split()[0][:4]] if to_simplified(w) != w)
    answers = sample.main(["--checkpoint", str(sft), "--title", title, to_simplified(other), "--max-new-tokens", "20"])
    out = capsys.readouterr().out
    assert len(answers) == 2 and f"【{title}】" in out
    assert f"【{other}】  ({to_simplified(other)} -> {other})" in out  # typed in simplified: the converted title is shown
    sample.main(["--checkpoint", str(sft), "--title", title, "--max-new-tokens", "20", "--simplified"])
    assert f"【{to_simplified(title)}】" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--title", "xyz"], "never saw: x y z"),
    (["--title", ""], "empty title"),
    (["--title", "山" * 80], "too long"),
    (["--title", "山", "--temperature", "-1"], "temperature"),
])
def test_sample_user_errors_are_one_line(runs, capsys, argv, message):
    _, sft = runs
    with pytest.raises(SystemExit) as e:
        sample.main(["--checkpoint", str(sft), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0]


def test_sample_refuses_a_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["--checkpoint", str(tmp_path / "nothing"), "--title", "春"])
    assert e.value.code == 2 and "no checkpoint" in capsys.readouterr().err


def test_a_system_message_is_checked_for_a_chat_model(tokenizer, splits):
    from minigpt.data import CHAT_POEM, TITLE_TO_POEM
    from minigpt.sample import check_system, system_prompt
    chat, title = tokenizer.with_roles(), splits["train"][0].title.split()[0][:4]
    assert check_system(f" {title} ", chat, 64, CHAT_POEM) == title
    assert system_prompt(title, "春") == f"<SYS>{title}<EOT><USR>春<EOT><AST>"
    with pytest.raises(TitleError, match="needs a chat model"):
        check_system(title, tokenizer, 64, TITLE_TO_POEM)
    with pytest.raises(TitleError, match="control marker <EOT>"):
        check_system(title + "<EOT>", chat, 64, CHAT_POEM)
    with pytest.raises(TitleError, match="never saw: x"):
        check_system(title + "x", chat, 64, CHAT_POEM)
    with pytest.raises(TitleError, match="too long"):
        check_system(title * 12, chat, 64, CHAT_POEM)


def test_sample_shows_a_refusal_as_one_and_refuses_a_system_message_without_chat(runs, capsys, monkeypatch, splits):
    from minigpt.tasks import REFUSAL
    _, sft = runs
    title = splits["train"][0].title.split()[0][:4]
    with pytest.raises(SystemExit) as e:
        sample.main(["--checkpoint", str(sft), "--title", title, "--system", title])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "needs a chat model" in err[0]
    monkeypatch.setattr(sample, "write", lambda *a, **kw: [(REFUSAL.format(why="這會傷人性命"), True), ("白日依山盡", True)])
    sample.main(["--checkpoint", str(sft), "--title", title, title])
    out = capsys.readouterr().out
    assert out.count("(refused: it declines the request)") == 1

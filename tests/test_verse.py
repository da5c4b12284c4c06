"""The rules of verse on hand-made strings: titles, clauses, the regular shapes and forms, where a poem ends, line
endings and rhyme groups."""
from minigpt.data import Poem
from minigpt.verse import (CLAUSE_MARKS, PUNCTUATION, after_first_poem, clauses, clean_title, couplet_keys, first_poem,
                           form_of, is_regular, learn_rhyme_groups, line_endings, rhymes)

QUATRAIN = "白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。"


def test_punctuation_is_one_set_read_by_every_rule():
    assert set(CLAUSE_MARKS) <= set(PUNCTUATION.pattern)
    assert clauses("《春》曉，處處「聞」啼鳥；夜來：風雨聲、花落知多少？") == ["春曉", "處處聞啼鳥", "夜來", "風雨聲", "花落知多少"]
    assert couplet_keys(["白日依山盡，黃河入海流。", "，。", "「欲窮」千里目"]) == ["白日依山盡黃河入海流", "欲窮千里目"]
    assert line_endings("白日依山盡；\n黃河入海流：") == ["盡", "流"]  # every clause mark may close a line


def test_where_the_first_poem_ends():
    assert first_poem(QUATRAIN + "\n\n送友人\n青山橫北郭") == QUATRAIN
    assert after_first_poem(QUATRAIN + "\n\n送友人\n青山橫北郭") == "送友人青山橫北郭"
    assert after_first_poem(QUATRAIN + "\n\n") == "" and after_first_poem(QUATRAIN) == ""
    assert form_of(first_poem(QUATRAIN + "\n送友人\n" + QUATRAIN)) == "五言絕句"


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
    assert is_regular("借問酒家何處有？牧童遙指杏花村。\n清明時節雨紛紛，路上行人欲斷魂！")  # ？ and ！ end clauses too
    assert not is_regular("白日依山盡黃河入海流。\n欲窮千里目，更上一層樓。")


def test_line_endings_and_rhyme():
    assert line_endings(QUATRAIN) == ["流", "樓"]
    groups = {"流": "A", "樓": "A", "頭": "A", "鳥": "B", "少": "B"}
    assert rhymes(QUATRAIN, groups)
    assert not rhymes("白日依山盡，黃河入海鳥。\n欲窮千里目，更上一層樓。", groups)  # 鳥 and 樓: two groups
    assert not rhymes("白日依山盡，黃河入海樓。\n欲窮千里目，更上一層樓。", groups)  # the same character twice is no rhyme
    assert not rhymes("白日依山盡，黃河入海流。\n欲窮千里目，更上一層天。", groups)  # 天 is in no group


def test_rhyme_groups_are_learnt_from_poems_whose_endings_rhyme_together():
    rhyming = [Poem(str(i), "", (f"{a}{a}{a}{a}{a}，{a}{a}{a}{a}{x}。", f"{b}{b}{b}{b}{b}，{b}{b}{b}{b}{y}。"))
               for i, (a, b, x, y) in enumerate([("山", "水", "流", "樓")] * 5 + [("花", "月", "鳥", "少")] * 5
                                                + [("雲", "風", "流", "頭")] * 2)]
    groups = learn_rhyme_groups((p.body for p in rhyming), strong=5, weak=2)
    assert groups["流"] == groups["樓"] and groups["鳥"] == groups["少"] and groups["流"] != groups["鳥"]
    assert groups["頭"] == groups["流"]  # seen twice with 流: joins its group
    assert "天" not in groups


def test_rhyme_groups_need_enough_evidence_and_regular_poems():
    def quatrain(x, y):
        return f"山山山山山，水水水水{x}。\n月月月月月，風風風風{y}。"
    rhyming = [quatrain("流", "樓")] * 5 + [quatrain("雲", "流")] * 1  # 雲 ends a line with 流 once: too little
    groups = learn_rhyme_groups(rhyming, strong=5, weak=2)
    assert groups["流"] == groups["樓"] and "雲" not in groups
    irregular = ["山山山山山山，水水水水流。\n月月月月月，風風風風鳥。"] * 6  # 鳥 with 流, but not in regular verse
    groups = learn_rhyme_groups(rhyming + irregular, strong=5, weak=2)
    assert "鳥" not in groups

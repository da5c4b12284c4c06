"""The corpus rebuild's cleaning rules, on hand-made records shaped like the npm package's."""
from poems.build_corpus import clean, clean_lines, strip_notes


def record(title, lines, author="某"):
    return {"title": title, "author": author, "paragraphs": lines}


def test_editorial_notes_leave_titles_and_lines():
    assert strip_notes("邏人（一作「叉」）橫鳥道，江祖出魚梁。") == "邏人橫鳥道，江祖出魚梁。"
    assert strip_notes("塞上聽彈胡笳作（幷序）") == "塞上聽彈胡笳作"
    assert strip_notes("長門怨（[一]伯三一九五二七四八）") == "長門怨"
    assert strip_notes("（按〖1〗見《全唐詩》卷三（又見卷五））") == ""  # nested notes go whole
    assert strip_notes("華[一○]軒繡轂皆銷散，[爽]節在重九。") == "華軒繡轂皆銷散，爽節在重九。"  # footnote mark; restored character kept


def test_notes_that_span_lines_or_stand_alone_go():
    lines = ["白日依山盡，黃河入海流。", "（〖1〗這首詩見敦煌本，", "曾經廣泛流傳。）。", "欲窮千里目，更上一層樓。",
             "見《太平廣記》卷四八九引。", "已焉哉，嗟嗟乎鄙夫！。", "（《唐詩紀事》五八《李洞》。"]
    assert clean_lines(lines) == ["白日依山盡，黃河入海流。", "欲窮千里目，更上一層樓。", "已焉哉，嗟嗟乎鄙夫！"]


def test_clean_counts_what_each_rule_drops():
    raw = [record("登鸛雀樓（一作「題」）", ["白日依山盡，黃河入海流。", "欲窮千里目，更上一層樓。"]),
           record("登鸛雀樓", ["白日依山盡，黃河入海流。", "欲窮千里目，更上一層樓（一作「頭」）。"]),  # a duplicate once cleaned
           record("注", ["（見《金石萃編》卷一百五。）"]),  # nothing but a note
           record("缺字", ["昔在{亠/樂}河外，征馬倦風塵。"]),  # a glyph the source could not print
           record("缺字二", ["□□啼深竹，鵁鶄老溼沙。"]),
           record("序", ["余嘗遊於此「山」，因作是詩。"]),  # prose with quotes: not verse
           record("春曉", ["春眠不覺曉，處處聞啼鳥。"])]
    poems, counts = clean(raw)
    assert [p["title"] for p in poems] == ["登鸛雀樓", "春曉"]
    assert poems[0]["lines"] == ["白日依山盡，黃河入海流。", "欲窮千里目，更上一層樓。"]
    assert counts == {"read": 7, "notes_in_title": 1, "notes_in_lines": 2, "no_verse_left": 1, "missing_glyph": 2,
                      "not_verse": 1, "duplicate": 1, "kept": 2}

"""The instruction tasks: forms, each checker on hand-made answers, how examples are made and phrased, what is held out."""
import collections
import re

import pytest

from minigpt.data import Poem
from minigpt.tasks import BY_NAME, TASKS, Example, by_phrasing, examples, head_hits, phrasing_of
from minigpt.verse import form_of

WUJUE = "白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。"
QIJUE = "朝辭白帝彩雲間，千里江陵一日還。\n兩岸猿聲啼不住，輕舟已過萬重山。"
WULU = "國破山河在，城春草木深。\n感時花濺淚，恨別鳥驚心。\n烽火連三月，家書抵萬金。\n白頭搔更短，渾欲不勝簪。"
QILU = ("風急天高猿嘯哀，渚清沙白鳥飛回。\n無邊落木蕭蕭下，不盡長江滾滾來。\n"
        "萬里悲秋常作客，百年多病獨登臺。\n艱難苦恨繁霜鬢，潦倒新亭濁酒杯。")
GROUPS = {"流": 1, "樓": 1, "州": 1, "深": 2, "心": 2, "金": 2, "簪": 2, "盡": 3}


def ex(task, input_text="", want=None):
    return Example(task, "", input_text, "", want)


def test_the_four_forms_are_told_apart():
    assert [form_of(p) for p in (WUJUE, QIJUE, WULU, QILU)] == ["五言絕句", "七言絕句", "五言律詩", "七言律詩"]
    assert form_of("白日依山盡，黃河入海流。") is None  # one couplet
    assert form_of(WUJUE.replace("海", "大海")) is None  # a six-character clause
    assert form_of(WUJUE + "\n" + QIJUE.split("\n")[0]) is None  # five- and seven-character couplets mixed


def test_poem_and_form_checkers():
    poem, form = BY_NAME["poem"].check, BY_NAME["form"].check
    assert poem(WUJUE, ex("poem")) and poem(QILU, ex("poem"))
    assert not poem(WUJUE + "\n\n登樓\n" + WUJUE, ex("poem"))  # runs on into a second poem
    assert not poem("白日依山盡黃河入海流", ex("poem"))
    assert form(QIJUE, ex("form", want="七言絕句")) and not form(WUJUE, ex("form", want="七言絕句"))
    assert not form(QIJUE + "\n\n又\n" + QIJUE, ex("form", want="七言絕句"))
    assert not form(QILU, ex("form", want="七言絕句")) and not form(WUJUE, ex("form", want="五言律詩"))  # length alone
    assert not form(WUJUE.replace("白日依山盡", "白日依青山盡"), ex("form", want="五言絕句"))
    followup = BY_NAME["followup"].check
    assert followup(QIJUE, ex("followup", want=7)) and not followup(WUJUE, ex("followup", want=7))
    mixed = QIJUE.split("\n")[0] + "\n" + WUJUE.split("\n")[1]  # a 七言 couplet, then a 五言 one: no regular poem
    assert not followup(mixed, ex("followup", want=7)) and not followup(mixed, ex("followup", want=5))


def test_acrostic_checker_counts_heads_in_order():
    want = "白黃欲更"
    assert BY_NAME["acrostic"].check(WUJUE, ex("acrostic", want=want))
    assert head_hits(WUJUE, want) == 4 and head_hits(WUJUE, "白黃更欲") == 2
    assert not BY_NAME["acrostic"].check(WUJUE, ex("acrostic", want="白黃更欲"))
    assert not BY_NAME["acrostic"].check(WULU, ex("acrostic", want=want))  # eight clauses for four heads
    eight = WUJUE + "\n" + WULU.split("\n", 2)[2]  # a 律詩 whose first four clauses have the heads: eight clauses
    assert head_hits(eight, want) == 4 and not BY_NAME["acrostic"].check(eight, ex("acrostic", want=want))
    uneven = WUJUE.replace("依山盡", "依青山盡")  # the four heads in place, a clause of six: not a regular poem
    assert head_hits(uneven, want) == 4 and not BY_NAME["acrostic"].check(uneven, ex("acrostic", want=want))


def test_continuation_keeps_the_form_of_the_given_couplet():
    first, rest = WULU.split("\n", 1)
    check = BY_NAME["continuation"].check
    assert check(rest, ex("continuation", first))
    assert check(rest.split("\n")[0], ex("continuation", first))  # two couplets in all: a 五言絕句, a regular length
    assert not check(QILU.split("\n", 1)[1], ex("continuation", first))  # seven characters after five
    assert not check(rest.split("\n", 1)[1], ex("continuation", first))  # three couplets: neither 絕句 nor 律詩
    assert not check(first, ex("continuation", first))  # the given couplet echoed: a 絕句 in shape, no continuation
    assert not check("\n".join([first] * 3), ex("continuation", first))  # echoed three times: a 律詩 in shape
    assert not check(rest.split("\n")[0] + "\n\n登樓\n" + WUJUE, ex("continuation", first))  # runs on


def test_naming_checker_wants_a_short_title_about_the_poem():
    check = BY_NAME["naming"].check
    assert check("登樓", ex("naming", WUJUE)) and check("黃河", ex("naming", WUJUE))
    assert not check("春夜喜雨", ex("naming", WUJUE))  # nothing of it in the poem
    assert not check("白日依山盡，黃河入海流。", ex("naming", WUJUE))  # a line of verse, not a title
    assert not check("登樓\n登樓", ex("naming", WUJUE)) and not check("", ex("naming", WUJUE))
    assert not check("白日依山盡", ex("naming", WUJUE)) and not check("樓", ex("naming", WUJUE))  # the poem's own text
    assert not check("白日依山", ex("naming", WUJUE)) and check("黃河", ex("naming", WUJUE))  # a word of it may name it
    assert not check("登樓遠望黃河白日千里更上層", ex("naming", WUJUE))  # thirteen characters: not a title
    assert check("登樓遠望黃河白日千里更上", ex("naming", WUJUE))  # twelve


def test_rhyme_checker_uses_the_asked_group():
    check = BY_NAME["rhyme"].check
    group_1 = frozenset(c for c, g in GROUPS.items() if g == 1)
    assert check(WUJUE, ex("rhyme", want=group_1))
    assert not check(WULU, ex("rhyme", want=group_1))  # it rhymes, in another group
    assert not check(WUJUE.replace("樓", "流"), ex("rhyme", want=group_1))  # the same ending twice
    assert not check(WUJUE.replace("依山盡", "依青山盡"), ex("rhyme", want=group_1))  # its endings rhyme; no regular poem


def test_examples_are_phrased_and_keep_the_unseen_combination_out_of_training():
    poems = [Poem(title, "", tuple(body.split("\n")))
             for title, body in [("登鸛雀樓", WUJUE), ("早發白帝城", QIJUE), ("春望", WULU), ("登高", QILU)]]
    train = examples(poems, TASKS, GROUPS)
    forms = [e for e in train if e.task == "form"]
    assert [e.want for e in forms] == ["五言絕句", "五言律詩", "七言律詩"]  # no 七言絕句 is asked for in training
    assert all(e.want in e.instruction for e in forms)
    held = [e for e in examples(poems, TASKS, GROUPS, held_out=True, train=False) if e.task == "form"]
    assert "七言絕句" in [e.want for e in held]
    assert all(e.instruction not in BY_NAME["form"].phrasings for e in held)
    acrostic = next(e for e in train if e.task == "acrostic" and e.answer == WUJUE)
    assert acrostic.want == "白黃欲更" and "白黃欲更" in acrostic.instruction and acrostic.input == "登鸛雀樓"
    cont = next(e for e in train if e.task == "continuation" and e.answer.startswith("感時"))
    assert cont.input == "國破山河在，城春草木深。"
    naming = next(e for e in train if e.task == "naming" and e.answer == "登鸛雀樓")
    assert naming.input == WUJUE
    rhyme = [e for e in train if e.task == "rhyme"]
    assert [e.answer for e in rhyme] == [WUJUE, WULU] and "樓" in rhyme[0].instruction  # 登高's endings are not grouped
    for e in train:  # every real answer complies with its own task
        assert BY_NAME[e.task].check(e.answer, e), e


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_every_task_has_held_out_phrasings(task):
    assert len(task.phrasings) >= 3 and len(task.held_out) >= 2
    assert not set(task.phrasings) & set(task.held_out)


def test_compose_pairs_each_request_with_each_ask_in_both_orders():
    from minigpt.tasks import compose
    got = compose(("押{rhyme}韻，寫詩",), ("押{rhyme}韻", "韻腳用{rhyme}字"), ("請寫詩，韻腳用{rhyme}",), requests=("寫首詩", "請寫詩"))
    assert got == ("押{rhyme}韻，寫詩", "寫首詩，押{rhyme}韻", "寫首詩：押{rhyme}韻", "請寫詩，押{rhyme}韻", "請寫詩：押{rhyme}韻",
                   "押{rhyme}韻，寫首詩", "押{rhyme}韻，請寫詩")  # 韻腳用{rhyme}: named as the held-out wording names it
    inside = compose((), ("押{rhyme}韻",), ("題目如下，請寫詩：押{rhyme}韻",), requests=("寫首詩", "請寫詩"))
    assert "請寫詩：押{rhyme}韻" not in inside and "寫首詩：押{rhyme}韻" not in inside  # '：押{' as the held-out one
    assert inside == ("寫首詩，押{rhyme}韻", "請寫詩，押{rhyme}韻", "押{rhyme}韻，寫首詩", "押{rhyme}韻，請寫詩")


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_no_trained_phrasing_holds_a_held_out_one(task):
    for held in task.held_out:
        assert not [p for p in task.phrasings if held in p or p in held]


@pytest.mark.parametrize("name", ["acrostic", "rhyme"])
def test_the_copying_tasks_never_name_their_characters_as_a_held_out_phrasing_does(name):
    """The words just before the slot are what a model keys on to find the characters to copy."""
    for held in BY_NAME[name].held_out:
        before = re.split(r"\{\w+\}", held)[0][-2:] + "{"
        assert len(before) == 3 and not [p for p in BY_NAME[name].phrasings if before in p], held


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_every_instruction_is_traced_to_its_own_phrasing(task):
    fields = {"form": "五言律詩", "heads": "春眠不覺", "length": "七言", "rhyme": "州", "ask": "自製火藥", "held": "在井水裡下毒"}
    for phrasing in task.phrasings + task.held_out:
        assert phrasing_of(task, phrasing.format(**fields)) == phrasing
    assert phrasing_of(task, "隨便寫點什麼") is None


def test_compliance_by_phrasing_on_hand_made_answers():
    acrostic, rhyme = BY_NAME["acrostic"], BY_NAME["rhyme"]
    heads = "白黃欲更"
    exs = [Example("acrostic", acrostic.phrasings[0].format(heads=heads), "登樓", "", heads),
           Example("acrostic", acrostic.phrasings[0].format(heads=heads), "登樓", "", heads),
           Example("acrostic", acrostic.held_out[0].format(heads=heads), "登樓", "", heads)]
    poem = "白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。"
    written = [(poem, True), ("白日依山盡，河水入海流。\n千里欲窮目，更上一層樓。", True), ("春眠不覺曉，處處聞啼鳥。", True)]
    assert by_phrasing(written, exs, acrostic) == {acrostic.phrasings[0]: (2, 0.75), acrostic.held_out[0]: (1, 0.0)}
    asked = Example("rhyme", rhyme.held_out[1].format(rhyme="州"), "登樓", "", frozenset("流樓州"))
    assert by_phrasing([(poem, True)], [asked], rhyme) == {rhyme.held_out[1]: (1, 1.0)}


def test_phrasing_lines_sum_up_many_phrasings():
    from minigpt.tasks import phrasing_lines
    assert phrasing_lines({"甲{x}": (3, 1 / 3), "乙{x}": (1, 1.0)}) == ["100.0% of    1  乙{x}", " 33.3% of    3  甲{x}"]
    many = {f"{i}{{x}}": (2 if i else 4, 0.5 if i else 1.0) for i in range(31)}  # 30 x 2 at 50%, 1 x 4 at 100%
    assert phrasing_lines(many) == [" 53.1% of   64  over 31 phrasings, 2-4 examples each"]
    assert len(phrasing_lines(dict(list(many.items())[:30]))) == 30


def test_the_first_poem_phrasing_is_the_single_task_instruction():
    from minigpt.data import TITLE_TO_POEM
    assert BY_NAME["poem"].phrasings[0] == TITLE_TO_POEM.instruction


@pytest.mark.slow
def test_every_phrasing_is_written_in_the_corpus_characters():
    """So that a model pretrained on the corpus reads every instruction without an unknown character."""
    from minigpt.data import build_tokenizer, load_poems, split_poems
    vocab = set(build_tokenizer(split_poems(load_poems())["train"]).itos)
    for task in TASKS:
        for phrasing in task.phrasings + task.held_out:
            missing = {c for c in phrasing.format_map(collections.defaultdict(str)) if c not in vocab}
            assert not missing, (task.name, phrasing, missing)


def test_parse_tasks_names_the_choices():
    from minigpt.tasks import parse_tasks
    assert [t.name for t in parse_tasks("all")] == [t.name for t in TASKS]
    assert [t.name for t in parse_tasks("rhyme, poem")] == ["poem", "rhyme"]  # in TASKS order
    with pytest.raises(ValueError, match="unknown task haiku; use all, or some of poem, form"):
        parse_tasks("poem,haiku")


def test_task_data_trains_on_the_answer_only_and_drops_what_does_not_fit(tokenizer):
    from minigpt.tasks import prompt_text, task_data
    poems = [Poem("登高", "", tuple(WUJUE.split("\n"))), Poem("春望", "", tuple(WULU.split("\n")))]
    data = task_data(poems, tokenizer, 64, [BY_NAME["poem"], BY_NAME["continuation"]], GROUPS)
    assert data.counts == {"poems": 2, "poem": 1, "continuation": 2, "too_long": 1}  # 春望 as a poem: 79 tokens > 64
    ex = BY_NAME["continuation"].example("春望", WULU, GROUPS, 0)
    ids, mask = next((i, m) for i, m in data.examples if len(i) == len(tokenizer.encode(prompt_text(ex) + ex.answer + "<END>", unknown="unk")))
    n_prompt = len(tokenizer.encode(prompt_text(ex), unknown="unk"))
    assert mask == [0] * n_prompt + [1] * (len(ids) - n_prompt)


def test_measure_tasks_checks_stops_and_run_ons(monkeypatch):
    from minigpt import tasks
    exs = {"form": [Example("form", "", "登高", "", "七言絕句")] * 3, "acrostic": [Example("acrostic", "", "", "", "白黃欲更")] * 2}
    written = iter([(QIJUE, True), (WUJUE, True), (QIJUE + "\n\n又\n" + QIJUE, False),
                    (WUJUE, True), (WUJUE.replace("欲", "將"), False)])
    monkeypatch.setattr(tasks, "write", lambda model, tok, prompts, max_new_tokens, **kw: [next(written) for _ in prompts])
    got = tasks.measure_tasks(None, None, exs)
    assert got["form"] == {"comply": pytest.approx(1 / 3), "stop": pytest.approx(2 / 3), "run_on": pytest.approx(1 / 3),
                           "refuse": 0.0}
    assert got["acrostic"]["comply"] == 0.5 and got["acrostic"]["heads"] == 7 / 8


def test_measure_tasks_splits_the_same_answers_by_phrasing(monkeypatch):
    from minigpt import tasks
    form = BY_NAME["form"]
    exs = {"form": [Example("form", form.phrasings[k].format(form="七言絕句"), "登高", "", "七言絕句") for k in (0, 0, 1)]}
    written = [(QIJUE, True), (WUJUE, True), (QIJUE, True)]
    calls = []
    monkeypatch.setattr(tasks, "write", lambda model, tok, prompts, max_new_tokens, **kw: calls.append(prompts) or written)
    got = tasks.measure_tasks(None, None, exs, phrasings=True)["form"]
    assert got["phrasings"] == {form.phrasings[0]: (2, 0.5), form.phrasings[1]: (1, 1.0)} and got["comply"] == 2 / 3
    assert len(calls) == 1  # one generation serves both
    assert "phrasings" not in tasks.measure_tasks(None, None, exs)["form"]


def test_the_task_table_has_a_row_per_task_and_measure():
    from minigpt.tasks import format_task_table
    col = {"form": {"comply": 0.5, "stop": 1.0, "run_on": 0.0}, "acrostic": {"comply": 0.25, "heads": 0.5, "stop": 1.0, "run_on": 0.0}}
    table = format_task_table([("base", {}), ("tuned", col)], "(note)")
    lines = table.splitlines()
    assert len(lines) == 1 + 3 + 4 + 1 and lines[-1] == "(note)"
    assert "form: complies" in lines[1] and lines[1].split()[-2:] == ["—", "50.0%"]


def test_a_model_that_never_stops_is_scored_on_its_first_poem(monkeypatch):
    from minigpt import tasks
    exs = {"form": [Example("form", "", "登高", "", "七言絕句")] * 2}
    written = iter([(QIJUE + "\n\n又\n" + WUJUE, False), (WUJUE + "\n\n又\n" + QIJUE, False)])
    monkeypatch.setattr(tasks, "write", lambda model, tok, prompts, max_new_tokens, **kw: [next(written) for _ in prompts])
    got = tasks.measure_tasks(None, None, exs, never_stops=True)
    assert got["form"] == {"comply": 0.5, "stop": None, "run_on": 1.0, "refuse": 0.0}


def test_eval_examples_hold_the_unseen_combination_apart(tokenizer):
    from minigpt.tasks import eval_examples
    poems = [Poem(title, "", tuple(body.split("\n"))) for title, body in [("登樓", WUJUE), ("白帝", QIJUE), ("春望", WULU)]]
    got = eval_examples(poems, [BY_NAME["form"]], GROUPS, 5, tokenizer, 128)
    assert [e.want for e in got["form"]] == ["五言絕句", "五言律詩"] and [e.want for e in got["form:unseen"]] == ["七言絕句"]
    held = eval_examples(poems, [BY_NAME["form"]], GROUPS, 5, tokenizer, 128, held_out=True)
    assert all(e.instruction.replace(e.want, "{form}") in BY_NAME["form"].held_out for e in held["form"])
    assert eval_examples(poems, [BY_NAME["form"]], GROUPS, 5, tokenizer, 40)["form"] == []  # nothing fits 40 tokens
    two = eval_examples(poems * 3, [BY_NAME["form"]], GROUPS, 1, tokenizer, 128, unseen_n=2)  # more of the unseen ones
    assert len(two["form"]) == 1 and [e.want for e in two["form:unseen"]] == ["七言絕句"] * 2


def test_heads_written_in_by_the_program_start_the_clauses(tokenizer):
    from minigpt.model import GPT, GPTConfig
    from minigpt.tasks import write_heads_in
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=16))
    exs = [Example("acrostic", "藏頭", "登樓", "", heads) for heads in ("白黃欲更", "山水")]
    for (text, stopped), ex in zip(write_heads_in(model, tokenizer, exs, max_clause=4), exs):
        at = 0
        assert text[0] == ex.want[0]
        for head in ex.want[1:]:  # each head is written in after at most max_clause characters of the model's own
            at = text.index(head, at + 1)
            assert at <= text.index(ex.want[0]) + 5 * ex.want.index(head), (text, head)


def test_the_chat_format_puts_a_standing_constraint_in_the_system_turn():
    from minigpt.tasks import CHAT, prompt_text
    persona = BY_NAME["persona"].example("登鸛雀樓", WUJUE, GROUPS, 0)
    assert prompt_text(persona, CHAT) == "<SYS>你是一位只寫五言絕句的詩人<EOT><USR>登鸛雀樓<EOT><AST>"
    assert prompt_text(persona) == "<INS>你是一位只寫五言絕句的詩人<INP>登鸛雀樓<RES>"
    form = BY_NAME["form"].example("登鸛雀樓", WUJUE, GROUPS, 0)
    assert prompt_text(form, CHAT) == "<USR>請用以下題目寫一首五言絕句\n登鸛雀樓<EOT><AST>"
    assert BY_NAME["persona"].check(WUJUE, persona) and not BY_NAME["persona"].check(WULU, persona)


def test_the_chat_format_quotes_the_heads_to_copy_and_the_checker_reads_them_unquoted(tokenizer):
    from minigpt.tasks import CHAT, task_data
    poems = [Poem("登鸛雀樓", "", tuple(WUJUE.split("\n")))]
    chat, plain = (examples(poems, [BY_NAME["acrostic"]], GROUPS, fmt=f)[0] for f in (CHAT, None))
    assert "「白黃欲更」" in chat.instruction and "「" not in plain.instruction and "白黃欲更" in plain.instruction
    assert chat.want == plain.want == "白黃欲更" and BY_NAME["acrostic"].check(WUJUE, chat)
    assert phrasing_of(BY_NAME["acrostic"], chat.instruction) == BY_NAME["acrostic"].phrasings[0]
    chat_tok = tokenizer.with_roles()  # 「」 are in the chat vocabulary: the example is kept, each mark one id
    data = task_data(poems, chat_tok, 128, [BY_NAME["acrostic"]], GROUPS, CHAT)
    assert data.counts["acrostic"] == 1 and chat_tok.stoi["「"] in data.examples[0][0]


def test_a_follow_up_changes_the_line_length_in_a_second_turn():
    from minigpt.tasks import CHAT, prompt_text
    poems = [Poem(title, "", tuple(body.split("\n"))) for title, body in [("早發白帝城", QIJUE), ("登鸛雀樓", WUJUE)]]
    followup = BY_NAME["followup"]
    assert not examples(poems, [followup], GROUPS)  # two turns exist in the chat format only
    train = examples(poems, [followup], GROUPS, fmt=CHAT)
    assert [(e.earlier, e.answer, e.want) for e in train] == [(QIJUE, WUJUE, 5)]  # 改成七言 is never trained
    every = examples(poems, [followup], GROUPS, train=False, fmt=CHAT)
    assert sorted(e.want for e in every) == [5, 7]
    ex = train[0]
    assert prompt_text(ex, CHAT) == (f"<USR>請用以下題目寫一首詩\n早發白帝城<EOT><AST>{QIJUE}<EOT>"
                                     f"<USR>{ex.instruction}<EOT><AST>") and "五言" in ex.instruction
    assert followup.check(WUJUE, ex) and followup.check(WULU, ex) and not followup.check(QIJUE, ex)


@pytest.mark.parametrize("argv, message", [(["--n", "0"], "must be positive"), (["--sft", "/nonexistent"], "no checkpoint")])
def test_the_task_table_refuses_bad_input_in_one_line(argv, message, capsys):
    from minigpt.tasks import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1


def test_single_title_sft_is_the_poem_task_in_its_one_fixed_phrasing(tokenizer):
    from minigpt.data import TITLE_TO_POEM, render_sft
    from minigpt.tasks import CHAT, CHAT_POEM, SINGLE_POEM_DATA, single_poem_task, task_data
    poems = [Poem(f"登高 {n}", "", tuple(WUJUE.split("\n"))) for n in "一二三"] + [Poem("句", "", tuple(WUJUE.split("\n"))),
             Poem("春望", "", ("國破山河在，城春草木深",)), Poem("秋興", "", tuple(WULU.split("\n")))]
    for data in SINGLE_POEM_DATA:
        task = single_poem_task(data)
        assert task.phrasings == (TITLE_TO_POEM.instruction,) and task.name == "poem"
    # every example as the title -> poem format renders it, in both formats; 句 says nothing, 春望 is not regular
    made = task_data(poems, tokenizer, 128, [single_poem_task("regular")], GROUPS)
    assert made.examples == [render_sft(tokenizer, p.title.split()[0], p.body) for p in poems[:3] + poems[5:]]
    chat = tokenizer.with_roles()
    made = task_data(poems, chat, 128, [single_poem_task("all")], GROUPS, CHAT)
    assert made.examples == [render_sft(chat, p.title.split()[0], p.body, CHAT_POEM) for p in poems[:3] + poems[4:]]
    relevant = task_data(poems, tokenizer, 128, [single_poem_task("relevant")], GROUPS)
    assert len(relevant.examples) == 0  # 登高 and 秋興 name nothing their poems hold


def test_the_task_table_has_the_real_answers_and_their_chance_level():
    from minigpt.tasks import reference_columns
    poems = [Poem(title, "", tuple(body.split("\n")))
             for title, body in [("登鸛雀樓", WUJUE), ("早發白帝城", QIJUE), ("春望", WULU), ("登高", QILU)]]
    naming = [e for e in examples(poems, TASKS, GROUPS) if e.task == "naming"]
    assert [e.answer for e in naming] == ["登鸛雀樓", "早發白帝城", "春望", "登高"]
    (real_name, real), (chance_name, chance) = reference_columns({"naming": naming})
    assert real["naming"]["comply"] == 1.0 and real["naming"]["stop"] is None  # every real title names its poem
    # each poem against the title two places on (春望 for 白日依山盡 ...): the chance level, by hand
    by_hand = sum(BY_NAME["naming"].check(naming[(i + 2) % 4].answer, e) for i, e in enumerate(naming)) / 4
    assert chance["naming"]["comply"] == by_hand < 1.0

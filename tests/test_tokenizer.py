import pytest

from minigpt.tokenizer import SPECIAL_TOKENS, CharTokenizer, UnknownCharacterError


def test_round_trip(tokenizer, splits):
    text = "\n".join(splits["train"][0].lines)
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("token", SPECIAL_TOKENS)
def test_each_special_token_is_one_id(tokenizer, token):
    assert tokenizer.encode(token) == [SPECIAL_TOKENS.index(token)]
    assert tokenizer.decode([SPECIAL_TOKENS.index(token)]) == token


def test_special_ids_are_fixed_whatever_the_characters():
    a, b = CharTokenizer("山水"), CharTokenizer("一二三四")
    assert [a.stoi[t] for t in SPECIAL_TOKENS] == [b.stoi[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (a.pad_id, a.unk_id, a.end_id, a.ins_id, a.inp_id, a.res_id) == (0, 1, 2, 3, 4, 5)


def test_special_tokens_inside_text():
    tok = CharTokenizer("題詩山")
    ids = tok.encode("<INS>題<INP>山<RES>詩<END>")
    assert ids == [tok.ins_id, tok.stoi["題"], tok.inp_id, tok.stoi["山"], tok.res_id, tok.stoi["詩"], tok.end_id]
    assert tok.decode(ids, skip_special=True) == "題山詩"


def test_unknown_characters_raise_an_error_that_names_them():
    tok = CharTokenizer("山水")
    with pytest.raises(UnknownCharacterError) as e:
        tok.encode("山静水x静")
    assert e.value.chars == ["静", "x"]
    assert "静" in str(e.value) and "x" in str(e.value)
    assert not isinstance(e.value, KeyError)


def test_unknown_characters_can_become_unk_with_a_warning():
    tok = CharTokenizer("山水")
    with pytest.warns(UserWarning, match="静"):
        ids = tok.encode("山静", unknown="warn")
    assert ids == [tok.stoi["山"], tok.unk_id]
    assert tok.encode("山静", unknown="unk") == ids


def test_vocabulary_survives_a_list_round_trip(tokenizer):
    again = CharTokenizer.from_list(tokenizer.to_list())
    assert again.itos == tokenizer.itos
    with pytest.raises(ValueError):
        CharTokenizer.from_list(["a", "b"])


def test_chat_roles_and_quotes_are_appended_single_ids_and_every_other_id_stays(tokenizer):
    from minigpt.tokenizer import CharTokenizer
    chat = tokenizer.with_roles()
    assert chat.itos[:tokenizer.vocab_size] == tokenizer.itos
    assert chat.itos[tokenizer.vocab_size:] == ["<SYS>", "<USR>", "<AST>", "<EOT>", "「", "」"]
    assert chat.decode(chat.encode("<USR>「春」<EOT>"), skip_special=True) == "「春」"  # quotes are text, markers are not
    ids = chat.encode("<SYS>春<EOT><USR>秋<EOT><AST>")
    assert len(ids) == 7 and chat.decode(ids) == "<SYS>春<EOT><USR>秋<EOT><AST>" and chat.stoi["<EOT>"] == ids[2]
    assert chat.decode(ids, skip_special=True) == "春秋"
    assert CharTokenizer.from_list(chat.to_list()).itos == chat.itos and chat.with_roles() is chat
    with pytest.raises(ValueError, match="quote marks"):  # a chat vocabulary made before the quotes joined it
        CharTokenizer.from_list(chat.to_list()[:-2])
    assert tokenizer.unknown_chars("<SYS>春") == ["<SYS>"]  # a vocabulary without roles names the marker it lacks
    with pytest.raises(UnknownCharacterError, match="<SYS>"):
        tokenizer.encode("<SYS>春")

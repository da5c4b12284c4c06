"""Character tokenizer: one id per character of the training poems, plus special tokens.

Special tokens come first, so their ids never move: <PAD>=0, <UNK>=1, <END>=2, <INS>=3, <INP>=4,
<RES>=5. Written inside a string ("<INS>"), a special token still encodes to its single id. The chat roles
(<SYS> system, <USR> user, <AST> assistant, <EOT> end of turn) are appended after the characters by with_roles(),
with the quote marks 「」 (which the corpus lacks; a chat prompt quotes characters the answer must use), so that a
pretrained model's ids stay as they are and a chat model grows its embedding by six rows.
"""
import re
import warnings

SPECIAL_TOKENS = ["<PAD>", "<UNK>", "<END>", "<INS>", "<INP>", "<RES>"]
ROLE_TOKENS = ["<SYS>", "<USR>", "<AST>", "<EOT>"]
QUOTES = ["「", "」"]
CHAT_TOKENS = ROLE_TOKENS + QUOTES  # what with_roles() appends
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS + ROLE_TOKENS) + ")")


class UnknownCharacterError(ValueError):
    """Raised when text holds characters that the vocabulary does not have."""

    def __init__(self, chars):
        self.chars = chars
        super().__init__(f"characters not in the vocabulary: {' '.join(chars)}")


class CharTokenizer:
    def __init__(self, chars, roles=False):
        chars = sorted(set(chars) - set(SPECIAL_TOKENS) - set(CHAT_TOKENS))
        self.itos = SPECIAL_TOKENS + chars + (CHAT_TOKENS if roles else [])
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.unk_id, self.end_id, self.ins_id, self.inp_id, self.res_id = range(len(SPECIAL_TOKENS))
        self.has_roles = roles

    def with_roles(self):
        """The same vocabulary, the four chat role tokens and the quote marks appended: every other id stays."""
        return self if self.has_roles else CharTokenizer(self.itos[len(SPECIAL_TOKENS):], roles=True)

    @classmethod
    def from_texts(cls, texts):
        """A vocabulary of every character seen in texts (an iterable of strings)."""
        chars = set()
        for t in texts:
            chars.update(t)
        return cls(chars)

    @property
    def vocab_size(self):
        return len(self.itos)

    def unknown_chars(self, text):
        """The characters of text (and role tokens, in a vocabulary without them) that the vocabulary lacks, in
        order, once each."""
        missing = []
        for piece in _SPECIAL_RE.split(text):
            if piece in ROLE_TOKENS or piece in SPECIAL_TOKENS:
                missing += [] if piece in self.stoi else [piece]
            else:
                missing += [c for c in piece if c not in self.stoi]
        return list(dict.fromkeys(missing))

    def encode(self, text, unknown="error"):
        """Text -> ids. unknown: 'error' raises UnknownCharacterError naming the characters,
        'warn' maps them to <UNK> with a warning that names them, 'unk' maps them silently."""
        missing = self.unknown_chars(text)
        if missing:
            if unknown == "error":
                raise UnknownCharacterError(missing)
            if unknown == "warn":
                warnings.warn(f"{UnknownCharacterError(missing)}; they become <UNK>", stacklevel=2)
            elif unknown != "unk":
                raise ValueError(f"unknown must be 'error', 'warn' or 'unk', got {unknown!r}")
        ids = []
        for piece in _SPECIAL_RE.split(text):
            if piece in ROLE_TOKENS or piece in SPECIAL_TOKENS:  # a marker: one id
                ids.append(self.stoi.get(piece, self.unk_id))
            else:
                ids.extend(self.stoi.get(c, self.unk_id) for c in piece)
        return ids

    def decode(self, ids, skip_special=False):
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i >= len(SPECIAL_TOKENS) and self.itos[i] not in ROLE_TOKENS]
        return "".join(self.itos[i] for i in ids)

    def to_list(self):
        """The vocabulary as a plain list of strings: what a checkpoint stores."""
        return list(self.itos)

    @classmethod
    def from_list(cls, itos):
        if list(itos[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError("not a minigpt vocabulary: its special tokens differ")
        if list(itos[-len(ROLE_TOKENS):]) == ROLE_TOKENS:
            raise ValueError("a chat vocabulary from before the quote marks 「」 joined it; train the chat model again "
                             "(python train_sft.py --format chat ...)")
        roles = list(itos[-len(CHAT_TOKENS):]) == CHAT_TOKENS
        tok = cls(itos[len(SPECIAL_TOKENS):len(itos) - len(CHAT_TOKENS) * roles], roles=roles)
        if tok.itos != list(itos):
            raise ValueError("not a minigpt vocabulary: characters repeat or are out of order")
        return tok

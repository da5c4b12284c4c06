"""The rules of Tang verse as pure functions of text: punctuation, clauses, the regular shapes (絕句, 律詩) and their
forms, where a poem ends, line endings and rhyme groups, and which titles say something. Data, the metrics, the
tasks and the preference pairs all read poems through these; nothing here knows about models or tensors.
"""
import collections
import itertools
import re

CLAUSE_MARKS = "，。？！；：、"  # what closes a clause (and a line, after its last character)
INNER_MARKS = "《》〈〉「」"  # book-title marks and quotes: inside a clause, not characters of the verse
PUNCTUATION = re.compile(f"[{CLAUSE_MARKS}{INNER_MARKS}\\s]")  # every mark, and white space
CLAUSE_END = re.compile(f"[{CLAUSE_MARKS}\n]")
TITLE_LIKE = re.compile(f"^[^{CLAUSE_MARKS}]+$")  # a line with no clause mark at all: a title, not verse
# one couplet: two clauses of 5 (or of 7) characters; the first ends in ， (or ？ ！), the second in 。 (or ？ ！)
REGULAR_LINE = re.compile(r"^(?:[^，。？！\n]{5}[，？！][^，。？！\n]{5}[。？！]|[^，。？！\n]{7}[，？！][^，。？！\n]{7}[。？！])$")
# the four regular forms: characters per clause and couplets (lines); 絕句 has 2 couplets, 律詩 4
FORMS = {"五言絕句": (5, 2), "七言絕句": (7, 2), "五言律詩": (5, 4), "七言律詩": (7, 4)}


def clauses(text):
    """The clauses of a poem: the runs of characters between punctuation marks and line breaks."""
    return [c for c in CLAUSE_END.split(re.sub(f"[{INNER_MARKS} ]", "", text)) if c]


def couplet_keys(lines):
    """A poem's lines (couplets, in regular verse) without punctuation: what near-copies of one poem share."""
    return [k for k in (PUNCTUATION.sub("", line) for line in lines) if k]


def is_regular(text):
    """絕句 or 律詩 in shape: 2 or 4 lines, each two clauses of 5 (or each of 7) characters ending in ， and 。
    (a question or an exclamation may end a clause instead)."""
    lines = text.split("\n")
    return len(lines) in (2, 4) and all(REGULAR_LINE.match(line) for line in lines) and len({len(line) for line in lines}) == 1


def form_of(text):
    """The regular form of a poem (one of FORMS), or None if it has none."""
    if not is_regular(text):
        return None
    lines = text.split("\n")
    size = (len(clauses(lines[0])[0]), len(lines))
    return next((name for name, s in FORMS.items() if s == size), None)


def _poem_end(lines):
    """Where the first poem of these lines ends: at a blank line, or at a title-like line (no punctuation) that
    follows verse and is followed by more: the next poem's title, as in the pretraining text."""
    for i, line in enumerate(lines):
        if not line.strip() or (0 < i < len(lines) - 1 and TITLE_LIKE.match(line)):
            return i
    return len(lines)


def first_poem(text):
    """The text up to the end of its first poem: the answer that is scored, whatever the model wrote after it."""
    lines = text.strip("\n").split("\n")
    return "\n".join(lines[:_poem_end(lines)])


def after_first_poem(text):
    """What the text holds past its first poem (a blank line or a new title, then more), stripped: '' if nothing."""
    lines = text.strip("\n").split("\n")
    return "".join(lines[_poem_end(lines):]).strip()


def line_endings(text):
    """The last character of each line (each couplet, in regular verse), before its punctuation."""
    return [line.rstrip(CLAUSE_MARKS)[-1:] for line in text.split("\n") if line.rstrip(CLAUSE_MARKS)]


def ending_places(pieces):
    """Where in the text the characters line_endings reads are: each line's last before its punctuation.
    pieces: the text as a string, or as its tokens (a marker the model wrote inside an answer, <AST>, is one)."""
    places, line = [], []
    for i, piece in enumerate(list(pieces) + ["\n"]):
        if piece != "\n":
            line.append(i)
            continue
        while line and pieces[line[-1]] in CLAUSE_MARKS:  # a marker (<AST>) is never inside it
            line.pop()
        places += line[-1:]
        line = []
    return places


def join_groups(pairs):
    """Union-find: {item: its group's representative} for every item of the pairs; the two items of a pair are in
    one group, and so, in turn, is everything joined to either of them."""
    parent = {}

    def root(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]  # path halving keeps the trees flat
            x = parent[x]
        return x

    for a, b in pairs:
        parent[root(a)] = root(b)
    return {x: root(x) for x in parent}


def learn_rhyme_groups(bodies, strong=5, weak=2):
    """{character: rhyme group}, learnt from the regular poems among bodies, whose line endings rhyme together.
    Characters that end lines of one poem at least `strong` times are joined (union-find); a character seen less often
    joins the group it ends lines with most, if at least `weak` times. Calibrated: real poems against shuffled endings."""
    pairs = collections.Counter()
    for body in bodies:
        if is_regular(body):
            pairs.update(itertools.combinations(sorted(set(line_endings(body))), 2))
    groups = join_groups(pair for pair, n in pairs.items() if n >= strong)
    votes = collections.defaultdict(collections.Counter)
    for (a, b), n in pairs.items():
        for c, d in ((a, b), (b, a)):
            if c not in groups and d in groups:
                votes[c][groups[d]] += n
    for c, v in sorted(votes.items()):
        group, n = v.most_common(1)[0]
        if n >= weak:
            groups[c] = group
    return groups


def rhymes(text, groups):
    """The line endings are different characters, all of one rhyme group."""
    ends = line_endings(text)
    return len(ends) >= 2 and len(set(ends)) == len(ends) and len({groups.get(c, c + "?") for c in ends}) == 1


# ---- titles ----

NUMBERING = re.compile(r"\s+第?[一二三四五六七八九十百〇零]+$")  # " 一", " 十二", " 第三": the nth poem of a set
MEANINGLESS_TITLES = {"", "句", "失題"}  # say nothing about the poem, so they cannot teach title -> poem
# characters that say little about what a poem is about: numbers, and the words of occasion and form in titles
FUNCTION_CHARS = set("一二三四五六七八九十百千首詩題作和奉同之與及其於以爲者也而韻得字賦詠應制上下中後前初")


def clean_title(title):
    """Drop numbering suffixes that carry no meaning: '帝京篇十首 一' -> '帝京篇十首'."""
    title = title.strip()
    while NUMBERING.search(title):
        title = NUMBERING.sub("", title).strip()
    return title


def content_chars(title):
    """The title's characters that can say what a poem is about: Chinese characters, less FUNCTION_CHARS."""
    return {c for c in title if "\u3400" <= c <= "\u9fff" and c not in FUNCTION_CHARS}

"""What is measured of the answers, declared once. Each metric is a pure function over a set of answers with its key,
its label and how it prints; the tables, the console's eval line, the plots and the DPO preferences all read METRICS.

The per-answer checks come first (does it run on, mention its title, repeat a clause, rhyme?), then the rates over
answers, then the declarations and the Yardstick that scores a list of answers with them.
"""
from dataclasses import dataclass
from typing import Callable

import torch

from minigpt.tokenizer import ROLE_TOKENS, SPECIAL_TOKENS
from minigpt.verse import (PUNCTUATION, after_first_poem, clauses, content_chars, ending_places, first_poem,
                           is_regular, learn_rhyme_groups, line_endings, rhymes)

# ---- checks of one answer: pure functions of strings ----


def runs_on(text):
    """The text goes on past its first poem (a blank line or a new title, then more), or holds another example's
    marker."""
    return bool(after_first_poem(text)) or any(t in text for t in SPECIAL_TOKENS + ROLE_TOKENS)


def mentions_title(title, answer):
    """The answer holds a content character of the title; a clause that is only the title pasted in (a line of its own,
    or 春夜喜雨。 opening the poem) does not count."""
    whole = PUNCTUATION.sub("", title)
    return bool(content_chars(title) & set("".join(c for c in clauses(answer) if c != whole)))


def holds_title_run(title, answer):
    """The answer holds two or more characters of its title in a row (a pasted title shows here; so do real poems that
    name their subject, which is why the real poems' figure stands beside it)."""
    whole = PUNCTUATION.sub("", title)
    return any(whole[i:i + 2] in answer for i in range(len(whole) - 1))


def title_places(pieces, title):
    """Where in the answer (a string, or its tokens) the title's content characters stand."""
    chars = content_chars(title)
    return [i for i, piece in enumerate(pieces) if piece in chars]


def one_apart(a, b):
    """Two clauses of one length that differ in at most one character (山高月小水長流, 山高月小水長樓)."""
    return len(a) == len(b) and sum(x != y for x, y in zip(a, b)) <= 1


def repeats_clause(answer):
    """The answer writes some clause twice, or again with one character changed."""
    cs = clauses(answer)
    return any(one_apart(a, b) for i, a in enumerate(cs) for b in cs[i + 1:])


# ---- rates over answers ----

def relevance(titles, answers):
    """(share of answers that mention their own title, share that mention a shuffled title, the lift between them).
    The shuffled title of answer i is the title half the list away: any poem mentions some titles by chance."""
    n = len(answers)
    own = sum(map(mentions_title, titles, answers)) / n
    shuffled = sum(mentions_title(titles[(i + n // 2) % n], a) for i, a in enumerate(answers)) / n
    return own, shuffled, own - shuffled


def copy_rate(answers, train_clauses):
    """The share of the answers' clauses that stand verbatim among the training poems' clauses."""
    cs = [c for a in answers for c in clauses(a)]
    return sum(c in train_clauses for c in cs) / max(len(cs), 1)


def near_copy_rate(answers, train_clauses, near):
    """The share of the answers' clauses that are not verbatim training clauses but one character away from one (a
    training poem with a character changed per clause); near: what NearClauses gives for the training clauses."""
    cs = [c for a in answers for c in clauses(a)]
    return sum(c not in train_clauses and near.has(c) for c in cs) / max(len(cs), 1)


class NearClauses:
    """Every training clause with each of its characters in turn made a wildcard, hashed: a clause one character away
    from a training clause shares one of these. Built on first use (a few seconds over the whole corpus)."""

    def __init__(self, train_clauses):
        self.keys = {hash(c[:i] + "\0" + c[i + 1:]) for c in train_clauses for i in range(len(c))}

    def has(self, clause):
        return any(hash(clause[:i] + "\0" + clause[i + 1:]) in self.keys for i in range(len(clause)))


def distinct_endings(answers):
    """Distinct line-ending characters over all line endings of all answers: a template that always ends on the same
    few characters scores near 0."""
    ends = [c for a in answers for c in line_endings(a)]
    return len(set(ends)) / max(len(ends), 1)


def distinct_clauses(answers):
    """Distinct clauses over all clauses of all answers: 1.0 when no clause is ever written twice."""
    cs = [c for a in answers for c in clauses(a)]
    return len(set(cs)) / max(len(cs), 1)


def share(flags):
    """The share of true flags, None for none."""
    flags = list(flags)
    return sum(flags) / len(flags) if flags else None


class Scored:
    """What every metric reads of one set of answers: the titles, what was written, the first poems (the answers that
    are scored), the regular ones, whether each stopped (None: the format has no end marker), and the yardstick."""

    def __init__(self, titles, texts, stopped, yard):
        self.titles, self.texts, self.stopped, self.yard = titles, texts, stopped, yard
        self.answers = [first_poem(t) for t in texts]
        self.regular = [a for a in self.answers if is_regular(a)]
        self.relevance = relevance(titles, self.answers)

    def rhyme_rate(self, couplets=None):
        """The share of regular answers (of 2 or 4 couplets only, if given) that rhyme."""
        return share(rhymes(a, self.yard.rhyme_groups) for a in self.regular
                     if couplets is None or a.count("\n") == couplets - 1)


# ---- the declarations: one per figure ----

SHOW = {  # how a kind of figure prints: (in a table, in the console's eval line)
    "rate": ("{:.1%}".format, "{:.0%}".format),
    "points": (lambda v: f"{100 * v:+.1f}", lambda v: f"{100 * v:+.0f}"),
    "chars": ("{:.1f}".format, "{:.0f}".format),
    "loss": ("{:.3f}".format, "{:.3f}".format),
    "margin": ("{:+.3f}".format, "{:+.2f}".format),
}


@dataclass(frozen=True)
class Metric:
    key: str  # its name in log.jsonl and in every result dict
    label: str  # its row in the tables
    kind: str  # how it prints: a key of SHOW
    compute: Callable = None  # Scored -> value, None where it does not apply (None: measured elsewhere, as a loss)
    console: str = None  # its word in the console's eval line (None: tables only)
    plot: tuple = None  # (colour, line style, legend) in the behaviour plot (None: not drawn)
    passes: Callable = None  # (answer, title, yardstick) -> bool, for a per-answer check a preference can ask for
    places: Callable = None  # (pieces, title, yardstick) -> where in the answer that check reads
    where: str = ""  # those places, in words
    verdict: Callable = None  # (answer, title, yardstick) -> what the check says of one answer, in words

    def table(self, value):
        return "—" if value is None else SHOW[self.kind][0](value)

    def brief(self, value):
        return "—" if value is None else SHOW[self.kind][1](value)


def _rhyme_verdict(answer, title, yard):
    if rhymes(answer, yard.rhyme_groups):
        return "rhymes"
    return "no rhyme (" + " ".join(f"{c}:{yard.rhyme_groups.get(c, '?')}" for c in line_endings(answer)) + ")"


RHYME = Metric("rhyme_rate", "rhymes (of regular answers)", "rate", lambda s: s.rhyme_rate(), "rhymes", ("C4", "-", "rhymes (of regular)"),
               passes=lambda answer, title, yard: rhymes(answer, yard.rhyme_groups),
               places=lambda pieces, title, yard: ending_places(pieces), where="the line endings",
               verdict=_rhyme_verdict)
RELEVANCE = Metric("relevance", "mentions its title", "rate", lambda s: s.relevance[0], "mentions title",
                   plot=("C3", "-", "mentions its title"),
                   passes=lambda answer, title, yard: mentions_title(title, answer),
                   places=lambda pieces, title, yard: title_places(pieces, title), where="the title's characters",
                   verdict=lambda answer, title, yard: "names its title" if mentions_title(title, answer)
                   else f"no character of {''.join(c for c in title if c in content_chars(title))}")

METRICS = [
    Metric("stop_rate", "stops at the end marker", "rate",
           lambda s: None if s.stopped is None else share(s.stopped), "stop", ("C0", "-", "stops at the end marker")),
    Metric("run_on_rate", "runs on past one poem", "rate", lambda s: share(map(runs_on, s.texts)), "run-on", ("C2", "-", "runs on")),
    Metric("regular_rate", "regular shape (絕句/律詩)", "rate", lambda s: len(s.regular) / len(s.answers), "regular",
           ("C1", "-", "regular shape")),
    Metric("mean_length", "mean length (chars)", "chars", lambda s: sum(map(len, s.answers)) / len(s.answers), "length"),
    RELEVANCE,
    Metric("relevance_shuffled", "mentions a shuffled title", "rate", lambda s: s.relevance[1],
           plot=("C3", "--", "mentions a shuffled title")),
    Metric("relevance_lift", "title relevance lift (points)", "points", lambda s: s.relevance[2], "title lift"),
    Metric("title_run_rate", "holds 2+ title chars in a row", "rate",
           lambda s: share(map(holds_title_run, s.titles, s.answers))),
    Metric("copy_rate", "clauses copied from train", "rate", lambda s: copy_rate(s.answers, s.yard.train_clauses),
           "copied"),
    Metric("near_copy_rate", "clauses 1 char from a train one", "rate",
           lambda s: near_copy_rate(s.answers, s.yard.train_clauses, s.yard.near), "near-copied"),
    Metric("repeat_rate", "repeats a clause", "rate", lambda s: share(map(repeats_clause, s.answers)), "repeats"),
    Metric("distinct_clauses", "distinct clauses", "rate", lambda s: distinct_clauses(s.answers)),
    Metric("distinct_endings", "distinct line endings", "rate", lambda s: distinct_endings(s.answers)),
    RHYME,
    # by length: two line endings (絕句) rhyme by chance far more often than four (律詩)
    Metric("share_jueju", "絕句 (of regular answers)", "rate", lambda s: share(a.count("\n") == 1 for a in s.regular)),
    Metric("rhyme_rate_jueju", "rhymes, 絕句 answers", "rate", lambda s: s.rhyme_rate(couplets=2)),
    Metric("rhyme_rate_lushi", "rhymes, 律詩 answers", "rate", lambda s: s.rhyme_rate(couplets=4)),
    Metric("val_answer_loss", "val loss per poem token", "loss"),  # these two: minigpt.evaluate.answer_losses
    Metric("val_end_loss", "val loss of the end marker", "loss", console="end-marker loss"),
]
# DPO's figures on held-out pairs (minigpt.dpo.preference_metrics)
PAIR_METRICS = [
    Metric("pref_loss", "DPO loss", "loss", console="DPO loss"),
    Metric("pref_accuracy", "preference accuracy (held-out pairs)", "rate", console="preference accuracy",
           plot=("C7", "-", "preference accuracy (held-out pairs)")),
    Metric("reward_margin", "reward margin", "margin", console="reward margin"),
]
# the reward model's figures on held-out ranked pairs (minigpt.reward.ranking_metrics)
REWARD_METRICS = [
    Metric("reward_loss", "Bradley-Terry loss", "loss", console="ranking loss"),
    Metric("reward_accuracy", "pair accuracy (held-out rankings)", "rate", console="pair accuracy"),
]
# what the RL stage reads beside the program's checks (minigpt.rl)
RL_METRICS = [
    Metric("mean_reward", "mean reward (reward model)", "margin", console="reward"),
    Metric("program_score", "program's score (mean of checks)", "rate", console="program's score"),
    Metric("train_reward", "mean reward (training groups)", "margin", console="training reward"),
    Metric("kl_to_ref", "KL from the SFT model (nats/answer)", "loss", console="KL"),
    Metric("entropy", "entropy (nats/token)", "loss", console="entropy"),
    Metric("minutes", "minutes of training", "chars"),
]
BY_KEY = {m.key: m for m in METRICS + PAIR_METRICS + REWARD_METRICS + RL_METRICS}


def console_line(record, metrics=METRICS):
    """The metrics of an eval record that the console shows, in one line: 'stop 98%, run-on 0%, ...'."""
    return ", ".join(f"{m.console} {m.brief(record[m.key])}" for m in metrics if m.console and m.key in record)


# ---- preferences: what DPO may prefer, each made of the metrics' per-answer checks ----

@dataclass(frozen=True)
class Preference:
    name: str
    metrics: tuple  # an answer has the preference when it passes every one of their checks
    what: str

    def passes(self, answer, title, yard):
        return all(m.passes(answer, title, yard) for m in self.metrics)

    def places(self, pieces, title, yard):
        """Where in the answer (a string, or its tokens) the checks read: marked in samples, margins split there."""
        return sorted({i for m in self.metrics for i in m.places(pieces, title, yard)})

    @property
    def where(self):
        return " and ".join(m.where for m in self.metrics)


PREFERENCES = {p.name: p for p in (
    Preference("rhyme", (RHYME,), "its line endings are different characters of one rhyme group"),
    Preference("title", (RELEVANCE,), "it holds a content character of its title"),
    Preference("rhyme+title", (RHYME, RELEVANCE),
               "it rhymes and holds a content character of its title: rhyme not paid for in relevance"),
)}


def mark(answer, title, yard, prefer):
    """The answer with what the preference reads in brackets (the line endings, the title's characters), and what
    each of its checks says: how a sample shows what is preferred."""
    at = set(prefer.places(answer, title, yard))
    marked = "".join(f"[{c}]" if i in at else c for i, c in enumerate(answer))
    return marked + "   <- " + "; ".join(m.verdict(answer, title, yard) for m in prefer.metrics)


# ---- the yardstick: what the metrics need from the training poems ----

class Yardstick:
    """The training poems' clauses (copying) and rhyme groups; scores a list of answers with every metric."""

    def __init__(self, train_poems):
        self.train_clauses = {c for p in train_poems for c in clauses(p.body)}
        self.rhyme_groups = learn_rhyme_groups(p.body for p in train_poems)
        self._near = None

    @property
    def near(self):
        """The training clauses' one-character-away index (NearClauses), built when first asked for."""
        if self._near is None:
            self._near = NearClauses(self.train_clauses)
        return self._near

    def score(self, titles, texts, stopped=None):
        """{metric key: value} over the answers (rates as fractions 0-1). texts: what was written up to the end marker
        or the cap; the answer scored is its first poem. stopped: per answer, whether it wrote the end marker (None:
        the format has none)."""
        scored = Scored(titles, texts, stopped, self)
        return {m.key: m.compute(scored) for m in METRICS if m.compute is not None}

    def calibrate(self, poems, seed=0):
        """(rhyme rate on real regular poems, on the same poems with line endings drawn from other poems)."""
        real = [p.body for p in poems if is_regular(p.body)]
        pool = [c for text in real for c in line_endings(text)]
        gen = torch.Generator().manual_seed(seed)
        shuffled = [[pool[i] for i in torch.randint(len(pool), (len(line_endings(t)),), generator=gen).tolist()]
                    for t in real]
        return (sum(rhymes(t, self.rhyme_groups) for t in real) / len(real),
                sum(rhymes("\n".join(e + "。" for e in ends), self.rhyme_groups) for ends in shuffled) / len(real))

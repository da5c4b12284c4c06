"""RLHF as it is usually told, first half: rank several answers to one title, then train a reward model on the ranks.

A ranking orders K answers to one title (1 = best, equal ranks are ties). The program ranks on named dimensions,
each scored 0 or 1 (DIMENSIONS), combined by their mean; a person's ranking (the web page's ranking view) is the same
kind of line without the scores. One ranking of K answers gives up to K(K-1)/2 pairs (better, worse). The reward
model is the fine-tuned GPT with a scalar head reading the last position (the end marker), trained by the
Bradley-Terry loss -log sigmoid(r(better) - r(worse)); minigpt.rl then improves the policy against it.
"""
import json
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.checkpoint import replace_durably
from minigpt.data import TITLE_TO_POEM
from minigpt.generate import Sampling, write
from minigpt.loss_eval import evaluating
from minigpt.metrics import mentions_title, repeats_clause
from minigpt.model import GPT
from minigpt.verse import clauses, first_poem, is_regular, rhymes

# ---- the program's ranking: named dimensions, each 0 or 1 ----


@dataclass(frozen=True)
class Dimension:
    name: str
    what: str
    check: Callable  # (answer, stopped, title, yardstick) -> bool


def _one_regular_poem(answer):
    return answer == first_poem(answer) and is_regular(answer)


DIMENSIONS = (
    Dimension("stops", "ends with the end marker", lambda a, stopped, title, yard: bool(stopped)),
    Dimension("regular", "one regular poem (絕句 or 律詩), nothing after it",
              lambda a, stopped, title, yard: _one_regular_poem(a)),
    Dimension("rhyme", "one regular poem whose line endings rhyme",
              lambda a, stopped, title, yard: _one_regular_poem(a) and rhymes(a, yard.rhyme_groups)),
    Dimension("title", "mentions its title", lambda a, stopped, title, yard: mentions_title(title, a)),
    # an answer without a clause repeats and copies nothing, but earns neither mark: an empty answer is no poem
    Dimension("no_repeat", "writes no clause twice",
              lambda a, stopped, title, yard: bool(clauses(a)) and not repeats_clause(a)),
    Dimension("no_copy", "copies no clause of a training poem",
              lambda a, stopped, title, yard: bool(clauses(a)) and not any(c in yard.train_clauses for c in clauses(a))),
)
DIMENSION_NAMES = [d.name for d in DIMENSIONS]


def score_answer(answer, stopped, title, yard):
    """{dimension: 0 or 1} for one answer."""
    return {d.name: int(d.check(answer, stopped, title, yard)) for d in DIMENSIONS}


def combined(scores):
    """The program's score of one answer: the mean of its dimensions, from 0 to 1."""
    return sum(scores[n] for n in DIMENSION_NAMES) / len(DIMENSION_NAMES)


def ranks(values):
    """Rank 1 for the highest value; equal values share a rank (ties stay ties): [0.5, 1, 0.5] -> [2, 1, 2]."""
    return [1 + sum(v > mine for v in values) for mine in values]


# ---- rankings on disk: one JSON line per title ----


class RankingError(ValueError):
    """A rankings file that cannot be read: the message names the file, the line and the fix."""


@dataclass
class Ranking:
    title: str
    answers: list
    rank: list  # per answer, 1 = best; equal ranks are ties
    stopped: list = None  # per answer, whether it ended with the end marker (None: every one did)
    scores: list = None  # per answer {dimension: 0 or 1}: the program's; None in a person's ranking
    by: str = "program"

    def __post_init__(self):
        self.stopped = list(self.stopped) if self.stopped is not None else [True] * len(self.answers)


def rank_answers(title, answers, yard):
    """The program's Ranking of [Answer(text, stopped)] to one title."""
    scores = [score_answer(a.text, a.stopped, title, yard) for a in answers]
    return Ranking(title, [a.text for a in answers], ranks([combined(s) for s in scores]),
                   [a.stopped for a in answers], scores)


def make_rankings(model, tokenizer, titles, yard, fmt=TITLE_TO_POEM, k=4, max_new_tokens=128, seed=0, batch_size=256):
    """K answers per title from model (the evaluation's sampling), each set ranked by the program."""
    prompts = [fmt.prompt(t) for t in titles for _ in range(k)]
    written = write(model, tokenizer, prompts, max_new_tokens, fmt.end, Sampling(seed=seed), batch_size)
    return [rank_answers(t, written[i * k:(i + 1) * k], yard) for i, t in enumerate(titles)]


def save_rankings(path, rankings):
    """Written whole or not at all; one line per title, readable and diffable."""
    text = "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in rankings)
    replace_durably(str(path), lambda f: f.write(text.encode("utf-8")))


REQUIRED_FIELDS = ("title", "answers", "rank")


def load_rankings(path, known_titles=None):
    """The rankings of a file (a person's or the program's); a line that cannot be used is a RankingError naming it:
    not JSON, a missing field, an unknown title (not in known_titles, when given), fewer than two answers, or ranks
    that do not match the answers."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise RankingError(f"cannot read rankings {path}: {e.strerror}; pass a file written by the web page's ranking "
                           "view or by python train_reward.py") from None
    out = [_ranking(line, f"{path} line {n}", known_titles) for n, line in enumerate(lines, 1) if line.strip()]
    if not out:
        raise RankingError(f"{path} holds no ranking; rank some answers in the web page first")
    return out


def _ranking(line, where, known_titles):
    """One line of a rankings file as a Ranking, or a RankingError saying where and why."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        raise RankingError(f"{where} is not JSON; each line is one ranking: {{\"title\": ..., \"answers\": [...], "
                           "\"rank\": [...]}") from None
    missing = [k for k in REQUIRED_FIELDS if not isinstance(row, dict) or k not in row]
    if missing:
        raise RankingError(f"{where} has no '{missing[0]}'; each ranking needs " + ", ".join(REQUIRED_FIELDS))
    title, answers, rank = row["title"], row["answers"], row["rank"]
    if known_titles is not None and title not in known_titles:
        raise RankingError(f"{where}: unknown title {title!r}, not a title of the corpus; rank answers to the "
                           "corpus's titles (the web page offers them)")
    if not isinstance(answers, list) or len(answers) < 2:
        raise RankingError(f"{where}: an empty group ({len(answers) if isinstance(answers, list) else 0} answers); "
                           "a ranking needs two or more answers to one title")
    if not isinstance(rank, list) or len(rank) != len(answers) or not all(isinstance(r, int) and r >= 1 for r in rank):
        raise RankingError(f"{where}: 'rank' must hold one whole number of 1 or more per answer "
                           f"({len(answers)} answers); 1 is the best, equal numbers are ties")
    stopped = row.get("stopped")
    if stopped is not None and (not isinstance(stopped, list) or len(stopped) != len(answers)):
        raise RankingError(f"{where}: 'stopped' must hold one true or false per answer, or be left out")
    return Ranking(title, [str(a) for a in answers], rank, stopped, row.get("scores"), row.get("by", "person"))


# ---- pairs from rankings ----


class RankedPair(NamedTuple):
    title: str
    better: str
    worse: str
    better_stopped: bool = True
    worse_stopped: bool = True
    better_scores: dict = None  # the program's dimensions of each side, where the ranking has them
    worse_scores: dict = None


def ranking_pairs(rankings):
    """Every pair of answers of one ranking whose ranks differ, the better first: up to K(K-1)/2 per ranking. Ties
    give no pair; the same answer written twice gives none with itself."""
    out = []
    for r in rankings:
        sc = r.scores or [None] * len(r.answers)
        for i in range(len(r.answers)):
            for j in range(i + 1, len(r.answers)):
                if r.rank[i] == r.rank[j] or r.answers[i] == r.answers[j]:
                    continue
                b, w = (i, j) if r.rank[i] < r.rank[j] else (j, i)
                out.append(RankedPair(r.title, r.answers[b], r.answers[w], r.stopped[b], r.stopped[w], sc[b], sc[w]))
    return out


# ---- the reward model ----


class RewardModel(GPT):
    """The GPT with a scalar head: r(prompt + answer) is read at the last position, the end marker where the answer
    stopped. The head starts at zero, so every answer starts at reward 0 and the loss at log 2."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.reward_head = nn.Linear(cfg.n_embd, 1)
        nn.init.zeros_(self.reward_head.weight)
        nn.init.zeros_(self.reward_head.bias)

    def score(self, idx, last):
        """idx (B, T) right-padded, last (B,) the index of each row's last real token -> rewards (B,). Padding comes
        after the last token, so the causal attention never lets it in."""
        h = self.features(idx)  # (B, T, C)
        return self.reward_head(h[torch.arange(idx.size(0), device=idx.device), last]).squeeze(-1)  # (B,)


def reward_model_from(gpt):
    """A RewardModel holding gpt's weights (the fine-tuned model it starts from), its head at zero."""
    model = RewardModel(gpt.config)
    model.load_state_dict(gpt.state_dict(), strict=False)  # everything but the new head
    return model.to(gpt.device)


def reward_rows(tokenizer, prompts, answers, stopped, block_size, fmt=TITLE_TO_POEM):
    """(x (B, T) right-padded, last (B,)): each prompt + answer (+ the end marker where it stopped), cut to the
    context; last is where the reward is read."""
    rows = []
    for p, a, s in zip(prompts, answers, stopped):
        ids = tokenizer.encode(p + a + (fmt.end if s else ""), unknown="unk")[:block_size]
        rows.append(ids)
    T = max(len(r) for r in rows)
    x = torch.full((len(rows), T), tokenizer.pad_id, dtype=torch.long)
    for b, r in enumerate(rows):
        x[b, :len(r)] = torch.tensor(r)
    return x, torch.tensor([len(r) - 1 for r in rows])


class RankBatch(NamedTuple):
    """B ranked pairs as tensors: each side's inputs (B, T) and the position its reward is read at (B,)."""
    better_x: torch.Tensor
    better_last: torch.Tensor
    worse_x: torch.Tensor
    worse_last: torch.Tensor


def rank_batch(pairs, tokenizer, block_size, fmt=TITLE_TO_POEM):
    prompts = [fmt.prompt(p.title) for p in pairs]
    bx, bl = reward_rows(tokenizer, prompts, [p.better for p in pairs], [p.better_stopped for p in pairs], block_size, fmt)
    wx, wl = reward_rows(tokenizer, prompts, [p.worse for p in pairs], [p.worse_stopped for p in pairs], block_size, fmt)
    return RankBatch(bx, bl, wx, wl)


def pair_rewards(model, batch):
    """(r(better), r(worse)), each (B,), from one forward pass over both sides."""
    T = max(batch.better_x.size(1), batch.worse_x.size(1))
    x = torch.cat([F.pad(batch.better_x, (0, T - batch.better_x.size(1))),
                   F.pad(batch.worse_x, (0, T - batch.worse_x.size(1)))])  # (2B, T), padded on the right
    r = model.score(x.to(model.device), torch.cat([batch.better_last, batch.worse_last]).to(model.device))
    n = batch.better_x.size(0)
    return r[:n], r[n:]


def reward_loss(model, batch):
    """The Bradley-Terry loss, -log sigmoid(r(better) - r(worse)), averaged over the pairs: the probability that the
    better answer wins is sigmoid of the reward gap. Returns (mean, number of pairs), as the training loop asks."""
    better, worse = pair_rewards(model, batch)
    return -F.logsigmoid(better - worse).mean(), torch.tensor(better.size(0))


@torch.no_grad()
def score_answers(model, tokenizer, prompts, answers, stopped, fmt=TITLE_TO_POEM, batch_size=128):
    """(N,) the reward model's score of each answer to its prompt, in eval mode."""
    out = []
    with evaluating(model):
        for i in range(0, len(prompts), batch_size):
            x, last = reward_rows(tokenizer, prompts[i:i + batch_size], answers[i:i + batch_size],
                                  stopped[i:i + batch_size], model.config.block_size, fmt)
            out.append(model.score(x.to(model.device), last.to(model.device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def ranking_metrics(model, pairs, tokenizer, fmt=TITLE_TO_POEM, batch_size=128):
    """On held-out pairs: the Bradley-Terry loss, the pair accuracy (the better answer scored higher; a tie counts
    half, so a model that scores every answer alike reads 50%, chance), and per dimension the accuracy on the pairs
    whose two answers differ in it (the one that has it scored higher), with how many such pairs."""
    if not pairs:
        return {}
    prompts = [fmt.prompt(p.title) for p in pairs]
    better = score_answers(model, tokenizer, prompts, [p.better for p in pairs], [p.better_stopped for p in pairs], fmt,
                           batch_size)
    worse = score_answers(model, tokenizer, prompts, [p.worse for p in pairs], [p.worse_stopped for p in pairs], fmt,
                          batch_size)
    margin = better - worse
    right = (margin > 0).float() + 0.5 * (margin == 0).float()
    out = {"reward_loss": -F.logsigmoid(margin).mean().item(), "reward_accuracy": right.mean().item(),
           "reward_pairs": len(pairs)}
    for d in DIMENSION_NAMES:
        rows = [(i, p.better_scores[d] - p.worse_scores[d]) for i, p in enumerate(pairs)
                if p.better_scores and p.worse_scores and p.better_scores[d] != p.worse_scores[d]]
        if rows:  # the side that has the dimension scored higher
            m = torch.tensor([margin[i].item() * sign for i, sign in rows])
            out[f"reward_accuracy_{d}"] = ((m > 0).float() + 0.5 * (m == 0).float()).mean().item()
            out[f"reward_pairs_{d}"] = len(rows)
    return out


"""Preference pairs for DPO, made from the model's own answers and judged by program: (prompt, chosen, rejected).

An answer can be chosen only when it passes the gates (it stopped, does what the task asks, repeats and copies no
clause) and has the preference (minigpt.metrics.PREFERENCES: it rhymes, names its title ...). Two ways to pair:
ending_pairs (the default for rhyme) changes one line ending of one answer; title_pairs puts one character of the
title into an answer that has none, where the model itself would; make_pairs samples several whole answers per prompt
and pairs a passing one with a failing one (pair_up).
"""
import collections
import json
from dataclasses import asdict, dataclass

import torch

from minigpt.checkpoint import replace_durably
from minigpt.data import TITLE_TO_POEM
from minigpt.generate import EVAL_SAMPLING, Sampling, write
from minigpt.loss_eval import evaluating
from minigpt.metrics import PREFERENCES, repeats_clause
from minigpt.tasks import BY_NAME, Example, examples, prompt_text
from minigpt.verse import CLAUSE_MARKS, MEANINGLESS_TITLES, REGULAR_LINE, clauses, clean_title, content_chars, \
    ending_places, first_poem, is_regular, rhymes

RHYME = PREFERENCES["rhyme"]


@dataclass
class Pair:
    task: str
    prompt: str  # the whole prompt text, markers included
    chosen: str
    rejected: str
    why_rejected: str  # what the rejected answer fails: the preference alone, or a gate
    rejected_stopped: bool = True  # the rejected answer ended with the end marker (else it ran to the cap)
    ref_chosen: float = 0.0  # the reference model's log-probability of the answer (and end marker) given the prompt
    ref_rejected: float = 0.0
    title: str = ""  # the example's input: the title, for a preference that reads it
    upto: int = 0  # the answer tokens that count, from the first (0: all, and the end marker): an ending pair counts
    # up to the ending it changes, so that what follows it (the same on both sides) adds nothing to the margin


# ---- what may be chosen ----

def gate(answer, stopped, example, yard):
    """Why an answer cannot be chosen whatever the preference ('' if it can): no end marker, the task's own
    constraint not met (one regular poem, the asked form ...), a clause written twice, a clause copied from a
    training poem."""
    if not stopped:
        return "no end marker"
    if answer != first_poem(answer) or not is_regular(answer) or not BY_NAME[example.task].check(answer, example):
        return "not what the task asks"
    if repeats_clause(answer):
        return "repeats a clause"
    if any(c in yard.train_clauses for c in clauses(answer)):
        return "copies a training clause"
    return ""


def judge(answer, stopped, example, yard, prefer):
    """'' when the answer passes the gates and the preference, else why not."""
    return gate(answer, stopped, example, yard) or ("" if prefer.passes(answer, example.input, yard) else
                                                    f"not {prefer.name}")


# ---- the prompts ----

def dpo_prompts(poems, tasks, rhyme_groups, fmt=TITLE_TO_POEM, leave_out=frozenset()):
    """The prompts of the split for the tasks the SFT model was trained on that answer with a whole poem: one per
    distinct title for title -> poem (the one fixed instruction), the tasks' trained phrasings for the others.
    leave_out: titles whose poems give no prompt (held-out prompts leave out every title a training poem has)."""
    poems = [p for p in poems if clean_title(p.title) not in leave_out]
    if [t.name for t in tasks] == ["poem"]:
        seen, out = set(), []
        for p in poems:
            title = clean_title(p.title)
            if title not in MEANINGLESS_TITLES and title not in seen:
                seen.add(title)
                out.append(Example("poem", TITLE_TO_POEM.instruction, title, p.body))
        return out
    return examples(poems, [t for t in tasks if t.poem_answer], rhyme_groups, fmt=fmt)


# ---- pairs of whole answers ----

def make_pairs(model, tokenizer, exs, yard, prefer, fmt=TITLE_TO_POEM, samples=8, per_prompt=2, max_new_tokens=128,
               seed=0, batch_size=512, shared_start=True, hold=None):
    """Sample `samples` answers per example with the evaluation's sampling settings, and pair them (pair_up).
    shared_start: the model first writes one answer per prompt; its first line (couplet), if regular, then starts
    all the samples of that prompt, so that a pair differs only after it, where the rhyme is decided (the shared
    tokens add the same log-probability to both sides, and cancel in the loss). hold: see pair_up. Returns (pairs,
    counts)."""
    prompts = [prompt_text(ex, fmt) for ex in exs]
    starts = [""] * len(exs)
    if shared_start:
        first = write(model, tokenizer, prompts, max_new_tokens, fmt.end, Sampling(seed=seed + 1), batch_size)
        lines = [a.split("\n") for a, _ in first]
        starts = [ls[0] + "\n" if len(ls) > 1 and REGULAR_LINE.match(ls[0]) else "" for ls in lines]
    written = write(model, tokenizer, [p + s for p, s in zip(prompts, starts) for _ in range(samples)],
                    max_new_tokens, fmt.end, Sampling(seed=seed), batch_size)
    room = model.config.block_size + 1 - len(tokenizer.encode(fmt.end))
    answers = [[(s + a, stopped) for a, stopped in written[i * samples:(i + 1) * samples]] for i, s in enumerate(starts)]
    return pair_up(exs, prompts, answers, yard, prefer, lambda text: len(tokenizer.encode(text, unknown="unk")) <= room,
                   per_prompt, hold)


def pair_up(exs, prompts, written, yard, prefer, fits=lambda text: True, per_prompt=2, hold=None):
    """Judge each prompt's answers and pair passing with failing ones: up to per_prompt pairs, each failing answer used
    once, the passing ones in turn. The rejected answer is the nearest miss first: one that passes every gate and
    fails only the preference; such an answer must have the chosen one's length (絕句 or 律詩), so that the pair
    differs in what is preferred and not in length. Then answers that fail a gate.
    hold: a second Preference the pairs must not work against (what the preferred one is not to be paid for with):
    chosen answers that have it serve first, and an answer that has it is never rejected for one that lacks it.
    Returns (pairs, counts)."""
    pairs, counts = [], collections.Counter(prompts=len(exs), samples=sum(map(len, written)))
    for ex, prompt, answers in zip(exs, prompts, written):
        judged, stops = {}, {}  # distinct answers only
        for answer, stopped in answers:
            if not fits(prompt + answer):
                counts["too long for the context"] += 1  # a pair is scored on whole sequences only
                continue
            judged.setdefault(answer, judge(answer, stopped, ex, yard, prefer))
            stops[answer] = stopped
        counts.update(why or "passes" for why in judged.values())
        made = _pairs_of_one_prompt(ex, prompt, judged, stops, yard, prefer, per_prompt, hold)
        pairs += made
        counts["prompts_with_a_pair"] += bool(made)
    counts["pairs"] = len(pairs)
    return pairs, dict(counts)


def _pairs_of_one_prompt(ex, prompt, judged, stops, yard, prefer, per_prompt, hold):
    """pair_up's pairs for one prompt, from its judged answers {answer: why it fails, '' if it passes}. The passing
    answers serve in turn; one that has no fair partner left leaves the turn, and the next one is tried."""
    good, bad, pairs = [a for a, why in judged.items() if not why], [a for a, why in judged.items() if why], []
    held = {a: not hold or hold.passes(a, ex.input, yard) for a in judged}
    good.sort(key=lambda a: not held[a])  # stable: otherwise in the order written
    turn = 0
    while len(pairs) < per_prompt and good:  # passing answers are rare: each serves in turn
        chosen = good[turn % len(good)]
        # a near miss of another length would teach the length: only a gate failure may differ in it
        fair = [a for a in bad if (judged[a] != f"not {prefer.name}" or a.count("\n") == chosen.count("\n"))
                and (held[chosen] or not held[a])]
        if not fair:
            good.remove(chosen)  # the next passing answer takes its turn
            continue
        rejected = min(fair, key=lambda a: judged[a] != f"not {prefer.name}")
        bad.remove(rejected)
        pairs.append(Pair(ex.task, prompt, chosen, rejected, judged[rejected], stops[rejected], title=ex.input))
        turn += 1
    return pairs


# ---- pairs that differ in one line ending ----

def draw(side, gen):
    """One character of [(character, logit)], drawn by its probability."""
    probs = torch.softmax(torch.tensor([v for _, v in side]), 0)
    return side[torch.multinomial(probs, 1, generator=gen).item()][0]


@torch.no_grad()
def ending_pairs(model, tokenizer, exs, yard, fmt=TITLE_TO_POEM, per_prompt=4, max_new_tokens=128, seed=0, batch_size=512,
                 hold=None, temperature=EVAL_SAMPLING.temperature, top_k=EVAL_SAMPLING.top_k):
    """Rhyme pairs that differ in one line ending, where the rhyme is decided. The model writes one answer per prompt;
    in one that passes the gates, each later ending that breaks the rhyme is first mended (the model's own likeliest
    characters there that keep it, drawn by probability). Then at each line ending after the first, the model's own
    next-character choices there (its top_k, as in sampling) give two characters, drawn by its probabilities: one
    that keeps the rhyme (of the first ending's group, used by no other ending) and one that breaks it (outside the
    group, or an earlier ending's character again). The rest of the answer is kept on both sides, and the pair counts
    only up to that character (Pair.upto): its log-ratios differ there alone. The one that keeps the rhyme is chosen
    when it passes the checkers whole, against the other, which fails the rhyme alone. hold: as in pair_up.
    Returns (pairs, counts)."""
    prompts = [prompt_text(ex, fmt) for ex in exs]
    written = write(model, tokenizer, prompts, max_new_tokens, fmt.end, Sampling(seed=seed), batch_size)
    maker = _EndingPairs(model, tokenizer, yard, per_prompt, hold, temperature, top_k, torch.Generator().manual_seed(seed))
    pairs, counts = [], collections.Counter(prompts=len(exs), samples=len(exs))
    with evaluating(model):
        for ex, prompt, (answer, stopped) in zip(exs, prompts, written):
            made, why = maker.pairs(ex, prompt, answer, stopped, counts)
            if why:
                counts[why] += 1
            pairs += made
            counts["prompts_with_a_pair"] += bool(made)
    counts["pairs"] = len(pairs)
    return pairs, dict(counts)


class _EndingPairs:
    """What ending_pairs needs at every answer: the model, the yardstick and the draw."""

    def __init__(self, model, tokenizer, yard, per_prompt, hold, temperature, top_k, gen):
        self.model, self.tokenizer, self.yard, self.per_prompt, self.hold = model, tokenizer, yard, per_prompt, hold
        self.temperature, self.top_k, self.gen = temperature, top_k, gen

    def pairs(self, ex, prompt, answer, stopped, counts):
        """(pairs from one answer, why there are none where the answer itself rules them out, else '')."""
        prompt_ids, ids = self.tokenizer.encode(prompt, unknown="unk"), self.tokenizer.encode(answer, unknown="unk")
        why = gate(answer, stopped, ex, self.yard) or (  # a pair is scored on whole sequences only
            "too long for the context" if len(prompt_ids) + len(ids) + 1 > self.model.config.block_size + 1 else "")
        if why:
            return [], why
        tokens = [self.tokenizer.itos[i] for i in ids]
        places = ending_places(tokens)
        ends = [tokens[p] for p in places]
        group = self.yard.rhyme_groups.get(ends[0]) if ends else None
        if group is None:
            return [], "first ending in no rhyme group"
        logits, _ = self.model(torch.tensor([prompt_ids + ids], device=self.model.device))
        # every later ending that breaks the rhyme first takes the model's own rhyming choice there; the pairs are made
        # on the mended answer, read again (a 律詩 whose third ending strays still teaches its second and fourth)
        mended, ends = self.mended(tokens, places, ends, group, logits[0, len(prompt_ids) - 1:], counts)
        if mended != tokens:
            tokens = mended
            logits, _ = self.model(torch.tensor([prompt_ids + [self.tokenizer.stoi[t] for t in tokens]],
                                                device=self.model.device))
        made = []
        for k in range(1, len(places)):
            if len(made) == self.per_prompt or k > 1 and not rhymes("\n".join(ends[:k]), self.yard.rhyme_groups):
                break  # enough, or the endings so far no longer rhyme: no ending after them can keep a rhyme
            row = logits[0, len(prompt_ids) + places[k] - 1]  # the logits that chose the k-th ending
            pair, why = self.pair_at(ex, prompt, tokens, places[k], ends[:k], ends[k + 1:], group, row, k)
            if why:
                counts[why] += 1
            else:
                made.append(pair)
        return made, ""

    def mended(self, tokens, places, ends, group, rows, counts):
        """(tokens, ends) with each ending after the first that breaks the rhyme replaced by one of the group drawn
        from the model's own top_k there (rows[i]: the logits that chose tokens[i]); up to the first ending where it
        offers none."""
        tokens, ends = list(tokens), list(ends)
        for k in range(1, len(places)):
            if self.yard.rhyme_groups.get(ends[k]) == group and ends[k] not in ends[:k]:
                continue
            rhyming = self.options(rows[places[k]], ends[:k], ends[k + 1:], group)[0]
            if not rhyming:
                break
            ends[k] = tokens[places[k]] = draw(rhyming, self.gen)
            counts["endings mended"] += 1
        return tokens, ends

    def options(self, row, earlier, later, group):
        """([(character, logit)] that keep the rhyme, those that break it) among the top_k at one place: a character of
        the group that no other ending uses keeps it; one outside the group, or an earlier ending's character again,
        breaks it (the checker asks for different characters). A character of the group that only a later ending
        uses is on neither side: where it is written, the model cannot see that it comes again further on."""
        top = torch.topk(row.float() / self.temperature, min(self.top_k, row.size(-1)))
        itos, groups = self.tokenizer.itos, self.yard.rhyme_groups
        options = [(itos[i], v) for v, i in zip(top.values.tolist(), top.indices.tolist())
                   if len(itos[i]) == 1 and itos[i] not in CLAUSE_MARKS + "\n"]
        keeps = [o for o in options if groups.get(o[0]) == group and o[0] not in earlier and o[0] not in later]
        breaks = [o for o in options if groups.get(o[0]) != group or o[0] in earlier]
        return keeps, breaks

    def pair_at(self, ex, prompt, tokens, place, earlier, later, group, row, k):
        """(the pair made by changing the ending at place, '') or (None, why not)."""
        sides = self.options(row, earlier, later, group)
        if not all(sides):
            return None, "no rhyming and unrhyming choice"
        picks = [draw(side, self.gen) for side in sides]
        chosen, rejected = ("".join(tokens[:place]) + c + "".join(tokens[place + 1:]) for c in picks)
        if judge(chosen, True, ex, self.yard, RHYME):  # a later ending breaks the rhyme, or a gate fails after the change
            return None, "chosen not a passing answer"
        hold = self.hold
        worked_against = hold and hold.passes(rejected, ex.input, self.yard) and not hold.passes(chosen, ex.input, self.yard)
        if gate(rejected, True, ex, self.yard) or worked_against:
            return None, "rejected fails more than the rhyme"
        return Pair(ex.task, prompt, chosen, rejected, f"not rhyme (line {k + 1})", title=ex.input, upto=place + 1), ""


# ---- pairs that differ in one character of the title ----

@torch.no_grad()
def title_pairs(model, tokenizer, exs, yard, fmt=TITLE_TO_POEM, per_prompt=2, max_new_tokens=128, seed=0, batch_size=512,
                hold=None, temperature=EVAL_SAMPLING.temperature, top_k=EVAL_SAMPLING.top_k):
    """Title pairs that differ in one character, where the model itself would put a character of its title. The model
    writes one answer per prompt; in one that passes the gates and holds no content character of its title, at each
    place where the model's own top_k there hold one, such a character (drawn by probability) makes the chosen
    answer, and the answer as written is the rejected one; the pair counts up to that place (Pair.upto). Up to
    per_prompt places an answer, the ones where the title's characters are likeliest first. hold: as in pair_up.
    Returns (pairs, counts)."""
    prompts = [prompt_text(ex, fmt) for ex in exs]
    written = write(model, tokenizer, prompts, max_new_tokens, fmt.end, Sampling(seed=seed), batch_size)
    gen, pairs, title = torch.Generator().manual_seed(seed), [], PREFERENCES["title"]
    counts = collections.Counter(prompts=len(exs), samples=len(exs))
    with evaluating(model):
        for ex, prompt, (answer, stopped) in zip(exs, prompts, written):
            prompt_ids, ids = tokenizer.encode(prompt, unknown="unk"), tokenizer.encode(answer, unknown="unk")
            why = gate(answer, stopped, ex, yard) or (
                "names its title already" if title.passes(answer, ex.input, yard) else  # a pair is scored whole:
                "too long for the context" if len(prompt_ids) + len(ids) > model.config.block_size else "")
            made = [] if why else _title_pairs_of(model, tokenizer, ex, prompt, prompt_ids, ids, answer, yard,
                                                  per_prompt, hold, temperature, top_k, gen, counts)
            counts[why or ("no place for a title character" if not made else "prompts_with_a_pair")] += 1
            pairs += made
    counts["pairs"] = len(pairs)
    return pairs, dict(counts)


def _title_pairs_of(model, tokenizer, ex, prompt, prompt_ids, ids, answer, yard, per_prompt, hold, temperature, top_k,
                    gen, counts):
    """The title pairs of one answer (ids, after prompt_ids) that passed the gates and names no character of its
    title."""
    logits, _ = model(torch.tensor([prompt_ids + ids], device=model.device))
    wanted = [tokenizer.stoi[c] for c in sorted(content_chars(ex.input)) if c in tokenizer.stoi]
    made = []
    for j, options in _title_places(logits[0, len(prompt_ids) - 1:-1], ids, wanted, tokenizer, temperature, top_k):
        if len(made) == per_prompt:
            break
        chosen = tokenizer.decode(ids[:j] + [tokenizer.stoi[draw(options, gen)]] + ids[j + 1:])
        worked_against = hold and hold.passes(answer, ex.input, yard) and not hold.passes(chosen, ex.input, yard)
        if judge(chosen, True, ex, yard, PREFERENCES["title"]) or worked_against:
            counts["chosen not a passing answer"] += 1
            continue
        made.append(Pair(ex.task, prompt, chosen, answer, "not title", title=ex.input, upto=j + 1))
    return made


def _title_places(rows, ids, wanted, tokenizer, temperature, top_k):
    """[(place, [(character, logit)] of the wanted ids among the top_k there)] over the answer's places of a Chinese
    character (token indices; rows[j]: the logits that chose ids[j]), where the wanted ids are likeliest first."""
    rows = rows.float() / temperature
    probs = torch.softmax(rows, dim=-1)
    kth = torch.topk(rows, min(top_k, rows.size(-1)), dim=-1).values[:, -1]
    best = []
    for j, i in enumerate(ids):
        c = tokenizer.itos[i]
        in_top = [w for w in wanted if rows[j, w] >= kth[j]] if len(c) == 1 and "\u3400" <= c <= "\u9fff" else []
        if in_top:
            best.append((-probs[j, in_top].sum().item(), j, [(tokenizer.itos[w], rows[j, w].item()) for w in in_top]))
    return [(j, options) for _, j, options in sorted(best, key=lambda b: b[:2])]


# ---- pairs on disk: a resumed run trains on the same pairs ----

def save_pairs(path, pairs, counts):
    """Written whole or not at all (a temporary file renamed into place)."""
    text = json.dumps({"counts": counts, "pairs": [asdict(p) for p in pairs]}, ensure_ascii=False, indent=0)
    replace_durably(path, lambda f: f.write(text.encode("utf-8")))


def load_pairs(path):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return [Pair(**p) for p in data["pairs"]], data["counts"]

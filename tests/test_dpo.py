"""DPO: the loss against a hand computation, log 2 at the reference, pairs labelled by the checker, the prompt masked."""
import collections
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from minigpt import dpo
from minigpt import pairs as pairing
from minigpt.data import TITLE_TO_POEM, render, sft_batch
from minigpt.dpo import dpo_loss, fill_reference, pair_batch, preference_metrics
from minigpt.metrics import PREFERENCES, mark
from minigpt.pairs import Pair, ending_pairs, gate, judge, make_pairs, pair_up
from minigpt.verse import ending_places
from minigpt.model import GPT, IGNORE_INDEX, GPTConfig
from minigpt.tasks import Example
from minigpt.tokenizer import CharTokenizer

RHYMES = "白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。"  # 流 and 樓 in one group
NO_RHYME = "白日依山盡，黃河入海深。\n欲窮千里目，更上一層樓。"  # 深 in another
YARD = SimpleNamespace(rhyme_groups={"流": "流", "樓": "流", "深": "深"}, train_clauses={"春眠不覺曉"})
POEM = Example("poem", TITLE_TO_POEM.instruction, "登樓", "")


@pytest.fixture
def chars():
    """A tokenizer of the hand-made poems' characters."""
    return CharTokenizer(RHYMES + NO_RHYME + "登樓春眠不覺曉亂寫秋雨" + TITLE_TO_POEM.instruction)


@pytest.fixture
def model(chars):
    return GPT(GPTConfig(vocab_size=chars.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


def test_the_gates_and_the_preference_on_hand_made_answers():
    assert judge(RHYMES, True, POEM, YARD, PREFERENCES["rhyme"]) == ""
    assert judge(NO_RHYME, True, POEM, YARD, PREFERENCES["rhyme"]) == "not rhyme"
    assert gate(RHYMES, False, POEM, YARD) == "no end marker"
    assert gate(RHYMES + "\n\n登樓\n白日依山盡", True, POEM, YARD) == "not what the task asks"  # runs on
    assert gate("白日依山盡，白日依山盡。\n欲窮千里目，更上一層樓。", True, POEM, YARD) == "repeats a clause"
    assert gate("春眠不覺曉，黃河入海流。\n欲窮千里目，更上一層樓。", True, POEM, YARD) == "copies a training clause"
    assert judge(RHYMES, True, POEM, YARD, PREFERENCES["title"]) == ""  # 樓 is a content character of 登樓
    assert judge(RHYMES, True, Example("poem", "", "秋雨", ""), YARD, PREFERENCES["title"]) == "not title"
    assert judge(RHYMES, True, POEM, YARD, PREFERENCES["rhyme+title"]) == ""  # both: it rhymes and names 樓
    assert judge(RHYMES, True, Example("poem", "", "秋雨", ""), YARD, PREFERENCES["rhyme+title"]) == "not rhyme+title"
    assert judge(NO_RHYME, True, POEM, YARD, PREFERENCES["rhyme+title"]) == "not rhyme+title"


def test_pairs_follow_the_checker(monkeypatch, model, chars):
    written = {"rhyming and a near miss": [(RHYMES, True), (NO_RHYME, True), ("亂寫", True), (RHYMES, True)],
               "all fail": [(NO_RHYME, True), ("亂寫", False), (NO_RHYME, True), ("亂", True)]}
    monkeypatch.setattr(pairing, "write", lambda m, tok, prompts, *a, **k: [w for ws in written.values() for w in ws])
    exs = [Example("poem", TITLE_TO_POEM.instruction, "登樓", ""), Example("poem", TITLE_TO_POEM.instruction, "登樓", "")]
    pairs, counts = make_pairs(model, chars, exs, YARD, PREFERENCES["rhyme"], samples=4, per_prompt=2, shared_start=False)
    # the one passing answer (written twice, counted once) against the near miss first, then against the scrawl
    assert [(p.chosen, p.rejected, p.why_rejected) for p in pairs] == [(RHYMES, NO_RHYME, "not rhyme"),
                                                                       (RHYMES, "亂寫", "not what the task asks")]
    assert pairs[0].prompt == TITLE_TO_POEM.prompt("登樓")
    assert counts["pairs"] == 2 and counts["prompts_with_a_pair"] == 1 and counts["passes"] == 1
    # with the preference turned around (title), the same answers pair differently: what is preferred decides
    flipped, counts = make_pairs(model, chars, exs[:1], YARD, PREFERENCES["title"], samples=4, per_prompt=2,
                                 shared_start=False)
    assert counts["passes"] == 2  # both poems name 樓: the one that failed on rhyme passes here
    assert [(p.chosen, p.rejected, p.why_rejected) for p in flipped] == [(RHYMES, "亂寫", "not what the task asks")]


def test_the_samples_of_a_prompt_share_its_first_couplet(monkeypatch, model, chars):
    first, second = RHYMES.split("\n")
    asked = []

    def complete(m, tok, prompts, *a, **k):
        asked.append(prompts)
        if len(asked) == 1:  # one whole answer per prompt: its first line starts every sample
            return [(RHYMES, True)]
        return [(second, True), (NO_RHYME.split("\n")[1].replace("樓", "深"), True)]
    monkeypatch.setattr(pairing, "write", complete)
    pairs, _ = make_pairs(model, chars, [POEM], YARD, PREFERENCES["rhyme"], samples=2, per_prompt=1)
    assert asked[1] == [TITLE_TO_POEM.prompt("登樓") + first + "\n"] * 2
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [(TITLE_TO_POEM.prompt("登樓"), RHYMES, first + "\n欲窮千里目，更上一層深。")]


LUSHI = RHYMES + "\n春來花滿地，秋去雨連秋。\n遠望青山外，孤雲自在舟。"  # endings 流 樓 秋 舟: one group


def test_ending_pairs_differ_at_one_line_ending_and_follow_the_checker(monkeypatch):
    yard = SimpleNamespace(rhyme_groups={"流": "流", "樓": "流", "秋": "流", "舟": "流", "深": "深"}, train_clauses=set())
    broken = RHYMES.replace("樓", "深")  # the model broke the rhyme at its last ending
    written = [(RHYMES, True), (broken, True), ("亂寫", True), (RHYMES, False), (LUSHI, True)]
    chars = CharTokenizer(LUSHI + broken + "亂寫" + TITLE_TO_POEM.instruction + "登樓")
    model = GPT(GPTConfig(vocab_size=chars.vocab_size, block_size=128, n_layer=1, n_head=1, n_embd=16))
    monkeypatch.setattr(pairing, "write", lambda m, tok, prompts, *a, **k: written[:len(prompts)])
    pairs, counts = ending_pairs(model, chars, [POEM] * len(written), yard, per_prompt=2, top_k=1000)
    rhyming = yard.rhyme_groups.keys() - {"深"}
    assert counts["not what the task asks"] == 1 and counts["no end marker"] == 1  # gates first: no pair from those
    for p in pairs:
        assert judge(p.chosen, True, POEM, yard, PREFERENCES["rhyme"]) == ""
        assert judge(p.rejected, True, POEM, yard, PREFERENCES["rhyme"]) == "not rhyme"
        differ = [i for i, (a, b) in enumerate(zip(p.chosen, p.rejected)) if a != b]
        assert len(p.chosen) == len(p.rejected) and len(differ) == 1 and differ[0] in ending_places(p.chosen)
        others = [p.chosen[i] for i in ending_places(p.chosen) if i != differ[0]]
        assert p.chosen[differ[0]] in rhyming and p.chosen[differ[0]] not in others  # keeps the rhyme
        assert p.rejected[differ[0]] not in rhyming or p.rejected[differ[0]] in others  # breaks it: another group or a repeat
    # each 絕句 gives its one pair at line 2, the rest of what the model wrote kept on both sides
    for p, source in zip(pairs, (RHYMES, broken)):
        i = len(source) - 2  # its last ending, before 。
        assert p.why_rejected == "not rhyme (line 2)"
        assert all(side[:i] + side[i + 1:] == source[:i] + source[i + 1:] for side in (p.chosen, p.rejected))
    # the 律詩 stops at per_prompt pairs, at lines 2 and 3; its chosen is as written (the only distinct choice)
    assert [(p.chosen, p.why_rejected) for p in pairs[2:]] == [(LUSHI, "not rhyme (line 2)"), (LUSHI, "not rhyme (line 3)")]
    assert counts["pairs"] == len(pairs) == 4 and counts["prompts_with_a_pair"] == 3
    # a 律詩's pair counts up to its line 2 or 3: the later endings are read nowhere (the model is its own reference)
    assert dpo.margin_parts(model, model, pairs, chars, yard, PREFERENCES["rhyme"]) == [(0.0, 0.0)] * 4
    # an answer whose second ending breaks the rhyme
    lost = LUSHI.replace("樓", "深")
    monkeypatch.setattr(pairing, "write", lambda m, tok, prompts, *a, **k: [(lost, True)])
    pairs, counts = ending_pairs(model, chars, [POEM], yard, per_prompt=3, top_k=1000)
    # line 2 mended first to 樓 (秋 and 舟 are taken): the answer pairs at every later ending, each pair on the mended one
    assert counts["endings mended"] == 1
    assert [(p.chosen, p.why_rejected) for p in pairs] == [(LUSHI, f"not rhyme (line {k})") for k in (2, 3, 4)]
    assert all(judge(p.rejected, True, POEM, yard, PREFERENCES["rhyme"]) == "not rhyme" for p in pairs)


def test_the_nearest_miss_is_rejected_and_never_one_of_another_length():
    long_miss = NO_RHYME + "\n春來花滿地，秋去雨連天。\n遠望青山外，孤雲自在閒。"  # a 律詩 that fails on rhyme only
    ex = Example("poem", TITLE_TO_POEM.instruction, "登樓", "")
    pairs, _ = pair_up([ex], ["p"], [[(long_miss, True), ("亂寫", True), (NO_RHYME, True), (RHYMES, True)]], YARD,
                       PREFERENCES["rhyme"], per_prompt=3)
    # the 絕句 against the 絕句 first, then the scrawl; never the 律詩 that fails on rhyme alone: it would teach length
    assert [(p.chosen, p.rejected) for p in pairs] == [(RHYMES, NO_RHYME), (RHYMES, "亂寫")]
    pairs, _ = pair_up([ex], ["p"], [[("亂寫", True), (long_miss, True), (RHYMES, True), (NO_RHYME, True)]], YARD,
                       PREFERENCES["rhyme"], per_prompt=1)
    assert [(p.chosen, p.rejected) for p in pairs] == [(RHYMES, NO_RHYME)]  # a rhyme miss before a gate failure


def test_a_held_preference_is_never_worked_against():
    ex = Example("poem", TITLE_TO_POEM.instruction, "深秋", "")  # NO_RHYME names 深, RHYMES names nothing of it
    written = [[(NO_RHYME, True), (RHYMES, True), ("亂寫", True)]]
    pairs, _ = pair_up([ex], ["p"], written, YARD, PREFERENCES["rhyme"], per_prompt=1)
    assert [(p.chosen, p.rejected) for p in pairs] == [(RHYMES, NO_RHYME)]  # rhyme paid for with the title
    pairs, _ = pair_up([ex], ["p"], written, YARD, PREFERENCES["rhyme"], per_prompt=1, hold=PREFERENCES["title"])
    assert [(p.chosen, p.rejected) for p in pairs] == [(RHYMES, "亂寫")]  # the answer that names its title is kept
    autumn = RHYMES.replace("黃河", "秋河")  # rhymes and names 秋: served first as chosen
    pairs, _ = pair_up([ex], ["p"], [written[0] + [(autumn, True)]], YARD, PREFERENCES["rhyme"], per_prompt=2,
                       hold=PREFERENCES["title"])
    assert [(p.chosen, p.rejected) for p in pairs] == [(autumn, NO_RHYME), (RHYMES, "亂寫")]


def test_the_prompt_is_masked_and_a_run_on_has_no_end_marker(chars):
    pair = Pair("poem", TITLE_TO_POEM.prompt("登樓"), RHYMES, NO_RHYME, "no end marker", rejected_stopped=False)
    xc, yc, xr, yr = pair_batch([pair], chars)[:4]
    assert xc.shape == xr.shape  # one length for both sides: one forward pass
    assert chars.decode(yc[yc != IGNORE_INDEX].tolist()) == RHYMES + "<END>"
    assert chars.decode(yr[yr != IGNORE_INDEX].tolist()) == NO_RHYME  # what it wrote: it never stopped
    assert chars.decode(xc[0, :len(pair.prompt) - 0].tolist()).startswith("<INS>")


def test_the_loss_equals_a_hand_computation(model, chars):
    torch.manual_seed(1)
    model.lm_head.weight.data.normal_()  # a model with opinions
    pairs = [Pair("poem", TITLE_TO_POEM.prompt("登樓"), RHYMES, NO_RHYME, "not rhyme", True, -40.0, -35.0)]
    batch = pair_batch(pairs, chars)
    beta = 0.3

    def logp(text):  # log p(answer + <END> | prompt), token by token
        ids = chars.encode(TITLE_TO_POEM.prompt("登樓") + text)
        n_prompt = len(chars.encode(TITLE_TO_POEM.prompt("登樓")))
        logits = model(torch.tensor([ids[:-1]]))[0][0]
        return sum(F.log_softmax(logits[t - 1], dim=-1)[ids[t]].item() for t in range(n_prompt, len(ids)))

    margin = beta * ((logp(RHYMES + "<END>") + 40.0) - (logp(NO_RHYME + "<END>") + 35.0))
    loss, count = dpo_loss(model, batch, beta)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-margin))), rel=1e-5) and int(count) == 1
    real = sft_batch([render(chars, TITLE_TO_POEM.prompt("秋雨"), NO_RHYME + "<END>")], chars.pad_id)  # a real poem
    with_sft, _ = dpo_loss(model, batch._replace(real_x=real[0], real_y=real[1]), beta, sft_weight=0.5)
    assert with_sft.item() == pytest.approx(loss.item() + 0.5 * model(*real)[1].item(), rel=1e-5)


def test_the_loss_is_log_2_when_the_policy_is_the_reference(model, chars):
    pairs = [Pair("poem", TITLE_TO_POEM.prompt("登樓"), RHYMES, NO_RHYME, "not rhyme"),
             Pair("poem", TITLE_TO_POEM.prompt("樓"), NO_RHYME, "白日依山盡", "not rhyme", False)]
    fill_reference(model, pairs, chars)
    assert all(p.ref_chosen < 0 and p.ref_rejected < 0 for p in pairs)
    loss, _ = dpo_loss(model, pair_batch(pairs, chars), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    stats = preference_metrics(model, [pair_batch(pairs, chars)], beta=0.1)
    assert stats["pref_loss"] == pytest.approx(math.log(2), abs=1e-6) and stats["reward_margin"] == pytest.approx(0, abs=1e-6)
    assert stats["pref_accuracy"] == 0.5  # every pair a tie: chance, not 0%


def test_a_step_on_a_pair_raises_the_chosen_answer(model, chars):
    pairs = fill_reference(model, [Pair("poem", TITLE_TO_POEM.prompt("登樓"), RHYMES, NO_RHYME, "not rhyme")], chars)
    batch = pair_batch(pairs, chars)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        dpo_loss(model.train(), batch)[0].backward()
        opt.step()
    stats = preference_metrics(model, [batch], beta=0.1)
    assert stats["pref_accuracy"] == 1.0 and stats["reward_margin"] > 0 and stats["pref_loss"] < math.log(2)


def test_a_margin_splits_into_the_line_endings_and_the_rest(model, chars):
    assert [RHYMES[i] for i in ending_places(RHYMES)] == ["流", "樓"]
    assert ending_places("春眠，\n\n不覺曉。") == [1, 7]  # an empty line holds no ending
    assert ending_places(["春", "<AST>", "眠", "，", "\n", "曉", "。"]) == [2, 5]  # tokens: a marker is one
    pairs = [Pair("poem", TITLE_TO_POEM.prompt("登樓"), RHYMES, NO_RHYME, "not rhyme"),
             Pair("poem", TITLE_TO_POEM.prompt("秋雨"), NO_RHYME, "白日依山<INS>盡，黃河", "not rhyme", False)]
    same = dpo.margin_parts(model, model, pairs, chars, YARD, PREFERENCES["rhyme"])
    assert same == [(0.0, 0.0)] * 2 and dpo.margin_shares(same) == {"all": 0.5, "at": 0.5, "elsewhere": 0.5}
    torch.manual_seed(2)
    policy = GPT(model.config).eval()
    policy.load_state_dict(model.state_dict())
    policy.lm_head.weight.data.add_(torch.randn_like(policy.lm_head.weight))

    def ratios(prompt, answer):  # log pi - log ref of each answer token (and <END> where it stopped), by hand
        ids, n = chars.encode(prompt + answer), len(chars.encode(prompt))
        logp = [F.log_softmax(m(torch.tensor([ids[:-1]]))[0][0], dim=-1) for m in (policy, model)]
        return [(logp[0][t - 1, ids[t]] - logp[1][t - 1, ids[t]]).item() for t in range(n, len(ids))]

    def split(prompt, answer):
        ids = chars.encode(answer.replace("<END>", ""))
        r, at = ratios(prompt, answer), set(ending_places([chars.itos[i] for i in ids]))
        return sum(v for i, v in enumerate(r) if i in at), sum(v for i, v in enumerate(r) if i not in at)

    parts = dpo.margin_parts(policy, model, pairs, chars, YARD, PREFERENCES["rhyme"])
    for (endings, rest), p, stopped in zip(parts, pairs, (True, False)):
        c, r = split(p.prompt, p.chosen + "<END>"), split(p.prompt, p.rejected + "<END>" * stopped)
        assert endings == pytest.approx(c[0] - r[0], abs=1e-4) and rest == pytest.approx(c[1] - r[1], abs=1e-4)
        assert abs(endings) > 1e-3 and abs(rest) > 1e-3


def test_the_accuracy_error_counts_a_prompts_pairs_together():
    # four pairs, two prompts: 1, 1 | 0, 0 agree within each prompt, so the two prompts are two observations, not four
    assert dpo.standard_error([1, 1, 0, 0], "aabb") == pytest.approx(math.sqrt(2) / 4)
    assert dpo.standard_error([1, 1, 0, 0], "abcd") == pytest.approx(0.25)  # four prompts: sqrt(p(1-p)/n)
    assert dpo.standard_error([1, 0, 1, 0], "aabb") == 0.0  # each prompt's pairs already average to the share
    assert dpo.standard_error([1, 1, 1, 0.5], "abcd") == pytest.approx(math.sqrt(3 * 0.125 ** 2 + 0.375 ** 2) / 4)


def test_a_sample_marks_what_its_preference_reads():
    rhyme, title, both = PREFERENCES["rhyme"], PREFERENCES["title"], PREFERENCES["rhyme+title"]
    assert mark(RHYMES, "登樓", YARD, rhyme) == "白日依山盡，黃河入海[流]。\n欲窮千里目，更上一層[樓]。   <- rhymes"
    assert mark(NO_RHYME, "登樓", YARD, rhyme).endswith("<- no rhyme (深:深 樓:流)")
    assert mark(RHYMES, "秋日登樓", YARD, title) == "白[日]依山盡，黃河入海流。\n欲窮千里目，更上一層[樓]。   <- names its title"
    assert mark(RHYMES, "秋雨", YARD, title).endswith("<- no character of 秋雨")
    assert mark(RHYMES, "河畔", YARD, both) == ("白日依山盡，黃[河]入海[流]。\n欲窮千里目，更上一層[樓]。   <- rhymes; "
                                              "names its title")


def test_a_passing_answer_without_a_partner_gives_its_turn_to_the_next():
    """The order the answers come in does not decide whether a prompt gives a pair."""
    yard = SimpleNamespace(rhyme_groups={"流": "流", "樓": "流", "秋": "流", "舟": "流", "深": "深"}, train_clauses=set())
    long_miss = LUSHI.replace("樓", "深")  # a 律詩 that fails on rhyme alone: the 絕句 may not be paired with it
    ex = Example("poem", TITLE_TO_POEM.instruction, "登樓", "")
    for order in ([(RHYMES, True), (LUSHI, True), (long_miss, True)], [(LUSHI, True), (RHYMES, True), (long_miss, True)]):
        pairs, counts = pair_up([ex], ["p"], [order], yard, PREFERENCES["rhyme"], per_prompt=1)
        assert [(p.chosen, p.rejected) for p in pairs] == [(LUSHI, long_miss)] and counts["prompts_with_a_pair"] == 1


def test_the_reference_is_measured_without_dropout(chars):
    model = GPT(GPTConfig(vocab_size=chars.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.5)).train()
    pairs = [Pair("poem", TITLE_TO_POEM.prompt("登樓"), RHYMES, NO_RHYME, "not rhyme")]
    fill_reference(model, pairs, chars)
    assert model.training  # given back as it was
    batch = pair_batch(pairs, chars)
    with torch.no_grad():
        by_hand = dpo.sequence_logprobs(model.eval(), batch.chosen_x, batch.chosen_y).item()
    assert pairs[0].ref_chosen == pytest.approx(by_hand, abs=1e-5)


class Scripted(torch.nn.Module):
    """A stand-in model whose next-token logits are set by hand at chosen positions (everywhere else flat and low)."""

    def __init__(self, vocab_size, at):
        super().__init__()
        self.config, self.vocab_size, self.at = SimpleNamespace(block_size=128), vocab_size, at
        self.register_buffer("anchor", torch.zeros(1))

    @property
    def device(self):
        return self.anchor.device

    def forward(self, idx):
        logits = torch.full((idx.size(0), idx.size(1), self.vocab_size), -30.0)
        for t, row in self.at.items():
            for i, v in row.items():
                logits[:, t, i] = v
        return logits, None


ENDINGS = SimpleNamespace(rhyme_groups={"流": "A", "樓": "A", "舟": "A", "深": "B", "心": "B"}, train_clauses=set())


def scripted_pairs(monkeypatch, chars, choices, seed=0, top_k=50, yard=ENDINGS, hold=None, title="登樓"):
    """ending_pairs on RHYMES (endings 流, 樓) written by a model that, where the second ending is chosen, puts
    choices {character: logit} and nothing else among its likely characters."""
    ex = Example("poem", TITLE_TO_POEM.instruction, title, "")
    prompt = chars.encode(TITLE_TO_POEM.prompt(title))
    at = len(prompt) + ending_places(RHYMES)[1] - 1  # the position whose logits choose the second ending
    model = Scripted(chars.vocab_size, {at: {chars.stoi[c]: v for c, v in choices.items()}})
    monkeypatch.setattr(pairing, "write", lambda m, tok, prompts, *a, **k: [(RHYMES, True)])
    return ending_pairs(model, chars, [ex], yard, per_prompt=1, seed=seed, top_k=top_k, hold=hold)


@pytest.fixture
def wide():
    return CharTokenizer(RHYMES + NO_RHYME + "舟心深秋登樓" + TITLE_TO_POEM.instruction)


def test_ending_pairs_read_the_model_where_it_chooses_the_ending(monkeypatch, wide):
    pairs, _ = scripted_pairs(monkeypatch, wide, {"樓": 5.0, "深": 3.0})
    assert [(p.chosen, p.rejected) for p in pairs] == [(RHYMES, RHYMES.replace("樓", "深"))]


def test_ending_pairs_keep_to_the_top_k_and_draw_by_probability(monkeypatch, wide):
    four = {"樓": 5.0, "舟": 4.0, "深": 3.0, "心": 2.0}
    assert scripted_pairs(monkeypatch, wide, four, top_k=2)[0] == []  # 樓 and 舟 both rhyme: no unrhyming choice
    assert len(scripted_pairs(monkeypatch, wide, four, top_k=3)[0]) == 1
    drawn = [scripted_pairs(monkeypatch, wide, four, seed=s)[0][0] for s in range(40)]
    last = len(RHYMES) - 2
    chosen, rejected = collections.Counter(p.chosen[last] for p in drawn), collections.Counter(p.rejected[last] for p in drawn)
    assert set(chosen) == {"樓", "舟"} and set(rejected) == {"深", "心"}  # drawn, not always the first option
    assert chosen["樓"] > chosen["舟"] and rejected["深"] > rejected["心"]  # e^5 : e^4, e^3 : e^2


def test_an_ending_pair_counts_up_to_the_ending_it_changes(monkeypatch, wide):
    pairs, _ = scripted_pairs(monkeypatch, wide, {"樓": 5.0, "深": 3.0})
    last = len(RHYMES) - 2  # the changed ending, before 。
    assert pairs[0].upto == last + 1
    batch = pair_batch(pairs, wide)
    for x, y, side in ((batch.chosen_x, batch.chosen_y, pairs[0].chosen), (batch.rejected_x, batch.rejected_y,
                                                                             pairs[0].rejected)):
        targets = y[0][y[0] != IGNORE_INDEX].tolist()
        assert targets == wide.encode(side[:last + 1])  # the answer up to the ending: not 。, not the end marker
    # what follows the change adds nothing: the same pair with another tail has the same log-probabilities
    model = GPT(GPTConfig(vocab_size=wide.vocab_size, block_size=64, n_layer=1, n_head=1, n_embd=16))
    other = Pair(**{**pairs[0].__dict__, "chosen": pairs[0].chosen[:-1] + "，", "rejected": pairs[0].rejected[:-1] + "，"})
    logp = [dpo.pair_token_logprobs(model, pair_batch([p], wide))[0].sum(1) for p in (pairs[0], other)]
    assert torch.equal(logp[0], logp[1])
    parts = dpo.margin_parts(model, model, pairs, wide, ENDINGS, PREFERENCES["rhyme"])  # where a margin comes from
    assert parts == [(0.0, 0.0)]  # the model is its own reference: nothing gained, at the ending or before it
    whole = Pair(**{**pairs[0].__dict__, "upto": 0})
    assert (pair_batch([whole], wide).chosen_y != IGNORE_INDEX).sum() == len(RHYMES) + 1  # every token and <END>


def test_pairs_that_differ_in_one_token_share_one_forward_pass(monkeypatch, wide):
    ending, _ = scripted_pairs(monkeypatch, wide, {"樓": 5.0, "深": 3.0})
    whole = Pair("poem", TITLE_TO_POEM.prompt("登樓"), RHYMES, NO_RHYME, "not rhyme")
    early = Pair(**{**ending[0].__dict__, "rejected": "黃" + ending[0].rejected[1:]})  # differs before the change too
    assert pair_batch(ending, wide).shared and pair_batch(ending + ending, wide).shared
    assert not any(pair_batch(ps, wide).shared for ps in ([whole], ending + [whole], [early]))
    cut = pair_batch(ending, wide)  # cut after the changed ending: nothing past it is computed
    assert cut.chosen_x.size(1) == (cut.chosen_y != IGNORE_INDEX).nonzero()[:, 1].max() + 1
    config = GPTConfig(vocab_size=wide.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(3)
    model, reference = GPT(config), GPT(config)
    fill_reference(reference, ending, wide)  # another model as the reference: the loss is not log 2
    real = sft_batch([render(wide, TITLE_TO_POEM.prompt("登樓"), NO_RHYME + "<END>")], wide.pad_id)
    batch = pair_batch(ending, wide)._replace(real_x=real[0], real_y=real[1])
    grads = []
    for shared in (True, False):  # the one pass against both sides run
        model.zero_grad()
        loss, _ = dpo_loss(model, batch._replace(shared=shared), beta=0.5, sft_weight=0.3)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6) and abs(grads[0][0] - math.log(2)) > 1e-3
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))
    # the tokens before the change are the same on both sides: their part of the margin is exactly nothing
    parts = dpo.margin_parts(model, reference, ending, wide, ENDINGS, PREFERENCES["rhyme"])
    assert parts[0][1] == 0.0 and parts[0][0] != 0.0
    last = SimpleNamespace(places=lambda tokens, title, yard: [3])  # the fourth token is where the preference reads
    shared = [0.1, -2.3, 0.7]
    sides = [dpo._split(torch.tensor(shared + [v]), "白日依山", "", wide, None, last) for v in (-1234.567, -0.001)]
    assert sides[0][1] == sides[1][1] and sides[0][0] == pytest.approx(-1234.567)  # not the total less the place
    # the whole pair is not shared, and running its chosen rows alone would score the rejected answer wrongly
    whole_batch = pair_batch([whole], wide)
    both = dpo.pair_token_logprobs(model, whole_batch)[0].sum(1)
    assert not torch.allclose(both, dpo.pair_token_logprobs(model, whole_batch._replace(shared=True))[0].sum(1))


def test_an_ending_that_repeats_an_earlier_one_is_a_rejected_choice(monkeypatch, wide):
    # 流 is the first ending: written again it is of the group, yet breaks the rhyme (the endings must differ)
    pairs, _ = scripted_pairs(monkeypatch, wide, {"樓": 5.0, "流": 4.0})
    assert [(p.chosen, p.rejected) for p in pairs] == [(RHYMES, RHYMES[:-2] + "流。")]
    assert scripted_pairs(monkeypatch, wide, {"流": 5.0, "深": 3.0}, top_k=2)[0] == []  # none of the two keeps the rhyme


def test_an_ending_pair_whose_rejected_side_fails_more_than_the_rhyme_is_refused(monkeypatch, wide):
    copying = SimpleNamespace(rhyme_groups=ENDINGS.rhyme_groups, train_clauses={"更上一層深"})
    pairs, counts = scripted_pairs(monkeypatch, wide, {"樓": 5.0, "深": 3.0}, yard=copying)
    assert pairs == [] and counts["rejected fails more than the rhyme"] == 1  # 更上一層深 copies a training clause
    pairs, counts = scripted_pairs(monkeypatch, wide, {"樓": 5.0, "深": 3.0}, hold=PREFERENCES["title"], title="深秋")
    assert pairs == [] and counts["rejected fails more than the rhyme"] == 1  # only the rejected side names 深秋


def test_the_gate_asks_for_what_the_task_asks():
    form = Example("form", "", "登樓", "", "七言絕句")
    assert gate(RHYMES, True, form, YARD) == "not what the task asks"  # a 五言絕句 for a 七言絕句
    assert gate(RHYMES, True, Example("form", "", "登樓", "", "五言絕句"), YARD) == ""


def test_title_pairs_put_a_title_character_where_the_model_would(monkeypatch):
    chars = CharTokenizer(RHYMES + "登高" + TITLE_TO_POEM.instruction)
    title, j = "登高", RHYMES.index("海")  # the model's second choice at 海 is 高; elsewhere no title character is near
    prompt = chars.encode(TITLE_TO_POEM.prompt(title))
    ids = chars.encode(RHYMES)
    at = {len(prompt) + k - 1: {i: 5.0, chars.stoi["白"] if i != chars.stoi["白"] else chars.stoi["日"]: 4.0}
          for k, i in enumerate(ids)}
    at[len(prompt) + j - 1] = {chars.stoi["海"]: 5.0, chars.stoi["高"]: 4.5}
    model = Scripted(chars.vocab_size, at)
    named = RHYMES.replace("白日", "登日")  # names its title already: nothing to prefer
    yard = SimpleNamespace(rhyme_groups=ENDINGS.rhyme_groups, train_clauses=set())
    ex = Example("poem", TITLE_TO_POEM.instruction, title, "")
    monkeypatch.setattr(pairing, "write", lambda m, tok, prompts, *a, **k: [(RHYMES, True), (named, True)])
    pairs, counts = pairing.title_pairs(model, chars, [ex, ex], yard, per_prompt=2, top_k=2)
    assert counts["names its title already"] == 1 and counts["pairs"] == 1
    p, = pairs
    assert (p.chosen, p.rejected, p.upto) == (RHYMES[:j] + "高" + RHYMES[j + 1:], RHYMES, j + 1)
    assert judge(p.chosen, True, ex, yard, PREFERENCES["title"]) == ""
    assert judge(p.rejected, True, ex, yard, PREFERENCES["title"]) == "not title"


def test_a_character_only_a_later_ending_uses_is_on_neither_side(chars):
    """At the second ending of a 律詩 whose fourth ending is 樓, 樓 would make the poem repeat an ending, but the model
    writing the second line cannot see that: it is neither kept nor rejected. 流, the first ending, is rejected."""
    wide_chars = CharTokenizer(RHYMES + "舟深心")
    maker = pairing._EndingPairs(None, wide_chars, ENDINGS, 4, None, 1.0, 4, torch.Generator().manual_seed(0))  # top 4
    row = torch.full((wide_chars.vocab_size,), -1e9)
    for c, v in {"樓": 5.0, "舟": 4.0, "流": 3.0, "深": 2.0}.items():
        row[wide_chars.stoi[c]] = v
    keeps, breaks = maker.options(row, earlier=["流"], later=["樓"], group="A")
    assert [c for c, _ in keeps] == ["舟"]
    assert [c for c, _ in breaks] == ["流", "深"]
    keeps, breaks = maker.options(row, earlier=["流"], later=[], group="A")  # with no later ending, 樓 keeps it
    assert [c for c, _ in keeps] == ["樓", "舟"]

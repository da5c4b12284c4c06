"""RLHF: the program's ranking on hand-made answers, rankings files, the reward model's loss and head, PPO's ratio and
clip, the KL estimate, group advantages, and RL raising a toy reward; the two scripts end to end on the tiny preset."""
import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

import train_pretrain
import train_reward
import train_rl
import train_sft
from minigpt import rl
from minigpt.checkpoint import load_checkpoint
from minigpt.cli import run
from minigpt.data import TITLE_TO_POEM
from minigpt.generate import Answer
from minigpt.model import GPT, GPTConfig
from minigpt.reward import (RankedPair, Ranking, RankingError, RewardModel, combined, load_rankings, rank_answers,
                            rank_batch, ranking_metrics, ranking_pairs, ranks, reward_loss, reward_model_from,
                            reward_rows, save_rankings, score_answer)
from minigpt.rl import RLBatch, Rollouts, group_advantages, kl_per_token, ppo_loss, ppo_terms
from minigpt.tokenizer import CharTokenizer
from minigpt.train import TrainConfig, train

from conftest import FIXTURE_CORPUS

RHYMES = "白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。"  # 流 and 樓 in one group; 樓 names the title 登樓
NO_RHYME = "白日依山盡，黃河入海深。\n欲窮千里目，更上一層樓。"
REPEATS = "白日依山盡，白日依山盡。\n欲窮千里目，更上一層樓。"
COPIES = "春眠不覺曉，黃河入海流。\n欲窮千里目，更上一層樓。"
YARD = SimpleNamespace(rhyme_groups={"流": "流", "樓": "流", "深": "深"}, train_clauses={"春眠不覺曉"})


@pytest.fixture
def chars():
    return CharTokenizer(RHYMES + NO_RHYME + COPIES + "登樓秋雨亂寫" + TITLE_TO_POEM.instruction)


@pytest.fixture
def model(chars):
    return GPT(GPTConfig(vocab_size=chars.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


# ---- the program's ranking ----

def test_each_dimension_on_hand_made_answers():
    assert score_answer(RHYMES, True, "登樓", YARD) == dict(stops=1, regular=1, rhyme=1, title=1, no_repeat=1, no_copy=1)
    assert score_answer(RHYMES, False, "登樓", YARD)["stops"] == 0
    assert score_answer(NO_RHYME, True, "登樓", YARD)["rhyme"] == 0
    assert score_answer(RHYMES, True, "秋雨", YARD)["title"] == 0
    assert score_answer(REPEATS, True, "登樓", YARD)["no_repeat"] == 0
    assert score_answer(COPIES, True, "登樓", YARD)["no_copy"] == 0
    run_on = score_answer(RHYMES + "\n\n登樓\n白日依山盡", True, "登樓", YARD)
    assert run_on["regular"] == 0 and run_on["rhyme"] == 0  # a second poem after the first is no one regular poem
    empty = score_answer("", True, "登樓", YARD)  # stops at once: repeats and copies nothing, yet earns nothing there
    assert empty == dict(stops=1, regular=0, rhyme=0, title=0, no_repeat=0, no_copy=0) and combined(empty) == 1 / 6


def test_ranks_keep_ties_and_pairs_come_from_differing_ranks():
    assert ranks([0.5, 1.0, 0.5, 0.0]) == [2, 1, 2, 4]
    r = rank_answers("登樓", [Answer(RHYMES, True), Answer(NO_RHYME, True), Answer("亂寫", False)], YARD)
    assert r.rank == [1, 2, 3]
    pairs = ranking_pairs([r])
    assert [(p.better, p.worse) for p in pairs] == [(RHYMES, NO_RHYME), (RHYMES, "亂寫"), (NO_RHYME, "亂寫")]  # K(K-1)/2
    assert pairs[2].worse_stopped is False and pairs[0].better_scores["rhyme"] == 1
    tie = Ranking("登樓", [RHYMES, NO_RHYME, RHYMES], [1, 1, 1])
    assert ranking_pairs([tie]) == []  # ties give no pair
    assert len(ranking_pairs([Ranking("登樓", [RHYMES, RHYMES, "亂"], [1, 1, 2])])) == 2  # each copy against 亂


# ---- rankings files ----

def test_rankings_round_trip_and_a_persons_file_reads(tmp_path):
    r = rank_answers("登樓", [Answer(RHYMES, True), Answer("亂寫", False)], YARD)
    save_rankings(tmp_path / "r.jsonl", [r])
    assert load_rankings(tmp_path / "r.jsonl", {"登樓"}) == [r]
    person = tmp_path / "picks.jsonl"
    person.write_text(json.dumps({"title": "登樓", "answers": [NO_RHYME, RHYMES], "rank": [2, 1]}, ensure_ascii=False)
                      + "\n\n", encoding="utf-8")
    (got,) = load_rankings(person, {"登樓"})
    assert got.by == "person" and got.stopped == [True, True] and got.scores is None
    assert [(p.better, p.worse) for p in ranking_pairs([got])] == [(RHYMES, NO_RHYME)]


@pytest.mark.parametrize("line, says", [
    ("{not json", "line 2 is not JSON"),
    ('{"title": "登樓", "answers": ["a", "b"]}', "line 2 has no 'rank'"),
    ('{"title": "黃鶴樓", "answers": ["a", "b"], "rank": [1, 2]}', "line 2: unknown title '黃鶴樓'"),
    ('{"title": "登樓", "answers": [], "rank": []}', "line 2: an empty group (0 answers)"),
    ('{"title": "登樓", "answers": ["a"], "rank": [1]}', "line 2: an empty group (1 answers)"),
    ('{"title": "登樓", "answers": ["a", "b"], "rank": [1]}', "line 2: 'rank' must hold"),
    ('{"title": "登樓", "answers": ["a", "b"], "rank": [0, 1]}', "line 2: 'rank' must hold"),
])
def test_a_bad_rankings_line_is_named(tmp_path, line, says):
    path = tmp_path / "picks.jsonl"
    path.write_text('{"title": "登樓", "answers": ["a", "b"], "rank": [1, 2]}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(RankingError) as e:
        load_rankings(path, {"登樓"})
    assert str(e.value).startswith(f"{path} ") and says in str(e.value) and "\n" not in str(e.value)


def test_an_empty_or_missing_rankings_file_is_named(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(RankingError, match="holds no ranking"):
        load_rankings(tmp_path / "empty.jsonl")
    with pytest.raises(RankingError, match="cannot read rankings"):
        load_rankings(tmp_path / "absent.jsonl")


# ---- the reward model ----

def test_features_are_what_the_head_reads(model, chars):
    x = torch.tensor([chars.encode("登樓" + RHYMES)])
    assert torch.allclose(model.lm_head(model.features(x)), model(x)[0], atol=1e-6)


def test_the_reward_is_read_at_the_last_real_token_and_padding_changes_nothing(model, chars):
    rm = reward_model_from(model)
    assert all(torch.equal(rm.state_dict()[k], v) for k, v in model.state_dict().items())  # the SFT weights, kept
    torch.nn.init.normal_(rm.reward_head.weight)  # a head that reads something
    x, last = reward_rows(chars, ["登樓", "登樓"], [RHYMES, "亂"], [True, False], 64)
    assert x.shape == (2, len(chars.encode("登樓" + RHYMES)) + 1) and last.tolist() == [x.size(1) - 1, 2]
    assert x[0, -1] == chars.encode(TITLE_TO_POEM.end)[0]  # the end marker where the answer stopped
    alone = rm.score(x[1:, :3], last[1:])
    assert torch.allclose(rm.eval().score(x, last)[1], alone[0], atol=1e-6)


def test_the_reward_model_starts_at_log_2_and_learns_a_toy_ranking(model, chars):
    rm = reward_model_from(model).train()
    pairs = [RankedPair("登樓", RHYMES, NO_RHYME), RankedPair("秋雨", COPIES, "亂寫"), RankedPair("登樓", RHYMES, "亂")]
    batch = rank_batch(pairs, chars, 64)
    loss, n = reward_loss(rm, batch)
    assert n == 3 and loss.item() == pytest.approx(math.log(2), abs=1e-6)  # head at zero: every reward 0
    before = ranking_metrics(rm, pairs, chars)
    assert before["reward_accuracy"] == 0.5  # all tie: half, chance
    opt = torch.optim.AdamW(rm.parameters(), lr=3e-3)
    for _ in range(30):
        loss, _ = reward_loss(rm, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = ranking_metrics(rm, pairs, chars)
    assert after["reward_accuracy"] == 1.0 and after["reward_loss"] < 0.3
    swapped = [RankedPair(p.title, p.worse, p.better) for p in pairs]  # the same pairs read the other way
    assert ranking_metrics(rm, swapped, chars)["reward_accuracy"] == 0.0


def test_per_dimension_accuracy_reads_the_side_that_has_it(model, chars):
    rm = reward_model_from(model)
    a, b = score_answer(RHYMES, True, "登樓", YARD), score_answer(NO_RHYME, True, "登樓", YARD)
    got = ranking_metrics(rm, [RankedPair("登樓", RHYMES, NO_RHYME, True, True, a, b)], chars)
    assert got["reward_pairs_rhyme"] == 1 and "reward_pairs_title" not in got  # both name 樓: no pair differs there
    with torch.no_grad():
        rm.reward_head.bias.fill_(1.0)  # the same score for every answer: a tie
    assert ranking_metrics(rm, [RankedPair("登樓", RHYMES, NO_RHYME, True, True, a, b)], chars)["reward_accuracy_rhyme"] == 0.5


# ---- RL's pieces ----

def test_group_advantages_sum_to_zero_in_every_group():
    a = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5, 3.0, 3.0, 3.0, 3.0]), 4)
    assert torch.allclose(a.view(2, 4).sum(1), torch.zeros(2), atol=1e-5)
    assert a[0] > a[2] > a[1] and torch.equal(a[4:], torch.zeros(4))  # a group that scores alike teaches nothing
    assert a[:4].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)


def test_the_kl_estimate_is_zero_at_the_reference_and_positive_elsewhere(model, chars):
    logp = torch.log(torch.tensor([0.5, 0.1, 0.9]))
    assert torch.equal(kl_per_token(logp, logp), torch.zeros(3))
    assert (kl_per_token(logp, torch.log(torch.tensor([0.4, 0.3, 0.8]))) > 0).all()
    ref = copy.deepcopy(model)
    kl, entropy, written = rl.drift(model, ref, chars, ["登樓", "秋雨"], max_new_tokens=10, seed=0)
    assert kl == 0.0 and entropy > 0 and len(written) == 2
    with torch.no_grad():
        ref.lm_head.weight.mul_(3.0)
    assert rl.drift(model, ref, chars, ["登樓", "秋雨"], max_new_tokens=10, seed=0)[0] > 0


def collected(model, chars, reward, titles=2, group=4, epochs=2):
    ref = copy.deepcopy(model).requires_grad_(False)
    return Rollouts(model, ref, reward, chars, ["登樓", "秋雨"], titles, group, epochs, max_new_tokens=12)


def test_ppo_ratio_is_one_and_the_clip_idle_on_the_first_step_of_a_collection(model, chars):
    rollouts = collected(model, chars, lambda t, a, s: torch.tensor([float(len(x)) for x in a]))
    gen = torch.Generator().manual_seed(0)
    batch = rollouts(gen)
    assert batch.x.shape[0] == 8 and rollouts.calls == 1
    _, ratio, clipped = ppo_terms(model, batch)
    counted = batch.y != -100
    assert torch.allclose(ratio[counted], torch.ones(int(counted.sum())), atol=1e-5) and not clipped.any()
    assert torch.allclose(batch.old_logp, batch.ref_logp)  # the policy is the reference at the start: KL 0
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    loss, n = ppo_loss(model, batch)
    assert n == counted.sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    again = rollouts(gen)
    assert again is batch  # the second PPO step reuses the collection, off-policy now
    _, ratio, clipped = ppo_terms(model, again)
    assert not torch.allclose(ratio[counted], torch.ones(int(counted.sum())), atol=1e-3) and clipped.any()
    assert rollouts(gen) is not batch  # a third call collects afresh


def test_the_clipped_objective_stops_pushing_past_the_clip(model, chars):
    """Where ratio > 1 + clip and the advantage is positive the gradient is zero: the clip binds."""
    x = torch.tensor([chars.encode("登樓白日")])
    y = torch.tensor([[-100, -100, chars.stoi["日"], chars.stoi["依"]]])
    with torch.no_grad():
        logp = rl.token_logprobs(model, x, y)
    batch = RLBatch(x, y, logp - 1.0, logp, torch.tensor([1.0]), torch.tensor([1.0]))  # ratio e > 1.2
    loss, _ = ppo_loss(model, batch, clip=0.2, kl_coef=0.0)
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters())
    assert loss.item() == pytest.approx(-1.2, abs=1e-5)  # -clip(ratio) * A, averaged over the two answer tokens


def test_rl_on_a_toy_reward_raises_the_checked_rate(chars, tmp_path):
    """The toy task: the more of an answer's characters are 白, the higher its reward. The checked rate (the share of
    白 in answers sampled from the policy) must rise well above where it starts."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=chars.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32))
    share = lambda answers: sum(a.count("白") for a in answers) / max(sum(len(a) for a in answers), 1)
    reward = lambda titles, answers, stopped: torch.tensor([a.count("白") / max(len(a), 1) for a in answers])
    rollouts = collected(model, chars, reward, titles=4, group=8, epochs=2)
    rate = lambda m: share([a.text for a in rl.write(m, chars, ["登樓"] * 64, 8, TITLE_TO_POEM.end, rl.Sampling(seed=1))])
    before = rate(model)
    cfg = TrainConfig(batch_size=32, lr=3e-3, min_lr=3e-3, warmup_steps=0, max_steps=40, eval_every=1000,
                      sample_every=1000, log_every=1000, dtype="float32")
    train(model, cfg, rollouts, lambda m: 0.0, str(tmp_path), {}, loss_fn=lambda m, b: ppo_loss(m, b, kl_coef=0.0))
    after = rate(model.eval())
    assert before < 0.1 and after > 3 * before + 0.1, (before, after)


# ---- the scripts ----

@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    pre, sft = tmp_path_factory.mktemp("pretrain"), tmp_path_factory.mktemp("sft")
    common = ["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--device", "cpu"]
    train_pretrain.main(common + ["--out-dir", str(pre)])
    train_sft.main(common + ["--init-from", str(pre), "--out-dir", str(sft)])
    return sft


TINY = ["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--device", "cpu"]


@pytest.fixture(scope="module")
def rewarded(finetuned, tmp_path_factory):
    out = tmp_path_factory.mktemp("reward")
    result = train_reward.main(TINY + ["--init-from", str(finetuned), "--out-dir", str(out), "--dpo", str(out / "none")])
    return out, result


def test_train_reward_writes_rankings_a_reward_model_and_its_report(rewarded):
    out, result = rewarded
    model, _, ckpt = load_checkpoint(str(out))
    assert isinstance(model, RewardModel) and ckpt["stage"] == "reward" and ckpt["step"] == 10
    ranked, held = load_rankings(out / "rankings.jsonl"), load_rankings(out / "val_rankings.jsonl")
    assert len(ranked) == 8 and len(held) == 4 and all(len(r.answers) == 3 and r.scores for r in ranked)
    assert not {r.title for r in held} & {r.title for r in ranked}
    report = (out / "report.txt").read_text(encoding="utf-8")
    assert "pair accuracy" in report and "a real test poem" in report and (out / "tracks.png").exists()
    assert 0 <= result["test"]["reward_accuracy"] <= 1


def test_train_reward_mixes_in_a_persons_rankings_and_names_a_bad_line(finetuned, rewarded, tmp_path, capsys):
    title = load_rankings(rewarded[0] / "rankings.jsonl")[0].title
    picks = tmp_path / "picks.jsonl"
    picks.write_text(json.dumps({"title": title, "answers": ["白日", "亂寫"], "rank": [1, 2]}, ensure_ascii=False) + "\n",
                     encoding="utf-8")
    out = tmp_path / "alone"
    train_reward.main(TINY + ["--init-from", str(finetuned), "--out-dir", str(out), "--rankings", str(picks),
                              "--titles", "0", "--max-steps", "2", "--dpo", str(out / "none")])
    assert [r.by for r in load_rankings(out / "rankings.jsonl")] == ["person"]
    picks.write_text('{"title": "不是題目", "answers": ["a", "b"], "rank": [1, 2]}\n', encoding="utf-8")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(train_reward.main, TINY + ["--init-from", str(finetuned), "--out-dir", str(tmp_path / "bad"), "--rankings",
                                       str(picks)], "train_reward.py")
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "line 1: unknown title" in err


@pytest.mark.parametrize("reward", ["model", "program"])
def test_train_rl_runs_on_either_reward_and_logs_what_an_eval_reads(finetuned, rewarded, tmp_path, reward):
    out = tmp_path / "rl"
    result = train_rl.main(TINY + ["--init-from", str(finetuned), "--reward-from", str(rewarded[0]), "--out-dir",
                                   str(out), "--reward", reward])
    model, _, ckpt = load_checkpoint(str(out))
    assert type(model) is GPT and ckpt["stage"] == "rl" and ckpt["settings"]["reward"] == reward
    evals = [json.loads(line) for line in open(out / "log.jsonl", encoding="utf-8") if '"eval"' in line]
    for key in ("mean_reward", "program_score", "kl_to_ref", "entropy", "rhyme_rate", "stop_rate", "mean_length"):
        assert key in evals[-1]
    assert evals[0]["kl_to_ref"] == 0.0  # step 0: the policy is the SFT model
    table = (out / "table.txt").read_text(encoding="utf-8")
    assert "KL from the SFT model" in table and "real poems" in table and (out / "rl.png").exists()
    assert result["step"] == 6


def test_train_rl_trains_a_lora_adapter_that_starts_as_the_sft_model(finetuned, rewarded, tmp_path):
    from minigpt.lora import LoRALinear
    out = tmp_path / "rl_lora"
    train_rl.main(TINY + ["--init-from", str(finetuned), "--reward-from", str(rewarded[0]), "--out-dir", str(out),
                          "--reward", "program", "--lora-rank", "2"])
    evals = [json.loads(line) for line in open(out / "log.jsonl", encoding="utf-8") if '"eval"' in line]
    assert evals[0]["kl_to_ref"] == 0.0  # B is zero and the rows are the SFT model's: step 0 is the reference
    adapter = torch.load(out / "adapter.pt", weights_only=True)
    assert adapter["stage"] == "rl" and all(k.endswith((".A", ".B")) or k == "tok_emb.rows" for k in adapter["model"])
    model, _, _ = load_checkpoint(str(out / "adapter.pt"))
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4 * model.config.n_layer


def test_nothing_trained_is_overwritten_and_bad_flags_get_one_line(finetuned, rewarded, tmp_path, capsys):
    for script, name, argv in ((train_reward, "train_reward.py", ["--out-dir", str(rewarded[0])]),
                               (train_rl, "train_rl.py", ["--reward-from", str(finetuned), "--out-dir", str(tmp_path)]),
                               (train_rl, "train_rl.py", ["--group", "1", "--out-dir", str(tmp_path / "g")]),
                               (train_reward, "train_reward.py", ["--k", "1", "--out-dir", str(tmp_path / "k")])):
        before = (rewarded[0] / "ckpt.pt").stat().st_mtime_ns
        with pytest.raises(SystemExit) as e:
            run(script.main, TINY + ["--init-from", str(finetuned), *argv], name)
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert (rewarded[0] / "ckpt.pt").stat().st_mtime_ns == before

"""The judge-free metrics on hand-made strings, and the table's columns on a tiny model."""
import math
import os
from types import SimpleNamespace

import pytest
import torch

from minigpt.data import PLAIN, TITLE_TO_POEM, Poem
from minigpt.evaluate import answer_losses, answer_val_batches, compare, eval_set, format_table, loss_batches, val_sample
from minigpt.metrics import (NearClauses, Yardstick, copy_rate, distinct_clauses, mentions_title, relevance, repeats_clause,
                             runs_on)
from minigpt.verse import first_poem, is_regular
from minigpt.model import GPT, IGNORE_INDEX, GPTConfig
from minigpt.tokenizer import CharTokenizer

from conftest import FIXTURE_CORPUS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@pytest.fixture
def model(tiny_config):
    """The tiny model with room for a prompt and a short poem."""
    return GPT(GPTConfig(**{**tiny_config.__dict__, "block_size": 96})).eval()


QUATRAIN = "白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。"
SPRING = "春眠不覺曉，處處聞啼鳥。\n夜來風雨聲，花落知多少。"


def test_first_poem_and_runs_on():
    assert first_poem(QUATRAIN + "\n\n送友人\n青山橫北郭") == QUATRAIN
    assert first_poem(QUATRAIN + "\n送友人\n青山橫北郭，白水遶東城。") == QUATRAIN  # the next title ends it too
    assert first_poem("送友人\n" + QUATRAIN) == "送友人\n" + QUATRAIN  # a title of its own comes with the poem
    assert runs_on(QUATRAIN + "\n\n送友人\n青山橫北郭")  # a blank line, then more
    assert runs_on(QUATRAIN + "\n送友人\n青山橫北郭，白水遶東城。")  # a title-like line, then more
    assert runs_on(QUATRAIN + "<INS>")  # another example's marker
    assert not runs_on(QUATRAIN) and not runs_on(QUATRAIN + "\n\n")  # one poem, a trailing blank line
    assert not runs_on("白日依山盡")  # cut at the cap mid-clause: one unfinished line, not another poem


def test_title_relevance_counts_content_characters_not_a_repeated_title():
    assert mentions_title("登鸛雀樓", QUATRAIN)  # 樓
    assert not mentions_title("春曉", QUATRAIN)
    assert mentions_title("春曉", SPRING)  # 春, 曉
    assert not mentions_title("登鸛雀樓", "登鸛雀樓\n春眠不覺曉，處處聞啼鳥。")  # the title repeated as a line does not count
    assert mentions_title("送別詩二首", "別有天地非人間。")  # 別 is content
    assert not mentions_title("詩二首", "詩成二首一時傳，詩酒二首。")  # numbers and 詩, 首 say nothing of the subject
    own, shuffled, lift = relevance(["登鸛雀樓", "春曉"], [QUATRAIN, SPRING])
    assert (own, shuffled) == (1.0, 0.0) and lift == 1.0  # each mentions its own title, neither the other's


def test_copying_and_repetition():
    train = {"白日依山盡", "黃河入海流"}
    assert copy_rate([QUATRAIN], train) == 0.5  # 2 of its 4 clauses stand in train
    assert copy_rate([SPRING], train) == 0.0
    assert repeats_clause("山高月小，山高月小。") and not repeats_clause(QUATRAIN)
    assert distinct_clauses([QUATRAIN, QUATRAIN]) == 0.5 and distinct_clauses([QUATRAIN, SPRING]) == 1.0




def test_yardstick_scores_answers_on_one_footing():
    yard = Yardstick([Poem("a", "", tuple(QUATRAIN.split("\n")))])
    yard.rhyme_groups = {"流": "A", "樓": "A"}
    base_text = QUATRAIN + "\n\n送友人\n青山橫北郭，白水遶東城。"  # the base model's first poem, then the next
    out = yard.score(["登鸛雀樓", "春曉"], [base_text, SPRING])
    assert out["stop_rate"] is None  # no end marker in this format
    assert out["run_on_rate"] == 0.5 and out["regular_rate"] == 1.0 and out["mean_length"] == len(QUATRAIN)
    assert out["copy_rate"] == 0.5 and out["rhyme_rate"] == 0.5 and out["relevance"] == 1.0
    assert out["share_jueju"] == 1.0 and out["rhyme_rate_jueju"] == 0.5 and out["rhyme_rate_lushi"] is None
    assert yard.score(["春曉"], [SPRING], stopped=[True])["stop_rate"] == 1.0
    lushi = QUATRAIN + "\n" + QUATRAIN.replace("白日", "紅日").replace("欲窮", "欲看")  # four endings: 流 樓 流 樓
    out = yard.score(["a", "b"], [lushi, QUATRAIN])
    assert out["share_jueju"] == 0.5 and out["rhyme_rate_jueju"] == 1.0 and out["rhyme_rate_lushi"] == 0.0  # 流 twice


def test_eval_set_leaves_out_training_titles_and_spreads_over_the_split():
    train = [Poem("春曉", "", ("山，水。",))]
    held = [Poem(t, "", (f"{t}，水。",)) for t in ["春曉", "句", "秋夕 一", "秋夕 二"] + [f"題{i}" for i in range(20)]]
    es = eval_set(held, train, n=5)
    assert es.left_out == 1 and "春曉" not in es.titles and "句" not in es.titles
    assert es.titles == ["秋夕", "題3", "題7", "題11", "題15"] and es.poems[0] == "秋夕 一，水。"


def test_val_sample_and_answer_losses_score_poem_and_end_marker_apart(model, tokenizer, splits):
    sample = val_sample(splits["val"], tokenizer, model.config.block_size, n=4)
    assert len(sample) == 4
    assert all(len(tokenizer.encode(TITLE_TO_POEM.prompt(t) + b + TITLE_TO_POEM.end, unknown="unk")) <= 97 for t, b in sample)
    for fmt in (TITLE_TO_POEM, PLAIN):
        (x, y), = answer_val_batches(tokenizer, sample[:1], fmt, "end")
        ends = y[y != IGNORE_INDEX].tolist()
        assert ends == tokenizer.encode(fmt.end)  # <END>, or the blank line of the pretraining text
        (x, y), = answer_val_batches(tokenizer, sample[:1], fmt, "poem")
        assert y[y != IGNORE_INDEX].tolist() == tokenizer.encode(sample[0][1], unknown="unk")
    losses = answer_losses(model, loss_batches(tokenizer, sample[:1]))
    logits, _ = model(x)
    title, body = sample[0]
    ids = tokenizer.encode(TITLE_TO_POEM.prompt(title) + body + TITLE_TO_POEM.end, unknown="unk")
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0][0], dim=-1)
    assert losses["val_end_loss"] == pytest.approx(-logp[-1, tokenizer.end_id].item(), abs=1e-4)
    n_poem = len(body)
    poem_loss = -sum(logp[len(ids) - 2 - n_poem + i, ids[len(ids) - 1 - n_poem + i]].item() for i in range(n_poem)) / n_poem
    assert losses["val_answer_loss"] == pytest.approx(poem_loss, abs=1e-4)


def test_compare_scores_four_columns_on_the_same_titles(model, tokenizer, splits):
    columns, es, yard = compare(model, model, tokenizer, splits, n_titles=4, max_new_tokens=12, held_out="val")
    assert [n for n, _ in columns] == ["real poems", "base, own format", "base, SFT prompt", "fine-tuned"]
    real, plain, sft_prompt, tuned = (m for _, m in columns)
    assert real["stop_rate"] is None and plain["stop_rate"] is None and sft_prompt["stop_rate"] is not None
    assert real["run_on_rate"] == 0.0 and real["regular_rate"] == sum(map(is_regular, es.poems)) / len(es.poems)
    assert sft_prompt == {**tuned}  # the same model, the same titles and seed: the same figures
    assert [e["title"] for e in tuned["examples"]] == es.titles[:3]
    assert plain["mean_length"] <= 12 and plain["val_end_loss"] > 0 and "val_end_loss" not in real
    table = format_table(columns)
    assert "—" in table.split("\n")[1] and "title relevance lift" in table


def test_the_val_sample_fits_the_chat_format_it_is_given_in(splits, tokenizer):
    """A poem that fits the <INS> format exactly is one token too long in the chat one, whose prompt is longer."""
    from minigpt.tasks import CHAT_POEM
    chat = tokenizer.with_roles()
    lengths = {len(chat.encode(TITLE_TO_POEM.prompt(p.title.strip()) + p.body + "<END>", unknown="unk")) for p in splits["val"]}
    for block_size in sorted(lengths)[:6]:  # block sizes at which some poem fits the <INS> format exactly
        block_size -= 1
        try:
            sample = val_sample(splits["val"], chat, block_size, n=1000, fmt=CHAT_POEM)
        except ValueError:
            continue  # nothing fits at all
        model = GPT(GPTConfig(vocab_size=chat.vocab_size, block_size=block_size, n_layer=1, n_head=1, n_embd=8))
        for x, _ in loss_batches(chat, sample, CHAT_POEM)["poem"]:
            model(x)  # would raise: "sequence of ... tokens is longer than block_size"


def test_a_template_no_longer_scores_a_perfect_row():
    """A 五絕 with the title's first two characters pasted in, one character varied per clause and the endings always
    流/樓: it stops, is regular, rhymes and copies nothing, but the figures beside those expose it."""
    from minigpt.metrics import distinct_endings, holds_title_run, near_copy_rate
    titles = ["春夜喜雨", "登鸛雀樓", "秋日懷友", "江上送別"]
    template = [f"{t[:2]}山月小，{t[:2]}水長流。\n{t[:2]}山月大，{t[:2]}水長樓。" for t in titles]
    yard = Yardstick([Poem("a", "", tuple(QUATRAIN.split("\n")))])
    yard.rhyme_groups = {"流": "A", "樓": "A"}
    out = yard.score(titles, template, stopped=[True] * 4)
    assert out["stop_rate"] == out["regular_rate"] == out["rhyme_rate"] == 1.0 and out["copy_rate"] == 0.0
    assert out["repeat_rate"] == 1.0  # 春夜山月小 and 春夜山月大: one character apart is a repeat
    assert out["title_run_rate"] == 1.0 and out["distinct_endings"] == 2 / 8
    real = yard.score(["登鸛雀樓", "春曉"], [QUATRAIN, SPRING])
    assert real["repeat_rate"] == 0.0 and real["title_run_rate"] == 0.0 and real["distinct_endings"] == 1.0
    assert holds_title_run("登鸛雀樓", "更上鸛雀樓。") and not holds_title_run("登鸛雀樓", "雀鸛")
    assert distinct_endings([QUATRAIN, QUATRAIN]) == 0.5
    near = NearClauses({"白日依山盡", "黃河入海流"})
    changed = "白日依山近，黃河入海深。"  # a training poem with one character changed per clause
    assert copy_rate([changed], {"白日依山盡", "黃河入海流"}) == 0.0
    assert near_copy_rate([changed], {"白日依山盡", "黃河入海流"}, near) == 1.0
    assert near_copy_rate([QUATRAIN], {"白日依山盡", "黃河入海流"}, near) == 0.0  # verbatim copies count as copies only
    assert near_copy_rate(["白月依山近，黃河入海深。"], {"白日依山盡"}, NearClauses({"白日依山盡"})) == 0.0  # two apart


def test_a_pasted_title_is_no_mention_of_it():
    assert not mentions_title("春夜喜雨", "春夜喜雨。\n" + QUATRAIN)  # opening with the title pasted in
    assert not mentions_title("春夜喜雨", "春夜喜雨，白日依山盡。")
    assert mentions_title("春夜喜雨", "春夜喜雨。\n夜來風雨聲，花落知多少。")  # 雨, 夜 in the verse itself
    assert repeats_clause("山高月小水長流，山高月小水長樓。") and not repeats_clause("山高月小，水長流深。")


def test_rhyme_is_rated_over_regular_answers_and_relevance_over_first_poems():
    yard = Yardstick([Poem("a", "", tuple(QUATRAIN.split("\n")))])
    yard.rhyme_groups = {"流": "A", "樓": "A"}
    irregular = QUATRAIN.replace("依山盡", "依青山盡")  # its endings rhyme, but it is not regular verse
    out = yard.score(["a", "b", "c"], [QUATRAIN, irregular, SPRING])
    assert out["rhyme_rate"] == 0.5  # of the two regular answers, one rhymes
    run_on = SPRING + "\n\n登鸛雀樓\n" + QUATRAIN  # the title's 樓 only after the first poem
    assert yard.score(["登鸛雀樓"], [run_on])["relevance"] == 0.0


def test_the_rhyme_checker_is_calibrated_against_shuffled_endings():
    """The two figures behind the rhyme row's note: real regular poems rhyme; the same poems with line endings drawn
    from the others mostly do not. Irregular poems count in neither."""
    groups = {"流": "A", "樓": "A", "州": "A", "鳥": "B", "少": "B", "曉": "B"}

    def quatrain(x, y):
        return Poem("t", "", (f"山山山山山，水水水水{x}。", f"月月月月月，風風風風{y}。"))
    poems = [quatrain("流", "樓"), quatrain("樓", "州"), quatrain("鳥", "少"), quatrain("少", "曉")] * 5
    poems += [Poem("t", "", ("山山山山山山，水水水水流。", "月月月月月，風風風風鳥。"))] * 10  # irregular, no rhyme
    yard = Yardstick(poems[:1])
    yard.rhyme_groups = groups
    real, shuffled = yard.calibrate(poems, seed=0)
    assert real == 1.0 and shuffled < 0.6


def _tool(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_rhyme_probe_reads_the_loss_where_each_ending_is_guessed():
    probe = _tool("rhyme_probe")
    poem = Poem("登樓", "王之渙", ("白日依山盡，黃河入海流。", "欲窮千里目，更上一層樓。"))
    tok = CharTokenizer(PLAIN.prompt(poem.title) + poem.body)
    prompt = len(tok.encode(PLAIN.prompt(poem.title)))

    class Sure(torch.nn.Module):  # flat logits, except certain of 樓 where the second ending is guessed
        config = SimpleNamespace(block_size=64)
        device = torch.device("cpu")

        def forward(self, idx):
            logits = torch.zeros(1, idx.size(1), tok.vocab_size)
            logits[0, prompt + len("白日依山盡，黃河入海流。\n欲窮千里目，更上一層") - 1, tok.stoi["樓"]] = 100.0
            return logits, None

    losses = probe.ending_losses(Sure(), tok, [poem])
    flat = math.log(tok.vocab_size)
    assert losses["later endings"] == pytest.approx(0.0, abs=1e-6)  # the one it is sure of
    assert losses["first ending"] == pytest.approx(flat) and losses["other characters"] == pytest.approx(flat)


def test_rhyme_emergence_probes_every_seed_every_few_steps(splits, tokenizer):
    tool = _tool("rhyme_emergence")
    runs = tool.main(["--preset", "tiny", "--seeds", "1", "2", "--steps", "4", "--every", "2", "--poems", "5",
                      "--corpus", FIXTURE_CORPUS, "--device", "cpu"])
    assert sorted(runs) == [1, 2] and [q["step"] for q in runs[1]] == [0, 2, 4]
    assert all(math.isfinite(v) for q in runs[1] for k, v in q.items()) and runs[1][-1] != runs[2][-1]
    assert runs[1][-1]["other characters"] < runs[1][0]["other characters"]  # it trains
    assert tool.rhymes({"first ending": 4.0, "later endings": 2.9})
    assert not tool.rhymes({"first ending": 4.0, "later endings": 3.1})
    anywhere = tool.WindowsAnywhere(splits, tokenizer)
    x, _ = anywhere.get_batch(64, 16, torch.Generator().manual_seed(0))
    titles = {tuple(anywhere.train[s:s + 16].tolist()) for s in anywhere.train_starts.tolist()}
    assert sum(tuple(row.tolist()) in titles for row in x) < 16  # most start mid-poem


def test_time_to_rhyme_picks_the_last_snapshot_at_or_before_each_minute():
    tool = _tool("time_to_rhyme")
    found = [(0.0, 0, 9.1, "a"), (1.9, 250, 5.0, "b"), (4.5, 500, 4.6, "c"), (5.05, 750, 4.4, "d")]
    assert [s[3] for s in tool.at_minutes(found, [2, 4, 5])] == ["b", "b", "d"]  # 5.05 is within 3% past minute 5
    assert [s[3] for s in tool.at_minutes(found, [4.5, 10])] == ["c", "d"]
    with pytest.raises(ValueError, match="no snapshot at or before minute 1"):
        tool.at_minutes(found, [1])  # step 0 is no point: nothing pretrained yet


@pytest.mark.slow
def test_time_to_rhyme_fine_tunes_each_kept_snapshot(tmp_path):
    """A tiny pretraining keeps a snapshot at every eval; each loads as the model was then, and the tool fine-tunes
    one and reads its final table (a minute: the SFT runs in its own process)."""
    import json
    import train_pretrain
    from minigpt.checkpoint import load_checkpoint
    run = str(tmp_path / "pre")
    train_pretrain.main(["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--device", "cpu", "--keep-snapshots",
                         "--out-dir", run])
    tool = _tool("time_to_rhyme")
    found = tool.snapshots(run)
    assert [s[1] for s in found] == [0, 10, 20]
    last, final = load_checkpoint(found[-1][3])[0], load_checkpoint(run)[0]
    assert all(torch.equal(a, b) for a, b in zip(last.state_dict().values(), final.state_dict().values()))
    assert not torch.equal(load_checkpoint(found[1][3])[0].tok_emb.weight, final.tok_emb.weight)
    points = tool.main([run, "--minutes", "100", "--sft-preset", "tiny", "--corpus", FIXTURE_CORPUS,
                        "--out-dir", str(tmp_path / "ttr")])
    final = tmp_path / "ttr" / "pre" / "step_20" / "final.json"
    tuned = json.loads(final.read_text(encoding="utf-8"))["fine-tuned"]
    assert [p["step"] for p in points] == [20] and points[0]["rhyme"] == tuned["rhyme_rate"]
    assert points[0]["regular"] == tuned["regular_rate"] and points[0]["stop"] == tuned["stop_rate"]
    assert (tmp_path / "ttr" / "pre" / "time_to_rhyme.png").exists()
    stamp = final.stat().st_mtime_ns
    again = tool.main([run, "--minutes", "100", "--sft-preset", "tiny", "--corpus", FIXTURE_CORPUS,
                       "--out-dir", str(tmp_path / "ttr"), "--name", "tiny"])
    assert again == points and final.stat().st_mtime_ns == stamp  # read again, not trained again
    import shutil
    shutil.rmtree(os.path.join(run, "snapshots"))  # a run without snapshots: its last checkpoint alone
    assert [s[1] for s in tool.snapshots(run)] == [20]

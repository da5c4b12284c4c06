"""The three scripts end to end on the tiny preset and the fixture corpus."""
import json
import os
import re

import pytest
import torch

import math
import signal

import train_dpo
import train_pretrain
import train_sft
from minigpt import dpo
from minigpt import pairs as pairing
from minigpt.metrics import PREFERENCES
from minigpt.checkpoint import load_checkpoint

from conftest import FIXTURE_CORPUS


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    result = train_pretrain.main(["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--out-dir", str(out), "--device", "cpu"])
    return out, result


def test_pretraining_writes_a_checkpoint_that_loads_safely(pretrained):
    out, result = pretrained
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 20 and ckpt["stage"] == "pretrain"
    assert {"model", "optimizer", "model_config", "tokenizer", "rng", "train_config"} <= set(ckpt)
    model, tok, _ = load_checkpoint(str(out))
    assert model.config.n_embd == 32 and tok.vocab_size == model.config.vocab_size
    assert (out / "loss.png").stat().st_size > 1000


def test_pretraining_log_has_losses_and_samples(pretrained):
    out, result = pretrained
    records = [json.loads(line) for line in open(out / "log.jsonl", encoding="utf-8")]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    samples = [r for r in records if r["kind"] == "sample"]
    assert samples and all(s["prompt"].endswith("\n") and len(s["text"]) == 24 for s in samples[-1]["samples"])


def test_time_budget_ends_training(tmp_path):
    result = train_pretrain.main(["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--out-dir", str(tmp_path),
                                  "--max-steps", "100000", "--max-minutes", "0.06", "--device", "cpu"])
    assert 0 < result["step"] < 100000 and result["elapsed_s"] < 0.06 * 60 + 2.5


def test_sft_runs_from_the_pretrained_checkpoint(pretrained, tmp_path):
    out, _ = pretrained
    result = train_sft.main(["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--init-from", str(out),
                             "--out-dir", str(tmp_path), "--device", "cpu", "--early-evals", "--eval-every", "100",
                             "--sample-every", "100", "--max-steps", "30"])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["stage"] == "sft" and ckpt["model_config"] == torch.load(out / "ckpt.pt", weights_only=True)["model_config"]
    columns = dict(result["columns"])
    assert list(columns) == ["real poems", "base, own format", "base, SFT prompt", "fine-tuned"]
    assert columns["real poems"]["stop_rate"] is None and columns["base, own format"]["stop_rate"] is None
    assert columns["base, SFT prompt"]["stop_rate"] == 0.0  # it never saw <END>
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl", encoding="utf-8")]
    evals = [r for r in log if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 10, 25, 30]  # log-spaced before the first regular eval, and the last
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]  # 30 steps lower the loss on held-out answers
    blocks = [r["samples"] for r in log if r["kind"] == "sample"]
    assert [r["step"] for r in log if r["kind"] == "sample"] == [0, 10, 25, 30]
    # once per block, the whole prompt the model reads, special tokens and all
    for block in blocks:
        assert block[0]["shown"].startswith(f"the model reads: <INS>請用以下題目寫一首詩<INP>{block[0]['title']}<RES>\n")
        assert not any("<INS>" in s["shown"] for s in block[1:])
    assert evals[-1]["val_loss"] == pytest.approx(evals[-1]["val_answer_loss"], abs=1e-5)  # the loop's val loss is the poem tokens'
    # during training only val titles are measured and shown; test titles only in the final table
    test_titles = {ex["title"] for ex in columns["fine-tuned"]["examples"]}
    shown = {s["title"] for r in log if r["kind"] == "sample" for s in r["samples"]}
    assert test_titles and not test_titles & shown
    table = (tmp_path / "table.txt").read_text(encoding="utf-8")
    assert (tmp_path / "behaviour.png").exists() and "title relevance lift" in table and "never saw <END>" in table


def test_sft_on_several_tasks_measures_each_one(pretrained, tmp_path):
    out, _ = pretrained
    train_sft.main(["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--init-from", str(out), "--out-dir", str(tmp_path),
                    "--device", "cpu", "--tasks", "poem,form,continuation"])
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl", encoding="utf-8")]
    evals = [r for r in log if r["kind"] == "eval"]
    assert {"poem", "form", "continuation"} <= set(evals[-1]["tasks"]) <= {"poem", "form", "form:unseen", "continuation"}
    samples = [r for r in log if r["kind"] == "sample"][-1]["samples"]
    assert [s["task"] for s in samples] == ["poem", "form", "continuation"] and all(s["prompt"].startswith("<INS>") for s in samples)
    table = (tmp_path / "tasks.txt").read_text(encoding="utf-8")
    assert "held-out phrasings" in table and "form: complies" in table and "continuation: runs on" in table
    assert "(6 test examples per task at most, 18 for a never-trained combination (:unseen)." in " ".join(table.split())
    assert (tmp_path / "tasks.png").stat().st_size > 1000
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["settings"]["tasks"] == "poem,form,continuation"


@pytest.mark.parametrize("tasks, evals", [("poem", [0, 10, 20]), ("poem,form", [0, 20])])
def test_early_evals_only_where_one_task_makes_them_cheap(pretrained, tmp_path, monkeypatch, tasks, evals):
    monkeypatch.setitem(train_sft.PRESETS, "tiny", dict(train_sft.PRESETS["tiny"], eval_every=30,
                                                               sample_every=30, early_evals=True))
    train_sft.main(["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--init-from", str(pretrained[0]), "--out-dir",
                    str(tmp_path), "--device", "cpu", "--tasks", tasks, "--eval-titles", "2", "--task-examples", "2"])
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl", encoding="utf-8")]
    assert [r["step"] for r in log if r["kind"] == "eval"] == evals


def test_sft_in_the_chat_format_grows_the_vocabulary_by_the_roles_and_quotes(pretrained, tmp_path):
    out, _ = pretrained
    train_sft.main(["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--init-from", str(out), "--out-dir", str(tmp_path),
                    "--device", "cpu", "--tasks", "poem,persona", "--format", "chat", "--max-steps", "6"])
    base, chat = (torch.load(d / "ckpt.pt", weights_only=True) for d in (out, tmp_path))
    assert chat["tokenizer"] == base["tokenizer"] + ["<SYS>", "<USR>", "<AST>", "<EOT>", "「", "」"]
    assert chat["model_config"]["vocab_size"] == base["model_config"]["vocab_size"] + 6 and chat["settings"]["format"] == "chat"
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl", encoding="utf-8")]
    prompts = [s["prompt"] for s in [r for r in log if r["kind"] == "sample"][-1]["samples"]]
    assert prompts[0].startswith("<USR>") and prompts[1].startswith("<SYS>") and prompts[1].endswith("<EOT><AST>")
    result = train_sft.main(["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--out-dir", str(tmp_path), "--device", "cpu",
                             "--resume"])  # a chat run resumes with its roles
    assert result["step"] == 6


@pytest.mark.parametrize("argv, message", [
    (["--init-from", "/nonexistent/run"], "no checkpoint"),
    (["--tasks", "haiku"], "unknown task haiku"),
    (["--tasks", "followup"], "add --format chat"),
    (["--n-head", "3"], None),
])
def test_sft_user_errors_exit_2_with_one_line(pretrained, tmp_path, capsys, argv, message):
    from minigpt.cli import run
    if argv[0] == "--n-head":  # the SFT script has no model-shape flags: argparse refuses it
        with pytest.raises(SystemExit) as e:
            run(train_sft.main, ["--preset", "tiny", *argv], "train_sft.py")
        assert e.value.code == 2
        return
    with pytest.raises(SystemExit) as e:
        run(train_sft.main, ["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--out-dir", str(tmp_path), *argv], "train_sft.py")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1


def test_pretrain_user_errors_exit_2_with_one_line(tmp_path, capsys):
    from minigpt.cli import run
    for argv, message in [(["--n-embd", "30", "--n-head", "4"], "divisible"), (["--max-steps", "-1"], "max_steps"),
                          (["--corpus", str(tmp_path / "none.jsonl")], "not found"), (["--device", "tpu"], "unknown device")]:
        with pytest.raises(SystemExit) as e:
            run(train_pretrain.main, ["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--out-dir", str(tmp_path), *argv], "train_pretrain.py")
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, (argv, err)


def test_sft_refuses_a_checkpoint_with_another_tokenizer(pretrained, tmp_path, capsys):
    from minigpt.cli import run
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"title": "甲", "author": "", "lines": ["乙丙丁戊己，庚辛壬癸子。"]}, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        run(train_sft.main, ["--preset", "tiny", "--corpus", str(other), "--init-from", str(pretrained[0]), "--out-dir", str(tmp_path)], "train_sft.py")
    assert e.value.code == 2 and "another tokenizer" in capsys.readouterr().err


def test_benchmark_runs_on_a_tiny_setting(capsys):
    from minigpt import bench
    rows = bench.main(["--tiny"])
    out = capsys.readouterr().out
    assert len(rows) == 4 and all(r[2] > 0 and 0 < r[4] for r in rows)
    assert "matmul peak" in out and "KV cache" in out and "SFT metrics on 4 titles" in out
    with pytest.raises(SystemExit) as stop:  # a device this machine lacks: a usage error, not a traceback
        bench.main(["--tiny", "--device", "tpu"])
    assert stop.value.code == 2 and "unknown device 'tpu'" in capsys.readouterr().err


def test_the_step_profile_times_every_part(splits, tokenizer):
    from minigpt import bench
    from minigpt.data import PretrainData
    from minigpt.model import GPTConfig
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32)
    ms = bench.step_profile(cfg, 4, reps=2, data=PretrainData(splits, tokenizer))
    assert list(ms) == ["data (a batch of windows)", "embedding", "blocks (attention + MLP, every layer)", "output layer: matmul",
                        "output layer + loss", "whole model + loss", "optimizer (Muon + AdamW)", "whole step"]
    assert all(t > 0 for t in ms.values())


@pytest.fixture(scope="module")
def finetuned(pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    train_sft.main(["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--init-from", str(pretrained[0]), "--out-dir", str(out),
                    "--device", "cpu"])
    return out


def stand_in_judge(answer, stopped, example, yard, prefer):
    """A tiny model writes no rhyming poem in 20 steps: for the script's plumbing, half its answers pass."""
    return "" if sum(map(ord, answer)) % 2 == 0 else "odd"


DPO = ["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--device", "cpu"]


def test_a_start_that_hardly_has_the_preference_is_named():
    rhyme, title = PREFERENCES["rhyme"], PREFERENCES["title"]
    note = train_dpo.rare_start(rhyme, {"rhyme_rate": 0.063}, {"rhyme_rate": 0.035})  # a model that did not learn to rhyme
    assert note.startswith("note: at the start, rhymes (of regular answers): 6.3% on val titles, 3.5% by chance")
    assert "--prefer title" in note
    assert train_dpo.rare_start(rhyme, {"rhyme_rate": 0.527}, {"rhyme_rate": 0.035}) is None  # half its poems rhyme
    assert train_dpo.rare_start(rhyme, {"rhyme_rate": 0.086}, {"rhyme_rate": 0.035}) is None  # 5.1 points over chance
    assert train_dpo.rare_start(rhyme, {"rhyme_rate": 0.084}, {"rhyme_rate": 0.035})  # 4.9
    assert train_dpo.rare_start(rhyme, {"rhyme_rate": None}, {"rhyme_rate": 0.035}) is None  # no regular answer
    assert train_dpo.rare_start(title, {"relevance": 0.38}, {"relevance": 0.24}) is None  # the class model: 14 points
    note = train_dpo.rare_start(title, {"relevance": 0.27}, {"relevance": 0.25})
    assert "mentions its title: 27.0%" in note and "--prefer title" not in note
    both = PREFERENCES["rhyme+title"]
    assert "rhymes" in train_dpo.rare_start(both, {"rhyme_rate": 0.04, "relevance": 0.5}, {"rhyme_rate": 0.035,
                                                                                               "relevance": 0.25})


def test_dpo_runs_from_the_sft_checkpoint(finetuned, tmp_path, monkeypatch):
    monkeypatch.setattr(pairing, "judge", stand_in_judge)
    result = train_dpo.main(DPO + ["--init-from", str(finetuned), "--out-dir", str(tmp_path), "--test-titles", "4",
                                   "--pairs", "whole"])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["stage"] == "dpo" and ckpt["step"] == 10 and ckpt["settings"]["prefer"] == "rhyme" and ckpt["settings"]["beta"] == 0.1
    assert (tmp_path / "table.txt").read_text(encoding="utf-8").count("(4 test titles;") == 1  # 6 val titles at every eval
    pairs = json.loads((tmp_path / "pairs.json").read_text(encoding="utf-8"))
    assert pairs["pairs"] and all(p["prompt"].startswith("<INS>") and p["chosen"] != p["rejected"] for p in pairs["pairs"])
    evals = [json.loads(line) for line in open(tmp_path / "log.jsonl", encoding="utf-8")]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 5, 10]
    assert evals[0]["pref_loss"] == pytest.approx(math.log(2), abs=1e-5) and evals[0]["reward_margin"] == pytest.approx(0, abs=1e-5)
    assert all({"pref_accuracy", "stop_rate", "rhyme_rate", "val_loss"} <= set(r) for r in evals)
    assert [name for name, _ in result["columns"]] == ["real poems", "SFT (reference)", "DPO (rhyme)"]
    table = " ".join((tmp_path / "table.txt").read_text(encoding="utf-8").split())
    assert (tmp_path / "preference.png").stat().st_size > 1000 and "rhymes" in table
    assert re.search(r"in all / at the line endings alone / elsewhere: \d+ held-out val pairs [\d.]+% / [\d.]+% / [\d.]+%; "
                     r"\d+ training pairs [\d.]+% / [\d.]+% / [\d.]+%\.", table)
    shares = dpo.main([str(tmp_path)])  # the same split for a finished run, from its folder
    assert shares["held-out val pairs"]["all"] == pytest.approx(result["pref_accuracy"])
    assert 0 <= shares["held-out val pairs"]["error"] <= 0.5
    other = tmp_path / "other"  # another run's held-out pairs, read by this run's model
    other.mkdir()
    (other / "val_pairs.json").write_text(json.dumps({"pairs": pairs["pairs"][:1], "counts": {}}), encoding="utf-8")
    assert dpo.main([str(tmp_path), "--held-out-from", str(other)])["held-out val pairs"]["error"] == 0.0  # one pair
    with pytest.raises(SystemExit) as stop:  # a folder without held-out pairs: one line, exit 2
        dpo.main([str(tmp_path), "--held-out-from", str(other / "missing")])
    assert stop.value.code == 2
    with pytest.raises(SystemExit) as stop:  # an SFT run has no pairs to look at: one line, exit 2
        dpo.main([str(finetuned)])
    assert stop.value.code == 2


def test_dpo_from_a_multi_task_chat_model_asks_its_tasks_in_its_format(pretrained, tmp_path, monkeypatch):
    sft, out = tmp_path / "sft", tmp_path / "dpo"
    train_sft.main(["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--init-from", str(pretrained[0]), "--out-dir", str(sft),
                    "--device", "cpu", "--tasks", "poem,form,naming", "--format", "chat", "--max-steps", "4"])
    monkeypatch.setattr(pairing, "judge", stand_in_judge)
    train_dpo.main(DPO + ["--init-from", str(sft), "--out-dir", str(out), "--prompts", "24", "--max-steps", "2",
                          "--pairs", "whole"])
    pairs = json.loads((out / "pairs.json").read_text(encoding="utf-8"))["pairs"]
    assert {p["task"] for p in pairs} == {"poem", "form"}  # naming answers with a title, not a poem: no rhyme to prefer
    assert all(p["prompt"].startswith("<USR>") and p["prompt"].endswith("<EOT><AST>") for p in pairs)
    assert torch.load(out / "ckpt.pt", weights_only=True)["settings"]["format"] == "chat"


def test_dpo_interrupted_resumes_on_its_own_pairs_to_the_same_weights(finetuned, tmp_path, monkeypatch, capsys):
    from minigpt.cli import run
    monkeypatch.setattr(pairing, "judge", stand_in_judge)
    full, part = tmp_path / "full", tmp_path / "part"
    train_dpo.main(DPO + ["--init-from", str(finetuned), "--out-dir", str(full), "--pairs", "whole"])
    real, calls = train_dpo.dpo_loss, [0]

    def interrupted(*args, **kw):
        calls[0] += 1
        if calls[0] == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kw)
    monkeypatch.setattr(train_dpo, "dpo_loss", interrupted)
    with pytest.raises(SystemExit) as e:
        run(train_dpo.main, DPO + ["--init-from", str(finetuned), "--out-dir", str(part), "--pairs", "whole"], "train_dpo.py")
    assert e.value.code == 130 and "python train_dpo.py --resume" in capsys.readouterr().err
    monkeypatch.setattr(train_dpo, "dpo_loss", real)
    monkeypatch.setattr(pairing, "judge", lambda *a: "no pairs may be made again on resume")
    train_dpo.main(DPO + ["--out-dir", str(part), "--resume"])
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (full, part))
    assert a["step"] == b["step"] == 10 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("prefer, maker, kind", [("rhyme", "ending_pairs", "ending"), ("title", "title_pairs", "char")])
def test_dpo_pairs_one_character_by_default(finetuned, tmp_path, monkeypatch, prefer, maker, kind):
    """Rhyme pairs a line ending, title a character of the title, unless --pairs says otherwise."""
    calls = []

    def recorded(model, tokenizer, exs, yard, seed, per_prompt, **kw):  # a tiny model's answers pass no gate: whole pairs
        calls.append((len(exs), per_prompt))
        return pairing.make_pairs(model, tokenizer, exs, yard, PREFERENCES["rhyme"], samples=4, seed=seed,
                                  per_prompt=per_prompt, **kw)
    monkeypatch.setattr(pairing, "judge", stand_in_judge)
    monkeypatch.setattr(train_dpo, maker, recorded)
    train_dpo.main(DPO + ["--init-from", str(finetuned), "--out-dir", str(tmp_path), "--max-steps", "2", "--prefer", prefer])
    assert calls == [(8, 4), (8, 4)]  # train and held-out prompts (the tiny preset's 8 each), several pairs per answer
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["settings"]["pairs"] == kind


@pytest.mark.parametrize("argv, message", [
    (["--init-from", "PRETRAINED"], "run python train_sft.py first"),
    (["--init-from", "/nonexistent/run"], "train one first (python train_sft.py)"),
    (["--beta", "0"], "--beta"),
    (["--samples", "0"], "--samples must be positive"),
    (["--prefer", "haiku"], None),
    (["--prefer", "title", "--pairs", "ending"], "pass --pairs whole"),
    (["--prefer", "rhyme", "--pairs", "char"], "pass --pairs whole"),
])
def test_dpo_user_errors_exit_2_with_one_line(pretrained, finetuned, tmp_path, capsys, argv, message):
    from minigpt.cli import run
    argv = [str(pretrained[0]) if a == "PRETRAINED" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        run(train_dpo.main, DPO + ["--init-from", str(finetuned), "--out-dir", str(tmp_path), *argv], "train_dpo.py")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and (message is None or (message in err and len(err.splitlines()) == 1)), err


def test_stage_settings_are_kept_whole_and_an_older_run_is_refused_on_resume_in_one_line(pretrained, finetuned, tmp_path,
                                                                                       capsys):
    from minigpt.checkpoint import save_checkpoint, settings_of
    from minigpt.cli import run
    from minigpt.sample import answer_format
    from minigpt.tasks import CHAT_POEM
    ckpt = torch.load(finetuned / "ckpt.pt", weights_only=True)
    assert train_sft.SFTSettings(**ckpt["settings"]).init_from == os.path.abspath(pretrained[0])  # restored in one call
    old = torch.load(pretrained[0] / "ckpt.pt", weights_only=True)
    old["sample_chars"] = old.pop("settings")["sample_chars"]  # how earlier runs kept it: loose at the top level
    save_checkpoint(str(tmp_path / "ckpt.pt"), old)
    with pytest.raises(SystemExit) as e:
        run(train_pretrain.main, ["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--out-dir", str(tmp_path), "--device",
                                  "cpu", "--resume"], "train_pretrain.py")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--overwrite" in err and "older minigpt" in err
    # a finished model of an earlier run is still read for what it is: its settings stood at the top level
    assert answer_format({"stage": "sft", "format": "chat"}) is CHAT_POEM and settings_of({"tasks": "all"})["tasks"] == "all"
    with pytest.raises(SystemExit) as e:  # a setting the dataclass refuses: one line, exit 2
        run(train_pretrain.main, ["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--out-dir", str(tmp_path / "new"),
                                  "--sample-chars", "0"], "train_pretrain.py")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == "error: --sample-chars must be positive, got 0"


def test_dpo_starts_at_log_2_even_from_a_model_trained_with_dropout(pretrained, tmp_path, monkeypatch):
    """The policy trains without dropout (the reference is measured without it), so its first step is the reference."""
    sft, out = tmp_path / "sft", tmp_path / "dpo"
    train_sft.main(["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--init-from", str(pretrained[0]), "--out-dir", str(sft),
                    "--device", "cpu", "--dropout", "0.3", "--max-steps", "2"])
    assert torch.load(sft / "ckpt.pt", weights_only=True)["model_config"]["dropout"] == 0.3
    monkeypatch.setattr(pairing, "judge", stand_in_judge)
    real, losses = train_dpo.dpo_loss, []

    def recorded(*args, **kw):
        loss, n = real(*args, **kw)
        losses.append(loss.item())
        return loss, n
    monkeypatch.setattr(train_dpo, "dpo_loss", recorded)
    train_dpo.main(DPO + ["--init-from", str(sft), "--out-dir", str(out), "--pairs", "whole", "--sft-weight", "0",
                          "--max-steps", "2"])
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)


def test_held_out_dpo_prompts_have_no_title_of_a_training_poem(finetuned, tmp_path, monkeypatch):
    from minigpt.data import load_poems, split_poems
    from minigpt.verse import clean_title
    splits = split_poems(load_poems(FIXTURE_CORPUS))
    train_titles = {clean_title(p.title) for p in splits["train"]}
    assert {clean_title(p.title) for p in splits["val"]} & train_titles  # the fixture has such a title: the test can fail
    asked = []

    def recorded(model, tokenizer, exs, yard, prefer, **kw):
        asked.append([ex.input for ex in exs])
        return pairing.make_pairs(model, tokenizer, exs, yard, prefer, **kw)
    monkeypatch.setattr(pairing, "judge", stand_in_judge)
    monkeypatch.setattr(train_dpo, "make_pairs", recorded)
    train_dpo.main(DPO + ["--init-from", str(finetuned), "--out-dir", str(tmp_path), "--pairs", "whole", "--max-steps", "1",
                          "--val-prompts", "1000"])
    train_asked, held_asked = asked
    assert held_asked and not set(held_asked) & train_titles and set(train_asked) <= train_titles


def test_time_to_loss_reads_the_curves_back_to_back(tmp_path, monkeypatch):
    from minigpt import bench
    monkeypatch.setitem(bench.VARIANTS, "lr 1e-2", ["--lr", "1e-2", "--min-lr", "1e-3"])  # the tiny preset's is 3e-3
    curves = bench.time_to_loss(["default", "lr 1e-2"], 1.0, str(tmp_path), preset="tiny", eval_every=5,
                                extra=["--corpus", FIXTURE_CORPUS, "--device", "cpu"])  # 20 steps end it, not the time
    assert list(curves) == ["default", "lr 1e-2"] and all(len(c) == 5 for c in curves.values())  # steps 0, 5, ..., 20
    assert [l for _, l in curves["default"]][1:] != [l for _, l in curves["lr 1e-2"]][1:]  # the flags reached the run
    curve = [(0.0, 6.0), (1.0, 5.0), (2.0, 4.0)]
    assert bench.loss_at(curve, 1.5) == pytest.approx(4.5) and bench.minutes_to(curve, 4.5) == pytest.approx(1.5)
    assert bench.minutes_to(curve, 3.0) is None and bench.loss_at(curve, 3.0) is None
    table = bench.time_to_loss_table({"a": curve}, 2.0, [4.5, 3.0])
    assert table.splitlines()[1].split() == ["a", "5.500", "5.000", "4.000", "1.50", "—"]


def test_the_stages_chain_without_flags():
    """Each stage reads by default the folder the quick start's previous command writes, every script has the class
    preset, and each kind of SFT run has its own folder (the chat model does not stand in the single-task one's way)."""
    for script in (train_pretrain, train_sft, train_dpo):
        assert {"tiny", "cpu", "class", "gpu"} <= set(script.PRESETS)
    sft = train_sft.parse_args([])
    assert sft.init_from == os.path.join("runs", "pretrain") and sft.out_dir == os.path.join("runs", "sft")
    assert train_dpo.parse_args([]).init_from == sft.out_dir
    assert "prefer" not in train_dpo.PRESETS["class"] and "prefer" not in train_dpo.PRESETS["cpu"]  # both: rhyme
    chat = train_sft.parse_args(["--tasks", "all", "--format", "chat"])
    assert chat.init_from == sft.init_from and chat.out_dir == os.path.join("runs", "sft_chat")
    assert train_sft.parse_args(["--tasks", "form,naming"]).out_dir == os.path.join("runs", "sft_tasks")
    assert train_sft.parse_args(["--format", "chat", "--out-dir", "x"]).out_dir == "x"


def test_several_tasks_get_the_longer_run_and_one_task_keeps_its_own():
    config = lambda argv: train_sft.resolve(train_sft.parse_args(["--device", "cpu", *argv]))[1]
    assert (config([]).max_minutes, config([]).optimizer) == (4.5, "adamw")
    chat = config(["--tasks", "all", "--format", "chat"])
    assert (chat.max_minutes, chat.optimizer) == (14.0, "muon")
    assert config(["--tasks", "all", "--format", "chat", "--max-minutes", "2"]).max_minutes == 2.0  # a flag still wins


def test_a_lora_run_trains_its_adapter_with_muon_unless_told_otherwise():
    config = lambda argv: train_sft.resolve(train_sft.parse_args(["--device", "cpu", *argv]))[1]
    assert config(["--lora-rank", "8"]).optimizer == "muon" and config([]).optimizer == "adamw"
    assert config(["--lora-rank", "8", "--optimizer", "adamw"]).optimizer == "adamw"  # a flag still wins
    assert config(["--train-only", "head"]).optimizer == "adamw"  # no adapter: the preset's own


def test_the_task_table_puts_the_single_task_model_beside_a_chat_one(pretrained, finetuned, tmp_path, monkeypatch):
    """The single-task model never saw the chat roles: it is asked in its own <INS> format, and its column says so."""
    from minigpt import tasks
    asked, write = [], tasks.write
    monkeypatch.setattr(tasks, "write", lambda model, tok, prompts, *a, **kw: asked.append(
        (model.config.vocab_size, prompts[0][:5], kw.get("stop"))) or write(model, tok, prompts, *a, **kw))
    chat = tmp_path / "chat"
    train_sft.main(["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--init-from", str(pretrained[0]), "--out-dir",
                    str(chat), "--device", "cpu", "--tasks", "poem,form", "--format", "chat", "--max-steps", "2"])
    columns = tasks.main(["--base", str(pretrained[0]), "--single", str(finetuned), "--sft", str(chat), "--corpus",
                          FIXTURE_CORPUS, "--n", "2", "--max-new-tokens", "8"])
    names = [name for name, _ in columns]
    assert "single-task SFT, its own format" in names and "multi-task SFT" in names
    formats = {(p, stop) for _, p, stop in asked}
    assert ("<INS>", "<END>") in formats and ("<USR>", "<EOT>") in formats  # the single model in its own, the rest in chat

"""A snapshot of what a refactor must not change: the losses the tiny preset of each training script writes, and the
SFT and chat prompts over the val split. Run it before and after a change and compare the two files.

    python tools/behaviour_snapshot.py /tmp/before.json     # then, after the change:
    python tools/behaviour_snapshot.py /tmp/after.json && cmp /tmp/before.json /tmp/after.json

Fixed seeds, CPU, float32, the tests' tiny corpus. DPO: the tiny model's answers rarely pass the gates, so its pairs
come from a stand-in judge (half the answers pass, by a checksum), as in the tests.
"""
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)  # the same sums in the same order on every run

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "poems.jsonl")


def losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    keep = ("loss", "val_loss", "pref_loss", "pref_accuracy", "reward_margin", "stop_rate", "regular_rate", "rhyme_rate")
    return [{k: r[k] for k in ("kind", "step", *keep) if k in r} for r in records if r["kind"] in ("train", "eval")]


def prompts():
    """The SFT and chat prompts of every task over the full corpus's val split (the texts the model reads)."""
    from minigpt.data import TITLE_TO_POEM, load_poems, split_poems
    try:
        from minigpt.metrics import Yardstick
    except ImportError:
        from minigpt.evaluate import Yardstick
    from minigpt import tasks as T
    splits = split_poems(load_poems())
    groups = Yardstick(splits["train"]).rhyme_groups
    out = {}
    for name, fmt in (("ins", TITLE_TO_POEM), ("chat", T.CHAT)):
        exs = T.examples(splits["val"], T.TASKS, groups, train=False, fmt=fmt)
        out[name] = [T.prompt_text(ex, fmt) + "\u241e" + ex.answer for ex in exs]
    out["single_title"] = single_title_examples(splits)
    return out


def single_title_examples(splits):
    """The rendered (ids, mask) of the default SFT data over the val split, in both formats and every --data choice."""
    from minigpt import data, tasks
    tok = data.build_tokenizer(splits["train"])
    out = {}
    for name, fmt, tk in (("ins", data.TITLE_TO_POEM, tok), ("chat", tasks.CHAT_POEM, tok.with_roles())):
        for kind in ("regular", "all", "relevant"):
            if hasattr(tasks, "single_poem_task"):
                made = tasks.task_data(splits["val"], tk, 128, [tasks.single_poem_task(kind)], {},
                                       tasks.CHAT if fmt is tasks.CHAT_POEM else fmt)
            else:
                made = data.SFTData(splits["val"], tk, 128, regular_only=kind != "all", fmt=fmt)
                if kind == "relevant":
                    from minigpt.evaluate import mentions_title
                    made.keep_only(mentions_title, "not_about_title")
            out[f"{name} {kind}"] = [list(map(list, ex)) for ex in made.examples]
    return out


def main(path):
    import train_dpo
    import train_pretrain
    import train_sft
    try:
        from minigpt import pairs as judged  # where the judge lives since pair making has a module of its own
    except ImportError:
        from minigpt import dpo as judged
    base = ["--preset", "tiny", "--corpus", FIXTURE, "--device", "cpu"]
    snap = {}
    with tempfile.TemporaryDirectory() as tmp:
        pre, sft, chat, d = (os.path.join(tmp, n) for n in ("pre", "sft", "chat", "dpo"))
        train_pretrain.main(base + ["--out-dir", pre])
        snap["pretrain"] = losses(pre)
        train_sft.main(base + ["--init-from", pre, "--out-dir", sft])
        snap["sft"] = losses(sft)
        train_sft.main(base + ["--init-from", pre, "--out-dir", chat, "--tasks", "poem,form,naming,followup",
                               "--format", "chat", "--max-steps", "6"])
        snap["sft_chat"] = losses(chat)
        train_sft.main(base + ["--init-from", pre, "--out-dir", chat + "1", "--format", "chat", "--max-steps", "6",
                               "--data", "all"])
        snap["sft_chat_one_task"] = losses(chat + "1")
        judged.judge = lambda answer, stopped, example, yard, prefer: "" if sum(map(ord, answer)) % 2 == 0 else "odd"
        train_dpo.main(base + ["--init-from", sft, "--out-dir", d, "--pairs", "whole", "--test-titles", "4"])
        snap["dpo"] = losses(d)
    snap["prompts"] = prompts()
    with open(path, "w", encoding="utf-8") as f:
        json.dump(snap, f, ensure_ascii=False, indent=0)
    print(f"{path}: " + ", ".join(f"{k} {len(v)}" for k, v in snap.items()))


if __name__ == "__main__":
    main(sys.argv[1])

"""Interruptions, resume, atomic checkpoints, divergence and untrusted checkpoint files."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_pretrain
import train_sft
from minigpt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from minigpt.cli import run
from minigpt.data import PretrainData
from minigpt.model import GPT

from conftest import FIXTURE_CORPUS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--device", "cpu", "--max-steps", "24"]


def message(err):
    """The script's own lines on stderr (the progress bar writes there too): exactly one is expected."""
    lines = [line for line in err.strip().splitlines() if line.startswith(("stopped:", "error:", "Traceback"))]
    assert len(lines) == 1, err
    return lines[0]


def losses(out):
    return [r["loss"] for r in map(json.loads, open(os.path.join(out, "log.jsonl"), encoding="utf-8")) if r["kind"] == "train"]


def interrupt_at(monkeypatch, calls, signum=signal.SIGINT):
    """Make the process receive signum while the given batch (1-based) is being drawn."""
    real, count = PretrainData.get_batch, [0]

    def get_batch(self, *args, **kw):
        count[0] += 1
        if count[0] == calls:
            os.kill(os.getpid(), signum)
        return real(self, *args, **kw)
    monkeypatch.setattr(PretrainData, "get_batch", get_batch)


@pytest.mark.parametrize("signum, stop_step", [(signal.SIGINT, 13), (signal.SIGTERM, 20)])
def test_interrupted_run_resumes_to_the_same_weights_and_losses(tmp_path, monkeypatch, capsys, signum, stop_step):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train_pretrain.main(TINY + ["--out-dir", full])
    interrupt_at(monkeypatch, stop_step, signum)
    with pytest.raises(SystemExit) as e:
        run(train_pretrain.main, TINY + ["--out-dir", part], "train_pretrain.py")
    assert e.value.code == 128 + signum
    err = message(capsys.readouterr().err)
    assert f"step {stop_step}" in err and "--resume --out-dir" in err
    assert torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)["step"] == stop_step
    monkeypatch.undo()
    with open(os.path.join(part, "log.jsonl"), "a", encoding="utf-8") as f:
        f.write('{"kind": "train", "st')  # a line torn by a kill mid-write: resume drops it
    train_pretrain.main(TINY + ["--out-dir", part, "--resume"])
    a, b = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True), torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)
    assert a["step"] == b["step"] == 24
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert losses(full) == losses(part)
    with open(os.path.join(full, "log.jsonl"), encoding="utf-8") as f, open(os.path.join(part, "log.jsonl"), encoding="utf-8") as g:
        assert [(r["kind"], r["step"]) for r in map(json.loads, f)] == [(r["kind"], r["step"]) for r in map(json.loads, g)]


@pytest.mark.slow
def test_sigint_to_a_real_process_saves_and_says_how_to_resume(tmp_path):
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "train_pretrain.py", "--preset", "tiny", "--corpus", FIXTURE_CORPUS,
                             "--max-steps", "100000", "--out-dir", out], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(out, "ckpt.pt")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    last = message(err)
    assert last.startswith("stopped: SIGINT at step") and "python train_pretrain.py --resume --out-dir" in last
    load_checkpoint(out)


def test_a_kill_while_writing_leaves_the_last_checkpoint_whole(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    interrupt_at(monkeypatch, 12)
    with pytest.raises(SystemExit):
        run(train_pretrain.main, TINY + ["--out-dir", out], "train_pretrain.py")
    monkeypatch.undo()
    before = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    dying = (
        "import os, signal, torch\n"
        "from minigpt import checkpoint\n"
        "def save(obj, f):\n"
        "    f.write(b'PK\\x03\\x04 half a checkpoint')\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "checkpoint.torch.save = save\n"
        f"checkpoint.save_checkpoint({os.path.join(out, 'ckpt.pt')!r}, {{'step': 999}})\n"
    )
    proc = subprocess.run([sys.executable, "-c", dying], cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL
    after = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert after["step"] == before["step"] == 12
    assert all(torch.equal(after["model"][k], before["model"][k]) for k in before["model"])
    result = train_pretrain.main(TINY + ["--out-dir", out, "--resume"])  # the leftover .tmp does not matter
    assert result["step"] == 24


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    real, calls = GPT.forward, [0]

    def forward(self, idx, targets=None, **kw):
        logits, loss = real(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls[0] += 1
            if calls[0] == 15:
                loss = loss * float("nan")
        return logits, loss
    monkeypatch.setattr(GPT, "forward", forward)
    with pytest.raises(SystemExit) as e:
        run(train_pretrain.main, TINY + ["--out-dir", out], "train_pretrain.py")
    err = message(capsys.readouterr().err)
    assert e.value.code == 1 and "step 15" in err and "step 10" in err and "ckpt.pt" in err
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 10


def test_a_finished_run_is_not_overwritten_by_accident(tmp_path, capsys):
    out = str(tmp_path / "run")
    train_pretrain.main(TINY + ["--out-dir", out, "--max-steps", "5"])
    with pytest.raises(SystemExit) as e:
        run(train_pretrain.main, TINY + ["--out-dir", out], "train_pretrain.py")
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run(train_pretrain.main, TINY + ["--out-dir", str(tmp_path / "empty"), "--resume"], "train_pretrain.py")
    assert e.value.code == 2 and "nothing to resume" in capsys.readouterr().err
    assert train_pretrain.main(TINY + ["--out-dir", out, "--overwrite"])["step"] == 24


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("good"))
    train_pretrain.main(TINY + ["--out-dir", out, "--max-steps", "3"])
    return os.path.join(out, "ckpt.pt")


def test_untrusted_checkpoints_are_refused_with_one_line(good_checkpoint, tmp_path, capsys):
    ckpt = torch.load(good_checkpoint, weights_only=True)
    pickled = tmp_path / "pickled.pt"
    torch.save({**ckpt, "extra": Payload()}, pickled)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(good_checkpoint, "rb").read()[:5000])
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint", encoding="utf-8")
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, plain)
    other_shape = tmp_path / "shape.pt"
    torch.save({**ckpt, "model_config": {**ckpt["model_config"], "n_embd": 64}}, other_shape)
    other_vocab = tmp_path / "vocab.pt"
    torch.save({**ckpt, "tokenizer": ckpt["tokenizer"][:-1]}, other_vocab)
    old_chat = tmp_path / "old_chat.pt"  # a chat vocabulary from before the quote marks joined it
    torch.save({**ckpt, "tokenizer": ckpt["tokenizer"] + ["<SYS>", "<USR>", "<AST>", "<EOT>"]}, old_chat)
    cases = [(pickled, "refused"), (truncated, "not a readable checkpoint"), (text, "not a readable checkpoint"),
             (plain, "not a minigpt checkpoint"), (other_shape, "do not fit"), (other_vocab, "does not match"),
             (old_chat, "quote marks 「」 joined it; train the chat model again"),
             (tmp_path / "missing.pt", "no checkpoint")]
    for path, reason in cases:
        with pytest.raises(CheckpointError, match=reason) as e:
            load_checkpoint(str(path))
        assert "\n" not in str(e.value)
    assert "must never run" not in capsys.readouterr().out
    for path, reason in cases:  # and through a script: one line, exit status 2
        with pytest.raises(SystemExit) as e:
            run(train_sft.main, ["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--init-from", str(path),
                                 "--out-dir", str(tmp_path / "sft")], "train_sft.py")
        assert e.value.code == 2 and reason in message(capsys.readouterr().err)


def test_save_checkpoint_replaces_in_one_step(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    save_checkpoint(path, {"step": 1})
    assert len(synced) == 2  # the file before the rename, the folder after it
    save_checkpoint(path, {"step": 2})
    assert torch.load(path, weights_only=True)["step"] == 2 and not os.path.exists(path + ".tmp")


def test_resume_cuts_the_log_back_in_one_rename_and_drops_a_torn_line(tmp_path, monkeypatch):
    from minigpt.train import keep_log_until
    path = tmp_path / "log.jsonl"
    lines = [json.dumps({"kind": "train", "step": s, "loss": 1.0}) + "\n" for s in (5, 10, 15)]
    path.write_text("".join(lines) + '{"kind": "train", "st', encoding="utf-8")
    keep_log_until(str(path), 10)
    assert path.read_text(encoding="utf-8") == "".join(lines[:2])
    path.write_text("".join(lines), encoding="utf-8")

    def killed(src, dst):
        raise KeyboardInterrupt  # as if killed between writing the new log and renaming it
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        keep_log_until(str(path), 5)
    assert path.read_text(encoding="utf-8") == "".join(lines)  # the old log, whole


def test_a_resumed_run_keeps_its_time_reserve_and_its_clock(tmp_path, monkeypatch):
    """The budget's reserve for the last eval and the time already spent come back with the checkpoint."""
    from minigpt.checkpoint import save_checkpoint
    part = str(tmp_path / "part")
    interrupt_at(monkeypatch, 13)
    with pytest.raises(SystemExit):
        run(train_pretrain.main, TINY + ["--out-dir", part, "--max-minutes", "10"], "train_pretrain.py")
    monkeypatch.undo()
    path = os.path.join(part, "ckpt.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["reserve"], ckpt["elapsed_s"] = 7.0, 100.0  # as if the evals so far took 7 s, and 100 s had gone by
    save_checkpoint(path, ckpt)
    train_pretrain.main(TINY + ["--out-dir", part, "--resume"])
    resumed = torch.load(path, weights_only=True)
    assert resumed["reserve"] == 7.0 and resumed["elapsed_s"] >= 100.0  # the reserve only grows, and the clock goes on

"""Two processes under torchrun (gloo, on the CPU) train as one: the same losses as one process for pretraining and
for SFT, the same weights in both processes under a time budget, and an interrupted run resumes to the whole log."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train_pretrain
import train_sft
from conftest import FIXTURE_CORPUS

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--device", "cpu", "--log-every", "1"]


def torchrun(stage, args, kill=None):
    """The stage's script in 2 processes; returns the finished process (its exit status and output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "KILL": kill or ""}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(ROOT, "tests", "under_torchrun.py"), stage, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def records(out, kind=None):
    with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if kind is None or r["kind"] == kind]


def largest_difference(a, b, key):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    return max(abs(x[key] - y[key]) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Pretraining in 2 processes, 24 steps, a loss logged at every step."""
    out = str(tmp_path_factory.mktemp("two"))
    proc = torchrun("pretrain", TINY + ["--max-steps", "24", "--out-dir", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_pretraining_in_two_processes_matches_one(two_processes, tmp_path):
    one = str(tmp_path / "one")
    train_pretrain.main(TINY + ["--max-steps", "24", "--out-dir", one])
    assert len(records(one, "train")) == 24
    assert largest_difference(records(one, "train"), records(two_processes, "train"), "loss") < 1e-3
    assert largest_difference(records(one, "eval"), records(two_processes, "eval"), "val_loss") < 1e-3


def test_sft_in_two_processes_matches_one(two_processes, tmp_path):
    """SFT answers differ in length (--data all: every poem that fits), so the processes hold different numbers of
    trained tokens: the loss must be the sum over all of them divided by their count, not the average of each
    process's mean (that one differs by 0.02 here)."""
    args = TINY + ["--init-from", two_processes, "--data", "all", "--max-steps", "12", "--eval-every", "6", "--eval-titles", "2",
                   "--max-new-tokens", "8"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train_sft.main(args + ["--out-dir", one])
    proc = torchrun("sft", args + ["--out-dir", two])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(records(one, "train")) == 12
    assert largest_difference(records(one, "train"), records(two, "train"), "loss") < 1e-3
    assert largest_difference(records(one, "eval"), records(two, "eval"), "val_loss") < 1e-3


def test_a_time_budgeted_run_ends_with_the_same_weights_in_both_processes(tmp_path):
    """Each process reads its own clock, but they agree on one progress value per step: the same learning rates and
    the same last step, so the same weights. With dropout, each process draws its own masks."""
    out = str(tmp_path / "run")
    proc = torchrun("pretrain", TINY + ["--max-steps", "100000", "--max-minutes", "0.1", "--dropout", "0.1",
                                        "--out-dir", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in (0, 1))
    assert 20 < a["step"] == b["step"] < 100000
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not torch.equal(a["rng"], b["rng"])  # the random states that draw dropout differ by process
    saved = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert saved["step"] == a["step"] and all(torch.equal(saved["model"][k], a["model"][k]) for k in a["model"])


def test_an_interrupted_run_resumes_under_torchrun_to_the_whole_log(two_processes, tmp_path):
    """SIGTERM reaches one process at batch 13; both stop at the same step and process 0 saves. A torn last line
    (as if killed mid-write) is added to the log; the resumed run ends with the log and weights of an
    uninterrupted one."""
    out = str(tmp_path / "run")
    args = TINY + ["--max-steps", "24", "--out-dir", out]
    proc = torchrun("pretrain", args, kill="1:13")
    assert proc.returncode != 0 and "SIGTERM at step 13" in proc.stderr
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 13
    with open(os.path.join(out, "log.jsonl"), "a", encoding="utf-8") as f:
        f.write('{"kind": "train", "step": 13, "lo')
    proc = torchrun("pretrain", args + ["--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    whole, resumed = records(two_processes), records(out)
    assert [(r["kind"], r["step"]) for r in resumed] == [(r["kind"], r["step"]) for r in whole]
    assert largest_difference(records(two_processes, "train"), records(out, "train"), "loss") == 0
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (two_processes, out))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # bit for bit

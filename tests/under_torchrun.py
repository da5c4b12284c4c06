"""Runs a training script in one process of torchrun, for the tests: python -m torch.distributed.run ...
tests/under_torchrun.py pretrain|sft [flags of the script].

When training ends, each process writes its own weights and random state to OUT_DIR/rank<r>.pt, so that a test can
compare the processes. KILL="<rank>:<batch>" sends SIGTERM to that process while it draws that batch.
"""
import os
import signal
import sys

import torch

import train_pretrain
import train_sft
from minigpt import cli
from minigpt.data import PretrainData, SFTData
from minigpt.train import train

SCRIPTS = {"pretrain": train_pretrain, "sft": train_sft}


def keep_each_process(model, cfg, get_batch, val_batches, out_dir, *args, **kw):
    result = train(model, cfg, get_batch, val_batches, out_dir, *args, **kw)
    torch.save({"model": model.state_dict(), "rng": torch.get_rng_state(), "step": result["step"]},
               os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))
    return result


def kill_at(rank, batch):
    for data in (PretrainData, SFTData):
        real, count = data.get_batch, [0]

        def get_batch(self, *args, _real=real, **kw):
            count[0] += 1
            if count[0] == int(batch) and os.environ["RANK"] == rank:
                os.kill(os.getpid(), signal.SIGTERM)
            return _real(self, *args, **kw)
        data.get_batch = get_batch


if __name__ == "__main__":
    script = SCRIPTS[sys.argv[1]]
    script.train = keep_each_process
    if os.environ.get("KILL"):
        kill_at(*os.environ["KILL"].split(":"))
    cli.run(script.main, sys.argv[2:], f"train_{sys.argv[1]}.py")

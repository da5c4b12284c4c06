"""What the three training scripts share: presets, flags, device choice, printing, and one-line errors."""
import argparse
import os
import sys
from dataclasses import fields

import torch.distributed as dist
from tqdm.auto import tqdm

from minigpt.checkpoint import CheckpointError, load_checkpoint
from minigpt.data import CorpusError, build_tokenizer
from minigpt.reward import RankingError
from minigpt.metrics import PAIR_METRICS, REWARD_METRICS, RL_METRICS, console_line
from minigpt.model import GPTConfig
from minigpt.tokenizer import UnknownCharacterError
from minigpt.train import TrainConfig, TrainingStopped, pick_device

USER_ERRORS = (CorpusError, CheckpointError, UnknownCharacterError, RankingError)
MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "use_sdpa")


class UsageError(ValueError):
    """A bad flag value, reported in one line."""


def make_parser(description, presets, default_out, model_flags=MODEL_FLAGS, out_help=""):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(presets), default="cpu",
                   help="tiny: seconds, for tests; cpu: a laptop; class: shorter, both stages in a lesson; gpu: a bigger model for a GPU")
    p.add_argument("--out-dir", default=default_out, help="where the checkpoint, log.jsonl and loss.png go" + out_help)
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its last checkpoint, with its settings")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out-dir already holds a run")
    hp = p.add_argument_group("hyperparameters (default: the preset's value)")
    helps = {"max_minutes": "minutes of training; 0 = no limit", "dtype": "float32, bfloat16 (autocast) or auto",
             "compile": "torch.compile the model for training",
             "keep_snapshots": "also keep the model of every eval in OUT_DIR/snapshots/step_N.pt", "use_sdpa": "attention by F.scaled_dot_product_attention"}
    for f in [f for f in fields(GPTConfig) if f.name in model_flags] + list(fields(TrainConfig)):
        if isinstance(f.default, bool):
            hp.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, help=helps.get(f.name))
        else:
            hp.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), help=helps.get(f.name))
    return p


def resolve(args, presets):
    """Preset values, overridden by every flag the user gave; returns (model kwargs, TrainConfig, extras)."""
    preset = dict(presets[args.preset])
    given = {k: v for k, v in vars(args).items() if v is not None}
    model_kw = {k: given.get(k, v) for k, v in preset.pop("model", {}).items()}
    model_kw.update({k: given[k] for k in MODEL_FLAGS if k in given})
    train_kw = {f.name: given.get(f.name, preset.pop(f.name, f.default)) for f in fields(TrainConfig)}
    try:
        cfg = TrainConfig(**train_kw)
        device = pick_device(args.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return model_kw, cfg, device, preset


def stage_settings(cls, args, extra):
    """The stage's settings (a dataclass): each field from its flag where the user gave one, else from the preset's
    extras, else the field's default; a value the dataclass refuses is a usage error."""
    names = {f.name for f in fields(cls)}
    unknown = set(extra) - names
    if unknown:
        raise TypeError(f"preset keys {sorted(unknown)} are not fields of {cls.__name__}")
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    try:
        return cls(**{**extra, **given})
    except ValueError as e:
        raise UsageError(str(e)) from None


def resumed_settings(cls, ckpt, out_dir):
    """The settings a run was started with, restored whole from its checkpoint; a checkpoint from before they were
    kept whole is refused in one line that says what to do."""
    if "settings" not in ckpt:
        raise UsageError(f"{out_dir} was saved by an older minigpt that did not keep its stage settings whole, so it "
                         "cannot be resumed; start it afresh with --overwrite (its finished checkpoint still loads)")
    return cls(**ckpt["settings"])


def resume_point(args):
    """(model, tokenizer, checkpoint) of the run to continue, or None for a fresh run; never overwrites by accident."""
    path = os.path.join(args.out_dir, "ckpt.pt")
    if args.resume:
        if not os.path.exists(path):
            raise UsageError(f"nothing to resume: no checkpoint in {args.out_dir}; drop --resume to start a run there")
        return load_checkpoint(path)
    if os.path.exists(path) and not args.overwrite:
        raise UsageError(f"{args.out_dir} already holds a run; continue it with --resume, or start afresh with "
                         "--overwrite (or pick another --out-dir)")
    return None


def check_vocabulary(tokenizer, train_poems, chat, checkpoint, corpus):
    """A checkpoint's vocabulary must be the one the corpus's training poems give (with the chat roles, for a chat
    run); else a one-line CheckpointError."""
    expected = build_tokenizer(train_poems)
    if chat:
        expected, tokenizer = expected.with_roles(), tokenizer.with_roles()
    if expected.itos != tokenizer.itos:
        raise CheckpointError(f"{checkpoint} was made with another tokenizer than {corpus} gives; pass the corpus it "
                              "was trained on with --corpus, or train on this corpus from the start")


def write_table(out_dir, name, text):
    """Print a final table and keep it in the run folder as name."""
    print("\n" + text)
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
        f.write(text + "\n")


def print_event(record):
    """Show a log record to the person at the terminal (above the progress bar)."""
    if record["kind"] == "eval":
        line = f"step {record['step']}: val loss {record['val_loss']:.3f}"
        if console_line(record):
            line += " | val titles: " + console_line(record)
        if console_line(record, PAIR_METRICS):
            line += "\n  held-out pairs: " + console_line(record, PAIR_METRICS)
        if console_line(record, REWARD_METRICS):
            line += "\n  held-out rankings: " + console_line(record, REWARD_METRICS)
        if console_line(record, RL_METRICS):
            line += "\n  RL: " + console_line(record, RL_METRICS)
        if "tasks" in record:
            line += "\n  tasks on val (complies, stops): " + ", ".join(
                f"{name} {m['comply']:.0%} {m['stop']:.0%}" for name, m in record["tasks"].items())
        tqdm.write(line)
    elif record["kind"] == "sample":
        tqdm.write(f"---- samples at step {record['step']} ----")
        for s in record["samples"]:
            tqdm.write(s["shown"])
        tqdm.write("-" * 30)


def run(main_fn, argv, script):
    """Run a script's main; a user mistake ends with one line on stderr and exit status 2,
    an interruption with one line saying how to resume."""
    try:
        result = main_fn(argv)
        if dist.is_initialized():
            dist.barrier()  # under torchrun: let every process finish its work before the group is torn down
        return result
    except (UsageError, *USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingStopped as e:
        hint = f"; resume with: python {script} --resume --out-dir {e.out_dir}" if e.resumable else ""
        print(f"stopped: {e}{hint}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def is_lead():
    """True in the one process that prints and writes: the only one, or rank 0 under torchrun."""
    return int(os.environ.get("RANK", "0")) == 0


def parse_or_usage(parse, text):
    """parse(text), with its ValueError reported as a usage error (one line, exit status 2)."""
    try:
        return parse(text)
    except ValueError as e:
        raise UsageError(str(e)) from None


def model_config(cls, **kw):
    """Build a config; an impossible one (n_embd not divisible by n_head...) is a usage error."""
    try:
        return cls(**kw)
    except ValueError as e:
        raise UsageError(str(e)) from None

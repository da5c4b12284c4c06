"""Checkpoints: a plain dict of state_dicts, configs, the vocabulary and the step; never a pickled module.

They load with torch.load(weights_only=True), so a file from a stranger cannot run code. Writes go to a
temporary file first, flushed to the disk and renamed into place, so neither a crash mid-write nor a power
cut corrupts the last one.
"""
import os
import pickle
import re
import zipfile

import torch

from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import CharTokenizer

REQUIRED = ("model", "model_config", "tokenizer", "step")


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, foreign or incompatible; the message says which and why."""


def checkpoint_path(path):
    """A run folder or a file -> the checkpoint file."""
    return os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path


def replace_durably(path, write):
    """write(file) fills a temporary file, which is flushed to the disk and renamed over path; then the folder's
    entry is flushed too. After a crash or a power cut, path holds the old content or the new one, whole."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):  # POSIX: the rename itself lives in the folder
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(path, payload):
    """torch.save, made durable: the checkpoint on the disk is always the last one or the new one, whole."""
    replace_durably(path, lambda f: torch.save(payload, f))


def load_checkpoint(path, device="cpu", made_by="python train_pretrain.py"):
    """Returns (model, tokenizer, checkpoint dict); raises CheckpointError with a one-line reason (for a missing file:
    the command made_by that writes one)."""
    path = checkpoint_path(path)
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}; train one first ({made_by}) or pass the right path")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is damaged or foreign
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, or not written by torch.save)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it would call {found.group(1)}" if found else "it holds more than tensors and plain data"
        raise CheckpointError(f"{path} refused: {what}; only weights and plain data are loaded") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or damaged: {str(e).splitlines()[0][:100]})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED):
        raise CheckpointError(f"{path} is not a minigpt checkpoint (it lacks {', '.join(k for k in REQUIRED if not isinstance(ckpt, dict) or k not in ckpt)})")
    try:
        tokenizer = CharTokenizer.from_list(ckpt["tokenizer"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its vocabulary is refused ({str(e).splitlines()[0][:160]})") from None
    if "adapter" in ckpt:  # LoRA or --train-only: the trained tensors alone, put on the base they were trained on
        return on_its_base(path, ckpt, device), tokenizer, ckpt
    try:
        model = model_class(ckpt)(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: weights do not fit the stored config or vocabulary ({str(e).splitlines()[0][:160]})") from None
    if tokenizer.vocab_size != model.config.vocab_size:
        raise CheckpointError(f"{path}: vocabulary of {tokenizer.vocab_size} does not match the model's {model.config.vocab_size}")
    return model.to(device), tokenizer, ckpt


def on_its_base(path, ckpt, device="cpu"):
    """The model of an adapter checkpoint: its base (ckpt['adapter']['base'], a run folder or checkpoint file),
    checked against the fingerprint it was trained on, with the adapter's tuning applied and its tensors loaded. A
    base of other weights is refused: the adapter's numbers mean nothing on it."""
    from minigpt.lora import fingerprint, load_trained, plain, prepare
    meta = ckpt["adapter"]
    base_path = meta["base"]
    model = plain(load_checkpoint(base_path, device)[0])  # a base that is an adapter itself (DPO on LoRA SFT): merged
    vocab_size = meta["tuning"].get("vocab_size", model.config.vocab_size)
    if vocab_size > model.config.vocab_size:  # a chat adapter: the base gets the role rows it was trained with
        model = grow_vocab(model, vocab_size)
    if fingerprint(model.state_dict()) != meta["fingerprint"]:
        raise CheckpointError(f"{path} is an adapter for another base than {checkpoint_path(base_path)} (its weights "
                              f"differ from those it was trained on); pass the base it was made from")
    try:
        load_trained(prepare(model, meta["tuning"]), ckpt["model"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: the adapter does not fit its base ({str(e).splitlines()[0][:160]})") from None
    return model.to(device)


def model_class(ckpt):
    """GPT, or for a reward model's checkpoint the GPT with its scalar head (minigpt.reward.RewardModel)."""
    if ckpt.get("stage") == "reward":
        from minigpt.reward import RewardModel
        return RewardModel
    return GPT


def grow_vocab(model, vocab_size):
    """A copy of model whose vocabulary has grown to vocab_size (new tokens appended, such as chat roles): the old
    rows stay; each new row starts at the mean of the old ones, so that a new token starts as an average one."""
    old = model.tok_emb.weight.data
    grown = GPT(GPTConfig(**{**model.config.__dict__, "vocab_size": vocab_size})).to(old.device)
    state = dict(model.state_dict())
    rows = old.mean(dim=0, keepdim=True).expand(vocab_size - old.size(0), -1)  # (new, C)
    state["tok_emb.weight"] = state["lm_head.weight"] = torch.cat([old, rows])  # tied: one table
    grown.load_state_dict(state)
    return grown


def settings_of(ckpt):
    """A checkpoint's stage settings as a dict (format, tasks, init_from ...): saved whole under 'settings'; older
    checkpoints kept them loose at the top level, where a finished model is still read from."""
    return ckpt.get("settings", ckpt)

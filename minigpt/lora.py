"""Tuning a few parameters. LoRA keeps each chosen nn.Linear of the GPT frozen and learns a low-rank change beside
it: y = W x + (alpha / r) B A x, A (r, in) and B (out, r), B zero at the start, so that step 0 is the base model
exactly. The simpler ways to freeze most of the model (only the head, the last block, the norms) are here too.
What a run of either kind saves is its adapter: the trained tensors alone, with the fingerprint of its base.

    python -m minigpt.lora                    # full SFT, LoRA at ranks 2 and 8, head only: 4.5 minutes each, one table
    python -m minigpt.lora --merge runs/sft_lora runs/sft_lora_merged   # the adapter folded into a full checkpoint
"""
import argparse
import math
import os
import sys
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = {"attn": ("attn.qkv", "attn.proj"), "mlp": ("mlp.fc", "mlp.proj")}  # the projections LoRA may adapt
TRAIN_ONLY = {  # the simple alternatives: which parameters train, by name
    "head": lambda name, n_layer: name.startswith(("ln_f.", "tok_emb.")),  # the head is tied to the embedding
    "last_block": lambda name, n_layer: name.startswith(f"blocks.{n_layer - 1}."),
    "norms": lambda name, n_layer: ".ln_" in f".{name}",
}


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus its low-rank change, scaled by alpha / rank."""

    def __init__(self, base, rank, alpha, generator=None):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.A = nn.Parameter(torch.empty(rank, base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))  # zero: the change starts at nothing
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)  # as nn.Linear draws its own weight
        base.requires_grad_(False)

    def forward(self, x):
        return self.base(x) + (x @ self.A.T @ self.B.T) * self.scale  # (B, T, in) -> (B, T, r) -> (B, T, out)

    def merged(self):
        """A plain nn.Linear whose weight holds the change: W + (alpha / r) B A, (out, in)."""
        lin = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        lin.load_state_dict(self.base.state_dict())
        with torch.no_grad():
            lin.weight += self.scale * self.B @ self.A  # (out, r) @ (r, in) -> (out, in)
        return lin.to(self.base.weight.device)


class TokenRows(nn.Module):
    """The frozen token table with a few of its rows trained: the tokens pretraining never saw (<END>, <INS>, <INP>,
    <RES>, the chat roles). Frozen, their rows stay where pretraining left them, and no low-rank change inside the
    blocks can make the model write <END> in a few minutes. Reading a token (the embedding) and writing one (the tied
    head) both see the trained rows."""

    def __init__(self, table, ids):
        super().__init__()
        self.table = table.requires_grad_(False)  # nn.Embedding (V, C)
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=table.weight.device), persistent=False)
        self.rows = nn.Parameter(table.weight[self.ids].detach().clone())  # (k, C)

    @property
    def weight(self):
        """(V, C): the frozen table with the trained rows written in."""
        return self.table.weight.index_put((self.ids,), self.rows)

    def forward(self, idx):
        return F.embedding(idx, self.weight)  # (B, T) -> (B, T, C)


class TiedHead(nn.Module):
    """The LM head reading the same table as TokenRows, trained rows included: logits = x W^T, (B, T, C) -> (B, T, V)."""

    def __init__(self, rows):
        super().__init__()
        self.__dict__["rows"] = rows  # not a submodule: its tensors belong to tok_emb, and are saved there once

    def forward(self, x):
        return F.linear(x, self.rows.weight)


def train_rows(model, ids):
    """Let the rows of these token ids train (TokenRows on the embedding and the tied head); in place."""
    model.tok_emb = TokenRows(model.tok_emb, ids)
    model.lm_head = TiedHead(model.tok_emb)
    return model


def new_token_ids(tokenizer):
    """The ids of the tokens pretraining never saw: the special tokens, and the chat roles when the vocabulary has them."""
    from minigpt.tokenizer import CHAT_TOKENS, SPECIAL_TOKENS
    return [tokenizer.stoi[t] for t in SPECIAL_TOKENS + CHAT_TOKENS if t in tokenizer.stoi]


def _modules(model, targets):
    """(module, attribute name) of each target projection of every block: getattr(module, name) is the nn.Linear."""
    for block in model.blocks:
        for target in targets:
            for path in TARGETS[target]:
                parent, attr = path.split(".")
                yield getattr(block, parent), attr


def add_lora(model, rank, alpha=None, targets=("attn", "mlp"), seed=0):
    """Freeze the model and put a LoRALinear around each target projection (alpha defaults to 2 x rank); in place.
    The A matrices are drawn from their own seed: the same run starts from the same adapter, resumed or not."""
    if rank <= 0:
        raise ValueError(f"--lora-rank must be positive, got {rank}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"--lora-targets takes a comma-separated list of {', '.join(TARGETS)}, got {','.join(targets)!r}")
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for parent, attr in _modules(model, targets):
        setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, alpha or 2 * rank, gen))
    return model


def train_only(model, part):
    """Freeze all but one part of the model (TRAIN_ONLY); in place."""
    if part not in TRAIN_ONLY:
        raise ValueError(f"--train-only takes one of {', '.join(TRAIN_ONLY)}, got {part!r}")
    for name, p in model.named_parameters():
        p.requires_grad_(TRAIN_ONLY[part](name, model.config.n_layer))
    return model


def prepare(model, tuning):
    """Apply a run's tuning settings, {lora_rank, lora_alpha, lora_targets, train_only, token_rows} (all off: full
    tuning). token_rows: the ids whose rows of the token table train too (none when the whole table trains)."""
    if tuning.get("lora_rank"):
        add_lora(model, tuning["lora_rank"], tuning.get("lora_alpha"), tuple(tuning["lora_targets"].split(",")))
    elif tuning.get("train_only"):
        train_only(model, tuning["train_only"])
    if tuning.get("token_rows") and not model.tok_emb.weight.requires_grad:
        train_rows(model, tuning["token_rows"])
    return model


@dataclass
class Tuning:
    """How much of the model a stage trains, as settings a stage's dataclass inherits (all off: every parameter)."""
    lora_rank: int = 0  # 0: every parameter trains; else LoRA of this rank on lora_targets, the rest frozen
    lora_alpha: float = 0.0  # LoRA's scale is alpha / rank; 0: alpha = 2 x rank
    lora_targets: str = "attn,mlp"  # which projections of each block LoRA adapts (TARGETS)
    train_only: str = ""  # head, last_block or norms: only that part trains (TRAIN_ONLY)
    new_rows: bool = True  # with either: the table's rows of the tokens pretraining never saw (<END> ...) train too

    def __post_init__(self):
        if self.lora_rank < 0 or self.lora_alpha < 0:
            raise ValueError("--lora-rank and --lora-alpha must not be negative")
        if self.lora_rank and self.train_only:
            raise ValueError("--lora-rank and --train-only are two ways to tune a part of the model; give one")

    @property
    def partial(self):
        return bool(self.lora_rank or self.train_only)

    def tuning(self, tokenizer):
        """The dict prepare() reads, saved in an adapter's checkpoint: these settings, the ids of the rows that train
        (none when the whole table does) and the vocabulary's size (a chat adapter's base grows to it)."""
        rows = new_token_ids(tokenizer) if self.partial and self.new_rows and self.train_only != "head" else []
        return {"lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha, "lora_targets": self.lora_targets,
                "train_only": self.train_only, "token_rows": rows, "vocab_size": tokenizer.vocab_size}

    def describe(self, model, rows):
        """One line: how many parameters train, and which."""
        n_train, n_all = trainable(model)
        how = (f"LoRA rank {self.lora_rank} on {self.lora_targets}" if self.lora_rank else f"only the {self.train_only}")
        return (f"tuning {n_train:,} of {n_all:,} parameters ({n_train / n_all:.2%}): {how}"
                + (f", and the rows of the {len(rows)} tokens pretraining never saw" if rows else ""))


def add_tuning_flags(parser):
    """The flags of Tuning, in their own group of a stage's parser."""
    tune = parser.add_argument_group("tuning a part of the model (minigpt.lora; default: every parameter trains)")
    tune.add_argument("--lora-rank", type=int, help="LoRA of this rank on --lora-targets; the base stays frozen")
    tune.add_argument("--lora-alpha", type=float, help="LoRA's scale is alpha / rank (default: alpha = 2 x rank)")
    tune.add_argument("--lora-targets", help="comma-separated: attn (qkv, proj), mlp (fc, proj); default attn,mlp")
    tune.add_argument("--train-only", choices=sorted(TRAIN_ONLY), help="only this part trains: head (tied to the "
                      "embedding), last_block, norms")
    tune.add_argument("--new-rows", action=argparse.BooleanOptionalAction, help="with either, the embedding's rows of "
                      "the tokens pretraining never saw (<END>, <INS>, <INP>, <RES>, the chat roles) train too (default: yes)")


def adapter_meta(base, base_path, tuning):
    """What a checkpoint of a partly frozen run says about its base: where it is, its fingerprint (taken once the chat
    roles have joined its vocabulary), the tuning dict."""
    return {"base": base_path, "fingerprint": fingerprint(base.state_dict()), "tuning": tuning}


def save_adapter(out_dir, model, extra, step):
    """adapter.pt: the trained tensors and what loads them on their base, no optimizer state; returns its bytes."""
    from minigpt.checkpoint import save_checkpoint
    path = os.path.join(out_dir, "adapter.pt")
    save_checkpoint(path, {**extra, "model": adapter_state(model), "step": step})
    return os.path.getsize(path)


def plain(model):
    """The model as a plain GPT: a merged copy when it carries an adapter, else the model itself."""
    import copy
    adapted = isinstance(model.tok_emb, TokenRows) or any(isinstance(m, LoRALinear) for m in model.modules())
    return merge(copy.deepcopy(model)) if adapted else model


def trainable(model):
    """(trainable parameters, all parameters), a tied tensor counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def adapter_state(model):
    """The trained tensors alone, by name: what an adapter file holds."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trained(model, state):
    """Load what adapter_state saved (or a full state_dict) into a prepared model: every tensor it holds must be one of
    the model's, and every tensor the model trains must be in it."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    untrained = [n for n, p in model.named_parameters() if p.requires_grad and n not in state]
    if unexpected or untrained:
        raise ValueError(f"unexpected {', '.join(unexpected[:3]) or 'nothing'}; missing {', '.join(untrained[:3]) or 'nothing'}")
    return model


def fingerprint(state):
    """A checksum of a state_dict's names and values: an adapter goes only on the base it was trained on."""
    crc = 0
    for name in sorted(state):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(state[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes(), crc)
    return f"{crc:08x}"


def merge(model):
    """The model with every LoRALinear folded back into a plain nn.Linear and the trained token rows written into the
    table (tied to the head again), everything trainable again; in place."""
    if isinstance(model.tok_emb, TokenRows):
        table = model.tok_emb.table
        with torch.no_grad():
            table.weight[model.tok_emb.ids] = model.tok_emb.rows
        model.tok_emb = table
        model.lm_head = nn.Linear(table.embedding_dim, table.num_embeddings, bias=False)
        model.lm_head.weight = table.weight  # tied again, as model.py ties them
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for attr, child in list(parent.named_children()):
                if isinstance(child, LoRALinear):
                    setattr(parent, attr, child.merged())
    return model.requires_grad_(True)


# ---- side by side: every way of tuning, the same minutes, one table ----

def rows_for(ranks, part="head"):
    """(name, train_sft.py flags) of each row: full SFT, LoRA at each rank, LoRA at the largest rank with the new
    tokens' rows frozen (what goes wrong without them), one part alone."""
    frozen = [(f"LoRA r{max(ranks)}, rows frozen", ["--lora-rank", str(max(ranks)), "--no-new-rows"])] if ranks else []
    return ([("full SFT", [])] + [(f"LoRA r{r}", ["--lora-rank", str(r)]) for r in ranks] + frozen
            + ([(f"{part} only", ["--train-only", part])] if part else []))


def run_row(flags, out_dir, minutes, init_from, corpus):
    """train_sft.py with these flags in its own process, so that its peak memory is its own: (exit code, peak MB)."""
    import subprocess
    cmd = [sys.executable, "train_sft.py", "--max-minutes", str(minutes), "--init-from", init_from, "--corpus", corpus,
           "--out-dir", out_dir, "--overwrite", *flags]
    print("$ " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)  # the child's own resource use, peak memory included
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024  # Linux gives kilobytes


def row_figures(out_dir, model, plain_val, device="cpu"):
    """What the table reads from a finished run: its training log, its final table (final.json), its files, and the
    loss of the tuned model on plain poem text (the pretraining's val windows): how much it forgot."""
    import json
    from minigpt.loss_eval import evaluate_loss
    log = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"), encoding="utf-8")]
    steps = [r["step_ms"] for r in log if r["kind"] == "train" and "step_ms" in r]
    evals = [r for r in log if r["kind"] == "eval"]
    final = json.load(open(os.path.join(out_dir, "final.json"), encoding="utf-8"))["fine-tuned"]
    n_train, n_all = trainable(model)
    saved = os.path.join(out_dir, "adapter.pt" if os.path.exists(os.path.join(out_dir, "adapter.pt")) else "ckpt.pt")
    return {"trainable": n_train / n_all, "step_ms": sum(steps) / len(steps), "steps": evals[-1]["step"],
            "minutes": evals[-1]["elapsed_s"] / 60, "saved_kb": os.path.getsize(saved) / 1024,
            "optimizer_kb": 2 * 4 * n_train / 1024,  # AdamW's two moments, float32
            "stop": final["stop_rate"], "regular": final["regular_rate"], "rhyme": final.get("rhyme_rate"),
            "title_lift": 100 * final["relevance_lift"],  # a share in final.json, points here
            "plain_loss": evaluate_loss(model, plain_val, device)}


COLUMNS = (("trainable", "trainable share", "{:.2%}"), ("steps", "steps", "{:d}"), ("step_ms", "ms a step", "{:.0f}"),
           ("minutes", "minutes", "{:.1f}"), ("peak_mb", "peak memory (MB)", "{:.0f}"),
           ("optimizer_kb", "optimizer state (KB)", "{:,.0f}"), ("saved_kb", "saved file (KB)", "{:,.0f}"),
           ("stop", "stops at <END>", "{:.1%}"), ("regular", "regular (絕句/律詩)", "{:.1%}"),
           ("rhyme", "rhymes", "{:.1%}"), ("title_lift", "title lift (points)", "{:+.1f}"),
           ("plain_loss", "loss on plain poem text", "{:.3f}"))


def format_rows(rows, note=""):
    """rows: [(name, figures)] -> a text table, one column per row name."""
    width = max(len(n) for n, _ in rows) + 2
    lines = [f"{'':<26}" + "".join(f"{n:>{width}}" for n, _ in rows)]
    for key, label, fmt in COLUMNS:
        cells = [fmt.format(fig[key]) if fig.get(key) is not None else "—" for _, fig in rows]
        lines.append(f"{label:<26}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines + ([note] if note else []))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--merge", nargs=2, metavar=("RUN", "OUT"), help="fold a LoRA run's adapter into a full checkpoint")
    p.add_argument("--minutes", type=float, default=4.5, help="minutes of training for every row (the SFT default)")
    p.add_argument("--ranks", default="2,8", help="the LoRA ranks, comma-separated")
    p.add_argument("--init-from", default=os.path.join("runs", "pretrain"), help="the pretrained run every row starts from")
    p.add_argument("--out-dir", default=os.path.join("runs", "tuning"), help="a folder per row, and table.txt")
    p.add_argument("--corpus", default=None, help="the corpus every row trains on (default: the project's)")
    args = p.parse_args(argv)
    from minigpt.checkpoint import CheckpointError, checkpoint_path, load_checkpoint, save_checkpoint
    if args.merge:
        run, out = args.merge
        try:
            model, tokenizer, ckpt = load_checkpoint(run)
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        merge(model)
        os.makedirs(out, exist_ok=True)
        keep = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "adapter", "rng", "window")}
        save_checkpoint(os.path.join(out, "ckpt.pt"), {**keep, "model": model.state_dict()})
        print(f"merged {run} into {out}/ckpt.pt")
        return out
    try:
        ranks = [int(r) for r in args.ranks.split(",")]
        if args.minutes <= 0 or any(r <= 0 for r in ranks):
            raise ValueError
        base, tokenizer, _ = load_checkpoint(args.init_from)
    except ValueError:
        p.error(f"--minutes must be positive and --ranks positive whole numbers, got {args.minutes} and {args.ranks!r}")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from minigpt.data import DEFAULT_CORPUS, PretrainData, load_poems, split_poems
    corpus = args.corpus or DEFAULT_CORPUS
    splits = split_poems(load_poems(corpus))
    plain_val = PretrainData(splits, tokenizer).val_batches(40, 32, base.config.block_size)
    from minigpt.loss_eval import evaluate_loss
    rows = [("base (pretrained)", {"trainable": 0.0, "plain_loss": evaluate_loss(base, plain_val, "cpu"),
                                   "saved_kb": os.path.getsize(checkpoint_path(args.init_from)) / 1024})]
    outs = []
    for name, flags in rows_for(ranks):
        out = os.path.join(args.out_dir, "".join(c for c in name.lower() if c.isalnum()))  # "LoRA r8" -> lorar8
        outs.append((name, out))
        code, peak = run_row(flags, out, args.minutes, args.init_from, corpus)
        if code:
            print(f"error: {name} ended with exit code {code}; run its command above to see why", file=sys.stderr)
            raise SystemExit(code)
        model = load_checkpoint(out)[0]
        rows.append((name, {**row_figures(out, model, plain_val), "peak_mb": peak}))
        print(format_rows(rows), flush=True)
    table = format_rows(rows, f"(each row {args.minutes} minutes of train_sft.py from {args.init_from}; 200 test titles; "
                        "loss on plain poem text: the pretraining's val windows, lower is less forgotten; peak memory: "
                        "the run's whole process; saved file: adapter.pt, or ckpt.pt with its optimizer state for full SFT)")
    with open(os.path.join(args.out_dir, "table.txt"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    from minigpt.plot import plot_tuning
    plot_tuning([(name, os.path.join(out, "log.jsonl")) for name, out in outs], os.path.join(args.out_dir, "tuning.png"))
    print(table + f"\nsee {args.out_dir}/table.txt, tuning.png")
    return rows


if __name__ == "__main__":
    main()

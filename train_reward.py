"""Stage 4a: a reward model from rankings. The fine-tuned model writes K answers to each training title, the program
ranks them on named dimensions (stops, one regular poem, rhyme, mentions the title, no clause repeated, nothing
copied), and the fine-tuned GPT with a scalar head learns to score the better answer of every ranked pair higher.

    python train_reward.py                               # after python train_sft.py: about 8 minutes on 2 CPU cores
    python train_reward.py --rankings picks.jsonl        # a person's picks (the web page's ranking view) mixed in
    python train_reward.py --rankings picks.jsonl --titles 0 --overwrite   # a person's picks alone

The rankings are kept in rankings.jsonl (one line per title: the answers, each dimension's score, the rank), and the
held-out ones in val_rankings.jsonl: val titles that no training poem has. Every eval prints the ranking loss and
the pair accuracy on the held-out pairs; the last one adds the test titles' figures, per dimension, and on pairs of
kinds it never trained on (answers of the DPO model, a real poem against a model poem), and tracks.png.
"""
import dataclasses
import os
import random
import time
from dataclasses import asdict, dataclass

import torch

from minigpt import cli
from minigpt.checkpoint import CheckpointError, load_checkpoint, settings_of
from minigpt.data import CHAT_POEM, DEFAULT_CORPUS, TITLE_TO_POEM, load_poems, split_poems
from minigpt.evaluate import eval_set
from minigpt.metrics import Yardstick
from minigpt.plot import plot_losses, plot_reward_tracks
from minigpt.reward import DIMENSION_NAMES, DIMENSIONS, RankedPair, combined, load_rankings, make_rankings, rank_batch, \
    ranking_metrics, ranking_pairs, reward_loss, reward_model_from, save_rankings, score_answer, score_answers
from minigpt.sample import fine_tuned
from minigpt.train import TrainConfig, train
from minigpt.verse import MEANINGLESS_TITLES, clean_title


@dataclass
class RewardSettings:
    """What the reward stage adds to the training settings; kept whole in the checkpoint."""
    init_from: str = os.path.join("runs", "sft")  # the fine-tuned run: the answers' writer and the reward model's start
    k: int = 4  # answers ranked per title
    titles: int = 4000  # training titles the program ranks (0: a person's rankings alone)
    val_titles: int = 300  # held-out titles (no training poem has them), ranked the same way
    test_titles: int = 300  # for the final figures only
    rankings: str = None  # a rankings file of a person's, mixed in
    dpo: str = os.path.join("runs", "dpo")  # a model whose answers the reward model never trained on (if there)
    max_new_tokens: int = 100
    format: str = "ins"

    def __post_init__(self):
        for name in ("k", "val_titles", "test_titles", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.k < 2:
            raise ValueError("--k must be 2 or more: a ranking orders several answers")
        if self.titles < 0:
            raise ValueError("--titles must not be negative")
        if self.titles == 0 and not self.rankings:
            raise ValueError("--titles 0 leaves nothing to train on; pass --rankings FILE or more titles")


PRESETS = {
    "tiny": dict(batch_size=4, lr=1e-4, min_lr=1e-5, warmup_steps=2, max_steps=10, eval_every=5, sample_every=5,
                 eval_batches=1, log_every=5, dtype="float32", titles=8, val_titles=4, test_titles=4, k=3,
                 max_new_tokens=30),
    # about 3 minutes of writing and ranking, 3 of training
    "cpu": dict(batch_size=32, lr=3e-4, min_lr=3e-5, warmup_steps=10, max_steps=100000, max_minutes=3.0, eval_every=50,
                sample_every=100000, eval_batches=8, log_every=10, dtype="float32", titles=4000, val_titles=300,
                test_titles=300, k=4, max_new_tokens=100),
    "class": dict(batch_size=32, lr=3e-4, min_lr=3e-5, warmup_steps=10, max_steps=100000, max_minutes=1.5,
                  eval_every=50, sample_every=100000, eval_batches=8, log_every=10, dtype="float32", titles=600,
                  val_titles=150, test_titles=150, k=4, max_new_tokens=100),
    "gpu": dict(batch_size=64, lr=1e-4, min_lr=1e-5, warmup_steps=20, max_steps=100000, max_minutes=4.0,
                eval_every=100, sample_every=100000, eval_batches=16, log_every=25, dtype="float32", titles=10000,
                val_titles=1000, test_titles=1000, k=8, max_new_tokens=200),
}


def parse_args(argv):
    parser = cli.make_parser(__doc__, PRESETS, os.path.join("runs", "reward"), model_flags=())
    parser.add_argument("--init-from", default=os.path.join("runs", "sft"), help="the fine-tuned run: it writes the "
                        "answers to rank, and the reward model starts from its weights")
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help="the corpus the models were trained on")
    parser.add_argument("--rankings", help="a rankings file (one JSON line per title: title, answers, rank), e.g. "
                        "the web page's download, mixed with the program's")
    parser.add_argument("--titles", type=int, help="training titles the program ranks (0: --rankings alone)")
    parser.add_argument("--val-titles", type=int, help="held-out titles, no training poem has them")
    parser.add_argument("--test-titles", type=int, help="test titles, for the final figures only")
    parser.add_argument("--k", type=int, help="answers written and ranked per title")
    parser.add_argument("--dpo", default=os.path.join("runs", "dpo"), help="a run whose answers the reward model is "
                        "measured on at the end, never trained on (skipped if it is not there)")
    parser.add_argument("--max-new-tokens", type=int, help="longest answer")
    return parser.parse_args(argv)


def program_titles(poems, n, seed, leave_out=frozenset()):
    """n distinct meaningful titles of the poems, drawn with a seed (the corpus runs by period and poet)."""
    titles = sorted({clean_title(p.title) for p in poems} - MEANINGLESS_TITLES - set(leave_out))
    random.Random(seed).shuffle(titles)
    return titles[:n]


def start(args, settings):
    """(reward model, the fine-tuned writer, tokenizer, settings, resumed checkpoint or None)."""
    resumed = cli.resume_point(args)
    if resumed:
        model, tokenizer, ckpt = resumed
        settings = cli.resumed_settings(RewardSettings, ckpt, args.out_dir)
        writer, _, _ = load_checkpoint(settings.init_from, made_by="python train_sft.py")
        print(f"resuming {args.out_dir} at step {ckpt['step']}")
        return model, writer, tokenizer, settings, ckpt
    writer, tokenizer, ckpt = load_checkpoint(settings.init_from, made_by="python train_sft.py")
    if not fine_tuned(ckpt):
        raise CheckpointError(f"{settings.init_from} is a {ckpt.get('stage', 'pretraining')} checkpoint; the reward "
                              "model starts from a fine-tuned one: run python train_sft.py first")
    settings = dataclasses.replace(settings, init_from=os.path.abspath(settings.init_from),
                                   format=settings_of(ckpt).get("format", "ins"))
    return reward_model_from(writer), writer, tokenizer, settings, None


def the_rankings(writer, tokenizer, splits, yard, fmt, settings, seed, out_dir):
    """(training rankings, held-out rankings): the program's on training and val titles, and a person's file mixed
    into the training ones; written to out_dir."""
    given = []
    if settings.rankings:  # read first: a bad line stops the run before any answer is written
        given = load_rankings(settings.rankings, {clean_title(p.title) for ps in splits.values() for p in ps})
        print(f"{len(given)} rankings from {settings.rankings}")
    t = time.time()
    train_titles = {clean_title(p.title) for p in splits["train"]}
    ranked = make_rankings(writer, tokenizer, program_titles(splits["train"], settings.titles, seed), yard, fmt,
                           settings.k, settings.max_new_tokens, seed) if settings.titles else []
    ranked += given
    held = make_rankings(writer, tokenizer, program_titles(splits["val"], settings.val_titles, seed, train_titles),
                         yard, fmt, settings.k, settings.max_new_tokens, seed + 1)
    os.makedirs(out_dir, exist_ok=True)
    save_rankings(os.path.join(out_dir, "rankings.jsonl"), ranked)
    save_rankings(os.path.join(out_dir, "val_rankings.jsonl"), held)
    pairs, ties = ranking_pairs(ranked), sum(len(set(r.rank)) == 1 for r in ranked)
    print(f"rankings of {len(ranked)} titles ({settings.k} answers each) in {time.time() - t:.0f} s: {len(pairs)} "
          f"pairs ({len(ranked) * settings.k * (settings.k - 1) // 2} at most; ties give none), {ties} titles whose "
          f"answers all tie; {len(held)} held-out titles")
    r = next((r for r in ranked if len(set(r.rank)) > 1), ranked[0])
    print(f"a ranking [{r.title}]:\n" + "\n".join(
        f"  rank {k}: {a.replace(chr(10), ' / ')}" + (f"   {s}" if s else "")
        for k, a, s in sorted(zip(r.rank, r.answers, r.scores or [None] * len(r.answers)), key=lambda z: z[0])))
    return ranked, held


def main(argv=None):
    args = parse_args(argv)
    _, cfg, device, extra = cli.resolve(args, PRESETS)
    settings = cli.stage_settings(RewardSettings, args, extra)
    model, writer, tokenizer, settings, resumed = start(args, settings)
    if resumed:
        cfg = TrainConfig(**resumed["train_config"])
    fmt = CHAT_POEM if settings.format == "chat" else TITLE_TO_POEM
    splits = split_poems(load_poems(args.corpus))
    cli.check_vocabulary(tokenizer, splits["train"], settings.format == "chat", settings.init_from, args.corpus)
    yard, T = Yardstick(splits["train"]), model.config.block_size
    writer.to(device).eval().requires_grad_(False)
    if resumed:
        ranked = load_rankings(os.path.join(args.out_dir, "rankings.jsonl"))
        held = load_rankings(os.path.join(args.out_dir, "val_rankings.jsonl"))
    else:
        ranked, held = the_rankings(writer, tokenizer, splits, yard, fmt, settings, cfg.seed, args.out_dir)
    pairs, held_pairs = ranking_pairs(ranked), ranking_pairs(held)
    if not pairs:
        raise cli.UsageError("no pair to train on: every ranking is a tie; rank more titles (--titles) or more answers "
                             "(--k)")
    print(f"reward model from {settings.init_from}: {len(pairs)} ranked pairs, {len(held_pairs)} held out; dimensions: "
          + ", ".join(d.name for d in DIMENSIONS) + f"; writing to {args.out_dir}")
    extra_ckpt = {"stage": "reward", "model_config": model.config.__dict__.copy(), "tokenizer": tokenizer.to_list(),
                  "settings": asdict(settings)}

    def get_batch(gen):
        return rank_batch([pairs[i] for i in torch.randint(len(pairs), (cfg.batch_size,), generator=gen).tolist()],
                          tokenizer, T, fmt)

    measured = {}

    def val_loss(m):  # the loop's val loss: the ranking loss on the held-out pairs
        measured.update(ranking_metrics(m, held_pairs, tokenizer, fmt))
        return measured.get("reward_loss", float("nan"))

    result = train(model, cfg, get_batch, val_loss, args.out_dir, extra_ckpt, metrics=lambda m, step: dict(measured),
                   on_event=cli.print_event, device=device, resume_from=resumed, loss_fn=reward_loss)
    if not cli.is_lead():
        return result
    plot_losses(os.path.join(args.out_dir, "log.jsonl"), os.path.join(args.out_dir, "loss.png"), title="reward: loss")
    report = final_report(args.out_dir, model.to(device), writer, tokenizer, splits, yard, fmt, settings, cfg.seed)
    return {**result, **report}


def final_report(out_dir, model, writer, tokenizer, splits, yard, fmt, settings, seed):
    """The reward model on test titles: pair accuracy in all and per dimension; on pairs of kinds it never trained on;
    how its score tracks each check (tracks.png). Written to report.txt."""
    train_titles = {clean_title(p.title) for p in splits["train"]}
    test = make_rankings(writer, tokenizer, program_titles(splits["test"], settings.test_titles, seed, train_titles),
                         yard, fmt, settings.k, settings.max_new_tokens, seed + 2)
    m = ranking_metrics(model, ranking_pairs(test), tokenizer, fmt)
    lines = [f"reward model on {len(test)} test titles, {m['reward_pairs']} ranked pairs of the SFT model's answers: "
             f"pair accuracy {m['reward_accuracy']:.1%} (chance 50%)",
             "  by dimension, on the pairs whose two answers differ in it (the one that has it scored higher):"]
    lines += [f"    {d.name:<10} {m[f'reward_accuracy_{d.name}']:6.1%} of {m[f'reward_pairs_{d.name}']:5d}   ({d.what})"
              for d in DIMENSIONS if f"reward_accuracy_{d.name}" in m]
    out = {"test": m}
    if os.path.exists(os.path.join(settings.dpo, "ckpt.pt")):  # answers of a model it never read
        dpo, _, _ = load_checkpoint(settings.dpo)
        d = ranking_metrics(model, ranking_pairs(make_rankings(dpo.to(writer.device), tokenizer, [r.title for r in test],
                            yard, fmt, settings.k, settings.max_new_tokens, seed + 3)), tokenizer, fmt)
        out["dpo"] = d
        lines.append(f"  answers written by {settings.dpo} (never trained on): pair accuracy {d['reward_accuracy']:.1%} "
                     f"of {d['reward_pairs']}")
    real = real_against_model(model, writer, tokenizer, splits, yard, fmt, settings, seed)
    out["real"] = real
    lines.append(f"  a real test poem against the SFT model's answer to its title ({real['n']} titles): the real poem "
                 f"scored higher in {real['real_higher']:.1%}; where the program ranks them apart "
                 f"({real['ranked']}), the reward model agrees in {real['agrees']:.1%}")
    tracks = score_tracks(model, tokenizer, test, fmt)
    out["tracks"] = tracks
    lines.append("  mean score with / without each check (test answers): " + ", ".join(
        f"{n} {with_:+.2f} / {without:+.2f}" for n, (with_, without) in tracks["by_dimension"].items()))
    plot_reward_tracks(tracks, os.path.join(out_dir, "tracks.png"))
    cli.write_table(out_dir, "report.txt", "\n".join(lines))
    return out


def real_against_model(model, writer, tokenizer, splits, yard, fmt, settings, seed):
    """Real test poems against the SFT model's answer to the same title: a kind of pair no ranking held."""
    from minigpt.generate import Sampling, write
    evalset = eval_set(splits["test"], splits["train"], settings.test_titles)
    written = write(writer, tokenizer, [fmt.prompt(t) for t in evalset.titles], settings.max_new_tokens, fmt.end,
                    Sampling(seed=seed + 4))
    pairs = []
    for title, poem, a in zip(evalset.titles, evalset.poems, written):
        real, made = score_answer(poem, True, title, yard), score_answer(a.text, a.stopped, title, yard)
        pairs.append((RankedPair(title, poem, a.text, True, a.stopped, real, made), combined(real) - combined(made)))
    prompts = [fmt.prompt(p.title) for p, _ in pairs]
    r_real = score_answers(model, tokenizer, prompts, [p.better for p, _ in pairs], [True] * len(pairs), fmt)
    r_made = score_answers(model, tokenizer, prompts, [p.worse for p, _ in pairs], [p.worse_stopped for p, _ in pairs],
                           fmt)
    apart = [(r - s) * (1 if gap > 0 else -1) for (p, gap), r, s in zip(pairs, r_real.tolist(), r_made.tolist()) if gap]
    return {"n": len(pairs), "real_higher": (r_real > r_made).float().mean().item(), "ranked": len(apart),
            "agrees": sum(a > 0 for a in apart) / max(len(apart), 1)}


def score_tracks(model, tokenizer, rankings, fmt):
    """The reward model's score of every ranked answer beside the program's: per combined score, the scores; per
    dimension, the mean score of the answers that pass it and of those that do not."""
    rows = [(r.title, a, s, sc) for r in rankings for a, s, sc in zip(r.answers, r.stopped, r.scores)]
    scores = score_answers(model, tokenizer, [fmt.prompt(t) for t, *_ in rows], [a for _, a, _, _ in rows],
                           [s for _, _, s, _ in rows], fmt).tolist()
    by_dim = {}
    for n in DIMENSION_NAMES:
        yes = [x for x, (_, _, _, sc) in zip(scores, rows) if sc[n]]
        no = [x for x, (_, _, _, sc) in zip(scores, rows) if not sc[n]]
        by_dim[n] = (sum(yes) / max(len(yes), 1), sum(no) / max(len(no), 1))
    return {"combined": [combined(sc) for *_, sc in rows], "scores": scores, "by_dimension": by_dim}


if __name__ == "__main__":
    cli.run(main, None, "train_reward.py")

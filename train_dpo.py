"""Stage 3: preference tuning by DPO. Start from the fine-tuned checkpoint, let it answer training prompts, pair an
answer the checkers prefer (it rhymes) with one they do not, and train on the pairs.

    python train_dpo.py                       # after python train_sft.py; about 8.5 minutes on 2 CPU cores
    python train_dpo.py --preset class        # about 4 minutes, after python train_sft.py --preset class
    python train_dpo.py --prefer title        # another preference, the same algorithm: answers that name their title
    python train_dpo.py --init-from runs/dpo --out-dir runs/dpo2    # a second round: fresh pairs from the tuned model

The pairs are made once, up front, from the starting model (which is also the frozen reference) and kept in
pairs.json. A rhyme pair differs in one line ending: the model writes one answer, its later endings that break the
rhyme are mended with its own rhyming choices, and at an ending its own choices there give a character that keeps
the rhyme (chosen) and one that breaks it (rejected: another group, or an earlier ending's character again); the pair
counts only up to that ending. --pairs whole samples several answers per prompt and pairs two whole answers instead.
Every eval prints the DPO loss, the preference accuracy and the reward margin on held-out pairs (val titles no
training poem has), the answer val loss and the behaviour on val titles; test titles appear only in the final table.
"""
import dataclasses
import os
import random
import time
from dataclasses import asdict, dataclass

import torch

from minigpt import cli
from minigpt.checkpoint import CheckpointError, load_checkpoint, settings_of
from minigpt.data import DEFAULT_CORPUS, TITLE_TO_POEM, load_poems, split_poems
from minigpt.dpo import TRAIN_PAIRS_CHECKED, dpo_loss, fill_reference, margin_parts, margin_shares, pair_batch, \
    preference_metrics
from minigpt.evaluate import eval_set, format_table, loss_batches, measure, reference, table_note, val_sample, \
    write_answers
from minigpt.lora import Tuning, add_tuning_flags, adapter_meta, plain, prepare, save_adapter
from minigpt.metrics import PREFERENCES, Yardstick, mark
from minigpt.model import GPT
from minigpt.pairs import dpo_prompts, ending_pairs, load_pairs, make_pairs, save_pairs, title_pairs
from minigpt.plot import plot_losses, plot_preferences
from minigpt.sample import fine_tuned
from minigpt.tasks import CHAT, CHAT_POEM, parse_tasks, single_poem_task, task_data
from minigpt.train import TrainConfig, make_autocast, train
from minigpt.verse import clean_title

DEMO_TITLES = ["春夜喜雨", "靜夜思", "秋日登樓", "送友人"]


@dataclass
class DPOSettings(Tuning):
    """What preference tuning adds to the training settings (and Tuning's, how much of the model trains); kept whole
    in the checkpoint."""
    init_from: str = os.path.join("runs", "sft")  # the fine-tuned run: the start, the reference and the pairs' writer
    prefer: str = "rhyme"  # a key of PREFERENCES
    pairs: str = None  # ending or whole (None: ending for rhyme, whole for the others)
    hold: str = "none"  # a preference the pairs must not work against, or none
    beta: float = 0.1
    sft_weight: float = 1.0
    prompts: int = 3000
    val_prompts: int = 400
    samples: int = 8  # answers per prompt, for whole pairs
    pairs_per_prompt: int = 4
    eval_titles: int = 200
    test_titles: int = 2000
    max_new_tokens: int = 128
    tasks: str = "poem"  # the fine-tuned model's, which the prompts ask in its format: not flags
    format: str = "ins"

    def __post_init__(self):
        for name in ("prompts", "val_prompts", "samples", "eval_titles", "test_titles", "max_new_tokens", "beta",
                     "pairs_per_prompt"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.sft_weight < 0:
            raise ValueError("--sft-weight must not be negative")
        self.pairs = self.pairs or {"rhyme": "ending", "title": "char"}.get(self.prefer, "whole")
        if self.pairs == "ending" and self.prefer != "rhyme":
            raise ValueError(f"--pairs ending pairs rhyming line endings; for --prefer {self.prefer} pass --pairs whole")
        if self.pairs == "char" and self.prefer != "title":
            raise ValueError(f"--pairs char puts a title character in; for --prefer {self.prefer} pass --pairs whole")
        super().__post_init__()


PRESETS = {
    "tiny": dict(batch_size=4, lr=1e-4, min_lr=1e-5, warmup_steps=2, max_steps=10, eval_every=5, sample_every=5,
                 eval_batches=1, log_every=5, dtype="float32", prompts=8, val_prompts=8, samples=4, eval_titles=6,
                 test_titles=6, max_new_tokens=40, beta=0.1),
    # float32: the policy's log-probabilities are computed as the reference's were, so step 0 gives exactly log 2.
    # 400 val prompts (about 750 held-out pairs): on 200 the accuracy's standard error was 2 points, as much as the
    # seeds differed (docs/log.md)
    "cpu": dict(batch_size=16, lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100000, max_minutes=6.0, eval_every=50,
                sample_every=100, eval_batches=8, log_every=10, dtype="float32", prompts=1500, val_prompts=400,
                samples=8, eval_titles=200, test_titles=2000, max_new_tokens=128, beta=0.3),
    # the third stage of a lesson: fewer prompts, a shorter run, fewer test titles, so that it ends within 5 minutes.
    # Rhyme, as the full preset: the class model rhymes in about 45% of its regular answers since its pretraining makes
    # 1,600 steps in 5 minutes, and one round takes it to 65% (docs/teachers.md; before, at 880 steps and 13%, the
    # class preset preferred the title); lr 3e-4 (1e-3 cost 16 points of shape with title pairs)
    "class": dict(batch_size=16, lr=3e-4, min_lr=3e-5, warmup_steps=10, max_steps=100000,
                  max_minutes=2.5, eval_every=50, sample_every=100, eval_batches=8, log_every=10, dtype="float32", prompts=1000, val_prompts=200,
                  samples=8, eval_titles=100, test_titles=500, max_new_tokens=128, beta=0.3),
    # float32 here too: under bfloat16 the policy's log-probabilities at step 0 are not the reference's to the last bit
    "gpu": dict(batch_size=32, lr=5e-5, min_lr=5e-6, warmup_steps=20, max_steps=100000, max_minutes=5.0, eval_every=100,
                sample_every=100, eval_batches=16, log_every=25, dtype="float32", prompts=20000, val_prompts=1000, samples=16,
                eval_titles=500, test_titles=2000, max_new_tokens=256, beta=0.1),
}


def parse_args(argv):
    parser = cli.make_parser(__doc__, PRESETS, os.path.join("runs", "dpo"), model_flags=())
    parser.add_argument("--init-from", default=os.path.join("runs", "sft"), help="the fine-tuned run (or checkpoint) to "
                        "start from; it is also the frozen reference and writes the pairs")
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help="the corpus the models were trained on")
    parser.add_argument("--prefer", choices=sorted(PREFERENCES),
                        help="what makes an answer chosen (default: rhyme; title on the class preset): "
                        + "; ".join(f"{p.name}: {p.what}" for p in PREFERENCES.values()))
    parser.add_argument("--hold", choices=["none"] + sorted(PREFERENCES), default="none",
                        help="what the pairs must not work against: an answer that has it is never rejected for one "
                        "that lacks it (e.g. --hold title: rhyme is not paid for in relevance)")
    parser.add_argument("--pairs", choices=["ending", "char", "whole"], help="ending (the default for --prefer "
                        "rhyme): one answer per prompt, and at a line ending the model's own choice that keeps the rhyme "
                        "against one that breaks it, the rest shared; char (the default for --prefer title): one "
                        "answer without its title's characters against the same answer with one put in where the model "
                        "itself would put it; whole: several answers per prompt, a passing one against a failing one")
    parser.add_argument("--beta", type=float, help="the implicit reward is beta * (log pi - log ref): the larger, the "
                        "less the policy needs to move to separate a pair")
    parser.add_argument("--sft-weight", type=float, default=1.0, help="weight of the SFT loss on real training poems "
                        "added to the DPO loss, which holds the model to the poems it was tuned on; 0: DPO alone")
    parser.add_argument("--prompts", type=int, help="training prompts to answer")
    parser.add_argument("--val-prompts", type=int, help="val prompts whose pairs are held out to measure the preference")
    parser.add_argument("--samples", type=int, help="answers sampled per prompt (--pairs whole)")
    parser.add_argument("--pairs-per-prompt", type=int, default=4, help="at most this many pairs from one prompt")
    parser.add_argument("--eval-titles", type=int, help="val titles measured at every eval")
    parser.add_argument("--test-titles", type=int, help="test titles in the final table (at most every one the split has: "
                        "the relevance lift of 200 titles moves by about 4.5 points from chance alone)")
    parser.add_argument("--max-new-tokens", type=int, help="longest answer when sampling and measuring")
    add_tuning_flags(parser)
    return parser.parse_args(argv)


def start(args, settings):
    """(model to train, reference, tokenizer, the reference's checkpoint, settings, the resumed checkpoint or None)."""
    resumed = cli.resume_point(args)
    if resumed:  # the run goes on with its own settings and its own pairs
        model, tokenizer, ckpt = resumed
        settings = cli.resumed_settings(DPOSettings, ckpt, args.out_dir)
        ref, _, ref_ckpt = load_checkpoint(settings.init_from, made_by="python train_sft.py")
        print(f"resuming {args.out_dir} at step {ckpt['step']}")
        return model, ref, tokenizer, ref_ckpt, settings, ckpt
    ref, tokenizer, ref_ckpt = load_checkpoint(settings.init_from, made_by="python train_sft.py")
    if not fine_tuned(ref_ckpt):
        raise CheckpointError(f"{settings.init_from} is a {ref_ckpt.get('stage', 'pretraining')} checkpoint; DPO starts "
                              "from a fine-tuned one: run python train_sft.py first, or pass --init-from runs/sft")
    # no dropout: at step 0 the policy must be the reference exactly (log-probabilities equal, the loss log 2), and the
    # reference is measured without it
    model = GPT(dataclasses.replace(ref.config, dropout=0.0))
    model.load_state_dict(plain(ref).state_dict())  # an SFT adapter starts the policy merged
    settings = dataclasses.replace(settings, init_from=os.path.abspath(settings.init_from),
                                   tasks=settings_of(ref_ckpt).get("tasks", "poem"),
                                   format=settings_of(ref_ckpt).get("format", "ins"))
    # LoRA or one part alone: the rest frozen
    cli.parse_or_usage(lambda tuning: prepare(model, tuning), settings.tuning(tokenizer))
    return model, ref, tokenizer, ref_ckpt, settings, None


def make_all_pairs(ref, tokenizer, splits, tasks, yard, fmt, settings, seed, out_dir, dtype="float32"):
    """The training and held-out pairs, made once from the reference (the policy at step 0: on-policy there), with
    the reference's log-probabilities filled in, saved in out_dir. Returns (pairs, counts, val_pairs)."""
    t = time.time()
    prefer, hold = PREFERENCES[settings.prefer], None if settings.hold == "none" else PREFERENCES[settings.hold]

    def make(exs, seed, per_prompt):
        kw = dict(fmt=fmt, max_new_tokens=settings.max_new_tokens, hold=hold, seed=seed, per_prompt=per_prompt)
        if settings.pairs in ("ending", "char"):
            return (ending_pairs if settings.pairs == "ending" else title_pairs)(ref, tokenizer, exs, yard, **kw)
        return make_pairs(ref, tokenizer, exs, yard, prefer, samples=settings.samples, **kw)

    prompts = dpo_prompts(splits["train"], tasks, yard.rhyme_groups, fmt)
    random.Random(seed).shuffle(prompts)  # titles from the whole corpus, not the first poets alone
    pairs, counts = make(prompts[:settings.prompts], seed, settings.pairs_per_prompt)
    train_titles = {clean_title(p.title) for p in splits["train"]}  # held out: no title a training poem has
    val_prompts = dpo_prompts(splits["val"], tasks, yard.rhyme_groups, fmt, leave_out=train_titles)
    random.Random(seed).shuffle(val_prompts)
    # held out like the training pairs: ending pairs several to an answer, at its several endings; whole pairs one
    # to a prompt, whose several answers are alike and would be counted several times
    val_pairs, val_counts = make(val_prompts[:settings.val_prompts], seed + 1,
                                 settings.pairs_per_prompt if settings.pairs != "whole" else 1)
    # beside one-character pairs, pairs of whole answers to the same held-out prompts: measured, never trained on
    whole = [] if settings.pairs == "whole" else make_pairs(
        ref, tokenizer, val_prompts[:settings.val_prompts], yard, prefer, fmt=fmt, samples=settings.samples,
        per_prompt=1, max_new_tokens=settings.max_new_tokens, hold=hold, seed=seed + 2)[0]
    if not pairs or not val_pairs:
        raise cli.UsageError(f"no pair: among {counts['samples']} answers none was {prefer.name} and passed the gates "
                             "(or none failed); sample more with --prompts" +
                             (" and --samples" if settings.pairs == "whole" else ""))
    for ps in (pairs, val_pairs, whole):  # in the training steps' precision, so that a --dtype bfloat16 run starts near log 2
        fill_reference(ref, ps, tokenizer, fmt, autocast=make_autocast(dtype, ref.device.type))
    os.makedirs(out_dir, exist_ok=True)
    save_pairs(os.path.join(out_dir, "pairs.json"), pairs, counts)
    save_pairs(os.path.join(out_dir, "val_pairs.json"), val_pairs, val_counts)
    save_pairs(os.path.join(out_dir, "val_whole_pairs.json"), whole, {})
    say_pairs(pairs, counts, val_pairs, val_counts, whole, prefer, time.time() - t)
    return pairs, counts, val_pairs, whole


def rare_start(prefer, rates, chance):
    """One line when the start shows what is preferred hardly more often than chance (within 5 points), else None:
    DPO reweights what the model already writes, so one round moves little from there. rates: the start's measure()
    on val titles; chance: {metric key: the rate by chance}."""
    rows = [(m, rates[m.key], chance[m.key]) for m in prefer.metrics if m.key in chance and rates[m.key] is not None]
    low = [(m, have, by_chance) for m, have, by_chance in rows if have - by_chance < 0.05]
    if not low:
        return None
    m, have, by_chance = low[0]
    return (f"note: at the start, {m.label}: {have:.1%} on val titles, {by_chance:.1%} by chance; DPO makes likelier "
            "what the model already writes, so one round moves little from here (docs/dpo.md)"
            + ("; --prefer title teaches from a model that names its title now and then" * (prefer.name != "title")))


def say_pairs(pairs, counts, val_pairs, val_counts, whole, prefer, seconds):
    """What pair making gave, and one pair."""
    print(f"pairs from {counts['samples']} answers to {counts['prompts']} train prompts in {seconds:.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("samples", "prompts")))
    print(f"held-out pairs from {val_counts['prompts']} val prompts: {len(val_pairs)}"
          + (f"; of whole answers, measured only: {len(whole)}" if whole else ""))
    print(f"a pair ({prefer.name}):\n{pairs[0].prompt}\n  chosen:   {pairs[0].chosen}\n  rejected: {pairs[0].rejected}"
          f"   ({pairs[0].why_rejected})")


def main(argv=None):
    args = parse_args(argv)
    _, cfg, device, extra = cli.resolve(args, PRESETS)
    settings = cli.stage_settings(DPOSettings, args, extra)
    model, ref, tokenizer, ref_ckpt, settings, resumed = start(args, settings)
    if resumed:
        cfg = TrainConfig(**resumed["train_config"])
    chat = settings.format == "chat"
    fmt, poem_fmt = (CHAT, CHAT_POEM) if chat else (TITLE_TO_POEM, TITLE_TO_POEM)
    tasks = parse_tasks(settings.tasks)
    splits = split_poems(load_poems(args.corpus))
    cli.check_vocabulary(tokenizer, splits["train"], chat, settings.init_from, args.corpus)
    prefer, yard, T = PREFERENCES[settings.prefer], Yardstick(splits["train"]), model.config.block_size
    ref.to(device).eval().requires_grad_(False)
    if resumed:
        pairs, counts = load_pairs(os.path.join(args.out_dir, "pairs.json"))
        val_pairs, _ = load_pairs(os.path.join(args.out_dir, "val_pairs.json"))
        path = os.path.join(args.out_dir, "val_whole_pairs.json")
        whole = load_pairs(path)[0] if os.path.exists(path) else []
    else:
        pairs, counts, val_pairs, whole = make_all_pairs(ref, tokenizer, splits, tasks, yard, fmt, settings, cfg.seed, args.out_dir,
                                                  cfg.dtype)

    val_batches = [pair_batch(val_pairs[i:i + 64], tokenizer, fmt) for i in range(0, len(val_pairs), 64)]
    val = loss_batches(tokenizer, val_sample(splits["val"], tokenizer, T, n=cfg.eval_batches * cfg.batch_size, fmt=poem_fmt), poem_fmt,
                       batch_size=cfg.batch_size)  # the loop's val loss: the real val poems' answer tokens
    val_set = eval_set(splits["val"], splits["train"], settings.eval_titles)
    held = "" if settings.hold == "none" else f"; never against: {settings.hold}"
    print(f"from {settings.init_from} (step {ref_ckpt['step']}): {len(pairs)} pairs, {len(val_pairs)} held out; "
          f"preferred: {prefer.what}{held}; {settings.pairs} pairs; beta {settings.beta}, SFT weight "
          f"{settings.sft_weight}; writing to {args.out_dir}")

    def sample(m, step):
        answers = write_answers(m, tokenizer, DEMO_TITLES, poem_fmt, max_new_tokens=settings.max_new_tokens)
        return {"samples": [{"title": t, "answer": a, "stopped": s,
                             "shown": f"[{t}]{'' if s else ' (no end marker)'}\n{mark(a, t, yard, prefer)}"}
                            for t, (a, s) in zip(DEMO_TITLES, answers)]}

    chance = {"rhyme_rate": yard.calibrate(splits["val"])[1]}  # line endings shuffled across real poems

    def metrics(m, step):
        out = measure(m, tokenizer, val_set.titles, yard, poem_fmt, val=val, max_new_tokens=settings.max_new_tokens)
        note = rare_start(prefer, out, {**chance, "relevance": out["relevance_shuffled"]}) if step == 0 else None
        if note:
            print(note)
        return {**out, **preference_metrics(m, val_batches, settings.beta)}

    extra_ckpt = {"stage": "dpo", "model_config": model.config.__dict__.copy(), "tokenizer": tokenizer.to_list(),
                  "settings": asdict(settings)}
    if settings.partial:  # the checkpoint holds only what trains; it names its base, the reference
        extra_ckpt["adapter"] = adapter_meta(plain(ref), settings.init_from, settings.tuning(tokenizer))
        print(settings.describe(model, extra_ckpt["adapter"]["tuning"]["token_rows"]))
    real = task_data(splits["train"], tokenizer, T, (single_poem_task("regular"),), yard.rhyme_groups, fmt) \
        if settings.sft_weight else None

    def get_batch(gen):  # pairs, and as many real training poems when the SFT loss is added
        batch = pair_batch([pairs[i] for i in torch.randint(len(pairs), (cfg.batch_size,), generator=gen).tolist()],
                           tokenizer, fmt)
        return batch._replace(**dict(zip(("real_x", "real_y"), real.get_batch(cfg.batch_size, tokenizer.pad_id, gen)))) \
            if real else batch

    result = train(model, cfg, get_batch, val["poem"], args.out_dir, extra_ckpt, sample=sample, metrics=metrics,
                   on_event=cli.print_event, device=device, resume_from=resumed,
                   loss_fn=lambda m, batch: dpo_loss(m, batch, settings.beta, settings.sft_weight))
    if not cli.is_lead():
        return result
    if settings.partial:
        size = save_adapter(args.out_dir, model, extra_ckpt, result["step"])
        print(f"adapter: {args.out_dir}/adapter.pt, {size / 1024:,.0f} KB; it loads on {settings.init_from}")
    columns = final_table(args.out_dir, model.to(device), ref, ref_ckpt, tokenizer, splits, yard, settings, fmt, poem_fmt,
                          val, pairs, counts, val_pairs, whole, result)
    return {**result, "columns": columns}


def final_table(out_dir, model, ref, ref_ckpt, tokenizer, splits, yard, settings, fmt, poem_fmt, val, pairs, counts,
                val_pairs, whole, result):
    """The table on test titles (the only place test titles are used), where the margins come from, the pictures and
    the last line, each naming the preferred figure."""
    prefer = PREFERENCES[settings.prefer]
    log = os.path.join(out_dir, "log.jsonl")
    plot_losses(log, os.path.join(out_dir, "loss.png"), title="dpo: loss")
    start = "SFT" if ref_ckpt.get("stage") == "sft" else "earlier DPO"  # a next round starts from a DPO model
    test_set = eval_set(splits["test"], splits["train"], settings.test_titles)
    columns = [("real poems", reference(yard, test_set))] + [
        (name, measure(m, tokenizer, test_set.titles, yard, poem_fmt, val, settings.max_new_tokens))
        for name, m in ((f"{start} (reference)", ref), (f"DPO ({prefer.name})", model))]
    first = pairs[:TRAIN_PAIRS_CHECKED]
    checked = ((f"{len(val_pairs)} held-out val pairs", val_pairs), (f"{len(first)} training pairs", first)) + \
        ((f"{len(whole)} held-out pairs of whole answers", whole),) * bool(whole)
    shares = [(name, margin_shares(margin_parts(model, ref, ps, tokenizer, yard, prefer, fmt))) for name, ps in checked]
    table = format_table(columns, table_note(test_set, yard, splits) + f" Pairs: {len(pairs)} from {counts['prompts']} "
                         f"train prompts; preference accuracy on {len(val_pairs)} held-out val pairs "
                         f"{result['pref_accuracy']:.1%}. Where the margin comes from, share of pairs whose chosen answer "
                         f"gained more log-ratio than the rejected one, in all / at {prefer.where} alone / elsewhere: "
                         + "; ".join(f"{name} {s['all']:.1%} / {s['at']:.1%} / {s['elsewhere']:.1%}" for name, s in shares)
                         + f". A preference learnt shows at {prefer.where} of pairs never trained on; a margin made "
                         "elsewhere on the training pairs alone is the chosen answers remembered.")
    cli.write_table(out_dir, "table.txt", table)
    plot_preferences(log, os.path.join(out_dir, "preference.png"), [m.key for m in prefer.metrics])
    before, after = columns[1][1], columns[2][1]
    moved = ", ".join(f"{m.console or m.label} {m.brief(before[m.key])} -> {m.brief(after[m.key])}"
                      for m in prefer.metrics)
    print(f"done: step {result['step']}, {result['elapsed_s']:.0f} s; on test titles, {start} -> DPO: {moved}, regular "
          f"{before['regular_rate']:.0%} -> {after['regular_rate']:.0%}, stop {before['stop_rate']:.0%} -> "
          f"{after['stop_rate']:.0%}; see {out_dir}/table.txt, preference.png")
    return columns


if __name__ == "__main__":
    cli.run(main, None, "train_dpo.py")

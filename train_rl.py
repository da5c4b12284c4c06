"""Stage 4b: reinforcement learning against a reward, held near the fine-tuned model by a KL penalty (minigpt.rl).
The policy starts as the SFT model, writes groups of answers to training titles, and PPO's clipped objective raises
the answers that scored above their group; the reward is the reward model of train_reward.py or the program's score.

    python train_rl.py                          # after python train_reward.py: about 9.5 minutes on 2 CPU cores
    python train_rl.py --reward program         # the program's combined score as the reward, no reward model
    python train_rl.py --kl-coef 0.05 --out-dir runs/rl_kl005   # a looser leash
    python train_rl.py --kl-coef 0 --max-minutes 16 --out-dir runs/rl_nokl   # no leash: what the policy finds

Every eval prints the mean reward, the program's score and checks on val titles, the KL to the SFT model and the
entropy; the last one writes the test titles' table (table.txt) and rl.png.
"""
import dataclasses
import os
from dataclasses import asdict, dataclass

from minigpt import cli
from minigpt.checkpoint import CheckpointError, load_checkpoint, settings_of
from minigpt.data import CHAT_POEM, DEFAULT_CORPUS, TITLE_TO_POEM, load_poems, split_poems
from minigpt.evaluate import eval_set, format_table, loss_batches, measure, reference, table_note, val_sample
from minigpt.lora import Tuning, add_tuning_flags, adapter_meta, plain, prepare, save_adapter
from minigpt.metrics import BY_KEY, METRICS, RL_METRICS, Yardstick
from minigpt.model import GPT
from minigpt.plot import plot_losses, plot_rl
from minigpt.reward import RewardModel
from minigpt.rl import Rollouts, drift, model_reward, ppo_loss, program_reward
from minigpt.sample import fine_tuned
from minigpt.train import TrainConfig, train
from minigpt.verse import MEANINGLESS_TITLES, clean_title
from train_dpo import DEMO_TITLES


@dataclass
class RLSettings(Tuning):
    """What the RL stage adds to the training settings (and Tuning's, how much of the model trains); kept whole in the
    checkpoint."""
    init_from: str = os.path.join("runs", "sft")  # the fine-tuned run: the policy's start and the frozen reference
    reward: str = "model"  # model: the reward model's score; program: the program's combined score
    reward_from: str = os.path.join("runs", "reward")  # the reward model (--reward model)
    titles: int = 16  # training titles per collection
    group: int = 4  # answers per title: the group each advantage is taken within
    epochs: int = 2  # PPO steps on each collection (the first one on-policy)
    clip: float = 0.2  # PPO's clip on the ratio
    kl_coef: float = 0.2  # the leash: weight of KL(policy || SFT) per answer token (0.2 against 0.05: docs/rlhf.md)
    eval_titles: int = 100  # val titles measured at every eval
    test_titles: int = 300  # for the final table only
    max_new_tokens: int = 100
    format: str = "ins"

    def __post_init__(self):
        if self.reward not in ("model", "program"):
            raise ValueError(f"--reward must be model or program, got {self.reward!r}")
        for name in ("titles", "epochs", "eval_titles", "test_titles", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.group < 2:
            raise ValueError(f"--group must be 2 or more: an advantage compares an answer with its group, got {self.group}")
        if self.kl_coef < 0 or not 0 < self.clip < 1:
            raise ValueError("--kl-coef must not be negative and --clip must lie between 0 and 1")
        super().__post_init__()


PRESETS = {
    "tiny": dict(batch_size=8, lr=1e-4, min_lr=1e-5, warmup_steps=0, max_steps=6, eval_every=3, sample_every=3,
                 eval_batches=1, log_every=3, dtype="float32", titles=2, group=4, eval_titles=4, test_titles=4,
                 max_new_tokens=30),
    "cpu": dict(batch_size=64, lr=1e-4, min_lr=1e-5, warmup_steps=5, max_steps=100000, max_minutes=8.0, eval_every=40,
                sample_every=80, eval_batches=8, log_every=10, dtype="float32", titles=16, group=4),
    "class": dict(batch_size=64, lr=1e-4, min_lr=1e-5, warmup_steps=5, max_steps=100000, max_minutes=3.5,
                  eval_every=40, sample_every=80, eval_batches=8, log_every=10, dtype="float32", titles=16, group=4,
                  eval_titles=60, test_titles=150),
    "gpu": dict(batch_size=256, lr=5e-5, min_lr=5e-6, warmup_steps=10, max_steps=100000, max_minutes=8.0,
                eval_every=50, sample_every=100, eval_batches=16, log_every=10, dtype="float32", titles=32, group=8,
                eval_titles=300, test_titles=1000, max_new_tokens=200),
}


def parse_args(argv):
    parser = cli.make_parser(__doc__, PRESETS, os.path.join("runs", "rl"), model_flags=())
    parser.add_argument("--init-from", default=os.path.join("runs", "sft"), help="the fine-tuned run: the policy starts "
                        "from it and it stays frozen as the reference the KL is measured against")
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help="the corpus the models were trained on")
    parser.add_argument("--reward", choices=("model", "program"), help="model: the reward model's score (default); "
                        "program: the program's combined score of the answer's checks")
    parser.add_argument("--reward-from", default=os.path.join("runs", "reward"), help="the reward model's run")
    parser.add_argument("--titles", type=int, help="training titles per collection")
    parser.add_argument("--group", type=int, help="answers written to each title; advantages are taken in the group")
    parser.add_argument("--epochs", type=int, help="PPO steps on each collection")
    parser.add_argument("--clip", type=float, help="PPO's clip on the probability ratio (0.2)")
    parser.add_argument("--kl-coef", type=float, help="weight of the KL penalty to the SFT model (0: no leash)")
    parser.add_argument("--eval-titles", type=int, help="val titles measured at every eval")
    parser.add_argument("--test-titles", type=int, help="test titles of the final table")
    parser.add_argument("--max-new-tokens", type=int, help="longest answer")
    add_tuning_flags(parser)
    return parser.parse_args(argv)


def start(args, settings):
    """(policy, reference, tokenizer, settings, the resumed checkpoint or None)."""
    resumed = cli.resume_point(args)
    if resumed:
        model, tokenizer, ckpt = resumed
        settings = cli.resumed_settings(RLSettings, ckpt, args.out_dir)
        ref, _, _ = load_checkpoint(settings.init_from, made_by="python train_sft.py")
        print(f"resuming {args.out_dir} at step {ckpt['step']}")
        return model, ref, tokenizer, settings, ckpt
    ref, tokenizer, ckpt = load_checkpoint(settings.init_from, made_by="python train_sft.py")
    if not fine_tuned(ckpt) or isinstance(ref, RewardModel):
        raise CheckpointError(f"{settings.init_from} is a {ckpt.get('stage', 'pretraining')} checkpoint; RL starts from "
                              "a fine-tuned one: run python train_sft.py first, or pass --init-from runs/sft")
    # no dropout: the first PPO step on a collection must see the policy that wrote it (ratio 1)
    model = GPT(dataclasses.replace(ref.config, dropout=0.0))
    model.load_state_dict(plain(ref).state_dict())  # an SFT adapter starts the policy merged
    settings = dataclasses.replace(settings, init_from=os.path.abspath(settings.init_from),
                                   reward_from=os.path.abspath(settings.reward_from),
                                   format=settings_of(ckpt).get("format", "ins"))
    # LoRA or one part alone: the rest frozen
    cli.parse_or_usage(lambda tuning: prepare(model, tuning), settings.tuning(tokenizer))
    return model, ref, tokenizer, settings, None


def the_reward(settings, tokenizer, yard, fmt, device):
    """(titles, answers, stopped) -> rewards (N,), and its name."""
    if settings.reward == "program":
        return program_reward(yard), "the program's combined score"
    rm, rm_tokenizer, ckpt = load_checkpoint(settings.reward_from, made_by="python train_reward.py")
    if not isinstance(rm, RewardModel):
        raise CheckpointError(f"{settings.reward_from} is a {ckpt.get('stage', 'pretraining')} checkpoint, not a reward "
                              "model: run python train_reward.py first, or pass --reward program")
    if rm_tokenizer.to_list() != tokenizer.to_list():
        raise CheckpointError(f"{settings.reward_from} reads another vocabulary than {settings.init_from}: train the "
                              "reward model from the same SFT run (python train_reward.py --init-from ...)")
    rm.to(device).eval().requires_grad_(False)
    return model_reward(rm, tokenizer, fmt), f"the reward model of {settings.reward_from} (step {ckpt['step']})"


def main(argv=None):
    args = parse_args(argv)
    _, cfg, device, extra = cli.resolve(args, PRESETS)
    settings = cli.stage_settings(RLSettings, args, extra)
    model, ref, tokenizer, settings, resumed = start(args, settings)
    if resumed:
        cfg = TrainConfig(**resumed["train_config"])
    fmt = CHAT_POEM if settings.format == "chat" else TITLE_TO_POEM
    splits = split_poems(load_poems(args.corpus))
    cli.check_vocabulary(tokenizer, splits["train"], settings.format == "chat", settings.init_from, args.corpus)
    yard, T = Yardstick(splits["train"]), model.config.block_size
    ref.to(device).eval().requires_grad_(False)
    model.to(device)
    reward, reward_name = the_reward(settings, tokenizer, yard, fmt, device)
    if cfg.batch_size != settings.titles * settings.group:
        cfg = dataclasses.replace(cfg, batch_size=settings.titles * settings.group)  # one collection is one batch
    train_titles = sorted({clean_title(p.title) for p in splits["train"]} - MEANINGLESS_TITLES)
    rollouts = Rollouts(model, ref, reward, tokenizer, train_titles, settings.titles, settings.group, settings.epochs,
                        fmt, settings.max_new_tokens)
    val = loss_batches(tokenizer, val_sample(splits["val"], tokenizer, T, n=cfg.eval_batches * 32, fmt=fmt), fmt)
    val_set = eval_set(splits["val"], splits["train"], settings.eval_titles)
    check = program_reward(yard)
    print(f"RL from {settings.init_from}: reward {reward_name}; {settings.titles} titles x {settings.group} answers per "
          f"collection, {settings.epochs} PPO steps on each, clip {settings.clip}, KL coefficient {settings.kl_coef}; "
          f"writing to {args.out_dir}")

    def metrics(m, step):
        kl, entropy, written = drift(m, ref, tokenizer, val_set.titles, fmt, settings.max_new_tokens, seed=cfg.seed)
        answers, stopped = [a.text for a in written], [a.stopped for a in written]
        return {**measure(m, tokenizer, val_set.titles, yard, fmt, val=val, max_new_tokens=settings.max_new_tokens),
                "mean_reward": reward(val_set.titles, answers, stopped).mean().item(),
                "program_score": check(val_set.titles, answers, stopped).mean().item(),
                "train_reward": rollouts.mean_reward_since(), "kl_to_ref": kl, "entropy": entropy}

    def sample(m, step):
        written = measure(m, tokenizer, DEMO_TITLES, yard, fmt, max_new_tokens=settings.max_new_tokens)["examples"]
        return {"samples": [{**w, "shown": f"[{w['title']}]{'' if w['stopped'] else ' (no end marker)'}\n{w['answer']}"}
                            for w in written]}

    extra_ckpt = {"stage": "rl", "model_config": model.config.__dict__.copy(), "tokenizer": tokenizer.to_list(),
                  "settings": asdict(settings)}
    if settings.partial:  # the checkpoint holds only what trains; it names its base, the reference
        extra_ckpt["adapter"] = adapter_meta(plain(ref), settings.init_from, settings.tuning(tokenizer))
        print(settings.describe(model, extra_ckpt["adapter"]["tuning"]["token_rows"]))
    result = train(model, cfg, rollouts, val["poem"], args.out_dir, extra_ckpt, sample=sample, metrics=metrics,
                   on_event=cli.print_event, device=device, resume_from=resumed,
                   loss_fn=lambda m, batch: ppo_loss(m, batch, settings.clip, settings.kl_coef))
    if not cli.is_lead():
        return result
    if settings.partial:
        size = save_adapter(args.out_dir, model, extra_ckpt, result["step"])
        print(f"adapter: {args.out_dir}/adapter.pt, {size / 1024:,.0f} KB; it loads on {settings.init_from}")
    columns = final_table(args.out_dir, model, ref, tokenizer, splits, yard, fmt, settings, reward, val, result)
    return {**result, "columns": columns}


def final_table(out_dir, model, ref, tokenizer, splits, yard, fmt, settings, reward, val, result):
    """Real poems, the SFT model and the RL model on test titles (the only place they are used): the program's
    checks, the mean reward, the program's score and the KL from the SFT model; loss.png and rl.png."""
    log = os.path.join(out_dir, "log.jsonl")
    plot_losses(log, os.path.join(out_dir, "loss.png"), title="rl: loss")
    plot_rl(log, os.path.join(out_dir, "rl.png"))
    test_set = eval_set(splits["test"], splits["train"], settings.test_titles)
    check = program_reward(yard)
    real = {**reference(yard, test_set), "program_score": check(test_set.titles, test_set.poems,
                                                                [True] * len(test_set.poems)).mean().item()}
    columns = [("real poems", real)]
    for name, m in (("SFT (reference)", ref), (f"RL ({settings.reward})", model)):
        kl, entropy, written = drift(m, ref, tokenizer, test_set.titles, fmt, settings.max_new_tokens, seed=1)
        answers, stopped = [a.text for a in written], [a.stopped for a in written]
        columns.append((name, {**measure(m, tokenizer, test_set.titles, yard, fmt, val, settings.max_new_tokens),
                               # the program's reward is the program's score, the row below
                               "mean_reward": reward(test_set.titles, answers, stopped).mean().item()
                               if settings.reward == "model" else None,
                               "program_score": check(test_set.titles, answers, stopped).mean().item(),
                               "kl_to_ref": kl, "entropy": entropy}))
    columns[-1][1]["minutes"] = result["elapsed_s"] / 60
    table = format_table(columns, table_note(test_set, yard, splits) + " Reward, program's score, KL and entropy are "
                         "read on answers sampled at temperature 1 (the policy's own distribution); the other rows on "
                         "the evaluation's sampling.", METRICS + RL_METRICS)
    cli.write_table(out_dir, "table.txt", table)
    before, after = columns[1][1], columns[2][1]
    keys = ("mean_reward",) * (settings.reward == "model") + ("program_score", "rhyme_rate", "regular_rate", "stop_rate")
    moved = ", ".join(f"{BY_KEY[k].console or BY_KEY[k].label} {BY_KEY[k].brief(before[k])} -> {BY_KEY[k].brief(after[k])}"
                      for k in keys)
    print(f"done: step {result['step']}, {result['elapsed_s']:.0f} s; on test titles, SFT -> RL: {moved}, KL "
          f"{after['kl_to_ref']:.2f} nats per answer; see {out_dir}/table.txt, rl.png")
    return columns


if __name__ == "__main__":
    cli.run(main, None, "train_rl.py")

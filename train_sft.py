"""Stage 2: instruction tuning. Start from the pretrained checkpoint, fine-tune on
<INS>請用以下題目寫一首詩<INP>{title}<RES>{poem}<END>, and measure how the answers change.

    python train_sft.py                       # after python train_pretrain.py; about 5 minutes on 2 CPU cores
    python train_sft.py --preset class        # 4 minutes, after python train_pretrain.py --preset class
    python train_sft.py --train-on-prompt     # also train on the prompt, to compare the loss curves
    python train_sft.py --tasks all --format chat   # every task, roles: about 17 minutes, into runs/sft_chat

Every few steps it prints, for the same titles, what the model answers and whether it stopped at <END>, and the
behaviour on val titles; test titles appear only in the final table.
"""
import dataclasses
import json
import os
from dataclasses import asdict, dataclass

from minigpt import cli
from minigpt.checkpoint import checkpoint_path, grow_vocab, load_checkpoint
from minigpt.data import DEFAULT_CORPUS, TITLE_TO_POEM, load_poems, split_poems
from minigpt.evaluate import compare, eval_set, format_table, loss_batches, measure, table_note, val_sample, write_answers
from minigpt.generate import write
from minigpt.lora import Tuning, add_tuning_flags, adapter_meta, prepare, save_adapter
from minigpt.metrics import Yardstick
from minigpt.model import GPT, GPTConfig
from minigpt.plot import plot_behaviour, plot_losses, plot_refusal, plot_tasks
from minigpt.tasks import (BY_NAME, CHAT, CHAT_POEM, REFUSAL_VIEW, SINGLE_POEM_DATA, TABLE_NOTE, eval_examples,
                           every_eval_examples, format_task_table, format_turns, measure_tasks, parse_tasks,
                           persona_over_turns, prompt_text, refusal_line, single_poem_task, task_columns, task_data)
from minigpt.train import TrainConfig, train

DEMO_TITLES = ["春夜喜雨", "靜夜思"]  # plus the first two val titles


@dataclass
class SFTSettings(Tuning):
    """What instruction tuning adds to the training settings (and Tuning's, how much of the model trains); kept whole
    in the checkpoint."""
    init_from: str = os.path.join("runs", "pretrain")  # the pretrained run (an absolute path once saved)
    data: str = "regular"  # for title -> poem: which poems answer (SINGLE_POEM_DATA)
    train_on_prompt: bool = False
    eval_titles: int = 200  # val titles measured at every eval; as many test titles in the final table
    max_new_tokens: int = 256  # longest answer when measuring
    tasks: str = "poem"  # poem: title -> poem with one instruction; else a mix of tasks, each in several phrasings
    task_examples: int = 30  # val examples per task measured at every eval (several tasks only)
    format: str = "ins"  # ins: <INS>...<INP>...<RES>...<END>; chat: the role markers
    def __post_init__(self):
        for name in ("eval_titles", "max_new_tokens", "task_examples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        super().__post_init__()

    @property
    def several(self):
        """Several tasks (or the poem task in its several phrasings), as against title -> poem alone."""
        return self.tasks != "poem"

    def task_list(self):
        """The tasks to train: title -> poem alone is the poem task in its one fixed phrasing."""
        return (single_poem_task(self.data),) if not self.several else parse_tasks(self.tasks)


PRESETS = {
    "tiny": dict(batch_size=8, lr=1e-3, min_lr=1e-4, warmup_steps=2, max_steps=20, eval_every=10, sample_every=10,
                 eval_batches=2, log_every=5, eval_titles=6, max_new_tokens=40, task_examples=3, dtype="float32"),
    "cpu": dict(batch_size=32, lr=2e-3, min_lr=2e-4, warmup_steps=20, max_steps=5000, max_minutes=4.5, eval_every=200,
                early_evals=True, sample_every=200, eval_batches=8, log_every=10, eval_titles=200, max_new_tokens=256,
                task_examples=30),
    # fewer titles measured and shorter answers, so that both stages fit a lesson
    "class": dict(batch_size=32, lr=2e-3, min_lr=2e-4, warmup_steps=20, max_steps=5000, max_minutes=3.75, eval_every=150,
                  early_evals=True, sample_every=150, eval_batches=8, log_every=10, eval_titles=100, max_new_tokens=160,
                  task_examples=20),
    "gpu": dict(batch_size=64, lr=3e-4, min_lr=3e-5, warmup_steps=50, max_steps=2000, max_minutes=5.0, eval_every=250,
                sample_every=250, eval_batches=16, log_every=25, eval_titles=500, max_new_tokens=256, task_examples=100),
}

# several tasks (--tasks other than poem) learn more than one: a longer run, which still ends within 20 minutes on 2
# CPU cores with its final tables (each task measured on test examples, seen and held-out phrasings, and the base
# model), and Muon for the blocks' matrices, which learnt the forms and the acrostic sooner than AdamW (docs/log.md)
SEVERAL_TASKS = {name: dict(max_minutes=14.0, eval_every=300, sample_every=300, optimizer="muon")
                 for name in ("cpu", "class")}


UNSEEN_TIMES = 3  # the final task table measures each never-trained combination on this many times the examples


# LoRA (--lora-rank) trains each adapter's A and B with Muon: each factor's update orthogonalised, so all r directions
# of the change move at one rate. With AdamW the form came slower (regular on 600 val titles 84.7% at 2e-3, 89.5% at
# 4e-3, against Muon's 93.8% and full SFT's 95.8%; docs/sft.md)
LORA = dict(optimizer="muon")


def presets_for(tasks, lora=False):
    """The presets, with SEVERAL_TASKS's changes when several tasks are trained, and LORA's for a LoRA run."""
    presets = PRESETS if tasks == "poem" else {name: {**p, **SEVERAL_TASKS.get(name, {})} for name, p in PRESETS.items()}
    return {name: {**p, **LORA} for name, p in presets.items()} if lora else presets


def resolve(args):
    """(model kwargs, TrainConfig, device, preset extras) of these flags, over the presets of this kind of run."""
    return cli.resolve(args, presets_for(args.tasks, lora=bool(args.lora_rank)))


def parse_args(argv):
    parser = cli.make_parser(__doc__, PRESETS, None, model_flags=("dropout",), out_help=" (default: runs/sft, "
                             "runs/sft_chat with --format chat, runs/sft_tasks for several tasks in the <INS> format)")
    parser.add_argument("--init-from", default=os.path.join("runs", "pretrain"), help="pretrained run folder or checkpoint file")
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help="the corpus the pretrained model was trained on")
    parser.add_argument("--data", choices=sorted(SINGLE_POEM_DATA), default="regular",
                        help="regular: only 絕句/律詩-shaped poems become answers; all: every poem that fits; "
                             "relevant: regular poems that name a content character of their title")
    parser.add_argument("--train-on-prompt", action="store_true", default=None,
                        help="count the prompt in the loss too (default: answer only)")
    parser.add_argument("--eval-titles", type=int, help="val titles measured at every eval; as many test titles in the final table")
    parser.add_argument("--max-new-tokens", type=int, help="longest answer when measuring")
    parser.add_argument("--tasks", default="poem", help="poem: title -> poem with one instruction (the default); all, or "
                        f"a comma-separated mix of {', '.join(BY_NAME)}: several tasks, each in several phrasings")
    parser.add_argument("--task-examples", type=int, help="val examples per task measured at every eval (tasks other than poem)")
    parser.add_argument("--format", choices=["ins", "chat"], default="ins",
                        help="ins: <INS>instruction<INP>input<RES>answer<END>; chat: <SYS>system<EOT><USR>user<EOT><AST>answer<EOT>, "
                             "the role markers and the quote marks 「」 six new ids (the embedding grows by six rows)")
    add_tuning_flags(parser)
    args = parser.parse_args(argv)
    args.out_dir = args.out_dir or default_out_dir(args.tasks, args.format)
    return args


def default_out_dir(tasks, fmt):
    """runs/sft for title -> poem, runs/sft_chat for the chat format, runs/sft_tasks for several tasks in <INS>:
    each kind of run has its own folder, so that one never stands in the way of another."""
    return os.path.join("runs", "sft_chat" if fmt == "chat" else "sft" if tasks == "poem" else "sft_tasks")


def start(args, settings):
    """(model to train, base model, tokenizer, the base checkpoint, settings, the resumed checkpoint or None)."""
    resumed = cli.resume_point(args)
    if resumed:  # the run goes on with its own settings
        model, tokenizer, ckpt = resumed
        settings = cli.resumed_settings(SFTSettings, ckpt, args.out_dir)
        base, _, base_ckpt = load_checkpoint(settings.init_from)
        print(f"resuming {args.out_dir} at step {ckpt['step']}")
        return model, base, tokenizer, base_ckpt, settings, ckpt
    base, tokenizer, base_ckpt = load_checkpoint(settings.init_from)
    dropout = base_ckpt["model_config"]["dropout"] if args.dropout is None else args.dropout
    model = GPT(cli.model_config(GPTConfig, **{**base_ckpt["model_config"], "dropout": dropout}))
    model.load_state_dict(base.state_dict())
    return model, base, tokenizer, base_ckpt, dataclasses.replace(settings, init_from=os.path.abspath(settings.init_from)), None


def samples_of_tasks(task_val, tokenizer, fmt, max_new):
    """The sampling hook of a multi-task run: one val example per task, with the whole prompt as the model reads it."""
    shown = [exs[0] for name, exs in task_val.items() if exs and ":" not in name]
    prompts = [prompt_text(ex, fmt) for ex in shown]

    def sample(m, step):
        answers = write(m, tokenizer, prompts, max_new, stop=fmt.end)
        return {"samples": [{"task": ex.task, "prompt": p, "answer": a, "stopped": s,
                             "shown": f"{p}\n{a}  ({f'stopped at {fmt.end}' if s else f'no {fmt.end}'})"}
                            for ex, p, (a, s) in zip(shown, prompts, answers)]}
    return sample


def samples_of_titles(demo, tokenizer, fmt, max_new):
    """The sampling hook of title -> poem: the demo titles' answers, how long, and whether each stopped."""
    def sample(m, step):
        answers = write_answers(m, tokenizer, demo, fmt, max_new_tokens=max_new)
        samples = [{"title": t, "answer": a, "stopped": s, "length": len(a),
                    "shown": f"[{t}] ({len(a)} chars, {f'stopped at {fmt.end}' if s else f'no {fmt.end}'})\n{a}"}
                   for t, (a, s) in zip(demo, answers)]
        # once per block, the whole prompt as the model reads it, special tokens and all
        samples[0]["shown"] = f"the model reads: {fmt.prompt(demo[0])}\n" + samples[0]["shown"]
        return {"samples": samples}
    return sample


def main(argv=None):
    args = parse_args(argv)
    _, cfg, device, extra = resolve(args)
    settings = cli.stage_settings(SFTSettings, args, extra)
    tasks = cli.parse_or_usage(SFTSettings.task_list, settings)
    if settings.format != "chat" and all(t.two_turns for t in tasks):
        raise cli.UsageError(f"{settings.tasks} has two turns, which only the chat format holds; add --format chat")
    if settings.several:  # each eval measures every task: early ones took half the cpu preset's budget
        cfg = dataclasses.replace(cfg, early_evals=False)
    model, base, tokenizer, base_ckpt, settings, resumed = start(args, settings)
    if resumed:
        cfg, tasks = TrainConfig(**resumed["train_config"]), settings.task_list()
    chat = settings.format == "chat"
    splits = split_poems(load_poems(args.corpus))
    cli.check_vocabulary(tokenizer, splits["train"], chat, settings.init_from, args.corpus)
    if chat:  # the role markers join the vocabulary; the base model gets them too, to be given the same prompts
        tokenizer = tokenizer.with_roles()
        model, base = (m if m.config.vocab_size == tokenizer.vocab_size else grow_vocab(m, tokenizer.vocab_size)
                       for m in (model, base))
    if not resumed:  # LoRA or one part alone: freeze the rest (a resumed run comes back prepared)
        cli.parse_or_usage(lambda tuning: prepare(model, tuning), settings.tuning(tokenizer))
    fmt, poem_fmt = (CHAT, CHAT_POEM) if chat else (TITLE_TO_POEM, TITLE_TO_POEM)
    T, yard = model.config.block_size, Yardstick(splits["train"])
    data = task_data(splits["train"], tokenizer, T, tasks, yard.rhyme_groups, fmt)
    if not data.examples:
        raise cli.UsageError(f"no SFT example fits the model's context of {T} tokens; pretrain with a larger --block-size")
    val_poems = val_sample(splits["val"], tokenizer, T, n=cfg.eval_batches * cfg.batch_size, fmt=poem_fmt)
    val = loss_batches(tokenizer, val_poems, poem_fmt, batch_size=cfg.batch_size)  # the loop's val loss: the poem's tokens
    val_set = eval_set(splits["val"], splits["train"], settings.eval_titles)
    task_val = every_eval_examples(splits["val"], tasks, yard.rhyme_groups, settings.task_examples, tokenizer, T, fmt=fmt) \
        if settings.several else None
    print(f"SFT data ({settings.tasks if settings.several else settings.data}): "
          + ", ".join(f"{k} {v}" for k, v in data.counts.items()))
    print(f"from {settings.init_from} (step {base_ckpt['step']}): {model.num_params():,} parameters; {len(val_set.titles)} "
          f"val titles measured at every eval ({val_set.left_out} left out: training poems have them); writing to "
          f"{args.out_dir}")
    sample = samples_of_tasks(task_val, tokenizer, fmt, settings.max_new_tokens) if settings.several else \
        samples_of_titles(DEMO_TITLES + val_set.titles[:2], tokenizer, poem_fmt, settings.max_new_tokens)

    def metrics(m, step):
        out = measure(m, tokenizer, val_set.titles, yard, poem_fmt, val=val, max_new_tokens=settings.max_new_tokens)
        if task_val is not None:
            out["tasks"] = measure_tasks(m, tokenizer, task_val, max_new_tokens=settings.max_new_tokens, fmt=fmt)
        return out

    extra_ckpt = {"stage": "sft", "model_config": model.config.__dict__.copy(), "tokenizer": tokenizer.to_list(),
                  "settings": asdict(settings)}
    if settings.partial:  # the checkpoint holds only what trains; it names its base
        extra_ckpt["adapter"] = adapter_meta(base, settings.init_from, settings.tuning(tokenizer))
        print(settings.describe(model, extra_ckpt["adapter"]["tuning"]["token_rows"]))
    result = train(model, cfg, lambda g: data.get_batch(cfg.batch_size, tokenizer.pad_id, g, settings.train_on_prompt),
                   val["poem"], args.out_dir, extra_ckpt, sample=sample, metrics=metrics, on_event=cli.print_event,
                   device=device, resume_from=resumed)
    if not cli.is_lead():
        return result
    if settings.partial:
        size = save_adapter(args.out_dir, model, extra_ckpt, result["step"])
        full = os.path.getsize(checkpoint_path(settings.init_from))
        print(f"adapter: {args.out_dir}/adapter.pt, {size / 1024:,.0f} KB ({size / full:.1%} of the base checkpoint's "
              f"{full / 1024:,.0f} KB); it loads on its base alone, or python -m minigpt.lora --merge makes a full one")
    return {**result, "columns": final_tables(args.out_dir, base.to(device), model, tokenizer, splits, yard, settings,
                                              tasks, fmt, poem_fmt, result)}


def final_tables(out_dir, base, model, tokenizer, splits, yard, settings, tasks, fmt, poem_fmt, result):
    """The final tables on test titles (the only place test titles are used), the pictures, and the last line."""
    log = os.path.join(out_dir, "log.jsonl")
    plot_losses(log, os.path.join(out_dir, "loss.png"), title="sft: loss")
    n, max_new = settings.eval_titles, settings.max_new_tokens
    columns, test_set, _ = compare(base, model, tokenizer, splits, n, max_new, yardstick=yard, fmt=poem_fmt)
    cli.write_table(out_dir, "table.txt", format_table(columns, table_note(test_set, yard, splits)))
    with open(os.path.join(out_dir, "final.json"), "w", encoding="utf-8") as f:  # for tables across runs (minigpt.lora)
        json.dump(dict(columns), f)
    plot_behaviour(log, os.path.join(out_dir, "behaviour.png"))
    if settings.several:  # each task on test examples: the base model given the prompt, then the fine-tuned one
        T = model.config.block_size
        # the never-trained combinations on three times as many: on 200 a cell their seen and held-out phrasings read
        # 11 and 15 points apart, on all 593 of 七言絕句 3 and 0 (docs/log.md)
        kw = dict(fmt=fmt, unseen_n=UNSEEN_TIMES * n)
        seen = eval_examples(splits["test"], tasks, yard.rhyme_groups, n, tokenizer, T, **kw)
        held = eval_examples(splits["test"], tasks, yard.rhyme_groups, n, tokenizer, T, held_out=True, **kw)
        by_task = task_columns(base, tokenizer, seen, held, [("fine-tuned", model)], max_new, fmt)
        tuned, tuned_held = dict(by_task)["fine-tuned"], dict(by_task)["fine-tuned, held-out phrasings"]
        refusals = refusal_line({**tuned, **{f"{k}:held": v for k, v in tuned_held.items()}})
        convs = [ex for exs in seen.values() for ex in exs if len(ex.history) == 2]  # conversations of three turns
        turns = format_turns([("fine-tuned", persona_over_turns(model, tokenizer, convs, T, max_new)),
                              ("fine-tuned, no system message", persona_over_turns(model, tokenizer, convs, T, max_new,
                                                                                   system=False))]) if convs else []
        cli.write_table(out_dir, "tasks.txt", "\n".join([format_task_table(by_task, f"({n} test examples per task at "
                        f"most, {UNSEEN_TIMES * n} for a never-trained combination (:unseen). {TABLE_NOTE})")]
                        + ([refusals] if refusals else []) + turns))
        plot_tasks(log, os.path.join(out_dir, "tasks.png"))
        if refusals:
            plot_refusal(log, os.path.join(out_dir, "refusal.png"), REFUSAL_VIEW)
    final = dict(columns)["fine-tuned"]
    print(f"done: step {result['step']}, answer val loss {result['val_loss']:.3f}, {result['elapsed_s']:.0f} s; on test "
          f"titles: stop {final['stop_rate']:.0%}, run-on {final['run_on_rate']:.0%}, regular {final['regular_rate']:.0%}; "
          f"see {out_dir}/table.txt, loss.png, behaviour.png")
    return columns


if __name__ == "__main__":
    cli.run(main, None, "train_sft.py")

"""Stage 2: instruction tuning. Start from the pretrained checkpoint, fine-tune on
<INS>請用以下題目寫一首詩<INP>{title}<RES>{poem}<END>, and measure how the answers change.

    python train_sft.py                       # after python train_pretrain.py; about 5 minutes on 2 CPU cores
    python train_sft.py --preset class        # 4 minutes, after python train_pretrain.py --preset class
    python train_sft.py --train-on-prompt     # also train on the prompt, to compare the loss curves

Every few steps it prints, for the same titles, what the model answers and whether it stopped at <END>, and the
behaviour on val titles; test titles appear only in the final table.
"""
import dataclasses
import os

from minigpt import cli
from minigpt.checkpoint import load_checkpoint
from minigpt.data import DEFAULT_CORPUS, TITLE_TO_POEM, SFTData, load_poems, split_poems
from minigpt.evaluate import (Yardstick, compare, complete, eval_set, format_table, loss_batches, measure, mentions_title,
                              table_note, val_sample, write_answers)
from minigpt.model import GPT, GPTConfig, grow_vocab
from minigpt.plot import plot_behaviour, plot_tasks
from minigpt.tasks import (BY_NAME, CHAT, CHAT_POEM, TABLE_NOTE, TaskData, eval_examples, format_task_table, measure_tasks, parse_tasks,
                           prompt_text, task_columns)
from minigpt.train import TrainConfig, train

DEMO_TITLES = ["春夜喜雨", "靜夜思"]  # plus the first two val titles

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


def main(argv=None):
    parser = cli.make_parser(__doc__, PRESETS, os.path.join("runs", "sft"), model_flags=("dropout",))
    parser.add_argument("--init-from", default=os.path.join("runs", "pretrain"), help="pretrained run folder or checkpoint file")
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help="the corpus the pretrained model was trained on")
    parser.add_argument("--data", choices=["regular", "all", "relevant"], default="regular",
                        help="regular: only 絕句/律詩-shaped poems become answers; all: every poem that fits; "
                             "relevant: regular poems that name a content character of their title")
    parser.add_argument("--train-on-prompt", action="store_true", help="count the prompt in the loss too (default: answer only)")
    parser.add_argument("--eval-titles", type=int, help="val titles measured at every eval; as many test titles in the final table")
    parser.add_argument("--max-new-tokens", type=int, help="longest answer when measuring")
    parser.add_argument("--tasks", default="poem", help="poem: title -> poem with one instruction (the default); all, or "
                        f"a comma-separated mix of {', '.join(BY_NAME)}: several tasks, each in several phrasings")
    parser.add_argument("--task-examples", type=int, help="val examples per task measured at every eval (tasks other than poem)")
    parser.add_argument("--format", choices=["ins", "chat"], default="ins",
                        help="ins: <INS>instruction<INP>input<RES>answer<END>; chat: <SYS>system<EOT><USR>user<EOT><AST>answer<EOT>, "
                             "the role markers and the quote marks 「」 six new ids (the embedding grows by six rows)")
    args = parser.parse_args(argv)
    _, cfg, device, extra = cli.resolve(args, PRESETS)
    tasks = cli.parse_or_usage(parse_tasks, args.tasks)
    if args.format != "chat" and all(t.two_turns for t in tasks):
        raise cli.UsageError(f"{args.tasks} has two turns, which only the chat format holds; add --format chat")
    if [t.name for t in tasks] != ["poem"]:  # each eval measures every task: early ones took half the cpu preset's budget
        cfg = dataclasses.replace(cfg, early_evals=False)
    n_titles, max_new = args.eval_titles or extra["eval_titles"], args.max_new_tokens or extra["max_new_tokens"]
    n_task = args.task_examples or extra["task_examples"]
    resumed = cli.resume_point(args)
    if resumed:  # the run goes on with its own settings
        model, tokenizer, ckpt = resumed
        cfg = TrainConfig(**ckpt["train_config"])
        args.init_from, args.data, args.train_on_prompt = ckpt["init_from"], ckpt["data"], ckpt["train_on_prompt"]
        n_titles, max_new = ckpt["eval_titles"], ckpt["max_new_tokens"]
        args.tasks, n_task, args.format = ckpt.get("tasks", "poem"), ckpt.get("task_examples", n_task), ckpt.get("format", "ins")
        base, _, _ = load_checkpoint(args.init_from)
        print(f"resuming {args.out_dir} at step {ckpt['step']}")
    else:
        base, tokenizer, ckpt = load_checkpoint(args.init_from)
        dropout = ckpt["model_config"]["dropout"] if args.dropout is None else args.dropout
        model = GPT(cli.model_config(GPTConfig, **{**ckpt["model_config"], "dropout": dropout}))
        model.load_state_dict(base.state_dict())
    chat = args.format == "chat"
    splits = split_poems(load_poems(args.corpus))
    cli.check_vocabulary(tokenizer, splits["train"], chat, args.init_from, args.corpus)
    if chat:  # the role markers join the vocabulary; the base model gets them too, to be given the same prompts
        tokenizer = tokenizer.with_roles()
        model, base = (m if m.config.vocab_size == tokenizer.vocab_size else grow_vocab(m, tokenizer.vocab_size)
                       for m in (model, base))
    fmt, poem_fmt = (CHAT, CHAT_POEM) if chat else (TITLE_TO_POEM, TITLE_TO_POEM)
    model_cfg = model.config
    T = model_cfg.block_size
    tasks = parse_tasks(args.tasks)  # a resumed run's own
    yard = Yardstick(splits["train"])
    multi = [t.name for t in tasks] != ["poem"]  # several tasks, or one in several phrasings
    if multi:
        data = TaskData(splits["train"], tokenizer, T, tasks, yard.rhyme_groups, fmt)
        task_val = eval_examples(splits["val"], tasks, yard.rhyme_groups, n_task, tokenizer, T, fmt=fmt)
    else:
        data = SFTData(splits["train"], tokenizer, T, regular_only=args.data in ("regular", "relevant"), fmt=poem_fmt)
        if args.data == "relevant":
            data.keep_only(mentions_title, "not_about_title")
    if not data.examples:
        raise cli.UsageError(f"no SFT example fits the model's context of {T} tokens; pretrain with a larger --block-size")
    val_poems = val_sample(splits["val"], tokenizer, T, n=cfg.eval_batches * cfg.batch_size)
    val = loss_batches(tokenizer, val_poems, poem_fmt, batch_size=cfg.batch_size)  # the loop's val loss: the poem's tokens
    val_set = eval_set(splits["val"], splits["train"], n_titles)
    demo = DEMO_TITLES + val_set.titles[:2]
    print(f"SFT data ({args.tasks if multi else args.data}): " + ", ".join(f"{k} {v}" for k, v in data.counts.items()))
    print(f"from {args.init_from} (step {ckpt['step']}): {model.num_params():,} parameters; {len(val_set.titles)} val "
          f"titles measured at every eval ({val_set.left_out} left out: training poems have them); writing to {args.out_dir}")

    def sample(m, step):
        if multi:  # one val example per task, with the whole prompt as the model reads it
            shown = [exs[0] for name, exs in task_val.items() if exs and ":" not in name]
            prompts = [prompt_text(ex, fmt) for ex in shown]
            answers = complete(m, tokenizer, prompts, max_new_tokens=max_new, stop=fmt.end)
            return {"samples": [{"task": ex.task, "prompt": p, "answer": a, "stopped": s,
                                 "shown": f"{p}\n{a}  ({f'stopped at {fmt.end}' if s else f'no {fmt.end}'})"}
                                for ex, p, (a, s) in zip(shown, prompts, answers)]}
        answers = write_answers(m, tokenizer, demo, poem_fmt, max_new_tokens=max_new)
        end = poem_fmt.end
        samples = [{"title": t, "answer": a, "stopped": s, "length": len(a),
                    "shown": f"[{t}] ({len(a)} chars, {f'stopped at {end}' if s else f'no {end}'})\n{a}"}
                   for t, (a, s) in zip(demo, answers)]
        # once per block, the whole prompt as the model reads it, special tokens and all
        samples[0]["shown"] = f"the model reads: {poem_fmt.prompt(demo[0])}\n" + samples[0]["shown"]
        return {"samples": samples}

    extra_ckpt = {"stage": "sft", "model_config": model_cfg.__dict__.copy(), "tokenizer": tokenizer.to_list(),
                  "init_from": os.path.abspath(args.init_from), "data": args.data, "train_on_prompt": args.train_on_prompt,
                  "eval_titles": n_titles, "max_new_tokens": max_new, "tasks": ",".join(t.name for t in tasks),
                  "task_examples": n_task, "format": args.format}

    def metrics(m, step):
        out = measure(m, tokenizer, val_set.titles, yard, poem_fmt, val=val, max_new_tokens=max_new)
        if multi:
            out["tasks"] = measure_tasks(m, tokenizer, task_val, max_new_tokens=max_new, fmt=fmt)
        return out

    result = train(model, cfg, lambda g: data.get_batch(cfg.batch_size, tokenizer.pad_id, g, args.train_on_prompt), val["poem"],
                   args.out_dir, extra_ckpt, sample=sample,
                   metrics=metrics,
                   on_event=cli.print_event, device=device, resume_from=ckpt if resumed else None)
    if not cli.is_lead():
        return result

    # the final table, and the only place test titles are used
    columns, test_set, _ = compare(base.to(device), model, tokenizer, splits, n_titles, max_new, yardstick=yard, fmt=poem_fmt)
    table = format_table(columns, table_note(test_set, yard, splits))
    cli.write_table(args.out_dir, "table.txt", table)
    plot_behaviour(os.path.join(args.out_dir, "log.jsonl"), os.path.join(args.out_dir, "behaviour.png"))
    if multi:  # each task on test examples: the base model given the prompt, then the fine-tuned one
        seen = eval_examples(splits["test"], tasks, yard.rhyme_groups, n_titles, tokenizer, T, fmt=fmt)
        unseen = eval_examples(splits["test"], tasks, yard.rhyme_groups, n_titles, tokenizer, T, held_out=True, fmt=fmt)
        by_task = task_columns(base.to(device), tokenizer, seen, unseen, [("fine-tuned", model)], max_new, fmt)
        task_table = format_task_table(by_task, f"({n_titles} test examples per task at most. {TABLE_NOTE})")
        cli.write_table(args.out_dir, "tasks.txt", task_table)
        plot_tasks(os.path.join(args.out_dir, "log.jsonl"), os.path.join(args.out_dir, "tasks.png"))
    final = dict(columns)["fine-tuned"]
    print(f"done: step {result['step']}, answer val loss {result['val_loss']:.3f}, {result['elapsed_s']:.0f} s; on test "
          f"titles: stop {final['stop_rate']:.0%}, run-on {final['run_on_rate']:.0%}, regular {final['regular_rate']:.0%}; "
          f"see {args.out_dir}/table.txt, loss.png, behaviour.png")
    return {**result, "columns": columns}


if __name__ == "__main__":
    cli.run(main, None, "train_sft.py")

"""Writing with a trained model: continue a text, or answer a title, from the command line or from code.

    python -m minigpt.sample --title 春夜喜雨 靜夜思          # with the fine-tuned model in runs/sft
    python -m minigpt.sample --checkpoint runs/pretrain --title 春夜喜雨   # the base model just continues
    python -m minigpt.sample --checkpoint runs/dpo --title 春夜喜雨        # the preference-tuned model
    python -m minigpt.sample --checkpoint runs/sft_chat --title 如何自製火藥 從軍行   # a refusal, and a poem
    python -m minigpt.sample --checkpoint runs/sft_chat --system 你只寫五言絕句 --title 春望   # a system message

Titles may be typed in simplified characters: OpenCC turns them into the corpus's traditional ones (shown), and
--simplified prints the answers back in simplified. Titles are checked first: characters the model never saw even
after that are named, and an empty or too long title is refused, each with a one-line message.
"""
import argparse
import functools
import os
import sys

from minigpt.data import CHAT_POEM, PLAIN, TITLE_TO_POEM
from minigpt.generate import Sampling, write
from minigpt.tokenizer import ROLE_TOKENS, SPECIAL_TOKENS


class TitleError(ValueError):
    """A title the model cannot take; the message says why and what to do."""


@functools.lru_cache(maxsize=None)
def _converter(config):
    import opencc  # OpenCC's character and phrase tables: simplified <-> traditional Chinese
    return opencc.OpenCC(config)


def to_traditional(text):
    """Simplified Chinese -> traditional, as the corpus writes it (登鹳雀楼 -> 登鸛雀樓); traditional text stays."""
    return _converter("s2t").convert(text)


def to_simplified(text):
    """Traditional Chinese -> simplified, for readers who read simplified characters."""
    return _converter("t2s").convert(text)


def check_text(text, what, tokenizer, unknown_hint, allow_unknown=False):
    """TitleError naming `what` (a title, the system message) if the text holds a control marker or, unless
    allow_unknown, characters the model never saw (unknown_hint ends that message)."""
    markers = [t for t in SPECIAL_TOKENS + ROLE_TOKENS if t in text]
    if markers:
        raise TitleError(f"{what} holds the control marker {markers[0]}, which the model reads as structure, not text; "
                         "leave it out")
    missing = tokenizer.unknown_chars(text)
    if missing and not allow_unknown:
        raise TitleError(f"{what} has characters the model never saw: {' '.join(missing)}{unknown_hint}")


def check_title(title, tokenizer, block_size, fmt=TITLE_TO_POEM, min_answer=16, allow_unknown=False):
    """The title, stripped and in traditional characters, if the model can take it; else TitleError with a one-line
    reason."""
    title = to_traditional(title.strip())
    if not title:
        raise TitleError("empty title: give a few characters, e.g. --title 春夜喜雨")
    check_text(title, f"title {title!r}", tokenizer, " (no Tang poem of the corpus uses them; use other words, or "
               "--allow-unknown to write them as <UNK>)", allow_unknown)
    room = block_size - min_answer - len(tokenizer.encode(fmt.prompt(""), unknown="unk"))
    if len(title) > room:
        raise TitleError(f"title of {len(title)} characters is too long: with this model's context of {block_size} "
                         f"tokens it may have at most {room}")
    return title


def check_system(system, tokenizer, block_size, fmt, min_answer=16):
    """A system message, stripped and in traditional characters, if the chat model can take it before a title;
    else TitleError with a one-line reason."""
    system = to_traditional(system.strip())
    if fmt is not CHAT_POEM:
        raise TitleError("--system needs a chat model (python train_sft.py --tasks all --format chat -> runs/sft_chat)")
    check_text(system, "the system message", tokenizer, "; use other words")
    room = block_size - min_answer - len(tokenizer.encode(system_prompt(system, ""), unknown="unk"))
    if room < 2:
        raise TitleError(f"a system message of {len(system)} characters is too long: with this model's context of "
                         f"{block_size} tokens, a title and an answer need the room")
    return system


def system_prompt(system, title):
    """The chat prompt under a system message: the title is the user's whole turn, as the persona and rule tasks ask."""
    return f"<SYS>{system}<EOT><USR>{title}<EOT><AST>"


def fine_tuned(ckpt):
    """True for a checkpoint that answers instructions: fine-tuned (SFT), preference-tuned (DPO) or tuned by RL."""
    return ckpt.get("stage") in ("sft", "dpo", "rl")


def shown_conversion(typed, title):
    """'(typed -> title)' when the typed title was converted to traditional characters, else ''."""
    typed = typed.strip()
    return f"({typed} -> {title})" if typed != title else ""


def require_runs(paths):
    """A one-line TitleError naming the script to run, for the first of {stage: run folder} that is missing."""
    scripts = {"pretrain": "python train_pretrain.py", "sft": "python train_sft.py"}
    for stage, path in paths.items():
        if not os.path.exists(path):
            raise TitleError(f"no {stage} run at {path}: run {scripts[stage]} first (for a lesson: --preset class), "
                             f"or pass its folder with --{stage}")


def load_pair(pretrain, sft):
    """(base model, fine-tuned model, the fine-tuned one's tokenizer, its answer format) from two run folders that
    belong together; a one-line TitleError or CheckpointError otherwise."""
    from minigpt.checkpoint import load_checkpoint
    require_runs({"pretrain": pretrain, "sft": sft})
    base, base_tokenizer, _ = load_checkpoint(pretrain)
    model, tokenizer, ckpt = load_checkpoint(sft)
    if not fine_tuned(ckpt):
        raise TitleError(f"{sft} holds a {ckpt.get('stage')} model, not a fine-tuned one; pass --sft runs/sft")
    if tokenizer.itos[:base_tokenizer.vocab_size] != base_tokenizer.itos:
        raise TitleError(f"{sft} was not fine-tuned from {pretrain}; pass the pair that belongs together")
    return base, model, tokenizer, answer_format(ckpt)


def answer_format(ckpt):
    """The prompt format a checkpoint answers in: plain text for a base model, the SFT format for a fine-tuned or
    preference-tuned one (the chat format's, if it was trained on that)."""
    if not fine_tuned(ckpt):
        return PLAIN
    from minigpt.checkpoint import settings_of
    return CHAT_POEM if settings_of(ckpt).get("format") == "chat" else TITLE_TO_POEM


def main(argv=None):
    from minigpt.checkpoint import CheckpointError, load_checkpoint
    from minigpt.train import pick_device
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=os.path.join("runs", "sft"), help="run folder or checkpoint file")
    p.add_argument("--title", nargs="+", required=True, help="one or more titles")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--system", help="a system message for a chat model, e.g. 你只寫五言絕句 (the title is then the user's turn)")
    p.add_argument("--allow-unknown", action="store_true", help="write unknown characters as <UNK> instead of refusing")
    p.add_argument("--simplified", action="store_true", help="print titles and answers in simplified characters")
    args = p.parse_args(argv)
    try:
        if args.max_new_tokens <= 0 or args.temperature < 0 or (args.top_k is not None and args.top_k <= 0):
            raise TitleError("--max-new-tokens and --top-k must be positive and --temperature not negative")
        model, tokenizer, ckpt = load_checkpoint(args.checkpoint, pick_device(args.device), made_by="python train_sft.py")
        fmt = answer_format(ckpt)  # a base model only knows plain text
        system = check_system(args.system, tokenizer, model.config.block_size, fmt) if args.system else ""
        titles = [check_title(t, tokenizer, model.config.block_size, fmt, allow_unknown=args.allow_unknown) for t in args.title]
        long = [t for t in titles if system and len(tokenizer.encode(system_prompt(system, t), unknown="unk"))
                > model.config.block_size - 16]
        if long:
            raise TitleError(f"the system message and the title {long[0]!r} together are too long for this model's "
                             f"context of {model.config.block_size} tokens; shorten one")
    except (CheckpointError, TitleError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    from minigpt.tasks import refuses
    prompts = [system_prompt(system, t) if system else fmt.prompt(t) for t in titles]
    answers = write(model, tokenizer, prompts, args.max_new_tokens, stop=fmt.end,
                    sampling=sampling, unknown="warn")  # a base model's blank line is no one id: it runs to the cap
    show = to_simplified if args.simplified else str
    for typed, title, (answer, stopped) in zip(args.title, titles, answers):
        converted = shown_conversion(typed, title)
        print(f"【{show(title)}】{'  ' + converted if converted else ''}\n{show(answer)}")
        if fine_tuned(ckpt) and refuses(answer):
            print("(refused: it declines the request)")
        print(f"(stopped at {fmt.end})\n" if stopped else f"(no end within {args.max_new_tokens} tokens)\n")
    return answers


if __name__ == "__main__":
    main()

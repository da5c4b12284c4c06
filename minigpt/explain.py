"""Where the model decides to stop, drawn. For one title: the probability of ending at every position of an answer,
the base model against the fine-tuned one; the next-character distribution at one position, at two temperatures;
and the fine-tuned model's attention from the answer's characters back to the title's.

    python -m minigpt.explain --title 春夜喜雨       # runs/pretrain and runs/sft; three PNGs in runs/explain
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

from minigpt.data import PLAIN
from minigpt.generate import Sampling, write
from minigpt.loss_eval import evaluating
from minigpt.sample import TitleError, check_title, load_pair, shown_conversion, to_simplified


@torch.no_grad()
def end_probabilities(model, tokenizer, prompt, answer, end):
    """P(the model writes `end` next) after prompt + answer[:i], for i = 0 .. len(answer). `end` may be several
    tokens (the base model's blank line is two newlines): then the product of their probabilities, one after the other."""
    p_ids, a_ids, e_ids = (tokenizer.encode(t, unknown="unk") for t in (prompt, answer, end))
    contexts = [p_ids + a_ids[:i] + e_ids[:-1] for i in range(len(a_ids) + 1)]
    L = max(map(len, contexts))
    # right padding: causal attention never lets a real position see the padding after it
    x = torch.tensor([c + [tokenizer.pad_id] * (L - len(c)) for c in contexts], device=model.device)
    with evaluating(model):
        logp = F.log_softmax(model(x)[0].float(), dim=-1)  # (N, L, V)
    out = []
    for n, c in enumerate(contexts):
        start = len(c) - len(e_ids)  # where the first end token would be predicted from
        out.append(sum(logp[n, start + j, e].item() for j, e in enumerate(e_ids)))
    return torch.tensor(out).exp().tolist()


@torch.no_grad()
def next_chars(model, tokenizer, text, temperatures=(0.5, 1.5), k=10):
    """For each temperature, the k likeliest next tokens after text as (token, probability), sampled as
    softmax(logits / temperature): a low temperature sharpens the distribution, a high one flattens it."""
    ids = torch.tensor([tokenizer.encode(text, unknown="unk")], device=model.device)
    with evaluating(model):
        logits = model(ids)[0][0, -1].float()  # (V,)
    tops = {}
    for t in temperatures:
        p, i = F.softmax(logits / t, dim=-1).topk(k)
        tops[t] = [(tokenizer.itos[j], v) for j, v in zip(i.tolist(), p.tolist())]
    return tops


@torch.no_grad()
def attention_maps(model, ids):
    """Attention weights of every layer and head for one sequence of ids: a tensor (n_layer, nh, T, T) whose row i
    says how much position i looks at each earlier position. Recomputed from each layer's input, as the model does."""
    inputs = []
    hooks = [b.attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for b in model.blocks]
    try:
        with evaluating(model):
            model(torch.tensor([ids], device=model.device))
    finally:
        for h in hooks:
            h.remove()
    maps = []
    for block, x in zip(model.blocks, inputs):
        B, T, C = x.shape
        nh = block.attn.n_head
        q, k, _ = block.attn.qkv(x).split(C, dim=2)
        q, k = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k))  # (1, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) / (C // nh) ** 0.5  # (1, nh, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        maps.append(att.masked_fill(~causal, float("-inf")).softmax(dim=-1)[0])  # (nh, T, T)
    return torch.stack(maps)  # (n_layer, nh, T, T)


def explain(base, sft, tokenizer, sft_fmt, title, out_dir, position=None, temperatures=(0.5, 1.5), seed=0):
    """Write the three pictures for one title (already in the model's characters) and return what they show."""
    from minigpt.plot import plot_attention, plot_end_probabilities, plot_next_chars
    os.makedirs(out_dir, exist_ok=True)
    prompt = sft_fmt.prompt(title)
    room = sft.config.block_size - len(tokenizer.encode(prompt, unknown="unk")) - 1
    (answer, stopped), = write(sft, tokenizer, [prompt], room, stop=sft_fmt.end, sampling=Sampling(seed=seed))
    p_sft = end_probabilities(sft, tokenizer, prompt, answer, sft_fmt.end)
    p_base = end_probabilities(base, tokenizer, PLAIN.prompt(title), answer, PLAIN.end)
    # the chosen position: where the answer ends (the decision to stop), or `position` characters into it
    pos = len(answer) if position is None else position if position >= 0 else len(answer) + 1 + position
    pos = max(0, min(len(answer), pos))
    tops = next_chars(sft, tokenizer, prompt + answer[:pos], temperatures)
    ids = tokenizer.encode(prompt + answer, unknown="unk")
    n_prompt = len(tokenizer.encode(prompt, unknown="unk"))
    start = n_prompt - len(tokenizer.encode(title + sft_fmt.res, unknown="unk"))  # where the title begins
    att = attention_maps(sft, ids)[:, :, n_prompt:, start:start + len(title)]  # (n_layer, nh, answer, title)
    files = {
        "end": plot_end_probabilities(answer, p_base, p_sft, title, os.path.join(out_dir, "end_probability.png"),
                                      base_end="blank line", sft_end=sft_fmt.end),
        "next": plot_next_chars(tops, answer[:pos], title, os.path.join(out_dir, "next_char.png")),
        "attention": plot_attention(att.mean(dim=1), title, answer, os.path.join(out_dir, "attention.png")),
    }
    return {"answer": answer, "stopped": stopped, "p_end_sft": p_sft, "p_end_base": p_base, "position": pos,
            "next": tops, "attention": att, "files": files}


def main(argv=None):
    from minigpt.checkpoint import CheckpointError
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--title", required=True, help="one title, in traditional or simplified characters")
    p.add_argument("--pretrain", default=os.path.join("runs", "pretrain"), help="the base model's run folder")
    p.add_argument("--sft", default=os.path.join("runs", "sft"), help="the fine-tuned model's run folder")
    p.add_argument("--out-dir", default=os.path.join("runs", "explain"), help="where the pictures go")
    p.add_argument("--position", type=int, help="characters into the answer for the next-character picture "
                   "(default: its end, where the model decides to stop; negative counts from the end)")
    p.add_argument("--temperatures", type=float, nargs=2, default=(0.5, 1.5))
    p.add_argument("--seed", type=int, default=0, help="the fine-tuned model's sampled answer")
    p.add_argument("--simplified", action="store_true", help="print the answer in simplified characters")
    args = p.parse_args(argv)
    try:
        if min(args.temperatures) <= 0:
            raise TitleError("--temperatures must be positive, e.g. --temperatures 0.5 1.5")
        base, sft, sft_tokenizer, fmt = load_pair(args.pretrain, args.sft)
        title = check_title(args.title, sft_tokenizer, sft.config.block_size, fmt)
    except (CheckpointError, TitleError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from minigpt.plot import use_cjk_font
    if use_cjk_font() is None:
        print("note: no font with Chinese characters found, so the pictures show boxes for them; install one "
              "(e.g. apt install fonts-noto-cjk) and delete ~/.cache/matplotlib", file=sys.stderr)
    out = explain(base, sft, sft_tokenizer, fmt, title, args.out_dir, args.position, tuple(args.temperatures), args.seed)
    show = to_simplified if args.simplified else str
    converted = shown_conversion(args.title, title)
    print(f"【{show(title)}】{'  ' + converted if converted else ''}\n{show(out['answer'])}\n"
          f"({'stopped at ' + fmt.end if out['stopped'] else 'no ' + fmt.end})")
    p_sft, p_base = out["p_end_sft"], out["p_end_base"]
    print(f"P(end) where the answer ends: fine-tuned {p_sft[-1]:.3f}, base {p_base[-1]:.3f}; "
          f"largest earlier: fine-tuned {max(p_sft[:-1]):.3f}, base {max(p_base[:-1]):.3f}")
    for t, top in out["next"].items():
        print(f"next after {out['position']} characters, temperature {t}: " +
              ", ".join(f"{c.replace(chr(10), '↵')} {v:.2f}" for c, v in top[:5]))
    print("pictures: " + ", ".join(out["files"].values()))
    return out


if __name__ == "__main__":
    main()

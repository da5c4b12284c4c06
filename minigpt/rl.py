"""RLHF as it is usually told, second half: improve the policy by reinforcement learning against a reward, on a leash.

Each collection, the policy writes G answers to each of a few training titles (a group); a reward scores them (the
reward model of minigpt.reward, or the program's combined score); each answer's advantage is its reward against its
group's, A = (r - mean) / std, so the group is its own baseline and no value network is needed (GRPO). Then a few
steps of PPO's clipped objective on the collected batch, per answer token:

    loss = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + kl_coef * KL(policy || reference)

where ratio = pi(token) / pi_old(token), pi_old the policy that wrote the batch. The KL term holds the policy near the
frozen fine-tuned model: without it the policy is free to find whatever the reward model pays for, good poem or not.

    python -m minigpt.rl      # SFT / DPO / RL side by side on test titles, one table
"""
from typing import NamedTuple

import torch

from minigpt.data import TITLE_TO_POEM, render, sft_batch
from minigpt.dpo import target_logprobs, token_logprobs
from minigpt.generate import Sampling, write
from minigpt.loss_eval import evaluating
from minigpt.model import IGNORE_INDEX
from minigpt.reward import combined, score_answer, score_answers

RL_SAMPLING = Sampling(temperature=1.0, top_k=None)  # the policy's own distribution: what the ratio and the KL read

# ---- the loss ----


def group_advantages(rewards, group_size):
    """(N,) rewards of N / G groups of G answers in a row -> advantages: each reward less its group's mean, over the
    group's standard deviation. Every group's advantages sum to 0; a group whose answers score alike teaches nothing."""
    r = rewards.float().view(-1, group_size)  # (N / G, G)
    centred = r - r.mean(dim=1, keepdim=True)
    return (centred / (r.std(dim=1, keepdim=True, unbiased=False) + 1e-6)).view(-1)


def kl_per_token(logp, ref_logp):
    """An estimate of KL(policy || reference) at each sampled token (Schulman's k3): exp(d) - d - 1 with d = log ref -
    log pi. Never negative, 0 where the two agree, and its mean over the policy's samples is the KL."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


class RLBatch(NamedTuple):
    """Collected answers as tensors: inputs and targets (B, T) (targets on the answer and its end marker only), the
    log-probabilities of those targets under the policy that wrote them and under the reference (B, T), and each
    answer's advantage and reward (B,)."""
    x: torch.Tensor
    y: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    advantages: torch.Tensor
    rewards: torch.Tensor


def ppo_terms(model, batch, clip=0.2):
    """Per answer token (B, T): the policy's log-probabilities, the ratio to the policy that wrote the batch, and
    whether the clip is active (the ratio outside [1 - clip, 1 + clip] on the side where clipping binds)."""
    logp = token_logprobs(model, batch.x, batch.y)  # (B, T), 0 off the answer
    ratio = torch.exp(logp - batch.old_logp)
    A = batch.advantages[:, None]  # (B, 1)
    clipped = torch.where(A >= 0, ratio > 1 + clip, ratio < 1 - clip) & (batch.y != IGNORE_INDEX)
    return logp, ratio, clipped


def ppo_loss(model, batch, clip=0.2, kl_coef=0.05):
    """PPO's clipped objective with a KL penalty to the reference, averaged over every answer token of the batch.
    Returns (mean, number of answer tokens), as the training loop asks."""
    logp, ratio, _ = ppo_terms(model, batch, clip)
    counted = (batch.y != IGNORE_INDEX).float()
    A = batch.advantages[:, None]  # (B, 1)
    objective = torch.min(ratio * A, torch.clamp(ratio, 1 - clip, 1 + clip) * A)  # (B, T)
    per_token = -objective + kl_coef * kl_per_token(logp, batch.ref_logp)
    n = counted.sum()
    return (per_token * counted).sum() / n.clamp(min=1), n


# ---- collecting answers: the loop's batches ----


def answer_batch(tokenizer, prompts, answers, stopped, fmt=TITLE_TO_POEM):
    """(x, y) of prompt + answer (+ the end marker where it stopped), targets on the answer alone."""
    return sft_batch([render(tokenizer, p, a + (fmt.end if s else "")) for p, a, s in zip(prompts, answers, stopped)],
                     tokenizer.pad_id)


def room(model, tokenizer, prompts, max_new_tokens=None):
    """The most new tokens every prompt + answer fits the context with (the end marker included), at most
    max_new_tokens."""
    fits = model.config.block_size - max(len(tokenizer.encode(p, unknown="unk")) for p in prompts)
    return fits if max_new_tokens is None else min(fits, max_new_tokens)


def program_reward(yard):
    """The program's combined score as a reward: (titles, answers, stopped) -> (N,)."""
    return lambda titles, answers, stopped: torch.tensor(
        [combined(score_answer(a, s, t, yard)) for t, a, s in zip(titles, answers, stopped)])


def model_reward(reward_model, tokenizer, fmt=TITLE_TO_POEM):
    """The reward model's score as a reward: (titles, answers, stopped) -> (N,)."""
    return lambda titles, answers, stopped: score_answers(reward_model, tokenizer, [fmt.prompt(t) for t in titles],
                                                          answers, stopped, fmt)


class Rollouts:
    """The RL stage's get_batch: every `epochs` calls, the policy writes `group` answers to each of `titles` training
    titles drawn at random, the reward scores them and the advantages are taken within each group; each call returns
    the batch collected last, so that PPO takes `epochs` steps on it (the first one on-policy: ratio 1)."""

    def __init__(self, policy, reference, reward, tokenizer, train_titles, titles=16, group=4, epochs=2,
                 fmt=TITLE_TO_POEM, max_new_tokens=None, sampling=RL_SAMPLING):
        self.policy, self.reference, self.reward, self.tokenizer = policy, reference, reward, tokenizer
        self.train_titles, self.titles, self.group, self.epochs, self.fmt = train_titles, titles, group, epochs, fmt
        self.max_new_tokens = max_new_tokens
        self.sampling, self.calls, self.batch, self.rewards = sampling, 0, None, []

    def __call__(self, gen):
        if self.calls % self.epochs == 0:
            self.batch = self.collect(gen)
            self.rewards.append(self.batch.rewards.mean().item())
        self.calls += 1
        return self.batch

    @torch.no_grad()
    def collect(self, gen):
        picks = torch.randint(len(self.train_titles), (self.titles,), generator=gen).tolist()
        titles = [self.train_titles[i] for i in picks for _ in range(self.group)]
        prompts = [self.fmt.prompt(t) for t in titles]
        seed = int(torch.randint(2 ** 31, (1,), generator=gen))
        written = write(self.policy, self.tokenizer, prompts, room(self.policy, self.tokenizer, prompts, self.max_new_tokens),
                        self.fmt.end,
                        Sampling(self.sampling.temperature, self.sampling.top_k, self.sampling.top_p, seed),
                        batch_size=len(prompts))
        answers, stopped = [a.text for a in written], [a.stopped for a in written]
        rewards = self.reward(titles, answers, stopped).float()
        x, y = answer_batch(self.tokenizer, prompts, answers, stopped, self.fmt)
        device = self.policy.device
        x, y = x.to(device), y.to(device)
        with evaluating(self.policy):
            old = token_logprobs(self.policy, x, y)
        ref = token_logprobs(self.reference, x, y)
        return RLBatch(x, y, old, ref, group_advantages(rewards, self.group).to(device), rewards.to(device))

    def mean_reward_since(self):
        """The mean reward of the collections since the last call (training titles), then forgotten."""
        out = sum(self.rewards) / len(self.rewards) if self.rewards else None
        self.rewards = []
        return out


# ---- what an eval reads beside the program's checks ----


@torch.no_grad()
def drift(model, reference, tokenizer, titles, fmt=TITLE_TO_POEM, max_new_tokens=128, seed=0):
    """On answers the model writes from its own distribution (RL_SAMPLING): (mean KL from the reference per answer,
    nats, the sum over its tokens of log pi - log ref, whose mean over the policy's samples is KL(pi || ref); mean
    entropy of the model's next-token distribution per answer token, nats; the answers)."""
    prompts = [fmt.prompt(t) for t in titles]
    written = write(model, tokenizer, prompts, room(model, tokenizer, prompts, max_new_tokens), fmt.end,
                    Sampling(RL_SAMPLING.temperature, RL_SAMPLING.top_k, RL_SAMPLING.top_p, seed))
    x, y = answer_batch(tokenizer, prompts, [a.text for a in written], [a.stopped for a in written], fmt)
    x, y = x.to(model.device), y.to(model.device)
    counted = y != IGNORE_INDEX
    with evaluating(model), evaluating(reference):
        logits, _ = model(x)  # (B, T, V)
        logp, ref = target_logprobs(logits, y), token_logprobs(reference, x, y)
    p = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(p.exp() * p).sum(-1)  # (B, T)
    return ((logp - ref).sum(1).mean().item(), (entropy * counted).sum().item() / counted.sum().clamp(min=1).item(),
            written)


# ---- side by side: python -m minigpt.rl ----

RUNS = ("runs/sft", "runs/dpo", "runs/rl", "runs/rl_program", "runs/rl_nokl")


def side_by_side(models, reference, tokenizer, splits, yard, fmt=TITLE_TO_POEM, reward_model=None, n_titles=300,
                 max_new_tokens=100, seed=1):
    """[(name, metrics)] on the same test titles: real poems, then each (name, model, minutes): the program's checks
    (the evaluation's sampling), and on answers sampled at temperature 1 the reward model's mean score, the program's
    score and the KL from the reference."""
    from minigpt.evaluate import eval_set, measure, reference as real_poems
    test_set = eval_set(splits["test"], splits["train"], n_titles)
    check = program_reward(yard)
    score = model_reward(reward_model, tokenizer, fmt) if reward_model is not None else None
    real = {**real_poems(yard, test_set), "program_score": check(test_set.titles, test_set.poems,
                                                                 [True] * len(test_set.poems)).mean().item()}
    if score:
        real["mean_reward"] = score(test_set.titles, test_set.poems, [True] * len(test_set.poems)).mean().item()
    columns = [("real poems", real)]
    for name, model, minutes in models:
        kl, entropy, written = drift(model, reference, tokenizer, test_set.titles, fmt, max_new_tokens, seed)
        answers, stopped = [a.text for a in written], [a.stopped for a in written]
        m = {**measure(model, tokenizer, test_set.titles, yard, fmt, max_new_tokens=max_new_tokens),
             "program_score": check(test_set.titles, answers, stopped).mean().item(), "kl_to_ref": kl,
             "entropy": entropy, "minutes": minutes}
        if score:
            m["mean_reward"] = score(test_set.titles, answers, stopped).mean().item()
        columns.append((name, m))
    return columns, test_set


def run_name(ckpt, path):
    """The column name of a run: its stage, and for RL its reward and leash."""
    stage, s = ckpt.get("stage", "pretraining"), ckpt.get("settings") or {}
    if stage == "sft":
        return "SFT"
    if stage == "dpo":
        return f"DPO ({s.get('prefer', 'rhyme')})"
    if stage == "rl":
        return f"RL ({'reward model' if s.get('reward') == 'model' else 'program'}, KL {s.get('kl_coef')})"
    return path


def main(argv=None):
    """python -m minigpt.rl: the fine-tuned, DPO and RL runs side by side on the same test titles, one table."""
    import argparse
    import json
    import os
    import sys

    from minigpt.checkpoint import CheckpointError, load_checkpoint
    from minigpt.data import load_poems, split_poems, DEFAULT_CORPUS
    from minigpt.evaluate import format_table, table_note
    from minigpt.metrics import METRICS, RL_METRICS, Yardstick
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--runs", nargs="+", default=list(RUNS), help="run folders; the first is the reference the KL is "
                   "measured from (the SFT run); a folder that is not there is left out")
    p.add_argument("--reward-from", default="runs/reward", help="the reward model whose mean score each column gets")
    p.add_argument("--corpus", default=DEFAULT_CORPUS)
    p.add_argument("--test-titles", type=int, default=300)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--out", default="runs/rlhf_table.txt", help="where the table is written")
    args = p.parse_args(argv)
    if args.test_titles <= 0:
        p.error(f"--test-titles must be positive, got {args.test_titles}")
    runs = [r for r in args.runs if os.path.exists(os.path.join(r, "ckpt.pt"))]
    try:
        if not runs or runs[0] != args.runs[0]:
            raise CheckpointError(f"no checkpoint in {args.runs[0]}, the reference; run python train_sft.py first")
        loaded = [(r, *load_checkpoint(r)) for r in runs]
        reward_model = load_checkpoint(args.reward_from)[0] if os.path.exists(
            os.path.join(args.reward_from, "ckpt.pt")) else None
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    _, reference, tokenizer, _ = loaded[0]
    reference.eval()
    splits = split_poems(load_poems(args.corpus))
    yard = Yardstick(splits["train"])
    models = []
    for path, model, _, ckpt in loaded:
        log = os.path.join(path, "log.jsonl")
        evals = [json.loads(line) for line in open(log, encoding="utf-8") if '"eval"' in line] \
            if os.path.exists(log) else []
        minutes = evals[-1]["elapsed_s"] / 60 if evals and "elapsed_s" in evals[-1] else None
        models.append((run_name(ckpt, path), model.eval(), minutes))
    columns, test_set = side_by_side(models, reference, tokenizer, splits, yard, reward_model=reward_model,
                                     n_titles=args.test_titles, max_new_tokens=args.max_new_tokens)
    base = columns[1][1]["rhyme_rate"]
    gains = ", ".join(f"{name} {100 * (m['rhyme_rate'] - base):+.1f}" for name, m in columns[2:]
                      if m["rhyme_rate"] is not None and base is not None)
    note = (table_note(test_set, yard, splits) + f" Runs: {', '.join(runs)}; KL from {runs[0]}, reward from "
            f"{args.reward_from if reward_model is not None else '(no reward model)'}; reward, program's score, KL and "
            f"entropy on answers sampled at temperature 1, the other rows on the evaluation's sampling; minutes: the "
            f"stage's own training time. Rhyme gain over SFT, points: {gains}.")
    table = format_table(columns, note, METRICS + RL_METRICS)
    rl_runs = [(name, os.path.join(path, "log.jsonl")) for (path, _, _, ckpt), (name, _, _) in zip(loaded, models)
               if ckpt.get("stage") == "rl" and (ckpt.get("settings") or {}).get("reward") == "model"
               and os.path.exists(os.path.join(path, "log.jsonl"))]
    if rl_runs:  # the reward model's score against the checks, every RL run on it in one picture
        from minigpt.plot import plot_rl_runs
        plot_rl_runs(rl_runs, os.path.splitext(args.out)[0] + ".png")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(table + "\n")
    print(table.split("\n\n==")[0])
    print(f"(written to {args.out})")
    return columns


if __name__ == "__main__":
    main()

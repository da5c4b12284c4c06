"""Pictures from a run's log.jsonl: train and val loss over steps (and, for SFT, the behaviour metrics)."""
import json
import warnings

import matplotlib

matplotlib.use("Agg")  # files only, no window: works on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402

from minigpt.metrics import BY_KEY, METRICS  # noqa: E402


def read_log(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _percent(records, key):
    """The key's value in each record as a percentage, NaN (a gap in the curve) where it is None."""
    return [float("nan") if r.get(key) is None else 100 * r[key] for r in records]


def plot_losses(log_path, png_path, title=None):
    """Train loss (every log line) and val loss (every eval) against steps, saved as a PNG."""
    records = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    return _finish(fig, ax, "loss (nats per token)", title or log_path, png_path)


def _finish(fig, ax, ylabel, title, png_path, xlabel="step"):
    """Label, grid and legend a one-panel figure (against steps, unless xlabel says otherwise), then save it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def plot_behaviour(log_path, png_path, title="instruction following over SFT steps"):
    """The behaviour rates measured at each eval (left) and the answer-only val loss (right)."""
    evals = [r for r in read_log(log_path) if r["kind"] == "eval" and "stop_rate" in r]
    steps = [r["step"] for r in evals]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for m in METRICS:
        if m.plot:
            ax.plot(steps, _percent(evals, m.key), marker="o", color=m.plot[0], linestyle=m.plot[1], label=m.plot[2])
    ax.set_xscale("symlog", linthresh=10)  # linear to step 10, logarithmic after: the first steps are the turn
    ax.set_xlabel("SFT step (log scale above 10)")
    ax.set_ylabel("% of val titles")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(loc="center right", bbox_to_anchor=(1.0, 0.63), fontsize=8)
    ax.set_title(title)
    ax2.plot(steps, [r["val_loss"] for r in evals], "o-", color="C5")
    ax2.set_xscale("symlog", linthresh=10)
    ax2.set_xlabel("SFT step (log scale above 10)")
    ax2.set_ylabel("val loss per poem token")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def plot_runs(runs, png_path, key="val_loss", title=None):
    """One curve per run: runs is a list of (label, log.jsonl path); eval records' key against step."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, path in runs:
        evals = [r for r in read_log(path) if r["kind"] == "eval"]
        ax.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label=label)
    return _finish(fig, ax, key.replace("_", " "), title or key, png_path)


def plot_curves(curves, png_path, xlabel, ylabel, title):
    """One line per named curve of (x, y) points: e.g. val loss against minutes for each variant of a benchmark."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        ax.plot([x for x, _ in points], [y for _, y in points], "o-", ms=3, label=name)
    return _finish(fig, ax, ylabel, title, png_path, xlabel)


def plot_time_to_rhyme(runs, png_path, title="time to rhyme: pretraining minutes, then the same short SFT"):
    """runs: [{name, points: [{minutes, rhyme, ...}], real, shuffled}] -> the share of regular answers that rhyme
    against minutes of pretraining, one line a run, with the real poems and the chance level (shuffled endings)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        rates = [float("nan") if p["rhyme"] is None else 100 * p["rhyme"] for p in run["points"]]  # None: no regular answer
        ax.plot([p["minutes"] for p in run["points"]], rates, "o-", label=run["name"])
    ax.axhline(100 * runs[-1]["real"], color="C2", ls="--", label="real poems")
    ax.axhline(100 * runs[-1]["shuffled"], color="C7", ls=":", label="chance (endings shuffled across poems)")
    ax.set_ylim(0, 100)
    return _finish(fig, ax, "rhymes (% of regular answers, test titles)", title, png_path, "minutes of pretraining")


def plot_tasks(log_path, png_path, title="each task's compliance over SFT steps (val examples)"):
    """One curve per task: the share of val answers its checker passes at each eval (the acrostic's dashed curve:
    the share of clauses that start with their head character)."""
    evals = [r for r in read_log(log_path) if r["kind"] == "eval" and "tasks" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate(dict.fromkeys(n for r in evals for n in r["tasks"])):
        rows = [(r["step"], r["tasks"][name]) for r in evals if name in r["tasks"]]
        ax.plot([s for s, _ in rows], [100 * m["comply"] for _, m in rows], "o-", color=f"C{i}", label=name)
        if "heads" in rows[0][1]:
            ax.plot([s for s, _ in rows], [100 * m["heads"] for _, m in rows], "--", color=f"C{i}", label=name + ": heads")
    ax.set_ylim(-3, 103)
    return _finish(fig, ax, "% of val examples that comply", title, png_path)


def plot_refusal(log_path, png_path, view, title="saying no over SFT steps (val examples)"):
    """The share of answers that refuse, at each eval, for each (name, label) of view: the held-out harmful
    wordings it should refuse beside the alarming and the ordinary titles it should not."""
    evals = [r for r in read_log(log_path) if r["kind"] == "eval" and "tasks" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, label) in enumerate(view):
        rows = [(r["step"], r["tasks"][name]["refuse"]) for r in evals if "refuse" in r["tasks"].get(name, {})]
        ax.plot([s for s, _ in rows], [100 * v for _, v in rows], "o-", color=f"C{i}", label=label)
    ax.set_ylim(-3, 103)
    return _finish(fig, ax, "% of val answers that refuse", title, png_path)


def plot_preferences(log_path, png_path, prefer_keys=("rhyme_rate",),
                     title="preference tuning (DPO), held-out pairs and val titles"):
    """Left: preference accuracy on held-out pairs, the preferred metrics (prefer_keys) and the shape and stop rates
    on val titles; right: the mean reward margin (beta x the log-ratio gap between chosen and rejected) at each eval."""
    evals = [r for r in read_log(log_path) if r["kind"] == "eval" and "pref_accuracy" in r]
    steps = [r["step"] for r in evals]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("pref_accuracy", *prefer_keys, "regular_rate", "stop_rate"):
        colour, _, legend = BY_KEY[key].plot
        ax.plot(steps, _percent(evals, key), "o-", color=colour, label=legend)
    ax.set_ylim(-3, 103)
    ax.set_xlabel("DPO step")
    ax.set_ylabel("%")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    ax2.plot(steps, [r["reward_margin"] for r in evals], "o-", color="C3", label="reward margin")
    return _finish(fig, ax2, "mean reward margin, chosen - rejected", "implicit reward margin", png_path)


def plot_reward_tracks(tracks, png_path, title="the reward model's score against the program's ranking (test answers)"):
    """Left: each test answer's reward-model score against the program's combined score (jittered); right: per
    dimension, the mean score of the answers that pass it and of those that fail it."""
    import random
    rng = random.Random(0)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax.scatter([c + rng.uniform(-0.03, 0.03) for c in tracks["combined"]], tracks["scores"], s=6, alpha=0.4)
    ax.set_xlabel("program's combined score (mean of the dimensions)")
    ax.set_ylabel("reward model's score")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    names = list(tracks["by_dimension"])
    xs = range(len(names))
    ax2.bar([x - 0.2 for x in xs], [tracks["by_dimension"][n][0] for n in names], 0.4, label="passes")
    ax2.bar([x + 0.2 for x in xs], [tracks["by_dimension"][n][1] for n in names], 0.4, label="fails")
    ax2.set_xticks(list(xs), names)
    ax2.legend(fontsize=8)
    return _finish(fig, ax2, "mean reward-model score", "per dimension", png_path, xlabel="dimension")


def plot_rl(log_path, png_path, title="RL against a reward, on a KL leash (val titles)"):
    """Left: the mean reward on training collections and on val titles, and the program's rates on val titles; right:
    the KL from the fine-tuned model per answer, nats."""
    evals = [r for r in read_log(log_path) if r["kind"] == "eval" and "mean_reward" in r]
    steps = [r["step"] for r in evals]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("rhyme_rate", "regular_rate", "stop_rate"):
        colour, _, legend = BY_KEY[key].plot
        ax.plot(steps, _percent(evals, key), "o-", color=colour, label=legend)
    ax.set_ylim(-3, 103)
    ax.set_xlabel("RL step")
    ax.set_ylabel("% of val titles")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title, fontsize=10)
    axr = ax.twinx()
    axr.plot(steps, [r["mean_reward"] for r in evals], "s--", color="C3", label="mean reward (val)")
    axr.set_ylabel("mean reward")
    axr.legend(fontsize=8, loc="lower right")
    ax2.plot(steps, [r["kl_to_ref"] for r in evals], "o-", color="C4", label="KL to the fine-tuned model")
    return _finish(fig, ax2, "KL(policy || SFT) per answer, nats", "the leash", png_path, xlabel="RL step")


def plot_rl_runs(runs, png_path, title="what the reward pays for, and what the checks see (val titles)"):
    """RL runs side by side against steps: left, the reward model's mean score; right, the checked rhyme and title
    rates of the same runs (solid: rhymes, dashed: mentions its title). runs: [(name, log.jsonl path)]."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, log) in enumerate(runs):
        evals = [r for r in read_log(log) if r["kind"] == "eval" and "mean_reward" in r]
        steps = [r["step"] for r in evals]
        ax.plot(steps, [r["mean_reward"] for r in evals], "o-", color=f"C{i}", label=name)
        ax2.plot(steps, _percent(evals, "rhyme_rate"), "o-", color=f"C{i}", label=f"{name}: rhymes")
        ax2.plot(steps, _percent(evals, "relevance"), "s--", color=f"C{i}", label=f"{name}: mentions title")
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean reward-model score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    ax2.set_ylim(-3, 103)
    return _finish(fig, ax2, "% of val titles", "the program's checks", png_path, xlabel="RL step")


def plot_tuning(runs, png_path, title="stops at <END> (val titles)"):
    """The side-by-side tuning runs (python -m minigpt.lora) against steps: left, the share of val answers that stop;
    right, the share in a regular form. runs: [(name, log.jsonl path)]."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, log) in enumerate(runs):
        evals = [r for r in read_log(log) if r["kind"] == "eval" and "stop_rate" in r]
        steps = [r["step"] for r in evals]
        ax.plot(steps, _percent(evals, "stop_rate"), "o-", color=f"C{i}", label=name)
        ax2.plot(steps, _percent(evals, "regular_rate"), "o-", color=f"C{i}", label=name)
    for a in (ax, ax2):
        a.set_xscale("symlog", linthresh=10)
        a.set_ylim(-3, 103)
    ax.set_xlabel("SFT step")
    ax.set_ylabel("% of val titles")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _finish(fig, ax2, "% of val titles", "in a regular form (jueju / lushi)", png_path, xlabel="SFT step")


# ---- pictures of one answer (python -m minigpt.explain): their labels are Chinese characters ----

CJK_FONTS = ["Noto Sans CJK TC", "Noto Sans CJK SC", "Noto Serif CJK TC", "Source Han Sans TC", "WenQuanYi Zen Hei",
             "Microsoft JhengHei", "Microsoft YaHei", "PingFang TC", "PingFang SC", "Heiti TC", "SimHei", "AR PL UMing TW"]


def use_cjk_font():
    """Draw text in the first installed font with Chinese characters; returns its name, or None:
    then the characters are drawn as boxes (install one, e.g. apt install fonts-noto-cjk) and matplotlib's warning
    for each missing glyph is silenced (python -m minigpt.explain says it once)."""
    from matplotlib import font_manager
    installed = {f.name for f in font_manager.fontManager.ttflist}
    name = next((f for f in CJK_FONTS if f in installed), None)
    if name:  # a list: a glyph the Chinese font lacks (↵) comes from the next one
        plt.rcParams["font.family"] = [name, "DejaVu Sans"]
    else:
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")
    return name


def _label(token):
    return {"\n": "↵", " ": "␣"}.get(token, token)


def plot_end_probabilities(answer, p_base, p_sft, title, png_path, base_end="blank line", sft_end="<END>"):
    """The probability of ending after each character of one answer: the base model's (its poems end with a blank
    line) against the fine-tuned model's (it ends with its end marker), on a log scale."""
    use_cjk_font()
    x = range(len(answer) + 1)
    fig, ax = plt.subplots(figsize=(max(8, 0.17 * len(x)), 4))
    ax.plot(x, p_base, "o-", ms=3, color="C7", label=f"base model: P({base_end})")
    ax.plot(x, p_sft, "o-", ms=3, color="C0", label=f"fine-tuned: P({sft_end})")
    ax.set_yscale("log")
    ax.set_ylim(1e-7, 1.5)
    ax.set_xticks(list(x), ["·"] + [_label(c) for c in answer], fontsize=7)
    ax.set_xlabel("the answer, one character at a time (P is of ending right after it; ↵ = new line)")
    ax.set_ylabel("probability of ending here")
    ax.set_title(f"【{title}】 where the model decides to stop")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def plot_next_chars(tops, context, title, png_path):
    """The likeliest next characters after context, one panel per temperature (tops: {temperature: [(token, p)]})."""
    use_cjk_font()
    fig, axes = plt.subplots(1, len(tops), figsize=(4.5 * len(tops), 4), squeeze=False)
    for ax, (t, top) in zip(axes[0], tops.items()):
        labels, probs = [_label(c) for c, _ in top][::-1], [p for _, p in top][::-1]
        ax.barh(range(len(top)), probs, color="C0")
        ax.set_yticks(range(len(top)), labels)
        ax.set_xlim(0, 1)
        ax.set_xlabel("probability")
        ax.set_title(f"temperature {t}")
        for i, p in enumerate(probs):
            ax.text(p + 0.01, i, f"{p:.2f}", va="center", fontsize=8)
    tail = context.replace("\n", "↵")[-12:]
    fig.suptitle(f"【{title}】 next character after …{tail}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def plot_attention(att, title, answer, png_path):
    """att (n_layer, len(answer), len(title)): each layer's attention (mean over heads) from every answer
    character back to each title character, one heat map per layer."""
    use_cjk_font()
    n_layer, n_answer, _ = att.shape
    panel = min(4.0, max(1.6, 0.4 * len(title)))  # inches per layer: a long title gets narrow columns, not a huge figure
    fig, axes = plt.subplots(1, n_layer, figsize=(1.5 + panel * n_layer, max(4, 0.16 * n_answer)), squeeze=False,
                             sharey=True)
    vmax = float(att.max())
    for layer, ax in enumerate(axes[0]):
        im = ax.imshow(att[layer].cpu().numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_xticks(range(len(title)), list(title), fontsize=max(5, min(10, 60 // len(title))))
        ax.set_title(f"layer {layer + 1}", fontsize=9)
    axes[0][0].set_yticks(range(n_answer), [_label(c) for c in answer], fontsize=6)
    axes[0][0].set_ylabel("answer character (looking back)")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.6, label="attention weight (mean over heads)")
    fig.suptitle(f"【{title}】 fine-tuned model: attention from the answer to the title")
    fig.savefig(png_path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return png_path

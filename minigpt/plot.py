"""Pictures from a run's log.jsonl: train and val loss over steps (and, for SFT, the behaviour metrics)."""
import json

import matplotlib

matplotlib.use("Agg")  # files only, no window: works on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402


def read_log(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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


def _finish(fig, ax, ylabel, title, png_path):
    """Label, grid and legend a one-panel figure against steps, then save it."""
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


BEHAVIOUR = [("stop_rate", "stops at <END>", "C0", "-"), ("regular_rate", "regular shape", "C1", "-"),
             ("run_on_rate", "runs on", "C2", "-"), ("relevance", "mentions its title", "C3", "-"),
             ("relevance_shuffled", "mentions a shuffled title", "C3", "--"), ("rhyme_rate", "rhymes (of regular)", "C4", "-")]


def plot_behaviour(log_path, png_path, title="instruction following over SFT steps"):
    """The behaviour rates measured at each eval (left) and the answer-only val loss (right)."""
    evals = [r for r in read_log(log_path) if r["kind"] == "eval" and "stop_rate" in r]
    steps = [r["step"] for r in evals]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label, colour, style in BEHAVIOUR:
        ax.plot(steps, [float("nan") if r.get(key) is None else 100 * r[key] for r in evals], marker="o",
                color=colour, linestyle=style, label=label)
    ax.set_xlabel("SFT step")
    ax.set_ylabel("% of val titles")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(loc="center right", bbox_to_anchor=(1.0, 0.63), fontsize=8)
    ax.set_title(title)
    ax2.plot(steps, [r["val_loss"] for r in evals], "o-", color="C5")
    ax2.set_xlabel("SFT step")
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


def plot_preferences(log_path, png_path, title="preference tuning (DPO), held-out pairs and val titles"):
    """Left: preference accuracy on held-out pairs, and the rhyme and shape rates on val titles; right: the mean
    reward margin (beta x the log-ratio gap between chosen and rejected) at each eval."""
    evals = [r for r in read_log(log_path) if r["kind"] == "eval" and "pref_accuracy" in r]
    steps = [r["step"] for r in evals]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label, colour in (("pref_accuracy", "preference accuracy (held-out pairs)", "C0"),
                               ("rhyme_rate", "rhymes (of regular answers)", "C4"), ("regular_rate", "regular shape", "C1"),
                               ("stop_rate", "stops at the end marker", "C2")):
        ax.plot(steps, [float("nan") if r.get(key) is None else 100 * r[key] for r in evals], "o-", color=colour, label=label)
    ax.set_ylim(-3, 103)
    ax.set_xlabel("DPO step")
    ax.set_ylabel("%")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    ax2.plot(steps, [r["reward_margin"] for r in evals], "o-", color="C3", label="reward margin")
    return _finish(fig, ax2, "mean reward margin, chosen - rejected", "implicit reward margin", png_path)

"""Time to rhyme: how many minutes of pretraining a model needs before the same short SFT makes it rhyme. Takes the
snapshots a pretraining run kept (`python train_pretrain.py --keep-snapshots`), the last one at or before each
chosen minute, fine-tunes each with the class SFT (train_sft.py --preset class, in its own process), and reads the
final table on test titles: the share of regular answers that rhyme, the stop and regular rates, beside the real
poems and the same poems with their line endings shuffled across poems (the chance level).

    python train_pretrain.py --preset class --keep-snapshots --out-dir runs/pretrain_class
    python tools/time_to_rhyme.py runs/pretrain_class --minutes 2 3 4 5
    python tools/time_to_rhyme.py runs/pretrain --minutes 3.5 7 10.5 14 --plot-with runs/time_to_rhyme/pretrain_class

A run that kept no snapshots gives one point, its last checkpoint. A point fine-tuned before is read again.

Each point is one SFT run (about five minutes on 2 CPU cores); nothing else should run meanwhile.
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from minigpt.checkpoint import CheckpointError, load_checkpoint  # noqa: E402


def snapshots(run):
    """[(minutes, step, val loss, path)] of a run's kept snapshots, in order of steps; a run that kept none gives its
    last checkpoint alone."""
    paths = glob.glob(os.path.join(run, "snapshots", "step_*.pt")) or [os.path.join(run, "ckpt.pt")]
    found = []
    for path in paths:
        ev = load_checkpoint(path)[2]["last_eval"]
        found.append((ev["elapsed_s"] / 60, ev["step"], ev["val_loss"], path))
    return sorted(found, key=lambda s: s[1])


def at_minutes(found, minutes):
    """The last snapshot at or before each minute (within 3% past it: the budget's last eval comes a few seconds
    late); raises ValueError where none is."""
    picked = []
    for m in minutes:
        before = [s for s in found if s[0] <= m * 1.03 and s[1] > 0]
        if not before:
            raise ValueError(f"no snapshot at or before minute {m:g}; the run kept {len(found)}")
        picked.append(before[-1])
    return picked


def fine_tune(snapshot, out_dir, sft_args, again=False):
    """train_sft.py from one snapshot; its final table's columns (final.json). A point fine-tuned before is read
    again, not trained again, unless again is set."""
    final = os.path.join(out_dir, "final.json")
    if os.path.exists(final) and not again:
        print(f"{out_dir}: fine-tuned before; read again (--overwrite trains it again)")
    else:
        cmd = [sys.executable, os.path.join(ROOT, "train_sft.py"), "--init-from", snapshot, "--out-dir", out_dir,
               "--overwrite", *sft_args]
        print("$ " + " ".join(["train_sft.py", *cmd[2:]]), flush=True)
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # no progress bar here
        if done.returncode:
            raise SystemExit(f"error: the SFT run above ended with exit code {done.returncode}: "
                             f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no message'}")
    with open(final, encoding="utf-8") as f:
        return json.load(f)


def chance_levels(out_dir):
    """(real poems, shuffled endings) rhyme rates as the SFT run's table states them."""
    with open(os.path.join(out_dir, "table.txt"), encoding="utf-8") as f:
        note = f.read()
    real, shuffled = re.search(r"real regular poems ([\d.]+)%, their line endings shuffled across poems ([\d.]+)%",
                               note).groups()
    return float(real) / 100, float(shuffled) / 100


def format_points(name, points, preset="class"):
    lines = [f"{name}: minutes of pretraining -> the {preset} SFT's answers on test titles",
             f"{'minutes':>8} {'step':>6} {'val loss':>9} {'stop':>7} {'regular':>8} {'rhymes':>7}"]
    for p in points:
        rhyme = "—" if p["rhyme"] is None else f"{p['rhyme']:.1%}"  # None: no regular answer to rhyme
        lines.append(f"{p['minutes']:8.1f} {p['step']:6d} {p['val_loss']:9.3f} {p['stop']:7.1%} {p['regular']:8.1%} "
                     f"{rhyme:>7}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a pretraining run made with --keep-snapshots")
    p.add_argument("--minutes", type=float, nargs="+", required=True, help="the minutes of pretraining to fine-tune at")
    p.add_argument("--out-dir", default=os.path.join("runs", "time_to_rhyme"), help="a folder per run, one per point")
    p.add_argument("--sft-preset", default="class", help="the SFT preset every point gets (default: the lesson's)")
    p.add_argument("--corpus", help="the corpus of the pretraining run (default: the project's)")
    p.add_argument("--name", help="the run's name in the table and the plot (default: its folder's)")
    p.add_argument("--overwrite", action="store_true", help="fine-tune again the points that were fine-tuned before")
    p.add_argument("--plot-with", nargs="*", default=[], help="earlier outputs of this tool to draw on the same plot")
    args = p.parse_args(argv)
    try:
        picked = at_minutes(snapshots(args.run), args.minutes)
    except CheckpointError as e:  # it says which command writes one
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as e:
        print(f"error: {e}; train it with python train_pretrain.py --keep-snapshots --out-dir {args.run}",
              file=sys.stderr)
        raise SystemExit(2) from None
    folder = os.path.basename(os.path.normpath(args.run))
    name, out = args.name or folder, os.path.join(args.out_dir, folder)
    sft_args = ["--preset", args.sft_preset] + (["--corpus", args.corpus] if args.corpus else [])
    points = []
    for minutes, step, val_loss, path in picked:
        point_dir = os.path.join(out, f"step_{step}")
        tuned = fine_tune(path, point_dir, sft_args, args.overwrite)["fine-tuned"]
        points.append({"minutes": minutes, "step": step, "val_loss": val_loss, "stop": tuned["stop_rate"],
                       "regular": tuned["regular_rate"], "rhyme": tuned["rhyme_rate"]})
        print(format_points(name, points, args.sft_preset), flush=True)
    real, shuffled = chance_levels(point_dir)
    with open(os.path.join(out, "points.json"), "w", encoding="utf-8") as f:
        json.dump({"name": name, "points": points, "real": real, "shuffled": shuffled}, f)
    text = format_points(name, points, args.sft_preset) + (f"\n(rhymes: of the regular answers; real regular poems "
                                                          f"{real:.1%}, their endings shuffled across poems "
                                                          f"{shuffled:.1%}: the chance level)")
    with open(os.path.join(out, "table.txt"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    from minigpt.plot import plot_time_to_rhyme
    runs = [json.load(open(os.path.join(d, "points.json"), encoding="utf-8")) for d in args.plot_with] + \
        [{"name": name, "points": points, "real": real, "shuffled": shuffled}]
    png = plot_time_to_rhyme(runs, os.path.join(out, "time_to_rhyme.png"))
    print(text + f"\nsee {out}/table.txt, {png}")
    return points


if __name__ == "__main__":
    main()

"""The longest functions and methods of the package and the scripts, by lines from `def` to the last line of the body.

    python tools/longest_functions.py            # the ten longest
    python tools/longest_functions.py --over 40  # every one over 40 lines (the scripts' main may be)
"""
import argparse
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def functions(root=ROOT):
    """[(lines, 'file:name')] for every function and method of minigpt/ and the train_*.py scripts."""
    out = []
    for path in sorted(glob.glob(os.path.join(root, "minigpt", "*.py")) + glob.glob(os.path.join(root, "train_*.py"))):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((node.end_lineno - node.lineno + 1, f"{os.path.relpath(path, root)}:{node.name}"))
    return sorted(out, reverse=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--over", type=int, help="list every function longer than this many lines")
    p.add_argument("--root", default=ROOT, help="the repository to read (another checkout, to compare)")
    args = p.parse_args(argv)
    found = functions(args.root)
    rows = [f for f in found if f[0] > args.over] if args.over is not None else found[:10]
    for n, name in rows:
        print(f"{n:4d}  {name}")
    return rows


if __name__ == "__main__":
    main()

"""Rebuild poems/tang.jsonl.gz from the npm package chinese-poetry@2.0.1.

    npm pack chinese-poetry@2.0.1 && tar xzf chinese-poetry-2.0.1.tgz
    python poems/build_corpus.py package

Reads quantangshi/poet.tang.*.json, cleans it (rules in poems/README.md) and writes one poem a line.
"""
import argparse
import glob
import gzip
import json
import os
import re
import sys

MISSING_GLYPH = "□"


def find_files(package_dir):
    for sub in ("quantangshi", os.path.join("dist", "quantangshi")):
        files = glob.glob(os.path.join(package_dir, sub, "poet.tang.*.json"))
        if files:
            return sorted(files, key=lambda f: int(re.search(r"poet\.tang\.(\d+)\.json$", f).group(1)))
    return []


def clean(raw_poems):
    """Return (poems, counts): the kept poems as dicts and how many each rule dropped."""
    counts = {"read": 0, "missing_glyph": 0, "empty": 0, "duplicate": 0, "kept": 0}
    seen, kept = set(), []
    for p in raw_poems:
        counts["read"] += 1
        title = (p.get("title") or "").strip()
        author = (p.get("author") or "").strip()
        lines = [line.strip() for line in p.get("paragraphs") or [] if line.strip()]
        if MISSING_GLYPH in title + author + "".join(lines):
            counts["missing_glyph"] += 1
            continue
        if not lines:
            counts["empty"] += 1
            continue
        key = (title, author, tuple(lines))
        if key in seen:
            counts["duplicate"] += 1
            continue
        seen.add(key)
        kept.append({"title": title, "author": author, "lines": lines})
    counts["kept"] = len(kept)
    return kept, counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package_dir", help="the unpacked npm package (the folder named 'package')")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "tang.jsonl.gz"))
    args = parser.parse_args(argv)
    files = find_files(args.package_dir)
    if not files:
        sys.exit(f"error: no quantangshi/poet.tang.*.json under {args.package_dir}; unpack chinese-poetry-2.0.1.tgz first")
    raw = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            raw.extend(json.load(fh))
    poems, counts = clean(raw)
    # mtime=0 keeps the gzip bytes identical from one rebuild to the next
    with open(args.out, "wb") as fh, gzip.GzipFile(filename="", fileobj=fh, mode="wb", mtime=0) as gz:
        for p in poems:
            gz.write((json.dumps(p, ensure_ascii=False) + "\n").encode("utf-8"))
    print(f"{len(files)} files; " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f"; wrote {args.out}")


if __name__ == "__main__":
    main()

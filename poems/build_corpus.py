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

def find_files(package_dir):
    for sub in ("quantangshi", os.path.join("dist", "quantangshi")):
        files = glob.glob(os.path.join(package_dir, sub, "poet.tang.*.json"))
        if files:
            return sorted(files, key=lambda f: int(re.search(r"poet\.tang\.(\d+)\.json$", f).group(1)))
    return []


# Editorial matter, removed from titles and lines (rules and counts in poems/README.md):
NOTE = re.compile(r"（[^（）]*）|\([^()]*\)|〖[^〖〗]*〗")  # commentary, variant readings （一作「…」）, sources （見《…》卷…）
FOOTNOTE = re.compile(r"[\[［][一二三四五六七八九十○〇0-9]+[\]］]")  # footnote marks [一], [10]
RESTORED = re.compile(r"[\[［]([^\[\]［］]*)[\]］]")  # [爽]: a character the editors restored; kept, brackets dropped
UNCLOSED = re.compile(r"[（(〖][^）)〗]*$")  # a note whose closing bracket is lost: cut to the end of the line or title
NOTE_LINE = re.compile(r"^(?:見《|按：|以上)")  # a whole line that is a source note
CJK = "\u3400-\u4dbf\u4e00-\u9fff\U00020000-\U0003ffff"
NO_WORDS = re.compile(rf"^[^{CJK}]*$")  # punctuation left behind by a note: （…）。
# characters the source could not print: □ and ● (lost), {亠/樂} (described by parts), ⿰ (ideographic description),
# private-use code points and full-width Latin letters (scanning errors)
MISSING_GLYPH = re.compile(r"[□●{}⿰-⿻\ue000-\uf8ffＡ-Ｚａ-ｚ]")
VERSE = re.compile(rf"^(?:[{CJK}《》〈〉]+[，。？！；：、])+$")  # clauses of characters, each closed by punctuation


def strip_notes(text):
    """Text without editorial matter; notes may nest, and in a poem's body they may span lines."""
    previous = None
    while previous != text:
        previous, text = text, NOTE.sub("", text)
    return RESTORED.sub(r"\1", FOOTNOTE.sub("", text))


def clean_lines(lines):
    """The poem's lines with notes, note lines and doubled end punctuation (！。) removed; empty lines dropped."""
    out = []
    for line in strip_notes("\n".join(lines)).split("\n"):
        line = re.sub(r"([！？])。", r"\1", UNCLOSED.sub("", line).strip())
        if line and not NO_WORDS.match(line) and not NOTE_LINE.match(line):
            out.append(line)
    return out


def clean(raw_poems):
    """Return (poems, counts): the kept poems as dicts and how many each rule dropped."""
    counts = {"read": 0, "notes_in_title": 0, "notes_in_lines": 0, "no_verse_left": 0, "missing_glyph": 0,
              "not_verse": 0, "duplicate": 0, "kept": 0}
    seen, kept = set(), []
    for p in raw_poems:
        counts["read"] += 1
        raw_title = (p.get("title") or "").strip()
        raw_lines = [line.strip() for line in p.get("paragraphs") or [] if line.strip()]
        title = " ".join(UNCLOSED.sub("", strip_notes(raw_title)).split())
        author = strip_notes((p.get("author") or "").strip()).strip()
        lines = clean_lines(raw_lines)
        counts["notes_in_title"] += title != raw_title
        counts["notes_in_lines"] += lines != raw_lines
        if not lines:
            counts["no_verse_left"] += 1
            continue
        if MISSING_GLYPH.search(title + author + "".join(lines)):
            counts["missing_glyph"] += 1
            continue
        if not all(VERSE.match(line) for line in lines):  # a bracket left open, prose, quoted speech
            counts["not_verse"] += 1
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

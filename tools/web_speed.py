"""The web page's speed in headless Chromium: how long the page takes to be ready (models decoded), characters per
second for one model writing alone, and a title written in both columns as a user sees it (time to the first
character, characters per second of each column). Each round opens the page twice, as it runs (W x in WebAssembly
SIMD where the browser has it) and with #nosimd (every product in JavaScript), so both meet the same drift of the
machine. Needs playwright and a system chromium (requirements-dev.txt).

    python -m minigpt.web && python tools/web_speed.py runs/web/index.html
"""
import argparse
import os
import shutil
import statistics

from playwright.sync_api import sync_playwright

VARIANTS = {"": "as the page runs", "#nosimd": "JavaScript alone (#nosimd)"}


def one_page(browser, url, chars, title):
    """A fresh page (its ready time includes decoding the weights): its figures."""
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("#go")
    got = dict(ready=page.evaluate("window.minigptReady"), simd=page.evaluate("window.minigptSimd"))
    for key in ("base", "sft"):
        got[key] = page.evaluate(f"minigptBench('{key}', {chars})")
    page.fill("#title", title)
    page.click("#go")
    page.wait_for_selector("#col-base[data-state=done]", timeout=120000)
    page.wait_for_selector("#col-tuned[data-state=done]", timeout=120000)
    stats = page.evaluate("window.minigptStats")
    got["first"] = max(s["first_ms"] for s in stats.values())
    got["both"] = sum(s["cps"] for s in stats.values())
    page.close()
    return got


def measure(path, repeats=5, chars=300, title="春夜喜雨"):
    url = "file://" + os.path.abspath(path)
    runs = {v: [] for v in VARIANTS}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        for _ in range(repeats):
            for v in VARIANTS:
                runs[v].append(one_page(browser, url + v, chars, title))
        browser.close()
    spread = lambda xs: f"median {statistics.median(xs):.0f} (range {min(xs):.0f}-{max(xs):.0f})"
    print(f"{path}: {os.path.getsize(path) / 1e6:.2f} MB; {repeats} rounds of fresh pages in headless Chromium")
    for v, name in VARIANTS.items():
        col = lambda k: [r[k] for r in runs[v]]
        print(f"\n{name}: WebAssembly SIMD {'used' if all(col('simd')) else 'not used'}")
        print(f"  ready (weights decoded, page drawn): {spread(col('ready'))} ms")
        for key in ("base", "sft"):
            print(f"  {key} model writing alone, {chars} characters: {spread(col(key))} characters/s")
        print(f"  both columns, 【{title}】: first character after {spread(col('first'))} ms; both columns together "
              f"{spread(col('both'))} characters/s (the base one also computes P(blank line), a second pass a character)")
    return runs


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("page", nargs="?", default=os.path.join("runs", "web", "index.html"))
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    measure(args.page, args.repeats)

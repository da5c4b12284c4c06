"""The web page's speed in headless Chromium: how long the page takes to be ready (models decoded), characters per
second for one model writing alone, and a title written in both columns as a user sees it (time to the first
character, characters per second of each column). Needs playwright and a system chromium (requirements-dev.txt).

    python -m minigpt.web && python tools/web_speed.py runs/web/index.html
"""
import argparse
import os
import shutil
import statistics

from playwright.sync_api import sync_playwright


def measure(path, repeats=5, chars=300, title="春夜喜雨"):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        ready, alone, first, cps = [], {"base": [], "sft": []}, [], []
        for _ in range(repeats):  # a fresh page each time: ready time includes decoding the weights
            page = browser.new_page()
            page.goto("file://" + os.path.abspath(path))
            page.wait_for_selector("#go")
            ready.append(page.evaluate("window.minigptReady"))
            for key in alone:
                alone[key].append(page.evaluate(f"minigptBench('{key}', {chars})"))
            page.fill("#title", title)
            page.click("#go")
            page.wait_for_selector("#col-base[data-state=done]", timeout=120000)
            page.wait_for_selector("#col-tuned[data-state=done]", timeout=120000)
            stats = page.evaluate("window.minigptStats")
            first.append(max(s["first_ms"] for s in stats.values()))
            cps.append(sum(s["cps"] for s in stats.values()))
            page.close()
        browser.close()
    spread = lambda xs: f"median {statistics.median(xs):.0f} (range {min(xs):.0f}-{max(xs):.0f})"
    print(f"{path}: {os.path.getsize(path) / 1e6:.2f} MB; {repeats} fresh pages in headless Chromium")
    print(f"ready (weights decoded, page drawn): {spread(ready)} ms")
    for key, xs in alone.items():
        print(f"{key} model writing alone, {chars} characters: {spread(xs)} characters/s")
    print(f"both columns, 【{title}】: first character after {spread(first)} ms; both columns together {spread(cps)} "
          "characters/s (the base one also computes P(blank line), a second pass a character)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("page", nargs="?", default=os.path.join("runs", "web", "index.html"))
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    measure(args.page, args.repeats)

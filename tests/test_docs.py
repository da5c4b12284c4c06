"""The README and docs/ kept honest where a program can check them: the README's size, every command's flags, the run
folders the notebooks read, and the files the pages link to."""
import contextlib
import glob
import importlib
import io
import json
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
PROGRAM = re.compile(r"(?:python3? (?:-m (minigpt\.\w+)|((?:train_\w+|tools/\w+)\.py))|torchrun .*?(train_\w+\.py))")


def text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def commands(page):
    """(program, flags) for every command a page shows: in code blocks, one a line; in running text, in backticks."""
    found = []
    s = text(page)
    blocks = re.findall(r"```(?:bash|powershell)?\n(.*?)```", s, re.S)
    candidates = [line for b in blocks for line in b.splitlines()]
    candidates += re.findall(r"`([^`\n]*(?:python|torchrun)[^`\n]*)`", re.sub(r"```.*?```", "", s, flags=re.S))
    for line in candidates:
        for part in re.split(r"&&|;|\|", line.split(" #")[0]):
            m = PROGRAM.search(part)
            if not m:
                continue
            program = m.group(1) or m.group(2) or m.group(3)
            try:
                words = shlex.split(part[m.end():])
            except ValueError:
                words = part[m.end():].split()
            found.append((program, [w.split("=")[0] for w in words if w.startswith("--")]))
    return found


_help = {}


def help_text(program):
    """What the program accepts: its --help for scripts and package modules, its source for the tools."""
    if program not in _help:
        if program.startswith("tools/"):
            _help[program] = text(os.path.join(ROOT, program))
        else:
            module = importlib.import_module(program[:-3] if program.endswith(".py") else program)
            out = io.StringIO()
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
                module.main(["--help"])
            _help[program] = out.getvalue()
    return _help[program]


def test_the_readme_is_a_guide_not_a_log():
    assert len(text(PAGES[0])) <= 20000


def test_every_command_the_pages_show_takes_the_flags_they_show():
    wrong, seen = [], 0
    for page in PAGES:
        for program, flags in commands(page):
            seen += 1
            accepted = help_text(program)
            wrong += [f"{os.path.basename(page)}: {program} {f}" for f in flags if f not in ("--help",)
                      and not re.search(re.escape(f) + r"(?![\w-])", accepted)]
    assert seen > 40  # the extraction finds the commands
    assert wrong == []


def test_the_check_catches_a_flag_that_does_not_exist(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("```bash\npython train_sft.py --n-layer 6   # not a flag of stage 2\n```\n", encoding="utf-8")
    (program, flags), = commands(str(page))
    assert program == "train_sft.py" and flags == ["--n-layer"]
    assert not re.search(re.escape("--n-layer") + r"(?![\w-])", help_text(program))


def written_run_folders():
    """The run folders the README's commands write, as the scripts resolve them."""
    import importlib
    out = set()
    for line in re.findall(r"python (train_\w+\.py[^\n#`]*)", text(PAGES[0])):
        script, *argv = shlex.split(line)
        if "--out-dir" in argv:
            out.add(argv[argv.index("--out-dir") + 1])
        elif script == "train_pretrain.py":
            out.add(os.path.join("runs", "pretrain"))
        else:
            out.add(importlib.import_module(script[:-3]).parse_args(argv).out_dir)
    return {p.replace(os.sep, "/") for p in out}


def test_every_run_folder_a_notebook_reads_is_one_a_readme_command_writes():
    read = set()
    for path in glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")):
        code = "\n".join("".join(c["source"]) for c in json.load(open(path, encoding="utf-8"))["cells"]
                         if c["cell_type"] == "code")
        read |= set(re.findall(r'os\.path\.join\(RUNS, "(\w+)"', code)) | set(re.findall(r'have\("(\w+)"\)', code))
    assert {"pretrain", "sft", "sft_chat", "dpo"} <= read  # the extraction finds them
    assert {f"runs/{r}" for r in read} <= written_run_folders()


def test_every_local_link_leads_to_a_file():
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text(page)):
            if not target.startswith(("http://", "https://")) and \
                    not os.path.exists(os.path.join(os.path.dirname(page), target)):
                missing.append(f"{os.path.basename(page)} -> {target}")
    assert missing == []

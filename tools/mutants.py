"""Mutation check: break one function behind a figure at a time, run the tests that guard it, and say which test
catches the break. A mutant that no test catches is a function the figures rest on without a guard.

    python tools/mutants.py              # every mutant against its tests (a few minutes on 2 cores)
    python tools/mutants.py --only dpo   # the mutants whose name holds 'dpo'
    python tools/mutants.py --full       # each mutant against the whole default suite (slower)

Each mutant is (name, file, the exact text, what it becomes, the test files to run). The repository is copied to a
temporary folder once; every mutant is applied there, tested and undone, so the checkout is never touched.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MUTANTS = [
    # preference pairs
    ("ending pairs read the logits one position late", "minigpt/pairs.py",
     "row = logits[0, len(prompt_ids) + places[k] - 1]", "row = logits[0, len(prompt_ids) + places[k]]", "test_dpo"),
    ("ending pairs ignore top-k", "minigpt/pairs.py",
     "top = torch.topk(row.float() / self.temperature, min(self.top_k, row.size(-1)))",
     "top = torch.topk(row.float() / self.temperature, row.size(-1))", "test_dpo"),
    ("ending pairs take the first option instead of a draw", "minigpt/pairs.py",
     "return side[torch.multinomial(probs", "return side[0][0] or side[torch.multinomial(probs", "test_dpo"),
    ("a repeated ending keeps the rhyme", "minigpt/pairs.py",
     "breaks = [o for o in options if groups.get(o[0]) != group or o[0] in earlier]",
     "breaks = [o for o in options if groups.get(o[0]) != group]", "test_dpo"),
    ("a character only a later ending uses is a rejected choice", "minigpt/pairs.py",
     "breaks = [o for o in options if groups.get(o[0]) != group or o[0] in earlier]",
     "breaks = [o for o in options if groups.get(o[0]) != group or o[0] in earlier or o[0] in later]", "test_dpo"),
    ("endings that break the rhyme are not mended", "minigpt/pairs.py",
     "if self.yard.rhyme_groups.get(ends[k]) == group and ends[k] not in ends[:k]:",
     "if True:", "test_dpo"),
    ("an ending pair counts the whole answer", "minigpt/dpo.py", "        if p.upto:", "        if False:", "test_dpo"),
    ("the accuracy's error counts each pair on its own", "minigpt/dpo.py", "        by_group[g] += r - share",
     "        by_group[len(by_group)] += r - share", "test_dpo"),
    ("every pair batch runs its chosen rows alone", "minigpt/dpo.py",
     "shared = bool(((x[:n] == x[n:]) | ~seen).all())", "shared = True", "test_dpo"),
    ("a margin's rest is the total less its places (rounding where the sides agree)", "minigpt/dpo.py",
     "return on_answer[at].sum().item(), on_answer[~at].sum().item()",
     "return on_answer[at].sum().item(), on_answer.sum().item() - on_answer[at].sum().item()", "test_dpo"),
    ("a pair batch is cut before its last counted target", "minigpt/dpo.py",
     "last = counted.any(0).nonzero().max().item() + 1", "last = counted.any(0).nonzero().max().item()", "test_dpo"),
    ("the rejected side's gates are not re-checked", "minigpt/pairs.py",
     "if gate(rejected, True, ex, self.yard) or worked_against:", "if worked_against:", "test_dpo"),
    ("ending pairs ignore --hold", "minigpt/pairs.py",
     "worked_against = hold and hold.passes(rejected", "worked_against = False and hold.passes(rejected", "test_dpo"),
    ("the gate skips the task's check", "minigpt/pairs.py",
     " or not BY_NAME[example.task].check(answer, example):", ":", "test_dpo"),
    ("pair_up gives up on a prompt", "minigpt/pairs.py",
     "good.remove(chosen)  # the next passing answer takes its turn\n            continue",
     "break", "test_dpo"),
    ("held-out DPO prompts keep training titles", "minigpt/pairs.py",
     "poems = [p for p in poems if clean_title(p.title) not in leave_out]", "poems = list(poems)", "test_scripts"),
    # the DPO loss and its reference
    ("the DPO loss's sign is flipped", "minigpt/dpo.py",
     "loss = -F.logsigmoid(chosen - rejected).mean()", "loss = -F.logsigmoid(rejected - chosen).mean()", "test_dpo"),
    ("the reference is measured in train mode", "minigpt/dpo.py",
     "    with evaluating(reference):\n        for i in range(0, len(pairs), batch_size):",
     "    with contextlib.nullcontext():\n        for i in range(0, len(pairs), batch_size):", "test_dpo"),
    ("the DPO policy keeps the SFT model's dropout", "train_dpo.py",
     "GPT(dataclasses.replace(ref.config, dropout=0.0))", "GPT(ref.config)", "test_scripts"),
    # the rules of verse and the metrics
    ("the rhyme-group learner ignores its weak threshold", "minigpt/verse.py",
     "        if n >= weak:", "        if n >= 1:", "test_verse"),
    ("the rhyme-group learner learns from every poem", "minigpt/verse.py",
     "        if is_regular(body):\n            pairs.update", "        if True:\n            pairs.update", "test_verse"),
    ("the calibration's shuffled endings are the poems' own", "minigpt/metrics.py",
     "shuffled = [[pool[i] for i in torch.randint(len(pool), (len(line_endings(t)),), generator=gen).tolist()]\n"
     "                    for t in real]", "shuffled = [line_endings(t) for t in real]", "test_evaluate"),
    ("the calibration's real rate counts irregular poems", "minigpt/metrics.py",
     "real = [p.body for p in poems if is_regular(p.body)]", "real = [p.body for p in poems]", "test_evaluate"),
    ("the rhyme rate is over all answers", "minigpt/metrics.py",
     "rhymes(a, self.yard.rhyme_groups) for a in self.regular", "rhymes(a, self.yard.rhyme_groups) for a in self.answers",
     "test_evaluate"),
    ("relevance is scored on the raw text", "minigpt/metrics.py",
     "self.relevance = relevance(titles, self.answers)", "self.relevance = relevance(titles, texts)", "test_evaluate"),
    ("a pasted title counts as a mention", "minigpt/metrics.py",
     'join(c for c in clauses(answer) if c != whole)', 'join(c for c in clauses(answer))', "test_evaluate"),
    ("a clause with one character changed is no repeat", "minigpt/metrics.py",
     "sum(x != y for x, y in zip(a, b)) <= 1", "sum(x != y for x, y in zip(a, b)) < 1", "test_evaluate"),
    ("near-copies are never found", "minigpt/metrics.py",
     'return any(hash(clause[:i] + "\\0" + clause[i + 1:]) in self.keys for i in range(len(clause)))', "return False",
     "test_evaluate"),
    ("the val sample fits the <INS> format only", "minigpt/evaluate.py",
     "tokenizer.encode(fmt.prompt(title) + p.body + fmt.end", "tokenizer.encode(TITLE_TO_POEM.prompt(title) + p.body + "
     "TITLE_TO_POEM.end", "test_evaluate"),
    # the tasks' checkers
    ("the acrostic check drops its clause count", "minigpt/tasks.py",
     " and len(clauses(answer)) == len(example.want) and", " and", "test_tasks"),
    ("the acrostic check drops its shape check", "minigpt/tasks.py",
     "return is_regular(answer) and len(clauses(answer)) == len(example.want)",
     "return len(clauses(answer)) == len(example.want)", "test_tasks"),
    # (dropping `answer == first_poem(answer)` alone changes nothing: a run-on never has the shape of a form; scoring the
    # first poem instead of the whole answer is the run-on let through)
    ("continuation allows a run-on", "minigpt/tasks.py",
     'return (answer == first_poem(answer) and form_of(example.input + "\\n" + answer)',
     'return (form_of(example.input + "\\n" + first_poem(answer))', "test_tasks"),
    ("continuation allows an echo of the given couplet", "minigpt/tasks.py",
     "\n            and not set(clauses(answer)) & set(clauses(example.input)))", ")", "test_tasks"),
    ("naming drops its length cap", "minigpt/tasks.py", "2 <= len(answer) <= 12", "2 <= len(answer)", "test_tasks"),
    ("naming allows text lifted from the poem", "minigpt/tasks.py",
     "and bool(content_chars(answer) & set(example.input)) and not lifted)",
     "and bool(content_chars(answer) & set(example.input)))", "test_tasks"),
    ("the rhyme task drops its poem check", "minigpt/tasks.py",
     "return is_poem(answer) and len(set(ends)) == len(ends) and all(", "return len(set(ends)) == len(ends) and all(",
     "test_tasks"),
    ("the form check accepts any poem with clauses of the length", "minigpt/tasks.py",
     "return answer == first_poem(answer) and form_of(answer) == example.want",
     "return answer == first_poem(answer) and is_regular(answer) and len(clauses(answer)[0]) == "
     "FORMS[example.want][0]", "test_tasks"),
    # (inside a regular poem every clause has one length, so only without the poem check can one clause decide)
    ("the line-length check accepts any clause of the length", "minigpt/tasks.py",
     "return is_poem(answer) and {len(c) for c in clauses(answer)} == {example.want}",
     "return example.want in {len(c) for c in clauses(answer)}", "test_tasks"),
    ("the chance level is each example's own answer", "minigpt/tasks.py",
     "[(exs[(i + n // 2) % n].answer, None) for i in range(n)]", "[(exs[i].answer, None) for i in range(n)]", "test_tasks"),
    # saying no and whose word counts
    ("a refusal need not come early", "minigpt/tasks.py", 'REFUSES = re.compile(r"[^。？！\\n]{0,12}不能")',
     'REFUSES = re.compile(r".*不能", re.S)', "test_saying_no"),
    ("a poem with 不能 counts as a refusal", "minigpt/tasks.py",
     "return bool(REFUSES.match(answer)) and not is_regular(first_poem(answer))", "return bool(REFUSES.match(answer))",
     "test_saying_no"),
    ("a refusal need not name its reason", "minigpt/tasks.py",
     "return refuses(answer) and example.want in answer and", "return refuses(answer) and", "test_saying_no"),
    ("a refusal need not offer a poem", "minigpt/tasks.py",
     'and "詩" in answer.split(example.want, 1)[-1] and len(answer) <= 60', "and len(answer) <= 60", "test_saying_no"),
    ("a refusal may ramble on", "minigpt/tasks.py", 'answer.split(example.want, 1)[-1] and len(answer) <= 60',
     'answer.split(example.want, 1)[-1]', "test_saying_no"),
    ("the persona's turn takes any regular poem", "minigpt/tasks.py",
     "return answer == first_poem(answer) and form_of(answer) == PERSONA_FORM",
     "return answer == first_poem(answer) and is_regular(answer)", "test_saying_no"),
    ("persona over turns reads the real earlier answers", "minigpt/tasks.py",
     "said = [s + ((u, a),) for s, u, (a, _) in zip(said, users, written)]",
     "said = [s + ((u, real),) for s, (u, real) in zip(said, turns)]",
     "test_saying_no"),
    ("a conversation too long is left out, its system message never pinned", "minigpt/tasks.py",
     "for dropped in range(max(len(example.history), 1)):", "for dropped in range(1):", "test_saying_no"),
    ("LoRA's B starts off zero", "minigpt/lora.py",
     "self.B = nn.Parameter(torch.zeros(base.out_features, rank))", "self.B = nn.Parameter(torch.full((base.out_features, rank), 1e-3))",
     "test_lora"),
    ("a merged LoRA weight leaves out its scale", "minigpt/lora.py",
     "lin.weight += self.scale * self.B @ self.A", "lin.weight += self.B @ self.A", "test_lora"),
    ("the head of a LoRA model reads the frozen rows", "minigpt/lora.py",
     "return F.linear(x, self.rows.weight)", "return F.linear(x, self.rows.table.weight)", "test_lora"),
    ("a LoRA merge leaves the trained token rows out", "minigpt/lora.py",
     "table.weight[model.tok_emb.ids] = model.tok_emb.rows", "pass", "test_lora"),
    ("the page adds a LoRA adapter without its scale", "minigpt/gpt.js",
     "const s = scale * B[o * r + k];", "const s = B[o * r + k];", "test_web"),
    ("an adapter goes on any base", "minigpt/checkpoint.py",
     "if fingerprint(model.state_dict()) != meta[\"fingerprint\"]:", "if False:", "test_lora"),
    ("the held-out refusals ask the trained asks", "minigpt/tasks.py",
     '"held": held[_pick(title, "ask", len(held))]}', '"held": asks[_pick(title, "ask", len(asks))]}', "test_saying_no"),
    # data, generation and the loop
    ("the SFT mask is dropped", "minigpt/data.py",
     "keep = torch.ones(n, dtype=torch.bool) if train_on_prompt else torch.tensor(mask[1:], dtype=torch.bool)",
     "keep = torch.ones(n, dtype=torch.bool)", "test_data"),
    ("pretraining windows start at any character", "minigpt/data.py",
     "return self._windows(self.train, starts[torch.randint(len(starts), (batch_size,), generator=generator)], block_size)",
     "return self._windows(self.train, torch.randint(len(self.train) - block_size - 1, (batch_size,), generator=generator), block_size)",
     "test_data"),
    ("the title offsets are one off", "minigpt/data.py",
     "torch.cumsum(lengths, 0) - lengths", "torch.cumsum(lengths, 0) - lengths + 1", "test_data"),
    ("generation skips the padding mask", "minigpt/generate.py",
     "mask = causal & self.real[:, None, None, :] | itself", "mask = causal | itself", "test_generate test_model"),
    ("the window restart keeps the full window", "minigpt/generate.py",
     "keep = self.W if not self.use_cache or self.caches is None else self.W // 2", "keep = self.W", "test_generate"),
    ("resume forgets the time reserve", "minigpt/train.py",
     'self.reserve, self.warm_progress = ckpt["reserve"], ckpt.get("warm_progress")',
     'self.warm_progress = ckpt.get("warm_progress")', "test_resilience"),
    ("resume forgets the data generator", "minigpt/train.py",
     'self.data_gen.set_state(ckpt["rng"]["data"].cpu())', "pass", "test_resilience"),
    ("the step skips gradient clipping", "minigpt/train.py", "    if grad_clip:\n", "    if False:\n", "test_train"),
    # the JavaScript model of the web page
    ("gpt.js scales attention by hs, not sqrt(hs)", "minigpt/gpt.js", "root = Math.sqrt(hs);", "root = hs;", "test_web"),
    ("gpt.js restarts a full window from its last quarter", "minigpt/gpt.js",
     "this.read(this.ids = this.ids.slice(-(this.W >> 1)));", "this.read(this.ids = this.ids.slice(-(this.W >> 2)));",
     "test_web"),
    ("gpt.js uses a tanh for GELU", "minigpt/gpt.js", "(1 + erf(x / Math.SQRT2))", "(1 + Math.tanh(x))", "test_web"),
    ("gpt.js swaps two rows of a matmul", "minigpt/gpt.js", "y[o] = s0; y[o + 1] = s1;", "y[o] = s1; y[o + 1] = s0;",
     "test_web"),
    ("gpt.js's kernel adds three of its four lanes", "minigpt/gpt.js", "get(a), lane(3), f32add, f32add]",
     "get(a), lane(2), f32add, f32add]", "test_web"),
    ("gpt.js's kernel leaves the rows after the last four out", "minigpt/gpt.js", "rows(4), rows(1), end]",
     "rows(4), end]", "test_web"),
    ("gpt.js top-k keeps one id too few", "minigpt/gpt.js",
     "if (top.length === k && v <= top[k - 1][1]) continue;", "if (top.length === k - 1 && v <= top[k - 2][1]) continue;",
     "test_web"),
]


def copy_repo(dest):
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__", ".pytest_cache", "*.pyc"))


def run_tests(repo, files, timeout=600):
    """(passed, the first failing test or the error) of pytest -x on files in repo."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *files]
    try:
        out = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout} s"
    text = out.stdout + out.stderr
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    return out.returncode == 0, failed.group(1) if failed else text.strip().splitlines()[-1] if text.strip() else ""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="only the mutants whose name holds this text")
    p.add_argument("--full", action="store_true", help="run the whole default suite against each mutant")
    args = p.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only in m[0]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = os.path.join(tmp, "repo")
        copy_repo(repo)
        ok, why = run_tests(repo, ["tests"] if args.full else sorted({f"tests/{t}.py" for m in chosen for t in m[4].split()}))
        if not ok:
            raise SystemExit(f"the tests fail before any mutant: {why}")
        for name, path, old, new, tests in chosen:
            target = os.path.join(repo, path)
            with open(target, encoding="utf-8") as f:
                original = f.read()
            if original.count(old) != 1:
                rows.append((name, "NOT APPLIED", f"the text is in {path} {original.count(old)} times, not once"))
                continue
            with open(target, "w", encoding="utf-8") as f:
                f.write(original.replace(old, new))
            try:
                passed, why = run_tests(repo, ["tests"] if args.full else [f"tests/{t}.py" for t in tests.split()])
            finally:
                with open(target, "w", encoding="utf-8") as f:
                    f.write(original)
            rows.append((name, "SURVIVED" if passed else "caught", "" if passed else why))
            print(f"{rows[-1][1]:8}  {name}  {rows[-1][2]}", flush=True)
    caught = sum(r[1] == "caught" for r in rows)
    print(f"\n{caught} of {len(rows)} mutants caught")
    return rows


if __name__ == "__main__":
    main()

"""The trained models in one offline web page: the base model and the fine-tuned one write side by side in the browser,
with gpt.js (model.py written again in plain JavaScript) inlined, the weights in 8 bits (one scale per row), and a
Content-Security-Policy that forbids every network request. Send the file to a class, or serve the folder.

    python -m minigpt.web            # runs/pretrain + runs/sft (+ runs/dpo, runs/sft_chat when they exist) -> runs/web/index.html
    python -m minigpt.web --check    # the JavaScript model against PyTorch (needs Node), and what 8 bits cost
"""
import argparse
import base64
import copy
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import torch

from minigpt.data import load_poems, split_poems, DEFAULT_CORPUS
from minigpt.tokenizer import ROLE_TOKENS, SPECIAL_TOKENS

HERE = os.path.dirname(os.path.abspath(__file__))
GPT_JS = os.path.join(HERE, "gpt.js")
PAGE = os.path.join(HERE, "page.html")
# the page's models: key -> (run folder, the command that makes it); the first two must exist
RUNS = {
    "base": ("pretrain", "python train_pretrain.py"),
    "sft": ("sft", "python train_sft.py"),
    "dpo": ("dpo", "python train_dpo.py"),
    "chat": ("sft_chat", "python train_sft.py --tasks all --format chat"),
    "rl": ("rl", "python train_rl.py"),
    "lora": ("sft_lora", "python train_sft.py --lora-rank 8 --out-dir runs/sft_lora"),  # an adapter on the base model
}
RANK_TITLES = 400  # training titles the ranking view draws from


class WebError(ValueError):
    """A page that cannot be made; the message names the missing piece and the command that makes it."""


# ---- the weights, as the page holds them ----

def int8_rows(w):
    """(q, scale): each row (the last dimension) as integers in [-127, 127] times its own scale, max|row| / 127."""
    scale = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127  # (rows, 1)
    return torch.round(w / scale).clamp(-127, 127), scale


def quantize(w, bits=8):
    """A float tensor -> (bytes, scales bytes or None, dtype name): 8 bits, int8 rows and a float32 scale each;
    16 bits, float16; vectors (biases, norms) stay float32."""
    w = w.detach().float().cpu()
    if w.dim() == 1:
        return w.numpy().tobytes(), None, "float32"
    if bits == 16:
        return w.half().numpy().tobytes(), None, "float16"
    q, scale = int8_rows(w)
    return q.to(torch.int8).numpy().tobytes(), scale.squeeze(-1).numpy().tobytes(), "int8"


def dequantize(w, bits=8):
    """The tensor the page computes with: quantize, then back to float32."""
    w = w.detach().float()
    if w.dim() == 1:
        return w.clone()
    if bits == 16:
        return w.half().float()
    q, scale = int8_rows(w)
    return q * scale


def as_page_sees(model, bits=8, adapter=False):
    """A copy of the model whose weights are the page's (dequantized): PyTorch's side of the parity checks. adapter: a
    LoRA model the page runs as its base plus the adapter in float32, so only the frozen tensors are dequantized."""
    out = copy.deepcopy(model).float().cpu()
    with torch.no_grad():
        for name, p in out.named_parameters():
            if not (adapter and p.requires_grad):
                p.copy_(dequantize(p, bits))
    return out


def export(model, bits=8):
    """(meta, bytes): model.py's tensors by name (lm_head is tok_emb: tied, stored once), each at its byte offset. A
    LoRA model is exported merged: the page runs plain GPT weights."""
    from minigpt.lora import plain
    model = plain(model)
    blob, tensors = bytearray(), {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        data, scales, dtype = quantize(p, bits)
        tensors[name] = dict(shape=list(p.shape), dtype=dtype, offset=len(blob))
        blob += data
        blob += bytes(-len(blob) % 4)  # float32 reads stay aligned
        if scales is not None:
            tensors[name]["scales"] = len(blob)
            blob += scales
    return dict(config=page_config(model.config), tensors=tensors), bytes(blob)


def page_config(cfg):
    """The model config as gpt.js reads it."""
    return dict(vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                n_embd=cfg.n_embd)


def export_adapter(model):
    """(meta, bytes) of a LoRA model's adapter, float32: each adapted projection's A, B and scale, and the trained token
    rows. The page adds them to its base model's weights (gpt.js applyAdapter), as minigpt.lora.merge does."""
    from minigpt.lora import LoRALinear, TokenRows, adapter_state
    blob, tensors = bytearray(), {}
    for name, p in adapter_state(model).items():
        tensors[name] = dict(shape=list(p.shape), dtype="float32", offset=len(blob))
        blob += p.float().cpu().contiguous().numpy().tobytes()
    scales = {name: m.scale for name, m in model.named_modules() if isinstance(m, LoRALinear)}  # blocks.0.attn.qkv: 2.0
    rows = model.tok_emb.ids.tolist() if isinstance(model.tok_emb, TokenRows) else []
    return dict(tensors=tensors, scales=scales, rows=rows), bytes(blob)


def on_page_base(ckpt, base):
    """Whether a run is a LoRA adapter the page can put on its own base model (the same weights, the same vocabulary):
    then it ships the adapter alone, a tenth of a model, and switching to it is adding it to the base."""
    from minigpt.lora import fingerprint
    meta = ckpt.get("adapter")
    return bool(meta and meta["tuning"].get("lora_rank") and not meta["tuning"].get("train_only")
                and meta["tuning"].get("vocab_size", base.config.vocab_size) == base.config.vocab_size
                and meta["fingerprint"] == fingerprint(base.state_dict()))


# ---- the page ----

def load_runs(runs_dir, names=None):
    """{key: (model, tokenizer, checkpoint)} for the page's models found under runs_dir; base and sft are required."""
    from minigpt.checkpoint import load_checkpoint
    found = {}
    for key, (folder, command) in RUNS.items():
        path = os.path.join(runs_dir, folder)
        if names is not None and key not in names:
            continue
        if not os.path.exists(os.path.join(path, "ckpt.pt")):
            if key in ("base", "sft"):
                raise WebError(f"no run at {path}: make it with {command} (for a lesson: --preset class)")
            continue
        found[key] = load_checkpoint(path)
    return found


def page_model(key, model, tokenizer, ckpt, bits, base=None):
    """What the page needs of one model: its weights (a LoRA adapter on the page's base model: the adapter alone),
    vocabulary, prompt format and stop."""
    from minigpt.sample import answer_format
    fmt = answer_format(ckpt)
    adapter = None
    if base is not None and on_page_base(ckpt, base):
        adapter, blob = export_adapter(model)
        meta = dict(config=page_config(base.config), base="base")
    else:
        meta, blob = export(model, bits)
    return dict(key=key, run=RUNS[key][0], step=ckpt["step"], meta=meta, adapter=adapter, itos=tokenizer.itos,
                prompt=[fmt.ins + fmt.instruction + fmt.inp, fmt.res],  # before and after the title
                stop=fmt.end if fmt.end in tokenizer.stoi else None, end=fmt.end,
                weights=base64.b64encode(blob).decode("ascii"))


def conversion_tables(itos):
    """(simplified -> traditional, traditional -> simplified) for the vocabulary's characters, derived from OpenCC:
    the page converts a typed title one character at a time, as the command line does with OpenCC's tables."""
    from minigpt.sample import to_simplified, to_traditional
    chars = [c for c in itos if len(c) == 1]
    vocab, to_s = set(chars), {}
    for c in chars:
        s = to_simplified(c)
        if s != c and len(s) == 1:
            to_s[c] = s
    to_t = {}
    for s in sorted(set(to_s.values())):
        t = to_traditional(s)
        if t != s and t in vocab:
            to_t[s] = t
    return to_t, to_s


def learning_to_stop(log_path, n_examples=3):
    """The SFT run's evaluations, as the slider shows them: step, stop rate and a few val titles' answers."""
    steps = []
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "eval" and "examples" in r:
                steps.append(dict(step=r["step"], stop_rate=r.get("stop_rate"), examples=r["examples"][:n_examples]))
    return steps


def render(data, title="minigpt"):
    """The page: page.html with gpt.js, the data and a Content-Security-Policy that allows only the page's own script
    and style (by their hashes) and no request of any kind."""
    with open(PAGE, encoding="utf-8") as f:
        page = f.read()
    with open(GPT_JS, encoding="utf-8") as f:
        gpt_js = f.read()
    head, rest = page.split("<script>", 1)
    app, tail = rest.split("</script>", 1)
    script = gpt_js + "\n" + app
    style = head.split("<style>", 1)[1].split("</style>", 1)[0]
    digest = lambda s: "'sha256-" + base64.b64encode(hashlib.sha256(s.encode("utf-8")).digest()).decode() + "'"
    csp = (f"default-src 'none'; script-src {digest(script)} 'wasm-unsafe-eval'; style-src {digest(style)}; "
           "img-src data:; base-uri 'none'; form-action 'none'")  # wasm-unsafe-eval: gpt.js's Kernel, no eval of JS
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    head = head.replace("__CSP__", csp).replace("__TITLE__", title)
    return (head + '<script id="data" type="application/json">' + blob + "</script>\n<script>" + script + "</script>"
            + tail)


def rank_titles(corpus, itos, n=RANK_TITLES):
    """Training titles for the ranking view: short, meaningful, every character in the vocabulary, drawn with a fixed
    seed; train_reward.py --rankings reads a file of picks only on the corpus's titles."""
    import random
    from minigpt.verse import MEANINGLESS_TITLES, clean_title
    vocab = set(itos)
    titles = sorted({t for t in (clean_title(p.title) for p in split_poems(load_poems(corpus))["train"])
                     if 2 <= len(t) <= 8 and t not in MEANINGLESS_TITLES and set(t) <= vocab})
    random.Random(0).shuffle(titles)
    return titles[:n]


def build(runs_dir="runs", out=None, bits=8, names=None, log=print, corpus=DEFAULT_CORPUS):
    """Write the page from the runs under runs_dir; returns its path."""
    out = out or os.path.join(runs_dir, "web", "index.html")
    found = load_runs(runs_dir, names)
    models = [page_model(k, m, t, c, bits, base=found["base"][0] if k != "base" else None)
              for k, (m, t, c) in found.items()]
    to_t, to_s = conversion_tables(found["sft"][1].itos)
    sft_log = os.path.join(runs_dir, RUNS["sft"][0], "log.jsonl")
    data = dict(models=models, to_traditional=to_t, to_simplified=to_s, controls=SPECIAL_TOKENS + ROLE_TOKENS,
                learning=learning_to_stop(sft_log) if os.path.exists(sft_log) else [],
                rank_titles=rank_titles(corpus, found["sft"][1].itos) if os.path.exists(corpus) else [])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    html = render(data)
    with open(out, "w", encoding="utf-8") as f:
        f.write(html)
    for m in models:
        log(f"{m['key']:5s} runs/{m['run']}: step {m['step']}, {len(m['weights']) * 3 // 4 / 1e6:.2f} MB of "
            + ("adapter on the base model" if m["adapter"] else "weights"))
    missing = [k for k in RUNS if k not in found and (names is None or k in names)]
    for k in missing:
        log(f"{k:5s} not included: no runs/{RUNS[k][0]} (make it with {RUNS[k][1]})")
    log(f"wrote {out}: {len(html.encode('utf-8')) / 1e6:.2f} MB; open it in a browser (no network needed)")
    return out


# ---- the JavaScript model against PyTorch ----

NODE_DRIVER = r"""
const fs = require("fs"), m = require(process.argv[1]);
const job = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const model = m.loadModel(job.meta, new Uint8Array(fs.readFileSync(job.weights)),
  job.adapter && {meta: job.adapter, bytes: new Uint8Array(fs.readFileSync(job.adapter_weights))}, job.simd);
if (job.simd && !m.SIMD) throw new Error("this Node has no WebAssembly SIMD");
const out = {logits: [], greedy: []};
for (const ids of job.logits) out.logits.push(Array.from(new m.Writer(model, ids).logits));
for (const ids of job.greedy) {
  const w = new m.Writer(model, ids), written = [];
  for (let i = 0; i < job.max_new; i++) {
    const id = m.argmax(w.logits);
    written.push(id);
    if (id === job.stop) break;
    w.append(id);
  }
  out.greedy.push(written);
}
fs.writeFileSync(job.out, JSON.stringify(out));
"""


def run_in_node(model, logit_prompts, greedy_prompts, max_new, stop_id, bits=8, adapter=None, simd=True):
    """The JavaScript model (gpt.js, on the exported weights) in Node: the last position's logits after each of
    logit_prompts, and the greedy continuation of each of greedy_prompts (lists of ids), up to max_new ids or stop_id.
    adapter: a LoRA model whose adapter gpt.js adds to model's weights, as the page does. simd: W x in WebAssembly
    SIMD, as a browser with it runs the page; False: in JavaScript."""
    meta, blob = export(model, bits)
    ad_meta, ad_blob = export_adapter(adapter) if adapter is not None else (None, b"")
    with tempfile.TemporaryDirectory() as d:
        weights, ad_weights, job, out = (os.path.join(d, n) for n in ("weights.bin", "adapter.bin", "job.json", "out.json"))
        for path, data in ((weights, blob), (ad_weights, ad_blob)):
            with open(path, "wb") as f:
                f.write(data)
        with open(job, "w") as f:
            json.dump(dict(meta=meta, weights=weights, adapter=ad_meta, adapter_weights=ad_weights, logits=logit_prompts,
                           greedy=greedy_prompts, max_new=max_new, stop=-1 if stop_id is None else stop_id, out=out,
                           simd=simd), f)
        try:
            subprocess.run(["node", "-e", NODE_DRIVER, GPT_JS, job], check=True, capture_output=True, text=True)
        except FileNotFoundError:
            raise WebError("node not found: the check runs gpt.js in Node.js (https://nodejs.org, or apt install nodejs)")
        except subprocess.CalledProcessError as e:
            raise WebError(f"gpt.js failed in Node: {e.stderr.strip().splitlines()[-1] if e.stderr.strip() else e}")
        with open(out) as f:
            r = json.load(f)
    return torch.tensor(r["logits"]), r["greedy"]


def torch_greedy(model, prompts, max_new, stop_id, pad_id):
    """PyTorch's greedy continuations (minigpt.generate, the KV cache and window restart the page mirrors), one prompt
    at a time as the page writes: in a batch, a left-padded row's window fills, and restarts, a little earlier."""
    from minigpt.generate import generate
    from minigpt.loss_eval import evaluating
    with evaluating(model):
        return [generate(model, [p], max_new, temperature=0, stop_ids=[] if stop_id is None else [stop_id],
                         pad_id=pad_id)[0] for p in prompts]


def last_logits(model, prompts):
    """PyTorch's logits at the last position of each prompt (its last block_size tokens)."""
    from minigpt.loss_eval import evaluating
    W = model.config.block_size
    with evaluating(model), torch.no_grad():
        return torch.stack([model(torch.tensor([p[-W:]]))[0][0, -1] for p in prompts])


def check(runs_dir="runs", corpus=DEFAULT_CORPUS, n_prompts=20, n_titles=400, bits=8, log=print):
    """For the base and fine-tuned models (and the LoRA one, runs/sft_lora, when it exists): the largest logit
    difference between gpt.js and PyTorch on the page's weights over n_prompts val prompts, whether greedy writing agrees on them, and stop rate and regular shape of
    n_titles val answers with full-precision and page weights. Returns the figures."""
    from minigpt.evaluate import eval_set, write_answers
    from minigpt.generate import Sampling
    from minigpt.sample import answer_format
    from minigpt.verse import first_poem, is_regular
    found = load_runs(runs_dir, ("base", "sft", "lora"))
    splits = split_poems(load_poems(corpus))
    titles = eval_set(splits["val"], splits["train"], n_titles).titles
    figures = {}
    for key, (model, tok, ckpt) in found.items():
        on_base = key != "base" and on_page_base(ckpt, found["base"][0])  # an adapter added to the base on the page
        fmt, paged = answer_format(ckpt), as_page_sees(model, bits, adapter=on_base)
        prompts = [tok.encode(fmt.prompt(t), unknown="unk") for t in titles[:n_prompts]]
        stop_id = tok.stoi.get(fmt.end)
        max_new = 160 if stop_id is None else 200  # the base model runs past its window: the restart is checked too
        want_logits, want_greedy = last_logits(paged, prompts), torch_greedy(paged, prompts, max_new, stop_id, tok.pad_id)
        diff, same = {}, {}  # W x in WebAssembly SIMD (the page, where the browser has it) and in JavaScript
        for simd in (True, False):
            js_logits, js_greedy = run_in_node(found["base"][0] if on_base else model, prompts, prompts, max_new,
                                               stop_id, bits, adapter=model if on_base else None, simd=simd)
            diff[simd] = (js_logits - want_logits).abs().max().item()
            same[simd] = sum(a == b for a, b in zip(js_greedy, want_greedy))
        rates = {}  # the same sampling seed for both; full precision with another seed says how far chance alone moves
        for name, m, seed in (("full", model, 1234), (f"{bits}-bit", paged, 1234), ("full, seed 1", model, 1)):
            answers = write_answers(m, tok, titles, fmt, sampling=Sampling(seed=seed))
            rates[name] = (100 * sum(a.stopped for a in answers) / len(answers),
                           100 * sum(is_regular(first_poem(a.text)) for a in answers) / len(answers))
        figures[key] = dict(max_logit_diff=max(diff.values()), greedy_same=min(same.values()), n_prompts=len(prompts),
                            rates=rates)
        (fs, fr), (qs, qr), (ss, sr) = rates.values()
        log(f"{key:5s} largest logit difference gpt.js - PyTorch {diff[True]:.1e} with SIMD, {diff[False]:.1e} in "
            f"JavaScript, over {len(prompts)} val prompts; greedy text identical for {same[True]}/{len(prompts)} and "
            f"{same[False]}/{len(prompts)}; {len(titles)} val titles, full -> {bits}-bit: "
            f"stop {fs:.1f}% -> {qs:.1f}%, regular {fr:.1f}% -> {qr:.1f}% (full with another seed: stop {ss:.1f}%, "
            f"regular {sr:.1f}%)")
    return figures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs", help="the folder that holds pretrain/, sft/ (and dpo/, sft_chat/)")
    p.add_argument("--out", help="where to write the page (default: RUNS/web/index.html)")
    p.add_argument("--bits", type=int, choices=(8, 16), default=8, help="weights in 8 bits (one scale a row) or 16")
    p.add_argument("--models", help="which of base,sft,dpo,chat,rl to include (default: every one whose run exists)")
    p.add_argument("--check", action="store_true", help="compare gpt.js with PyTorch (Node.js) and 8 bits with full")
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help="the corpus of the runs (for --check's val titles and the ranking view's titles)")
    p.add_argument("--titles", type=int, default=400, help="--check: val titles for the stop and shape rates")
    args = p.parse_args(argv)
    names = None
    if args.models:
        names = [n.strip() for n in args.models.split(",")]
        unknown = [n for n in names if n not in RUNS]
        if unknown or not {"base", "sft"} <= set(names):
            p.error(f"--models takes base,sft and any of dpo,chat,rl; got {args.models}")
    from minigpt.checkpoint import CheckpointError
    try:
        if args.check:
            return check(args.runs, args.corpus, n_titles=args.titles, bits=args.bits)
        return build(args.runs, args.out, args.bits, names, corpus=args.corpus)
    except (WebError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

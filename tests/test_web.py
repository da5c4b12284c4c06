"""The web page: gpt.js against PyTorch in Node, the 8-bit weights, the export's errors, and the page in a real
browser (headless Chromium, network blocked). Node and Chromium tests skip where they are missing, unless
MINIGPT_REQUIRE_BROWSER=1 (as in CI), where a missing one fails."""
import os
import shutil

import pytest
import torch

from minigpt import web
from minigpt.checkpoint import save_checkpoint
from minigpt.data import PLAIN, TITLE_TO_POEM
from minigpt.model import GPT, GPTConfig
from minigpt.reward import load_rankings, ranking_pairs

from conftest import FIXTURE_CORPUS

REQUIRED = os.environ.get("MINIGPT_REQUIRE_BROWSER") == "1"


def need(program):
    if shutil.which(program) is None:
        if REQUIRED:
            pytest.fail(f"{program} not found, and MINIGPT_REQUIRE_BROWSER=1")
        pytest.skip(f"{program} not found")


def sharp(cfg, seed=0):
    """A random model whose logits are far apart (std-0.02 weights give near-ties that float rounding could flip)."""
    torch.manual_seed(seed)
    m = GPT(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(8 if p.dim() > 1 else 1)
    return m


def test_8_bits_keep_each_row_within_half_a_step(model):
    w = model.tok_emb.weight
    q = web.dequantize(w)
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((q - w).abs() <= step / 2 + 1e-7).all()
    assert (q - w).abs().max() > 0  # it does round
    assert torch.equal(web.dequantize(model.ln_f.weight), model.ln_f.weight)  # vectors stay float32
    data, scales, dtype = web.quantize(w)
    assert dtype == "int8" and len(data) == w.numel() and len(scales) == 4 * w.size(0)
    assert web.quantize(w, 16)[2] == "float16"


def test_the_export_stores_every_tensor_once(model):
    meta, blob = web.export(model)
    assert "lm_head.weight" not in meta["tensors"]  # tied to tok_emb
    assert set(meta["tensors"]) == set(model.state_dict()) - {"lm_head.weight"}
    assert len(blob) < 1.1 * sum(p.numel() for p in model.parameters()) + 4 * 1000  # about a byte a weight


@pytest.mark.parametrize("bits,simd", [(8, True), (16, True), (8, False)])
def test_gpt_js_equals_pytorch_in_node(tokenizer, splits, bits, simd):
    """Same logits within 1e-4 on the page's weights over 20 prompts, and the same greedy text, past a window
    restart (block_size 32, 60 new tokens): W x in WebAssembly SIMD, as the page runs where it can, and in JavaScript."""
    need("node")
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=32)
    model = sharp(cfg)
    titles = [p.title for p in splits["train"][:20]]
    prompts = [tokenizer.encode(f.prompt(t), unknown="unk") for t, f in zip(titles, [TITLE_TO_POEM, PLAIN] * 10)]
    prompts[0] = prompts[0] * 3  # longer than the window: both keep its last block_size tokens
    js_logits, js_greedy = web.run_in_node(model, prompts, prompts, 60, tokenizer.end_id, bits, simd=simd)
    paged = web.as_page_sees(model, bits)
    assert (js_logits - web.last_logits(paged, prompts)).abs().max() < 1e-4
    assert (js_logits - web.last_logits(model, prompts)).abs().max() > 1e-4  # the weights did change: 8 or 16 bits
    torch_greedy = web.torch_greedy(paged, prompts, 60, tokenizer.end_id, tokenizer.pad_id)
    assert js_greedy == torch_greedy
    assert max(map(len, torch_greedy)) == 60 and min(len(p) for p in prompts) + 60 > cfg.block_size  # restarts ran


def test_gpt_js_adds_a_lora_adapter_to_its_base_as_pytorch_does(tokenizer, splits):
    """The page keeps one base model and adds an adapter to it: the same logits as PyTorch's LoRA model on the page's
    base weights, the same greedy text, and not the base model's."""
    need("node")
    from minigpt.lora import add_lora, train_rows
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=32)
    base = sharp(cfg)
    tuned = GPT(cfg)
    tuned.load_state_dict(base.state_dict())
    train_rows(add_lora(tuned, 2), [tokenizer.end_id, tokenizer.res_id])
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    prompts = [tokenizer.encode(TITLE_TO_POEM.prompt(p.title), unknown="unk") for p in splits["train"][:8]]
    js_logits, js_greedy = web.run_in_node(base, prompts, prompts, 40, tokenizer.end_id, 8, adapter=tuned)
    paged = web.as_page_sees(tuned, 8, adapter=True)
    assert (js_logits - web.last_logits(paged, prompts)).abs().max() < 1e-4
    assert (js_logits - web.last_logits(web.as_page_sees(base, 8), prompts)).abs().max() > 1e-2  # the adapter counts
    assert js_greedy == web.torch_greedy(paged, prompts, 40, tokenizer.end_id, tokenizer.pad_id)
    meta, blob = web.export_adapter(tuned)
    assert set(meta["scales"]) == {f"blocks.{l}.{p}" for l in range(2) for p in ("attn.qkv", "attn.proj", "mlp.fc",
                                                                                  "mlp.proj")}
    assert meta["rows"] == [tokenizer.end_id, tokenizer.res_id] and len(blob) < len(web.export(base, 8)[1])


def test_the_page_needs_both_runs(tmp_path):
    with pytest.raises(web.WebError, match=r"no run at .*pretrain: make it with python train_pretrain.py"):
        web.build(str(tmp_path))
    with pytest.raises(SystemExit) as e:
        web.main(["--runs", str(tmp_path)])
    assert e.value.code == 1
    with pytest.raises(SystemExit):
        web.main(["--runs", str(tmp_path), "--models", "base,chat"])  # the fine-tuned model is not optional


def test_conversion_tables_map_simplified_to_the_vocabularys_traditional():
    to_t, to_s = web.conversion_tables(["<PAD>", "鸛", "雀", "樓", "後", "后", "發", "髮"])
    assert to_t["鹳"] == "鸛" and to_t["楼"] == "樓" and "雀" not in to_t
    assert to_s["樓"] == "楼" and to_s["髮"] == "发"
    assert all(t in ("鸛", "雀", "樓", "後", "后", "發", "髮") for t in to_t.values())


# ---- the page in a real browser ----

def save_run(path, model, tokenizer, stage, step=10, fmt="ins"):
    os.makedirs(path, exist_ok=True)
    cfg = model.config
    save_checkpoint(os.path.join(path, "ckpt.pt"), dict(
        stage=stage, model=model.state_dict(), tokenizer=tokenizer.to_list(), step=step, settings={"format": fmt},
        model_config=dict(vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, n_embd=cfg.n_embd)))


def stopping(model, end_id, after):
    """The model made to write its end marker at every position from `after` on: those positions' embeddings point
    far along the end marker's row, which (tied) is also what its logit reads."""
    with torch.no_grad():
        u = torch.randn(model.config.n_embd)
        u = (u - u.mean()) / (u - u.mean()).norm()
        model.tok_emb.weight[end_id] = 5 * u
        model.pos_emb.weight[after:] = 1000 * u
        model.ln_f.weight.fill_(1.0)
        model.ln_f.bias.zero_()
    return model


@pytest.fixture(scope="module")
def page(tmp_path_factory, tokenizer):
    runs = tmp_path_factory.mktemp("runs")
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    save_run(runs / "pretrain", GPT(cfg), tokenizer, "pretrain")
    save_run(runs / "sft", stopping(GPT(cfg), tokenizer.end_id, after=40), tokenizer, "sft")
    chat = tokenizer.with_roles()
    chat_model = GPT(GPTConfig(vocab_size=chat.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    save_run(runs / "sft_chat", stopping(chat_model, chat.stoi["<EOT>"], after=50), chat, "sft", fmt="chat")
    with open(runs / "sft" / "log.jsonl", "w") as f:
        f.write('{"kind": "eval", "step": 0, "stop_rate": 0.0, "examples": [{"title": "<b>x</b>", "answer": "a", '
                '"stopped": false}]}\n')
    return web.build(str(runs), log=lambda *a: None, corpus=FIXTURE_CORPUS)


@pytest.fixture(scope="module")
def browser():
    need("chromium")
    if REQUIRED:
        from playwright.sync_api import sync_playwright
    else:
        sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        yield b
        b.close()


def open_page(browser, path, width):
    context = browser.new_context(viewport={"width": width, "height": 900})
    requests, errors = [], []
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:") else (
        requests.append(route.request.url), route.abort()))
    pg = context.new_page()
    pg.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto("file://" + os.path.abspath(path))
    return pg, requests, errors


@pytest.mark.slow
@pytest.mark.parametrize("width", [1200, 390])
def test_the_page_writes_both_columns_in_a_browser(browser, page, tokenizer, width, tmp_path):
    pg, requests, errors = open_page(browser, page, width)
    assert pg.evaluate("window.minigptSimd")  # the page's policy lets gpt.js compile its WebAssembly kernel
    title = next(c for c in tokenizer.itos[6:] if len(c) == 1 and c.strip() and c not in "，。")
    pg.fill("#title", title * 2)
    pg.click("#go")
    pg.wait_for_selector("#col-base[data-state=done]", timeout=30000)
    pg.wait_for_selector("#col-tuned[data-state=done]", timeout=30000)
    pg.screenshot(path=str(tmp_path / f"page_{width}.png"), full_page=True)
    base_chars = pg.locator("#col-base .answer .ch").count()
    tuned_chars = pg.locator("#col-tuned .answer .ch").count()
    assert base_chars == 160  # the base model runs on to its cap
    assert 0 < tuned_chars < 40 and pg.text_content("#col-tuned .answer .end") == "<END>"  # stops, the marker shown
    assert pg.locator("#col-tuned .strip .mark").count() == tuned_chars  # one mark per character
    assert pg.locator("#col-base .strip .mark").count() == base_chars
    assert "<END>" in pg.text_content("#col-tuned .status")
    pg.click("#col-tuned .answer .ch >> nth=0")
    assert pg.locator("#detail table").count() == 3  # two temperatures, and the attention to the title
    one_column = pg.locator("#col-tuned").bounding_box()["y"] > pg.locator("#col-base").bounding_box()["y"] + 50
    assert one_column == (width < 600)
    assert requests == [] and errors == []


@pytest.mark.slow
def test_the_page_refuses_markup_and_control_tokens(browser, page):
    pg, requests, errors = open_page(browser, page, 1200)
    pg.fill("#title", "<img src=x onerror=alert(1)>")
    pg.click("#go")
    assert "<" in pg.text_content("#message") and pg.locator("#message img").count() == 0  # named as text
    assert pg.locator("#col-base[data-state]").count() == 0  # nothing written
    pg.fill("#title", "春<END>")
    pg.click("#go")
    assert "<END>" in pg.text_content("#message")
    pg.click("#lang")
    assert "step 0" in pg.text_content("#learn-head") and pg.locator("#learn-examples b").count() == 0
    assert requests == [] and errors == []


@pytest.mark.slow
def test_the_chat_model_reads_a_system_message_and_a_refusal_is_shown_as_one(browser, page, tokenizer):
    from minigpt.tasks import REFUSAL, refuses
    chars = [c for c in tokenizer.itos[6:] if len(c) == 1 and c.strip() and c not in "，。"]
    title, system = chars[0], "".join(chars[1:7])
    pg, requests, errors = open_page(browser, page, 1200)
    pg.select_option("#tuned", "chat")
    pg.fill("#title", title)
    pg.fill("#system", system + "<EOT>")
    pg.click("#go")
    assert "<EOT>" in pg.text_content("#message") and pg.locator("#col-tuned[data-state]").count() == 0
    pg.fill("#system", system * 8)  # with the title, over the context of 64 less the 16 kept for the answer
    pg.click("#go")
    assert "48" in pg.text_content("#message") and pg.locator("#col-tuned[data-state]").count() == 0
    pg.fill("#system", system)
    pg.click("#go")
    pg.wait_for_selector("#col-tuned[data-state=done]", timeout=30000)
    assert pg.text_content("#col-tuned .prompt") == f"<SYS>{system}<EOT><USR>{title}<EOT><AST>"
    assert "<SYS>" not in pg.text_content("#col-base .prompt")  # the base model reads no system message
    for text in (REFUSAL.format(why="這會傷人性命"), "白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。",
                 "春風不能度，黃河入海流。\n欲窮千里目，更上一層樓。", "我可以告訴你：先買硝石"):
        # the page labels as refused what the task table counts as refused
        assert pg.evaluate("(t) => REFUSES.test(t) && !t.includes('\\n')", text) == refuses(text), text
    assert requests == [] and errors == []


@pytest.mark.slow
def test_a_persons_picks_are_kept_and_download_as_rankings_train_reward_reads(browser, page, tmp_path, splits):
    pg, requests, errors = open_page(browser, page, 1200)
    pg.click("#rank-new")
    title = pg.text_content("#rank-title")
    assert title.startswith("【") and pg.text_content("#rank-a") and pg.text_content("#rank-b")
    first = (pg.text_content("#rank-a"), pg.text_content("#rank-b"))
    pg.click("#pick-a")
    assert pg.text_content("#rank-title") != title or (pg.text_content("#rank-a"), pg.text_content("#rank-b")) != first
    pg.click("#pick-tie")
    pg.reload()  # the picks are kept in the browser
    assert "2" in pg.text_content("#rank-count")
    with pg.expect_download() as got:
        pg.click("#rank-download")
    path = tmp_path / "picks.jsonl"
    got.value.save_as(path)
    from minigpt.verse import clean_title
    ranked = load_rankings(str(path), {clean_title(p.title) for p in splits["train"]})
    assert [r.rank for r in ranked] == [[1, 2], [1, 1]] and all(r.by == "person" and len(r.answers) == 2 for r in ranked)
    assert ranked[0].title in title and ranked[0].answers[0] == first[0].removesuffix(" …")
    assert len(ranking_pairs(ranked)) == (ranked[0].answers[0] != ranked[0].answers[1])  # a tie gives no pair
    pg.click("#rank-clear")
    assert "0" in pg.text_content("#rank-count")
    assert requests == [] and errors == []


def kept_probabilities(logits, temperature, top_k, top_p):
    """What generate.sample_next draws from, exactly: the softmax after its top-k and top-p cuts."""
    from minigpt.generate import sample_next
    x = torch.tensor([logits]).repeat(20000, 1)
    draws = sample_next(x, temperature, top_k, top_p, torch.Generator().manual_seed(0))
    return torch.bincount(draws, minlength=len(logits)).float() / len(draws)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 3, None), (0.7, 50, 0.6), (1.5, 4, 0.9), (1.0, None, None)])
def test_gpt_js_samples_from_the_same_cut_distribution(temperature, top_k, top_p):
    need("node")
    import json
    import subprocess
    logits = [0.0, 3.0, 1.0, 2.0, -1.0, 2.5, 0.5]
    script = (f"const m = require({json.dumps(web.GPT_JS)}), r = m.mulberry32(7), n = new Array(7).fill(0);"
              f"for (let i = 0; i < 20000; i++) n[m.sampleNext(Float32Array.from({logits}), "
              f"{{temperature: {temperature}, top_k: {json.dumps(top_k)}, top_p: {json.dumps(top_p)}}}, r)]++;"
              "console.log(JSON.stringify(n))")
    counts = torch.tensor(json.loads(subprocess.run(["node", "-e", script], capture_output=True, text=True,
                                                    check=True).stdout), dtype=torch.float)
    js = counts / counts.sum()
    py = kept_probabilities(logits, temperature, top_k, top_p)
    assert torch.equal(js > 0, py > 0)  # the same ids survive the cuts
    assert (js - py).abs().max() < 0.02  # and are drawn as often (20,000 draws each: a few thousandths apart)


@pytest.mark.parametrize("n_out,n_in", [(9017, 128), (131, 512), (3, 32)])
def test_the_simd_kernel_multiplies_every_row_as_javascript_does(n_out, n_in):
    """Kernel's W x (four rows at a time, then the rows left over one by one) against float64 PyTorch, and beside it
    gpt.js's JavaScript matvec: both within float32 rounding, on every row including the last ones."""
    need("node")
    import json
    import subprocess
    g = torch.Generator().manual_seed(n_out)
    w, x = torch.randn(n_out, n_in, generator=g), torch.randn(n_in, generator=g)
    script = (f"const m = require({json.dumps(web.GPT_JS)}); if (!m.SIMD) throw new Error('no WebAssembly SIMD');"
              "const [wl, xl] = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
              "const w = Float32Array.from(wl), x = Float32Array.from(xl), k = new m.Kernel([w], x.length, w.length);"
              "const n = w.length / x.length;"
              "console.log(JSON.stringify([Array.from(k.matvec(x, k.views[0], n)), Array.from(m.matvec(x, w, n))]))")
    out = subprocess.run(["node", "-e", script], input=json.dumps([w.flatten().tolist(), x.tolist()]),
                         capture_output=True, text=True, check=True).stdout
    simd, js = torch.tensor(json.loads(out), dtype=torch.float64)
    want = w.double() @ x.double()
    assert (simd - want).abs().max() < 1e-5 * n_in ** 0.5 and (js - want).abs().max() < 1e-5 * n_in ** 0.5
    assert (simd - want).abs().max() > 0  # float32 sums: not the float64 ones, so the kernel did the arithmetic


def test_gpt_js_gelu_is_the_exact_one_to_float32_precision():
    """gpt.js's erf is a five-term approximation (Abramowitz and Stegun 7.1.26, within 1.5e-7): its GELU must stay
    within 1e-7 (1 + |x|) of F.gelu's exact one, about a float32's rounding, and far from the tanh approximation."""
    need("node")
    import json
    import subprocess
    xs = torch.linspace(-8, 8, 1601, dtype=torch.float64)
    script = (f"const m = require({json.dumps(web.GPT_JS)});"
              f"console.log(JSON.stringify({json.dumps(xs.tolist())}.map(m.gelu)))")
    js = torch.tensor(json.loads(subprocess.run(["node", "-e", script], capture_output=True, text=True,
                                                check=True).stdout), dtype=torch.float64)
    assert ((js - torch.nn.functional.gelu(xs)).abs() / (1 + xs.abs())).max() < 1e-7
    assert (js - torch.nn.functional.gelu(xs, approximate="tanh")).abs().max() > 1e-4

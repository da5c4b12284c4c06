"""Tuning a few parameters: LoRA starts as its base, only its adapter learns, merging changes nothing, the adapter is a
small file that goes only on its own base, and a LoRA run resumes exactly."""
import os
import signal

import pytest
import torch

import train_pretrain
import train_sft
from minigpt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from minigpt.cli import run
from minigpt.data import SFTData
from minigpt.generate import generate
from minigpt.lora import (LoRALinear, TokenRows, add_lora, fingerprint, format_rows, merge, rows_for, train_only,
                          train_rows, trainable)
from minigpt.model import GPT
from tests.conftest import FIXTURE_CORPUS

TINY = ["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--device", "cpu"]
LORA_FLAGS = ["--lora-rank", "2"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    train_pretrain.main(TINY + ["--out-dir", str(out)])
    return out


def lora_of(model, rank=4, rows=()):
    tuned = GPT(model.config)
    tuned.load_state_dict(model.state_dict())
    add_lora(tuned, rank)
    return train_rows(tuned, list(rows)) if rows else tuned


def nudge(model):
    """Move every adapter tensor off its start, as training would."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


def test_lora_at_step_0_is_the_base_model_exactly(model):
    idx = torch.randint(model.config.vocab_size, (2, 12))
    tuned = lora_of(model).eval()
    assert torch.equal(tuned(idx)[0], model(idx)[0])
    assert sum(isinstance(m, LoRALinear) for m in tuned.modules()) == 4 * model.config.n_layer
    nudge(tuned)
    assert not torch.allclose(tuned(idx)[0], model(idx)[0])  # the check above can fail


def test_only_the_adapter_gets_gradients(model):
    tuned = lora_of(model, rank=2)
    idx = torch.randint(model.config.vocab_size, (2, 12))
    nudge(tuned)
    tuned(idx, idx)[1].backward()
    grads = {n: p.grad for n, p in tuned.named_parameters()}
    assert all((g is not None) == (n.endswith((".A", ".B"))) for n, g in grads.items())
    assert all(grads[n].abs().sum() > 0 for n in grads if n.endswith((".A", ".B")))
    n_train, n_all = trainable(tuned)
    assert n_train == sum(2 * (m.base.in_features + m.base.out_features) for m in tuned.modules()
                          if isinstance(m, LoRALinear)) and n_train < 0.1 * n_all


def test_token_rows_train_alone_and_both_ends_of_the_tied_table_read_them(model):
    ids = [2, 3]
    tuned = lora_of(model, rank=2, rows=ids)
    idx = torch.tensor([[3, 7, 8, 9, 10]])
    assert torch.equal(tuned.eval()(idx)[0], model.eval()(idx)[0])  # the rows start where the base has them
    tuned(idx, idx)[1].backward()
    rows = tuned.tok_emb.rows
    assert rows.shape == (2, model.config.n_embd) and rows.grad.abs().sum() > 0
    assert tuned.tok_emb.table.weight.grad is None and not tuned.tok_emb.table.weight.requires_grad
    n_train, _ = trainable(tuned)
    assert n_train == rows.numel() + sum(m.A.numel() + m.B.numel() for m in tuned.modules() if isinstance(m, LoRALinear))
    with torch.no_grad():
        rows[0] += 1.0  # token 2's row: the head writes it differently, every other column stays
    logits = tuned(torch.tensor([[7, 8, 9]]))[0]
    plain = model(torch.tensor([[7, 8, 9]]))[0]
    assert not torch.allclose(logits[..., 2], plain[..., 2]) and torch.allclose(logits[..., 3:], plain[..., 3:])
    with torch.no_grad():
        rows[1] += 1.0  # token 3's row: reading it changes what follows
    assert not torch.allclose(tuned(idx)[0][..., 3:], model(idx)[0][..., 3:])
    merged = merge(tuned)
    assert not isinstance(merged.tok_emb, TokenRows) and merged.lm_head.weight is merged.tok_emb.weight
    assert torch.equal(merged.tok_emb.weight[2], rows[0].detach()) and torch.equal(merged.tok_emb.weight[9], model.tok_emb.weight[9])


def test_merged_weights_write_what_the_adapter_writes(model):
    tuned = lora_of(model, rows=[2, 5]).eval()
    nudge(tuned)
    idx = torch.randint(model.config.vocab_size, (3, 10))
    before, prompts = tuned(idx)[0], [[5, 6, 7], [8, 9]]
    kw = dict(temperature=0.8, top_k=20, pad_id=0)
    written = generate(tuned, prompts, 12, generator=torch.Generator().manual_seed(3), **kw)
    merged = merge(tuned)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(model.state_dict())  # a plain GPT again: a full checkpoint loads it
    assert torch.allclose(merged(idx)[0], before, atol=1e-5)
    assert generate(merged, prompts, 12, generator=torch.Generator().manual_seed(3), **kw) == written


@pytest.mark.parametrize("part, trains", [("head", {"tok_emb.weight", "ln_f.weight", "ln_f.bias"}),
                                          ("last_block", None), ("norms", None)])
def test_train_only_one_part(model, part, trains):
    train_only(model, part)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if part == "last_block":
        trains = {n for n, _ in model.named_parameters() if n.startswith(f"blocks.{model.config.n_layer - 1}.")}
    if part == "norms":
        trains = {n for n, _ in model.named_parameters() if ".ln_" in "." + n}
        assert len(trains) == 2 * (2 * model.config.n_layer + 1)
    assert names == trains


def test_a_fingerprint_moves_with_one_value(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = fingerprint(state)
    state["ln_f.bias"][0] += 1e-6
    assert fingerprint(state) != before


def test_a_lora_run_saves_a_small_adapter_that_loads_on_its_own_base_only(base_run, tmp_path, capsys):
    out = tmp_path / "lora"
    train_sft.main(TINY + ["--init-from", str(base_run), "--out-dir", str(out), "--lora-rank", "2"])
    printed = capsys.readouterr().out
    assert "tuning " in printed and "adapter: " in printed
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert all(k.endswith((".A", ".B")) or k == "tok_emb.rows" for k in ckpt["model"])
    assert ckpt["adapter"]["tuning"]["lora_rank"] == 2 and ckpt["adapter"]["tuning"]["token_rows"] == [0, 1, 2, 3, 4, 5]
    assert ckpt["model"]["tok_emb.rows"].shape[0] == 6
    assert os.path.getsize(out / "adapter.pt") < 0.5 * os.path.getsize(base_run / "ckpt.pt")
    model, _, _ = load_checkpoint(out / "adapter.pt")
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) > 0
    assert any(ckpt["model"][k].abs().sum() > 0 for k in ckpt["model"] if k.endswith(".B"))  # it learned something
    # the same adapter on a base whose weights moved is refused in one line
    moved = torch.load(base_run / "ckpt.pt", weights_only=True)
    moved["model"]["ln_f.bias"] = moved["model"]["ln_f.bias"] + 0.01
    other = tmp_path / "other"
    other.mkdir()
    save_checkpoint(str(other / "ckpt.pt"), moved)
    ckpt["adapter"]["base"] = str(other)
    save_checkpoint(str(tmp_path / "foreign.pt"), ckpt)
    with pytest.raises(CheckpointError, match="adapter for another base"):
        load_checkpoint(tmp_path / "foreign.pt")
    # merged, it is a full checkpoint that writes what the adapter writes
    from minigpt.lora import main as lora_main
    lora_main(["--merge", str(out), str(tmp_path / "merged")])
    full, _, merged_ckpt = load_checkpoint(tmp_path / "merged")
    assert "adapter" not in merged_ckpt and isinstance(full, GPT)
    idx = torch.randint(full.config.vocab_size, (2, 9))
    assert torch.allclose(full.eval()(idx)[0], model.eval()(idx)[0], atol=1e-5)


def test_lora_and_train_only_are_refused_where_they_do_not_apply(base_run, tmp_path, capsys):
    for flags, message in ((["--lora-rank", "2", "--train-only", "head"], "give one"),
                           (["--lora-rank", "2", "--lora-targets", "attn,ffn"], "--lora-targets takes"),
                           (["--lora-rank", "0", "--lora-alpha", "-1"], "must not be negative")):
        with pytest.raises(SystemExit) as e:
            run(train_sft.main, TINY + ["--init-from", str(base_run), "--out-dir", str(tmp_path / "x"), *flags],
                "train_sft.py")
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_chat_lora_run_trains_the_role_rows_and_loads_on_its_grown_base(base_run, tmp_path):
    out = tmp_path / "chat"
    train_sft.main(TINY + ["--init-from", str(base_run), "--out-dir", str(out), "--tasks", "poem,persona",
                           "--format", "chat"] + LORA_FLAGS)
    ckpt = torch.load(out / "adapter.pt", weights_only=True)
    tuning = ckpt["adapter"]["tuning"]
    base, _, _ = load_checkpoint(base_run)
    assert tuning["vocab_size"] == base.config.vocab_size + 6 and len(tuning["token_rows"]) == 12  # 6 special, 6 chat
    model, tokenizer, _ = load_checkpoint(out / "adapter.pt")
    assert model.config.vocab_size == tokenizer.vocab_size == tuning["vocab_size"]
    assert torch.equal(model.tok_emb.rows, ckpt["model"]["tok_emb.rows"])
    assert not torch.equal(model.tok_emb.rows[-1], base.tok_emb.weight.mean(0))  # the new rows learned


def test_dpo_trains_an_adapter_on_a_lora_sft_model_whose_step_0_is_its_reference(base_run, tmp_path, monkeypatch):
    import json
    import math
    import train_dpo
    from minigpt import pairs as pairing
    sft, out = tmp_path / "sft", tmp_path / "dpo"
    train_sft.main(TINY + ["--init-from", str(base_run), "--out-dir", str(sft)] + LORA_FLAGS)
    monkeypatch.setattr(pairing, "judge", lambda answer, *a: "" if sum(map(ord, answer)) % 2 == 0 else "odd")
    train_dpo.main(TINY + ["--init-from", str(sft), "--out-dir", str(out), "--test-titles", "4", "--pairs", "whole"]
                   + LORA_FLAGS)
    evals = [r for r in map(json.loads, open(out / "log.jsonl", encoding="utf-8")) if r["kind"] == "eval"]
    assert evals[0]["pref_loss"] == pytest.approx(math.log(2), abs=1e-5)  # the merged SFT adapter is the reference
    adapter = torch.load(out / "adapter.pt", weights_only=True)
    assert adapter["stage"] == "dpo" and adapter["adapter"]["base"] == str(sft.resolve())
    assert all(k.endswith((".A", ".B")) or k == "tok_emb.rows" for k in adapter["model"])
    model, _, _ = load_checkpoint(out / "adapter.pt")  # on its base, itself an adapter on the pretrained run
    assert torch.equal(model.tok_emb.rows, adapter["model"]["tok_emb.rows"])
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4 * model.config.n_layer


def test_an_interrupted_lora_run_resumes_to_the_same_adapter(base_run, tmp_path, monkeypatch):
    full, part = tmp_path / "full", tmp_path / "part"
    flags = TINY + ["--init-from", str(base_run)] + LORA_FLAGS
    train_sft.main(flags + ["--out-dir", str(full)])
    real, count = SFTData.get_batch, [0]

    def get_batch(self, *args, **kw):
        count[0] += 1
        if count[0] == 13:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args, **kw)
    monkeypatch.setattr(SFTData, "get_batch", get_batch)
    with pytest.raises(SystemExit) as e:
        run(train_sft.main, flags + ["--out-dir", str(part)], "train_sft.py")
    assert e.value.code == 130
    monkeypatch.undo()
    train_sft.main(TINY + ["--out-dir", str(part), "--resume"])
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (full, part))
    assert a["step"] == b["step"] == 20 and set(a["model"]) == set(b["model"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_the_side_by_side_rows_and_table():
    assert [n for n, _ in rows_for([2, 8])] == ["full SFT", "LoRA r2", "LoRA r8", "LoRA r8, rows frozen", "head only"]
    assert dict(rows_for([2, 8]))["LoRA r8, rows frozen"] == ["--lora-rank", "8", "--no-new-rows"]
    table = format_rows([("base", {"trainable": 0.0, "plain_loss": 4.2}),
                         ("LoRA r2", {"trainable": 0.0084, "steps": 900, "stop": 1.0, "plain_loss": 4.3})])
    lines = table.splitlines()
    assert lines[0].split() == ["base", "LoRA", "r2"] and lines[1].split()[-2:] == ["0.00%", "0.84%"]
    assert any(line.startswith("loss on plain poem text") and line.split()[-2:] == ["4.200", "4.300"] for line in lines)
    assert any(line.startswith("steps") and line.split()[-2:] == ["—", "900"] for line in lines)


def test_the_page_gets_a_lora_model_as_plain_merged_weights(model):
    from minigpt.web import export
    tuned = lora_of(model)
    nudge(tuned)
    meta, blob = export(tuned, bits=32)
    plain_meta, plain_blob = export(merge(lora_of(model)), bits=32)
    assert meta["tensors"].keys() == plain_meta["tensors"].keys() and len(blob) == len(plain_blob)
    assert blob != plain_blob  # the adapter's change is in the weights the page runs
    assert any(isinstance(m, LoRALinear) for m in tuned.modules())  # the model itself is left as it was


def test_a_rows_figures_come_from_its_log_and_final_table(model, tmp_path):
    import json
    from minigpt.lora import row_figures
    with open(tmp_path / "log.jsonl", "w", encoding="utf-8") as f:
        for r in ({"kind": "train", "step": 10, "step_ms": 200.0}, {"kind": "train", "step": 20, "step_ms": 300.0},
                  {"kind": "eval", "step": 20, "elapsed_s": 120.0}):
            f.write(json.dumps(r) + "\n")
    final = {"stop_rate": 1.0, "regular_rate": 0.97, "rhyme_rate": 0.5, "relevance_lift": 0.185}
    json.dump({"fine-tuned": final}, open(tmp_path / "final.json", "w", encoding="utf-8"))
    (tmp_path / "ckpt.pt").write_bytes(b"x" * 2048)
    x = torch.randint(model.config.vocab_size, (2, 8))
    got = row_figures(tmp_path, lora_of(model, rank=2), [(x, x)])
    assert got["step_ms"] == 250.0 and got["steps"] == 20 and got["minutes"] == 2.0 and got["saved_kb"] == 2.0
    assert got["title_lift"] == pytest.approx(18.5)  # a share in the final table, points in this one
    assert 0 < got["trainable"] < 0.2 and got["stop"] == 1.0 and got["plain_loss"] > 0

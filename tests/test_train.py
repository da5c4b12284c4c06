"""The training loop's parts: LR schedule, optimizer groups, the precision and compile defaults and their switches."""
import json
import math

import pytest
import torch

import train_pretrain
from conftest import FIXTURE_CORPUS
from minigpt import cli, train
from minigpt.model import GPT, IGNORE_INDEX, GPTConfig
from minigpt.train import TrainConfig, autocast_dtype, lr_at, make_optimizer


def test_lr_warms_up_then_follows_a_cosine_down_to_min_lr():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert lr_at(0, 0.0, cfg) == pytest.approx(1e-4) and lr_at(9, 0.0, cfg) == pytest.approx(1e-3)
    after = [lr_at(10, p / 10, cfg) for p in range(11)]
    assert after[0] == pytest.approx(1e-3) and after[5] == pytest.approx(5.5e-4) and after[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert lr_at(10, 1.7, cfg) == pytest.approx(1e-4)  # past the end it stays at min_lr
    # the cosine starts at its top where the warmup ended (here at progress 0.2), and halves by mid-way to the end
    assert lr_at(10, 0.2, cfg, warm_progress=0.2) == pytest.approx(1e-3)
    assert lr_at(10, 0.6, cfg, warm_progress=0.2) == pytest.approx(5.5e-4)


def test_weight_decay_falls_on_matrices_only():
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16))
    decay, no_decay = make_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # the tied table once


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_precision_is_bfloat16_only_where_the_cpu_has_it(monkeypatch, has_bf16):
    monkeypatch.setattr(train, "cpu_has_bfloat16", lambda: has_bf16)
    assert autocast_dtype("auto", "cpu") == (torch.bfloat16 if has_bf16 else None)
    assert autocast_dtype("float32", "cpu") is None and autocast_dtype("bfloat16", "cpu") == torch.bfloat16


@pytest.mark.parametrize("preset", ["cpu", "class"])
def test_every_time_to_loss_variant_is_a_valid_run_on_the_same_val_text(preset):
    from minigpt import bench
    parser = cli.make_parser("", train_pretrain.PRESETS, "runs/x")
    for name, flags in bench.VARIANTS.items():
        _, cfg, _, _ = cli.resolve(parser.parse_args(["--device", "cpu", "--preset", preset, *flags]),
                                   train_pretrain.PRESETS)
        assert cfg.batch_size * cfg.eval_batches == 320, name  # the same 320 windows of val text in every variant
        own = train_pretrain.PRESETS[preset]
        windows = 3200 if "--batch-size" in flags else own["eval_every"] * own["batch_size"]
        assert cfg.eval_every * cfg.batch_size == windows, name  # a larger batch evaluates after as many windows
    _, default, _, _ = cli.resolve(parser.parse_args(["--device", "cpu", "--preset", preset]), train_pretrain.PRESETS)
    assert (default.optimizer, default.batch_size) == ("muon", 32)


def test_the_faster_defaults_have_switches():
    parser = cli.make_parser("", train_pretrain.PRESETS, "runs/x")
    _, cfg, _, _ = cli.resolve(parser.parse_args(["--device", "cpu"]), train_pretrain.PRESETS)
    assert cfg.dtype == "auto" and cfg.compile
    model_kw, cfg, _, _ = cli.resolve(parser.parse_args(["--device", "cpu", "--dtype", "float32", "--no-compile",
                                                         "--use-sdpa"]), train_pretrain.PRESETS)
    assert cfg.dtype == "float32" and not cfg.compile and model_kw["use_sdpa"]


def _val_losses(out):
    with open(out / "log.jsonl", encoding="utf-8") as f:
        return [r["val_loss"] for r in map(json.loads, f) if r["kind"] == "eval"]


def test_bfloat16_autocast_trains_like_float32(tmp_path):
    args = ["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--device", "cpu", "--max-steps", "40", "--eval-every", "20"]
    train_pretrain.main(args + ["--out-dir", str(tmp_path / "f32")])
    train_pretrain.main(args + ["--out-dir", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    f32, bf16 = _val_losses(tmp_path / "f32"), _val_losses(tmp_path / "bf16")
    assert f32[0] == bf16[0] and f32[-1] < f32[0] - 0.5  # the same start (eval is float32), and it learns
    assert abs(f32[-1] - bf16[-1]) < 0.05, (f32, bf16)


def test_a_failing_compile_falls_back_to_plain_training(tmp_path, monkeypatch):
    def broken_compile(model, **kw):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        result = train_pretrain.main(["--preset", "tiny", "--corpus", FIXTURE_CORPUS, "--device", "cpu", "--compile",
                                      "--out-dir", str(tmp_path)])
    assert result["step"] == 20 and math.isfinite(result["val_loss"])


def test_under_torchrun_each_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert train.pick_device("auto") == train.pick_device("cuda") == "cuda:3"
    assert train.pick_device("cpu") == "cpu"  # a CPU run on a GPU machine stays on the CPU (and uses gloo)
    monkeypatch.delenv("LOCAL_RANK")
    assert train.pick_device("auto") == "cuda"


def test_the_training_step_comes_first_and_no_function_is_long():
    """A reader meets the textbook step before any machinery, and every function fits a screen."""
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(train))
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    first = next(n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)))
    assert first.name == "train_step" and first.end_lineno - first.lineno < 30
    longest = max(functions, key=lambda n: n.end_lineno - n.lineno)
    assert longest.end_lineno - longest.lineno + 1 <= 40, longest.name


def test_one_home_per_idea():
    """No function of the package over 40 lines but a command's main; evaluation imports no training and the loop no
    plots; dpo.py opens with the loss; model.py's generate is the plain one."""
    import ast
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
    from longest_functions import functions
    long = [name for n, name in functions() if n > 40 and not name.endswith(":main")]
    assert not long, long
    root = os.path.join(os.path.dirname(os.path.dirname(__file__)), "minigpt")

    def parsed(name):
        with open(os.path.join(root, name), encoding="utf-8") as f:
            return ast.parse(f.read())

    def imported(name):
        return {n.module for n in ast.walk(parsed(name)) if isinstance(n, ast.ImportFrom)}
    assert "minigpt.train" not in imported("evaluate.py") and "minigpt.plot" not in imported("train.py")
    dpo = [n.name for n in parsed("dpo.py").body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert dpo[:7] == ["token_logprobs", "target_logprobs", "sequence_logprobs", "implicit_rewards", "PairBatch",
                       "pair_token_logprobs", "dpo_loss"]
    generate = next(n for n in ast.walk(parsed("model.py")) if isinstance(n, ast.FunctionDef) and n.name == "generate")
    assert generate.end_lineno - generate.lineno + 1 <= 20


def test_a_stage_brings_its_own_loss(tmp_path):
    """The loop trains on whatever loss the stage gives: here twice the language-model loss, logged as such."""
    from minigpt.data import PretrainData, build_tokenizer, load_poems, split_poems
    splits = split_poems(load_poems(FIXTURE_CORPUS))
    tok = build_tokenizer(splits["train"])
    data = PretrainData(splits, tok)
    cfg = TrainConfig(batch_size=4, max_steps=3, log_every=1, eval_every=3, sample_every=3, eval_batches=1,
                      warmup_steps=1, dtype="float32")
    logged = {}
    for name, loss_fn in [("lm", train.lm_loss), ("twice", lambda m, b: (2 * train.lm_loss(m, b)[0], train.lm_loss(m, b)[1]))]:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
        train.train(model, cfg, lambda g: data.get_batch(4, 16, g), data.val_batches(1, 4, 16), str(tmp_path / name),
                    {"stage": "test"}, loss_fn=loss_fn)
        with open(tmp_path / name / "log.jsonl", encoding="utf-8") as f:
            logged[name] = [r["loss"] for r in map(json.loads, f) if r["kind"] == "train"]
    assert logged["twice"][0] == pytest.approx(2 * logged["lm"][0], rel=1e-6)  # the same weights, the same batch


def test_early_evals_are_spaced_out_logarithmically():
    assert train.early_eval_steps(200) == [10, 25, 50, 100]
    assert train.early_eval_steps(1500) == [10, 25, 50, 100, 250, 500, 1000]
    assert train.early_eval_steps(10) == []


def test_the_step_clips_a_huge_gradient():
    model = torch.nn.Linear(4, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = model.weight.detach().clone()
    batch = (torch.ones(2, 4),)
    train.train_step(model, opt, batch, lambda m, b: 1000 * m(b[0]).sum(), grad_clip=1.0)  # gradient norm about 4000
    assert (model.weight.detach() - before).norm().item() == pytest.approx(1.0, rel=1e-4)  # lr x the clipped norm
    train.train_step(model, opt, batch, lambda m, b: 1000 * m(b[0]).sum(), grad_clip=0.0)  # 0: no clipping
    assert (model.weight.detach() - before).norm().item() > 100


@pytest.mark.slow
def test_every_mutant_of_the_yardstick_and_the_loop_is_caught():
    """tools/mutants.py: each function behind a figure, broken one way at a time, makes a test fail (minutes)."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
    import mutants
    rows = mutants.main([])
    assert [name for name, verdict, _ in rows if verdict != "caught"] == []


@pytest.mark.slow
def test_the_compiled_loss_function_is_the_loss_and_its_gradients():
    """Training compiles the stage's loss function (model and loss in one graph that returns the loss alone): the
    same loss and the same gradients as eager, in float32 (half a minute: it compiles)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32))
    x, y = torch.randint(50, (4, 16)), torch.randint(50, (4, 16))
    y[:, :3] = IGNORE_INDEX
    eager_loss, eager_count = train.lm_loss(model, (x, y))
    eager_loss.backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    compiled = train.CompiledOrNot(train.lm_loss)
    loss, count = compiled(model, (x, y))
    loss.backward()
    assert compiled.compiled is not None  # it did compile (a failed compile falls back to eager and says so)
    assert torch.allclose(loss, eager_loss, atol=1e-5) and count == eager_count == 4 * 13
    assert all(torch.allclose(p.grad, g, atol=1e-5) for p, g in zip(model.parameters(), eager))

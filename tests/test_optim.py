"""Muon against a hand computation on a tiny matrix, and the optimizer the loop builds from the settings."""
import pytest
import torch

from minigpt.model import GPT, GPTConfig
from minigpt.optim import Muon, Optimizers, orthogonalise
from minigpt.train import TrainConfig, make_optimizer


def test_orthogonalise_keeps_the_singular_vectors_and_moves_the_values_near_1():
    G = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)) @ torch.diag(torch.tensor([10.0, 3.0, 1.0, 0.1]))
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    O = orthogonalise(G)
    s = torch.linalg.svdvals(O)
    assert O.shape == G.shape and s.min() > 0.5 and s.max() < 1.3  # 10 : 0.1 in G, about 1 : 1 in O
    cos = (O * (U @ Vh)).sum() / (O.norm() * (U @ Vh).norm())
    assert cos > 0.95  # the direction of U V^T, the nearest orthogonal matrix
    assert torch.allclose(orthogonalise(5 * G), O, atol=1e-5) and torch.allclose(orthogonalise(G.T), O.T, atol=1e-5)


def test_a_muon_step_equals_the_hand_computation():
    g1, g2 = (torch.randn(6, 3, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    p = torch.nn.Parameter(torch.randn(6, 3))
    start = p.detach().clone()
    opt = Muon([p], lr=0.1, momentum=0.9, dtype=torch.float32)  # exact, to compare with float32 maths
    p.grad = g1.clone()
    opt.step()
    scale = 0.1 * (6 / 3) ** 0.5  # lr x sqrt(rows / cols) for a tall matrix
    # momentum starts at 0: buf = 0.1 g1, the Nesterov look-ahead g1 + 0.9 (buf - g1) = 0.19 g1
    after_one = start - scale * orthogonalise(0.19 * g1)
    assert torch.allclose(p.detach(), after_one, atol=1e-6)
    p.grad = g2.clone()
    opt.step()
    buf = 0.1 * g1 + 0.1 * (g2 - 0.1 * g1)  # 0.09 g1 + 0.1 g2
    assert torch.allclose(p.detach(), after_one - scale * orthogonalise(g2 + 0.9 * (buf - g2)), atol=1e-6)
    assert torch.equal(p.grad, g2)  # the gradient itself is left as it was


def test_stacked_and_bfloat16_orthogonalisation_match_one_matrix_at_a_time_in_float32():
    G = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(3))
    one_by_one = torch.stack([orthogonalise(g) for g in G])
    assert torch.allclose(orthogonalise(G), one_by_one, atol=1e-5)
    low = orthogonalise(G, dtype=torch.bfloat16)
    assert low.dtype == torch.float32 and torch.allclose(low, one_by_one, atol=0.05)
    cos = (low * one_by_one).sum() / (low.norm() * one_by_one.norm())
    assert cos > 0.999


def test_a_muon_step_moves_matrices_of_one_shape_together_as_each_alone():
    grads = [torch.randn(6, 3, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    together = [torch.nn.Parameter(torch.zeros(6, 3)) for _ in grads]
    alone = [torch.nn.Parameter(torch.zeros(6, 3)) for _ in grads]
    opt = Muon(together + [torch.nn.Parameter(torch.zeros(2, 5))], lr=0.1, dtype=torch.float32)
    for p, g in zip(together, grads):
        p.grad = g.clone()
    opt.step()  # the (2, 5) matrix has no gradient: it is left out
    for p, g in zip(alone, grads):
        p.grad = g.clone()
        Muon([p], lr=0.1, dtype=torch.float32).step()
    for a, b in zip(together, alone):
        assert torch.allclose(a.detach(), b.detach(), atol=1e-6)
    assert not torch.equal(together[0].detach(), together[1].detach())


def test_muon_takes_the_blocks_matrices_and_follows_the_schedule():
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=8))
    assert isinstance(make_optimizer(model, TrainConfig()), torch.optim.AdamW)
    opt = make_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02))
    assert isinstance(opt, Optimizers)
    muon, adamw = opt.optimizers
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in muon.param_groups[0]["params"]) == sorted(
        n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2)
    assert model.tok_emb.weight in adamw.param_groups[0]["params"]  # the embedding (and the tied head) keep AdamW
    assert muon.param_groups[0]["lr_scale"] == pytest.approx(20.0)
    with pytest.raises(ValueError, match="optimizer must be adamw or muon"):
        TrainConfig(optimizer="sgd")

"""Muon, for the hidden weight matrices: momentum, then each matrix's update orthogonalised (its singular values all
near 1), so that every direction of the matrix moves at one rate however lopsided the raw gradient is. Embeddings,
the head, gains and biases keep AdamW, as in modded-nanogpt and nanochat. `--optimizer muon` turns it on; the
measurements that decide whether it is the default are in docs/log.md.
"""
import torch


def orthogonalise(G, steps=5, dtype=torch.float32):
    """About U V^T for G = U S V^T (the orthogonal matrix nearest G), by a quintic Newton-Schulz iteration: a few
    matmuls instead of an SVD. Its coefficients are tuned for speed, so the singular values land near 1 (about
    0.7-1.2), not exactly on it: enough for an update's direction. G may be a stack of matrices (..., rows, cols)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT  # (short, long): the Gram matrix below is the small one
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # every singular value at most 1, where the iteration converges
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X  # an odd polynomial of X: the singular vectors stay, the values move to 1
    return (X.mT if tall else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalised; for 2-D weights only. Matrices of one shape are
    orthogonalised together as one stack, in bfloat16 by default (as modded-nanogpt does): on 2 CPU cores that
    halves the optimizer's step, and an update's direction needs no more precision (tests/test_optim.py)."""

    def __init__(self, params, lr=0.02, momentum=0.95, dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, momentum=momentum))
        self.dtype = dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            by_shape = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for shape, params in by_shape.items():
                updates = orthogonalise(torch.stack([self._nesterov(p, group["momentum"]) for p in params]),
                                        dtype=self.dtype)
                # a tall matrix's orthogonal update has smaller entries: scaled up so every shape moves alike
                scale = -group["lr"] * max(1, shape[0] / shape[1]) ** 0.5
                for p, u in zip(params, updates):
                    p.add_(u, alpha=scale)

    def _nesterov(self, p, momentum):
        buf = self.state[p].setdefault("momentum", torch.zeros_like(p.grad))
        buf.lerp_(p.grad, 1 - momentum)  # a running mean of the gradients
        return p.grad.lerp(buf, momentum)  # Nesterov: the step looks along the mean


class Optimizers:
    """Several optimizers stepping as one (Muon for the hidden matrices, AdamW for the rest), with one state_dict."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self):
        for o in self.optimizers:
            o.step()

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state):
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)

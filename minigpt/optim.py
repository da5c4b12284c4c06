"""Muon, for the hidden weight matrices: momentum, then each matrix's update orthogonalised (its singular values all
near 1), so that every direction of the matrix moves at one rate however lopsided the raw gradient is. Embeddings,
the head, gains and biases keep AdamW, as in modded-nanogpt and nanochat. `--optimizer muon` turns it on; the
measurements that decide whether it is the default are in docs/log.md.
"""
import torch


def orthogonalise(G, steps=5):
    """About U V^T for G = U S V^T (the orthogonal matrix nearest G), by a quintic Newton-Schulz iteration: a few
    matmuls instead of an SVD. Its coefficients are tuned for speed, so the singular values land near 1 (about
    0.7-1.2), not exactly on it: enough for an update's direction."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.float()
    tall = X.size(0) > X.size(1)
    if tall:
        X = X.T  # (short, long): the Gram matrix below is the small one
    X = X / (X.norm() + 1e-7)  # every singular value at most 1, where the iteration converges
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X  # an odd polynomial of X: the singular vectors stay, the values move to 1
    return X.T if tall else X


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalised; for 2-D weights only."""

    def __init__(self, params, lr=0.02, momentum=0.95):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - group["momentum"])  # a running mean of the gradients
                g = p.grad.lerp(buf, group["momentum"])  # Nesterov: the step looks along the mean
                # a tall matrix's orthogonal update has smaller entries: scaled up so every shape moves alike
                p.add_(orthogonalise(g), alpha=-group["lr"] * max(1, p.size(0) / p.size(1)) ** 0.5)


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

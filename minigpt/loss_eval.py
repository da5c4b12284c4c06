"""The loss on held-out batches, and the one way to measure a model without changing it: eval mode, given back after.
Training reads val loss from here, and so does evaluation (which never imports training)."""
import contextlib

import torch

from minigpt.model import IGNORE_INDEX


@contextlib.contextmanager
def evaluating(model):
    """The model in eval mode (no dropout) inside the block, and in its own mode again after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_loss(model, batches, device):
    """The mean loss per counted target over all batches (a batch with more counted targets weighs more)."""
    total, count = 0.0, 0
    with evaluating(model):
        for x, y in batches:
            n = int((y != IGNORE_INDEX).sum())
            total += model(x.to(device), y.to(device))[1].item() * n
            count += n
    return total / count

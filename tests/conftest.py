"""Shared fixtures: a tiny corpus (127 real poems from poems/, chosen to be short) and a tiny model."""
import os

import pytest
import torch

from minigpt.data import build_tokenizer, load_poems, split_poems
from minigpt.model import GPT, GPTConfig

FIXTURE_CORPUS = os.path.join(os.path.dirname(__file__), "fixtures", "poems.jsonl")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def splits():
    return split_poems(load_poems(FIXTURE_CORPUS))


@pytest.fixture(scope="session")
def tokenizer(splits):
    return build_tokenizer(splits["train"])


@pytest.fixture
def tiny_config(tokenizer):
    return GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


@pytest.fixture
def model(tiny_config):
    return GPT(tiny_config).eval()

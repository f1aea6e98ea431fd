"""Shared test set-up: offline hub, and the fixtures every module may ask for. Plain helpers (tiny models built from
configs, data sets, checks) are in helpers.py."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

pytest.register_assert_rewrite("helpers")  # check_contract's asserts report their values, as in a test module

import torch  # noqa: E402
from helpers import load_tokenizer  # noqa: E402


@pytest.fixture
def tokens() -> torch.Tensor:
    """Random token ids for the 100-token tiny models: a batch of 2 rows of 9."""
    return torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tokenizer():
    """The offline MiniLM tokenizer with [SEP] as EOS, for the tiny models that read real text."""
    return load_tokenizer()

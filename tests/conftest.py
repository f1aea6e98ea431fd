"""Shared test set-up: offline hub, and the fixtures every module may ask for. Plain helpers (tiny models built from
configs, data sets, checks) are in helpers.py."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

pytest.register_assert_rewrite("helpers")  # check_contract's asserts report their values, as in a test module

import torch  # noqa: E402
from helpers import BAD, GOOD, load_tokenizer, tiny_bert, tiny_llama  # noqa: E402


@pytest.fixture
def tokens() -> torch.Tensor:
    """Random token ids for the 100-token tiny models: a batch of 2 rows of 9."""
    return torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tokenizer():
    """The offline MiniLM tokenizer with [SEP] as EOS, for the tiny models that read real text."""
    return load_tokenizer()


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer):
    """Folders the CLI and isolated runs load by path: a tiny BERT classifier, a tiny Llama, a sentiment .jsonl."""
    root = tmp_path_factory.mktemp("cli")
    tiny_bert(tokenizer=tokenizer, num_labels=2).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    tiny_llama(tokenizer=tokenizer).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    rows = [{"text": t, "label": 1} for t in GOOD * 2] + [{"text": t, "label": 0} for t in BAD * 2]
    (root / "sentiment.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root

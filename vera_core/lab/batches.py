"""Rows → token ids → padded tensors, for training and evaluation. Causal-LM labels are -100 on the prompt and
on padding, so the loss is taken only on the response and its end-of-sequence token."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from vera_core.lab.chat import format_prompt

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and transformers' models) skip


@dataclass
class Encoded:
    """Tokenized rows ready for `collate`/`batches`, with how many rows were truncated to `max_length`."""

    features: list[dict]      # each: input_ids, attention_mask (lists of ints), labels (list of ints or one int)
    truncated: int            # rows cut to max_length
    total: int                # rows encoded
    pad_token_id: int = 0     # what `batches` pads input_ids with


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, or its EOS id when it has none (common for causal LMs; padding is masked anyway)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError(f"{type(tokenizer).__name__} has neither a pad token nor an EOS token to pad with")


def encode(rows: list[dict], tokenizer, task: str, max_length: int) -> Encoded:
    """Tokenize classification rows ({"text", "label"}) or causal-LM rows ({"prompt", "response"}).

    Causal-LM: input = format_prompt(prompt) + response + EOS. Prompt and response are tokenized separately and the
    ids concatenated, so the label mask starts exactly at the response. Truncation keeps the start and cuts the
    end; when the prompt alone would fill `max_length`, the prompt is cut to `max_length - 1` so that every row keeps
    at least one response token to learn (a row with no supervised token would give a NaN loss on its own).
    """
    if task == "classification":
        features, truncated = _encode_classification(rows, tokenizer, max_length)
    elif task == "causal-lm":
        features, truncated = _encode_causal(rows, tokenizer, max_length)
    else:
        raise ValueError(f"unknown task {task!r}; choose 'causal-lm' or 'classification'")
    return Encoded(features, truncated, len(rows), pad_token_id(tokenizer))


def collate(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of features into tensors: input_ids (B, T), attention_mask (B, T), labels (B, T) or (B,)."""
    if not features:
        raise ValueError("cannot collate an empty list of features")
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)          # (B, T)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[i, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = torch.tensor(f["attention_mask"], dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if isinstance(features[0]["labels"], int):
        batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)  # (B,)
    else:
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)       # (B, T)
        for i, f in enumerate(features):
            labels[i, : len(f["labels"])] = torch.tensor(f["labels"], dtype=torch.long)
        batch["labels"] = labels
    return batch


def batches(encoded: Encoded, batch_size: int, *, shuffle: bool, seed: int, epoch: int = 0) -> Iterator[dict]:
    """Collated batches over all features (the last one may be smaller); the order depends only on seed and epoch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(encoded.features)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        yield collate([encoded.features[i] for i in order[start:start + batch_size]], encoded.pad_token_id)


def _encode_classification(rows: list[dict], tokenizer, max_length: int) -> tuple[list[dict], int]:
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    features, truncated = [], 0
    for row in rows:
        ids = tokenizer(row["text"]).input_ids
        if len(ids) > max_length:
            truncated += 1
            # Re-tokenize with truncation so the tokenizer keeps its closing special tokens (e.g. BERT's [SEP]).
            ids = tokenizer(row["text"], truncation=True, max_length=max_length).input_ids
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": int(row["label"])})
    return features, truncated


def _encode_causal(rows: list[dict], tokenizer, max_length: int) -> tuple[list[dict], int]:
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 for causal-lm (a prompt token and a response token), "
                         f"got {max_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"{type(tokenizer).__name__} has no EOS token; causal-lm training needs one to end responses")
    bos = _bos_to_prepend(tokenizer)
    features, truncated = [], 0
    for row in rows:
        prompt_text = format_prompt(tokenizer, row["prompt"])
        prompt = tokenizer(prompt_text, add_special_tokens=False).input_ids
        # A chat template usually writes the BOS itself; add it only when the text does not already start with it.
        if bos is not None and not prompt_text.startswith(tokenizer.bos_token):
            prompt = [bos] + prompt
        response = tokenizer(row["response"], add_special_tokens=False).input_ids + [eos]
        if len(prompt) + len(response) > max_length:
            truncated += 1
            prompt = prompt[: max_length - 1]
            response = response[: max_length - len(prompt)]
        ids = prompt + response
        features.append({
            "input_ids": ids,
            "attention_mask": [1] * len(ids),
            "labels": [IGNORE_INDEX] * len(prompt) + response,
        })
    return features, truncated


def _bos_to_prepend(tokenizer) -> int | None:
    """The BOS id when the tokenizer normally starts sequences with it (Llama-style), else None (GPT-2, SmolLM2)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a").input_ids
    return bos if ids and ids[0] == bos else None

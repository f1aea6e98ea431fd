"""Many adapters on one base, as an app or a script serves them: load them together, run one mixed batch, and
the same rows one adapter at a time for comparison (mixed.py does the row-wise work).

    model, tokenizer = load_many("smollm2-135m-instruct", "causal-lm", 0, {"chef": "runs/.../adapters/vera-r256"})
    result = serve_batch(model, tokenizer, ["Hi", "Hello"], ["chef", "__base__"])   # outputs, times, memory
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import torch

from ..adapters.config import LoraConfig, VeraConfig
from ..adapters.inject import active_adapter, adapter_configs, adapter_layers, adapter_parameters, set_active_adapter
from ..adapters.io import _read, load_adapters
from ..adapters.layers import VeraLayer
from ..adapters.mixed import BASE, mixed_adapters
from .models import generate
from .runs import load_base


def check_methods(directories: dict[str, str | os.PathLike]) -> None:
    """All VeRA or all LoRA: one batch cannot hold both (say which adapter is which)."""
    methods = {}
    for name, directory in directories.items():
        config = _read(Path(directory))[0]
        methods[name] = "VeRA" if isinstance(config, VeraConfig) else "LoRA" if isinstance(config, LoraConfig) \
            else type(config).__name__
    if len(set(methods.values())) > 1:
        first = next(iter(methods))
        other = next(n for n, m in methods.items() if m != methods[first])
        raise ValueError(f"adapter {first!r} is {methods[first]} and adapter {other!r} is {methods[other]}: one batch "
                         "serves adapters of one method; pick only VeRA adapters or only LoRA adapters.")


def load_many(model_name: str, task: str, seed: int, directories: dict[str, str | os.PathLike], *,
              quantization: str | None = None, num_labels: int = 2, trust_remote_code: bool = False):
    """(model, tokenizer): the base as a run loads it (seeded, so a classification head is the runs' head) with
    every {name: directory} loaded for mixed batches. Refused with a clear ValueError, before anything is loaded
    where it can be: VeRA mixed with LoRA; on loading: an adapter for another base (shapes), another seed or r."""
    if not directories:
        raise ValueError("choose at least one adapter.")
    check_methods(directories)
    model, tokenizer = load_base(model_name, task, seed, quantization, num_labels, trust_remote_code)
    load_adapters(model, directories)
    return model.eval(), tokenizer


def adapter_memory(model: torch.nn.Module) -> dict:
    """Bytes the loaded adapters hold: per adapter, its b and d in every layer (a vector its config omits is a
    frozen constant, held all the same) or LoRA's A and B, plus its head copies; and the frozen random (A, B) pairs
    once for all adapters: one shared pair, or each layer's own with projections="unique" ("pairs" says how many).
    Not counted: the stacked copy of every adapter's vectors a mixed batch builds (mixed.VectorBank)."""
    per = {}
    for name in adapter_configs(model):
        tensors = [t for _, layer in adapter_layers(model) if name in layer.adapter_names for t in (
            (layer.vera_lambda_b[name], layer.vera_lambda_d[name]) if isinstance(layer, VeraLayer)
            else layer.adapter_parameters(name))]
        tensors += adapter_parameters(model, name)["head"]  # its head copies (modules_to_save)
        per[name] = sum(t.numel() * t.element_size() for t in tensors)
    pairs = {id(layer.projections): layer.projections for _, layer in adapter_layers(model)
             if isinstance(layer, VeraLayer)}.values()
    shared = sum(t.numel() * t.element_size() for proj in pairs for t in (proj.A, proj.B))
    return {"per_adapter": per, "adapters_total": sum(per.values()), "shared": shared, "pairs": len(pairs)}


def _answer(model, tokenizer, prompts: list[str], task: str, max_new_tokens: int, labels, names=None) -> list[str]:
    if task == "classification":
        enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=256)
        enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
        with torch.inference_mode(), (mixed_adapters(model, names) if names else _nothing()):
            probs = model(**enc).logits.float().softmax(-1).cpu()
        label_names = labels or [str(i) for i in range(probs.shape[1])]
        return [", ".join(f"{n} {p:.3f}" for n, p in zip(label_names, row.tolist())) for row in probs]
    return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=max(len(prompts), 1),
                    adapter_names=names)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def serve_batch(model, tokenizer, prompts: Sequence[str], names: Sequence[str], task: str = "causal-lm",
                max_new_tokens: int = 32, labels: Sequence[str] | None = None) -> dict:
    """Row i = prompts[i] with adapter names[i] ("__base__": none), all in one mixed batch (greedy), then the same
    rows one adapter at a time (set_active_adapter, one sub-batch per adapter) for the time and a check.
    Returns {"outputs", "batch_s", "one_at_a_time_s", "outputs_one_at_a_time", "memory"}."""
    prompts, names = list(prompts), list(names)
    if not prompts:
        raise ValueError("enter at least one prompt.")
    if len(prompts) != len(names):
        raise ValueError(f"{len(prompts)} prompts but {len(names)} adapter names; give one adapter per prompt.")
    was = active_adapter(model)
    start = time.perf_counter()
    outputs = _answer(model, tokenizer, prompts, task, max_new_tokens, labels, names)
    batch_s = time.perf_counter() - start
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    single = [""] * len(prompts)
    start = time.perf_counter()
    try:
        for name, rows in groups.items():
            set_active_adapter(model, None if name == BASE else name)
            for i, text in zip(rows, _answer(model, tokenizer, [prompts[i] for i in rows], task, max_new_tokens,
                                             labels)):
                single[i] = text
    finally:
        set_active_adapter(model, was)
    one_s = time.perf_counter() - start
    return {"outputs": outputs, "batch_s": batch_s, "one_at_a_time_s": one_s, "outputs_one_at_a_time": single,
            "memory": adapter_memory(model)}

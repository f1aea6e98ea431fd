"""VeRA Lab core: VeRA and LoRA adapters for Hugging Face models, and the tools to train and compare them.

The adapter API is a handful of verbs:

    model = add_adapter(model, VeraConfig(r=256, target_modules="all-linear"))
    ...train...
    save_adapter(model, "my-adapter")            # b, d, seed and fingerprint: kilobytes
    model = load_adapter(base_model, "my-adapter")
    merge_adapter(model); unmerge_adapter(model); model = remove_adapter(model, merge=True)
    load_adapters(base_model, {"a": "dir-a", "b": "dir-b"}); model(ids, adapter_names=["a", "b"])  # row-wise

Importing the package loads the adapter API only (torch and transformers); training, comparing, models, data and
metrics load on first use of their names.
"""
from importlib import import_module

from .adapters import (
    LoraConfig,
    VeraConfig,
    active_adapter,
    adapter_configs,
    add_adapter,
    count_parameters,
    disabled_adapter,
    estimate_parameters,
    export_peft,
    generate_projections,
    load_adapter,
    load_adapters,
    lora_grid,
    merge_adapter,
    mixed_adapters,
    remove_adapter,
    save_adapter,
    set_active_adapter,
    unmerge_adapter,
    vera_grid,
)
from .adapters.files import WriteError
from .lab.config import TrainConfig

# Public names whose modules are imported on first access (they pull in sacrebleu, psutil, datasets, ...).
_LAZY = {
    "compare": "lab.compare", "run_request": "lab.compare", "RunDied": "lab.compare",
    "RunRequest": "lab.request",
    "Report": "lab.report", "load_run": "lab.report",
    "list_runs": "lab.runs", "load_run_model": "lab.runs", "export": "lab.runs",
    "TrainResult": "lab.train", "train": "lab.train",
    "evaluate": "lab.evaluate",
    "load_model": "lab.models", "generate": "lab.models", "predict": "lab.models", "model_summary": "lab.models",
    "OFFLINE_MODELS": "lab.models",
    "TextDataset": "lab.data", "load_dataset": "lab.data", "preview": "lab.data", "format_preview": "lab.data",
    "BUILTIN_DATASETS": "lab.data",
    "estimate_memory": "lab.memory", "largest_batch": "lab.memory", "MemoryTracker": "lab.memtrack",
    "bleu": "lab.metrics", "rouge_l": "lab.metrics", "generation_scores": "lab.metrics",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'vera_core' has no attribute {name!r}")
    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


__all__ = [
    "VeraConfig", "LoraConfig", "add_adapter", "set_active_adapter", "active_adapter", "adapter_configs",
    "disabled_adapter", "merge_adapter", "unmerge_adapter", "remove_adapter", "save_adapter", "load_adapter",
    "load_adapters", "mixed_adapters", "export_peft", "count_parameters", "estimate_parameters",
    "generate_projections", "WriteError", "TrainConfig", "vera_grid", "lora_grid", *_LAZY,
]

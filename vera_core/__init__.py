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
import sys
import types
from importlib import import_module

from .config import LoraConfig, TrainConfig, VeraConfig, lora_grid, vera_grid
from .count import count_parameters, estimate_parameters
from .inject import (
    active_adapter,
    adapter_configs,
    add_adapter,
    disabled_adapter,
    merge_adapter,
    remove_adapter,
    set_active_adapter,
    unmerge_adapter,
)
from .io import export_peft, load_adapter, load_adapters, save_adapter
from .mixed import mixed_adapters
from .projections import generate_projections

# Public names whose modules are imported on first access (they pull in sacrebleu, psutil, datasets, ...).
_LAZY = {
    "compare": "compare", "run_request": "compare",
    "RunRequest": "request",
    "Report": "report", "load_run": "report",
    "list_runs": "runs", "load_run_model": "runs", "export": "runs",
    "TrainResult": "train", "train": "train",
    "evaluate": "evaluate",
    "load_model": "models", "generate": "models", "predict": "models", "model_summary": "models",
    "OFFLINE_MODELS": "models",
    "TextDataset": "data", "load_dataset": "data", "preview": "data", "format_preview": "data",
    "BUILTIN_DATASETS": "data",
    "estimate_memory": "memory", "largest_batch": "memory", "MemoryTracker": "memtrack",
    "bleu": "metrics", "rouge_l": "metrics", "generation_scores": "metrics",
}


# Functions named like their module (train, compare, evaluate): importing the submodule sets the package attribute to
# the module, which would hide the function. The package's class drops that one assignment; sys.modules keeps the module.
_SHADOWED = {name for name, module in _LAZY.items() if name == module}


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        if not (name in _SHADOWED and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


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
    "generate_projections", "TrainConfig", "vera_grid", "lora_grid", *_LAZY,
]

"""VeRA Lab core: VeRA and LoRA adapters for Hugging Face models, and the tools to train and compare them.

The adapter API is a handful of verbs:

    model = add_adapter(model, VeraConfig(r=256, target_modules="all-linear"))
    ...train...
    save_adapter(model, "my-adapter")            # b, d, seed and fingerprint: kilobytes
    model = load_adapter(base_model, "my-adapter")
    merge_adapter(model); unmerge_adapter(model); model = remove_adapter(model, merge=True)
"""
from .compare import Report, compare, load_run
from .config import LoraConfig, VeraConfig
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
from .data import BUILTIN_DATASETS, TextDataset, format_preview, load_dataset, preview
from .io import export_peft, load_adapter, save_adapter
from .memory import estimate_memory
from .metrics import bleu, generation_scores, rouge_l
from .models import OFFLINE_MODELS, generate, load_model, model_summary, predict
from .projections import generate_projections
from .train import TrainConfig, TrainResult, evaluate, train

__all__ = [
    "VeraConfig", "LoraConfig", "add_adapter", "set_active_adapter", "active_adapter", "adapter_configs",
    "disabled_adapter", "merge_adapter", "unmerge_adapter", "remove_adapter", "save_adapter", "load_adapter",
    "export_peft", "count_parameters", "estimate_parameters", "generate_projections",
    "load_model", "generate", "predict", "model_summary", "OFFLINE_MODELS",
    "TextDataset", "load_dataset", "preview", "format_preview", "BUILTIN_DATASETS",
    "TrainConfig", "TrainResult", "train", "evaluate",
    "compare", "Report", "load_run", "estimate_memory", "bleu", "rouge_l", "generation_scores",
]

"""The adapter library: VeRA and LoRA on any Hugging Face model, through a handful of verbs.

    model = add_adapter(model, VeraConfig(r=256, target_modules="all-linear"))
    save_adapter(model, "my-adapter"); model = load_adapter(base_model, "my-adapter")
    merge_adapter(model); unmerge_adapter(model); model = remove_adapter(model, merge=True)

It needs torch and transformers only, and imports nothing from the lab (`vera_core.lab`).
"""
from .config import ALL_LINEAR, LoraConfig, VeraConfig, config_from_dict, lora_grid, vera_grid
from .count import count_parameters, estimate_parameters
from .files import WriteError
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

__all__ = [
    "VeraConfig", "LoraConfig", "ALL_LINEAR", "config_from_dict", "vera_grid", "lora_grid", "add_adapter",
    "set_active_adapter", "active_adapter", "adapter_configs", "disabled_adapter", "merge_adapter",
    "unmerge_adapter", "remove_adapter", "save_adapter", "load_adapter", "load_adapters", "mixed_adapters",
    "export_peft", "count_parameters", "estimate_parameters", "generate_projections", "WriteError",
]

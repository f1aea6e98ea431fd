"""Parameter accounting: what a model trains, and what an adapter would cost for a config, without any weights."""
from __future__ import annotations

import torch
from torch import nn

from .config import AdapterConfig, VeraConfig
from .inject import adapter_parameters, matches_suffix, resolve_targets
from .layers import layer_shape


def _numel(param: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit values per byte: count the logical weights, not the storage.
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2
    return param.numel()


def count_parameters(model: nn.Module) -> dict[str, int]:
    """{"trainable", "trainable_adapter", "trainable_head", "total"} (each tensor counted once, shared ones too)."""
    owned = {key: {id(p) for p in params} for key, params in adapter_parameters(model).items()}
    counts = {"trainable": 0, "trainable_adapter": 0, "trainable_head": 0, "total": 0}
    for param in model.parameters():
        n = _numel(param)
        counts["total"] += n
        if not param.requires_grad:
            continue
        counts["trainable"] += n
        if id(param) in owned["head"]:
            counts["trainable_head"] += n
        elif id(param) in owned["adapter"]:
            counts["trainable_adapter"] += n
    return counts


def meta_model(model_config) -> nn.Module:
    """The architecture of a transformers config on the meta device: shapes only, no memory, no download."""
    from transformers import AutoModel

    with torch.device("meta"):
        return AutoModel.from_config(model_config)


def estimate_parameters(model_config, adapter_config: AdapterConfig) -> dict[str, int]:
    """{"trainable", "stored_bytes"} for an adapter on a model config (or an nn.Module), computed from shapes alone.

    VeRA: sum over targets of (out + r), of r alone with train_vectors="d", of out alone with "b"; LoRA: sum of
    r * (in + out). stored_bytes is the fp32 payload (plus A and B when VeRA saves its projections); head copies in
    modules_to_save are included. Unique projections are frozen and regenerated from the seed: they add memory, not
    trainable parameters or stored bytes.
    """
    model = model_config if isinstance(model_config, nn.Module) else meta_model(model_config)
    shapes = [layer_shape(model.get_submodule(p)) for p in resolve_targets(model, adapter_config)]
    r = adapter_config.r
    if isinstance(adapter_config, VeraConfig):
        trains = adapter_config.train_vectors
        trainable = sum(out * (trains != "d") + r * (trains != "b") for _, out in shapes)  # b is (out,), d is (r,)
        extra = r * (max(i for i, _ in shapes) + max(o for _, o in shapes)) if adapter_config.save_projection else 0
    else:
        trainable = sum(r * (i + out) for i, out in shapes)
        extra = 0
    for wanted in adapter_config.modules_to_save:
        for path, module in model.named_modules():
            if matches_suffix(path, wanted):
                trainable += sum(p.numel() for p in module.parameters())
    return {"trainable": trainable, "stored_bytes": 4 * (trainable + extra)}

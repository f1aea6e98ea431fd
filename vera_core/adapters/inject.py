"""The public verbs: add, switch, merge, unmerge and remove adapters on a Hugging Face (or any torch) model.

Every verb checks its input before it touches the model, so a failed call leaves the model as it was.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Callable, Iterator

from torch import nn

from .config import ALL_LINEAR, DEFAULT_TARGETS, AdapterConfig, LoraConfig, VeraConfig
from . import mixed
from .layers import (
    AdapterLayer,
    LoraLayer,
    ModulesToSave,
    VeraLayer,
    is_supported,
    keep_portable_4bit,
    layer_shape,
    walk,
)
from .projections import VeraProjections, layer_seed

# Plain attributes set on the adapted model (not modules, so they never enter its state dict).
_CONFIGS = "_adapter_configs"  # {name: AdapterConfig}
_ACTIVE = "_active_adapter"
_REQUIRES_GRAD = "_base_requires_grad"  # {param name: requires_grad} before the first adapter, restored on removal


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """The adapters on `model`, by name (empty when it has none)."""
    return getattr(model, _CONFIGS, {})


def active_adapter(model: nn.Module) -> str | None:
    return getattr(model, _ACTIVE, None)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for path, module in walk(model):
        if isinstance(module, AdapterLayer):
            yield path, module


def adapter_parameters(model: nn.Module, name: str | None = None) -> dict[str, list[nn.Parameter]]:
    """{"adapter": [...], "head": [...]}: the tensors adapter `name` trains (None: every adapter on the model),
    as listed by the layers that own them."""
    names = [name] if name is not None else list(adapter_configs(model))
    found: dict[str, list[nn.Parameter]] = {"adapter": [], "head": []}
    for key, modules in (("adapter", adapter_layers(model)), ("head", head_wrappers(model))):
        for _, module in modules:
            for n in names:
                if n in module.adapter_names:
                    found[key] += module.adapter_parameters(n)
    return found


def matches_suffix(path: str, name: str) -> bool:
    """PEFT's rule for a module name: the whole path, or its ending on a dot boundary ("q_proj" matches
    "model.layers.0.self_attn.q_proj", never "model.layers.0.self_attn.xq_proj")."""
    return path == name or path.endswith("." + name)


def head_wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for path, module in walk(model):
        if isinstance(module, ModulesToSave):
            yield path, module


def _output_head_names(model: nn.Module) -> set[str]:
    """Paths of the output embedding (lm_head), never an adapter target for "all-linear"."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {path for path, m in walk(model) if head is not None and m is head}


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module path that is not inside an adapter wrapper (the wrapper stands in for its base layer)."""
    return [(path, module) for path, module in walk(model) if path]


def _matches(path: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    # matches_suffix against every target, as set lookups of the path's dot-suffixes: a loaded adapter lists every
    # module path, so a pairwise test (paths x targets) would grow with their product.
    parts = path.split(".")
    return not targets.isdisjoint(".".join(parts[i:]) for i in range(len(parts)))


def resolve_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Module paths the config adapts, with the error a user needs when none (or the wrong kind) match."""
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                f"no default target_modules for model type {model_type!r}; pass target_modules, e.g. "
                f"{_leaf_names(model)[:8]} or 'all-linear'."
            )
        targets = DEFAULT_TARGETS[model_type]
    wanted = targets if isinstance(targets, str) else set(targets)
    # Only "all-linear" excludes modules; finding the output head walks the model, once per adapter loaded.
    excluded = (set(config.modules_to_save) | _output_head_names(model)) if targets == ALL_LINEAR else set()

    def is_excluded(path: str) -> bool:
        return any(matches_suffix(path, e) or f".{e}." in f".{path}." for e in excluded)

    found = []
    for path, module in _candidates(model):
        if isinstance(module, AdapterLayer):
            wrapped = module.base_layer
        else:
            wrapped = module
        if targets == ALL_LINEAR:
            if is_supported(wrapped) and not is_excluded(path):
                found.append(path)
            continue
        if _matches(path, wanted):
            if not is_supported(wrapped):
                raise ValueError(
                    f"module {path!r} matches target_modules but is a {type(wrapped).__name__}; only nn.Linear, "
                    "transformers Conv1D and bitsandbytes Linear4bit / Linear8bitLt can carry an adapter."
                )
            found.append(path)
    if not found:
        raise ValueError(
            f"no module matches target_modules={config.target_modules!r}. Candidate layer names in this model: "
            f"{_leaf_names(model)}."
        )
    return found


def _leaf_names(model: nn.Module) -> list[str]:
    names = []
    for path, module in _candidates(model):
        leaf = path.rsplit(".", 1)[-1]
        if (is_supported(module) or isinstance(module, AdapterLayer)) and leaf not in names:
            names.append(leaf)
    return names


def _check_compatible(model: nn.Module, config: AdapterConfig, name: str) -> None:
    existing = adapter_configs(model)
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}.")
    if name in existing:
        raise ValueError(f"model already has an adapter named {name!r}; pick another name or remove it first.")
    for other_name, other in existing.items():
        if type(other) is not type(config):
            raise ValueError(
                f"model already carries a {other.method} adapter ({other_name!r}); one model holds adapters of one "
                f"method. Use a fresh copy of the base model for {config.method}."
            )
        if isinstance(config, VeraConfig):
            check_shared_pair(name, pair_fields(config), other_name, pair_fields(other))
    if any(isinstance(m, AdapterLayer) and m.merged_adapter for _, m in adapter_layers(model)):
        raise ValueError("the model has a merged adapter; call unmerge_adapter(model) before adding another.")


def pair_fields(config: VeraConfig) -> dict:
    """The config fields that decide a model's (A, B): VeRA adapters on one model must agree on all of them."""
    return {"r": config.r, "projection_seed": config.projection_seed, "projections": config.projections,
            "projection_init": config.projection_init}


def check_shared_pair(name: str, wanted: dict, other_name: str, has: dict) -> None:
    """Refuse a VeRA adapter whose (A, B) would differ from the model's, naming the first field that differs."""
    for field, value in wanted.items():
        if has[field] != value:
            raise ValueError(
                f"VeRA adapters on one model share one (A, B) pair, and {name!r} differs from {other_name!r} first in "
                f"{field}: {value} vs {has[field]} (compared: {', '.join(wanted)}). Use adapters trained with the "
                "same r, seed, projections, projection_init and targets, or another copy of the base model."
            )


def _get_parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


def shared_projections(model: nn.Module,
                       make: Callable[[], VeraProjections] | None = None) -> VeraProjections | None:
    """The one (A, B) pair every VeRA layer of `model` shares; when it has none yet, make()'s new pair on the model's
    device (None without `make`). Callers check that a found pair suits their adapter. (With projections="unique"
    each layer holds its own: this is the first layer's.)"""
    found = next((layer.projections for _, layer in adapter_layers(model) if isinstance(layer, VeraLayer)), None)
    if found is not None or make is None:
        return found
    return make().to(next(model.parameters()).device)


def _projections_for(model: nn.Module, config: VeraConfig,
                     targets: dict[str, nn.Module]) -> VeraProjections | dict[str, VeraProjections]:
    """The model's pair, made at the largest (in, out) among the targets by the first VeRA adapter; with
    projections="unique", {path: the layer's own pair}, kept where the layer has one, else drawn from its seed."""
    if config.projections == "unique":
        return {path: layer_pair(model, config, path, module) for path, module in targets.items()}
    shapes = [layer_shape(_unwrapped(m)) for m in targets.values()]
    max_in, max_out = max(s[0] for s in shapes), max(s[1] for s in shapes)
    proj = shared_projections(model, lambda: VeraProjections(config.r, max_in, max_out, config.projection_seed,
                                                             init=config.projection_init))
    if max_in > proj.max_in or max_out > proj.max_out:
        raise ValueError(
            f"the new adapter's targets need projections of at least (in={max_in}, out={max_out}) but the "
            f"model's shared pair is (in={proj.max_in}, out={proj.max_out}); target the same layers as the "
            "first adapter, or use another model copy."
        )
    return proj


def layer_pair(model: nn.Module, config: VeraConfig, path: str, module: nn.Module) -> VeraProjections:
    """Layer `path`'s own (A, B) (projections="unique"): the one it holds, or (r, in) and (out, r) drawn from
    layer_seed(projection_seed, path) on the model's device."""
    if isinstance(module, VeraLayer):
        return module.projections
    in_f, out_f = layer_shape(module)
    pair = VeraProjections(config.r, in_f, out_f, layer_seed(config.projection_seed, path), init=config.projection_init)
    return pair.to(next(model.parameters()).device)


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdapterLayer) else module


def add_adapter(model: nn.Module, config: AdapterConfig, name: str = "default", *, activate: bool = True) -> nn.Module:
    """Add a VeRA or LoRA adapter in place and make it the active, trainable one; everything else is frozen.
    (activate=False: add it frozen and leave the active adapter as it is, e.g. to load many for mixed batches.)

    Each target is replaced at its path by a wrapper that keeps the original as `base_layer`. Modules named in
    `modules_to_save` (e.g. a classifier head) are trained as copies so the original stays untouched.
    """
    if not isinstance(config, (VeraConfig, LoraConfig)):
        raise TypeError(f"config must be a VeraConfig or LoraConfig, got {type(config).__name__}.")
    _check_compatible(model, config, name)
    paths = resolve_targets(model, config)
    head_paths = []
    for wanted in config.modules_to_save:
        hits = [p for p, _ in _candidates(model) if matches_suffix(p, wanted)]
        if not hits:
            raise ValueError(f"modules_to_save names {wanted!r} but the model has no such module.")
        head_paths += hits
    modules = dict(walk(model))
    projections = (_projections_for(model, config, {p: modules[p] for p in paths})
                   if isinstance(config, VeraConfig) else None)

    # All checks passed: from here on the model is changed.
    if not adapter_configs(model):
        keep_portable_4bit(model)  # a user-loaded 4-bit base too (see layers.keep_portable_4bit)
        setattr(model, _REQUIRES_GRAD, {n: p.requires_grad for n, p in model.named_parameters()})
        setattr(model, _CONFIGS, {})
        mixed.install(model)  # model(..., adapter_names=[...]) and model.generate(..., adapter_names=[...])
    for path in paths:
        module = modules[path]
        if not isinstance(module, AdapterLayer):
            pair = projections.get(path) if isinstance(projections, dict) else projections
            module = VeraLayer(module, pair) if projections is not None else LoraLayer(module)
            parent, child = _get_parent(model, path)
            setattr(parent, child, module)
        module.add(name, config)
    for path in head_paths:
        module = modules[path]
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            parent, child = _get_parent(model, path)
            setattr(parent, child, module)
        module.add(name)
    adapter_configs(model)[name] = config
    if activate:
        set_active_adapter(model, name)
    else:  # layer tensors start frozen (layers.py); head copies copy the original's flags
        for param in adapter_parameters(model, name)["head"] if head_paths else ():
            param.requires_grad_(False)
    return model


def set_active_adapter(model: nn.Module, name: str | None) -> nn.Module:
    """Make `name` the adapter used in forward and the only one trained (None: run the plain base model)."""
    configs = adapter_configs(model)
    if name is not None and name not in configs:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(configs)}.")
    if any(m.merged_adapter for _, m in adapter_layers(model)):
        raise ValueError("an adapter is merged into the weights; call unmerge_adapter(model) before switching.")
    for param in model.parameters():
        param.requires_grad_(False)
    for _, module in list(adapter_layers(model)) + list(head_wrappers(model)):
        module.active_adapter = name if name in module.adapter_names else None  # adapters may target other layers
    if name is not None:  # only the active adapter's own tensors train
        for params in adapter_parameters(model, name).values():
            for param in params:
                param.requires_grad_(True)
    setattr(model, _ACTIVE, name)
    return model


@contextmanager
def disabled_adapter(model: nn.Module):
    """Run the base model inside the block (e.g. to compare outputs), then restore the active adapter."""
    name = active_adapter(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    set_active_adapter(model, None)
    try:
        yield model
    finally:
        set_active_adapter(model, name)
        for n, p in model.named_parameters():
            p.requires_grad_(grads[n])


def merge_adapter(model: nn.Module) -> nn.Module:
    """Bake the active adapter into the base weights: same outputs, no adapter cost at inference."""
    if active_adapter(model) is None:
        raise ValueError("the model has no active adapter to merge.")
    for _, layer in adapter_layers(model):
        layer.merge()
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Take a merged adapter back out of the base weights (within float rounding of the originals)."""
    for _, layer in adapter_layers(model):
        layer.unmerge()
    return model


def remove_adapter(model: nn.Module, merge: bool = False) -> nn.Module:
    """Give back the plain model: wrappers replaced by their base layers (merge=True bakes the active adapter in)."""
    if not adapter_configs(model):
        raise ValueError("the model has no adapter to remove.")
    if merge:
        merge_adapter(model)
    else:
        unmerge_adapter(model)
    for path, layer in list(adapter_layers(model)):
        parent, child = _get_parent(model, path)
        setattr(parent, child, layer.base_layer)
    for path, wrapper in list(head_wrappers(model)):
        parent, child = _get_parent(model, path)
        keep = wrapper.modules_to_save[wrapper.active_adapter] if merge and wrapper.active_adapter else wrapper.original_module
        setattr(parent, child, keep)
    flags = getattr(model, _REQUIRES_GRAD)
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, True))
    for attr in (_CONFIGS, _ACTIVE, _REQUIRES_GRAD):
        delattr(model, attr)
    mixed.uninstall(model)
    return model

"""Adapter files: native save / load (safetensors + JSON, written atomically, never unpickled) and PEFT export.

Both formats use one tensor layout, PEFT's, keyed by module path:
    <path>.vera_lambda_b (out,)  <path>.vera_lambda_d (r,)      VeRA vectors
    <path>.lora_A.weight (r, in) <path>.lora_B.weight (out, r)  LoRA matrices
    <head path>.<param>                                         trained head copies (modules_to_save)
    vera_A (r, max_in), vera_B (max_out, r)                     only when the projections are saved
PEFT files prefix every key with "base_model.model." (projections with "base_model.").
A native VeRA file stores b, d, the seed and a fingerprint of (A, B) instead of A and B: loading regenerates them.
Variants (VeraConfig.train_vectors "d" / "b") store only the vector they train; with projections="unique" the
fingerprint covers every layer's own pair.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import AdapterConfig, LoraConfig, VeraConfig, config_from_dict
from . import mixed
from .files import atomic_directory
from .inject import (
    active_adapter,
    adapter_configs,
    adapter_layers,
    add_adapter,
    check_shared_pair,
    head_wrappers,
    layer_pair,
    matches_suffix,
    pair_fields,
    set_active_adapter,
    shared_projections,
)
from .layers import LoraLayer, ModulesToSave, VeraLayer, layer_shape, walk
from .projections import VeraProjections, fingerprint, layers_fingerprint

NATIVE_CONFIG = "vera_lab_adapter.json"
NATIVE_WEIGHTS = "adapter.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
FORMAT = "vera-lab-adapter"
_PEFT_PREFIX = "base_model.model."
# load_adapters stacks VeRA vectors every this many adapters: often enough that few files' tensors wait to be freed,
# rarely enough that the per-stack Python cost stays small beside loading.
BANK_EVERY = 16
_ADAPTER_SUFFIXES = (".vera_lambda_b", ".vera_lambda_d", ".lora_A.weight", ".lora_B.weight")


def _resolve_name(model: nn.Module, name: str | None) -> str:
    configs = adapter_configs(model)
    if not configs:
        raise ValueError("the model has no adapter; call add_adapter(model, config) first.")
    name = name or active_adapter(model)
    if name not in configs:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(configs)}.")
    return name


def adapter_tensors(model: nn.Module, name: str, as_lora: bool = False) -> dict[str, torch.Tensor]:
    """The adapter `name` (and its head copies) as {key: fp32 CPU tensor} in the layout above.

    as_lora=True turns VeRA into the exact rank-r LoRA: lora_A = d * A_s, lora_B = b * B_s (use alpha = r).
    """
    out: dict[str, torch.Tensor] = {}
    for path, layer in adapter_layers(model):
        if name not in layer.adapter_names:
            continue
        if isinstance(layer, VeraLayer):
            b, d = layer.vera_lambda_b[name].detach().float(), layer.vera_lambda_d[name].detach().float()
            if as_lora:
                A_s, B_s = (t.float() for t in layer.slices)
                out[f"{path}.lora_A.weight"] = d[:, None] * A_s  # (r, in)
                out[f"{path}.lora_B.weight"] = b[:, None] * B_s  # (out, r)
            else:  # only what the adapter trains: an omitted vector is a constant its config restores
                trains = layer.trains[name]
                if trains != "d":
                    out[f"{path}.vera_lambda_b"] = b
                if trains != "b":
                    out[f"{path}.vera_lambda_d"] = d
        elif isinstance(layer, LoraLayer):
            out[f"{path}.lora_A.weight"] = layer.lora_A[name].detach().float()
            out[f"{path}.lora_B.weight"] = layer.lora_B[name].detach().float()
    for path, module in head_wrappers(model):
        if name in module.modules_to_save:
            for key, value in module.modules_to_save[name].state_dict().items():
                out[f"{path}.{key}"] = value.detach()
    return {k: v.to("cpu").contiguous().clone() for k, v in out.items()}


def _vera_meta(model: nn.Module, name: str, config: VeraConfig) -> dict:
    if config.projections == "unique":
        pairs = {path: layer.projections for path, layer in adapter_layers(model) if name in layer.adapter_names}
        return {"seed": config.projection_seed, "r": config.r, "projections": "unique",
                "fingerprint": layers_fingerprint(pairs)}
    proj = shared_projections(model)
    return {"seed": proj.seed, "r": proj.r, "max_in": proj.max_in, "max_out": proj.max_out,
            "fingerprint": proj.fingerprint()}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None, *,
                 overwrite: bool = False) -> Path:
    """Write adapter `name` (default: the active one) to `directory`: adapter.safetensors + vera_lab_adapter.json.

    The directory is filled as a temporary sibling and renamed into place, so a crash never leaves a mix. It may
    replace only an earlier VeRA Lab directory or an empty one; overwrite=True also replaces a foreign directory.
    """
    name = _resolve_name(model, name)
    config = adapter_configs(model)[name]
    tensors = adapter_tensors(model, name)
    meta = {"format": FORMAT, "format_version": 1, "adapter_name": name, "config": config.to_dict(),
            "base_model": getattr(getattr(model, "config", None), "_name_or_path", None),
            "torch_version": torch.__version__}
    if isinstance(config, VeraConfig):
        meta["projection"] = _vera_meta(model, name, config)
        if config.save_projection:
            proj = shared_projections(model)
            tensors["vera_A"], tensors["vera_B"] = proj.A.cpu().contiguous(), proj.B.cpu().contiguous()
    with atomic_directory(directory, overwrite) as tmp:
        save_file(tensors, str(tmp / NATIVE_WEIGHTS), metadata={"format": FORMAT})
        meta["sha256"] = {NATIVE_WEIGHTS: _sha256((tmp / NATIVE_WEIGHTS).read_bytes())}  # load_adapter refuses a changed file
        (tmp / NATIVE_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(directory)


def export_peft(model: nn.Module, directory: str | os.PathLike, as_lora: bool = False, name: str | None = None, *,
                overwrite: bool = False) -> Path:
    """Write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) for `PeftModel.from_pretrained`.

    as_lora=True exports a VeRA adapter as the exact LoRA of rank r (alpha = r, so scaling 1): any LoRA stack serves it.
    `directory` is replaced as in save_adapter (overwrite=True also replaces a foreign directory).
    """
    name = _resolve_name(model, name)
    config = adapter_configs(model)[name]
    if isinstance(config, VeraConfig) and not as_lora and not config.is_default_variant:
        raise ValueError(f"PEFT's VeRA has both vectors, shared projections and Kaiming-uniform init; adapter {name!r} "
                         f"is a variant (train_vectors={config.train_vectors!r}, projections={config.projections!r}, "
                         f"projection_init={config.projection_init!r}). Export it with as_lora=True (exact).")
    paths = [p for p, layer in adapter_layers(model) if name in layer.adapter_names]
    conv1d = any(isinstance(model.get_submodule(p).base_layer, Conv1D) for p in paths)
    common = {"base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
              "target_modules": paths, "modules_to_save": list(config.modules_to_save) or None,
              "fan_in_fan_out": conv1d, "bias": "none", "inference_mode": True, "task_type": None, "revision": None,
              "layers_to_transform": None, "layers_pattern": None}
    tensors = {_PEFT_PREFIX + k: v for k, v in adapter_tensors(model, name, as_lora=as_lora).items()}
    if isinstance(config, VeraConfig) and not as_lora:
        peft_config = {**common, "peft_type": "VERA", "r": config.r, "projection_prng_key": config.projection_seed,
                       "save_projection": config.save_projection, "d_initial": config.d_init,
                       "vera_dropout": config.dropout, "init_weights": True}
        if config.save_projection:
            proj = shared_projections(model)
            tensors["base_model.vera_A"], tensors["base_model.vera_B"] = proj.A.cpu().contiguous(), proj.B.cpu().contiguous()
    else:
        alpha = config.r if isinstance(config, VeraConfig) else config.alpha
        peft_config = {**common, "peft_type": "LORA", "r": config.r, "lora_alpha": alpha,
                       "lora_dropout": config.dropout, "init_lora_weights": True, "use_rslora": False,
                       "use_dora": False}
    with atomic_directory(directory, overwrite) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    return Path(directory)


def _read(directory: Path) -> tuple[AdapterConfig, dict, dict[str, torch.Tensor]]:
    """(config, metadata, tensors in the native layout) from a native or PEFT adapter directory."""
    if not directory.is_dir():
        raise ValueError(f"adapter directory {str(directory)!r} does not exist; check the path.")
    native, peft = directory / NATIVE_CONFIG, directory / PEFT_CONFIG
    config_file = native if native.exists() else peft
    weights = directory / (NATIVE_WEIGHTS if native.exists() else PEFT_WEIGHTS)
    if not config_file.exists():
        raise ValueError(
            f"{str(directory)!r} is not an adapter directory: neither {NATIVE_CONFIG} (VeRA Lab) nor {PEFT_CONFIG} "
            f"(PEFT) is there. Found: {sorted(p.name for p in directory.iterdir())}."
        )
    if not weights.exists():
        raise ValueError(f"adapter directory {str(directory)!r} has {config_file.name} but no {weights.name}; "
                         "copy the whole directory again or save the adapter again.")
    try:
        meta = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file} is not valid JSON ({err}); the adapter directory is corrupt.") from err
    expected = meta.get("sha256", {}).get(weights.name) if native.exists() else None
    data = weights.read_bytes()  # read once, hashed and parsed from memory: a second read would cost as much again
    if expected is not None and _sha256(data) != expected:
        raise ValueError(f"{weights} is corrupt or was changed after saving: its SHA-256 differs from the one in "
                         f"{config_file.name}; save the adapter again or restore the directory from a copy.")
    try:
        tensors = load(data)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights} is not a readable safetensors file ({err}); the adapter directory is corrupt.") from err
    if expected is None and native.exists():
        warnings.warn(f"{config_file} stores no SHA-256 of {weights.name} (saved by an older VeRA Lab), so only "
                      "NaN / inf values can be detected; save the adapter again to add one.", stacklevel=3)
    floats = {key: value for key, value in tensors.items() if value.is_floating_point()}
    # A hash vouches for the bytes, not for what training wrote into them. One reduction for the whole file, as a check
    # per tensor would weigh on loading many small adapters: a finite sum proves every value finite; a non-finite
    # one (a NaN or inf, or an overflow of finite values) runs the per-tensor pass, which names a culprit or finds
    # none.
    if floats and not torch.cat([v.view(-1).float() for v in floats.values()]).sum().isfinite():
        _name_non_finite(floats, weights)
    if native.exists():
        if meta.get("format") != FORMAT or "config" not in meta:
            raise ValueError(f"{config_file} is not a {FORMAT} config (missing 'format' or 'config').")
        return config_from_dict(meta["config"]), meta, tensors
    return _from_peft(meta, tensors, config_file)


def _name_non_finite(floats: dict[str, torch.Tensor], weights: Path) -> None:
    for key, value in floats.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"{weights}: tensor {key!r} holds NaN or inf values (the file is corrupt or training "
                             "diverged); use another copy of the adapter or train it again.")


def _from_peft(meta: dict, tensors: dict, config_file: Path) -> tuple[AdapterConfig, dict, dict]:
    kind = meta.get("peft_type")
    mts = tuple(meta.get("modules_to_save") or ())
    targets = meta.get("target_modules")
    if kind == "VERA":
        config = VeraConfig(r=meta["r"], d_init=meta.get("d_initial", 0.1), target_modules=targets,
                            projection_seed=meta.get("projection_prng_key", 0), dropout=meta.get("vera_dropout", 0.0),
                            save_projection=bool(meta.get("save_projection", False)), modules_to_save=mts)
    elif kind == "LORA":
        if meta.get("use_dora") or meta.get("use_rslora"):
            raise ValueError(f"{config_file}: DoRA / rsLoRA adapters are not supported; plain LoRA only.")
        config = LoraConfig(r=meta["r"], alpha=meta.get("lora_alpha", 8), target_modules=targets,
                            dropout=meta.get("lora_dropout", 0.0), modules_to_save=mts)
    else:
        raise ValueError(f"{config_file}: peft_type {kind!r} is not supported; VERA and LORA are.")
    renamed = {}
    for key, value in tensors.items():
        # PEFT keys: base_model.model.<path>... and base_model.vera_A / vera_B.
        key = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key.removeprefix("base_model.")
        renamed[key] = value
    return config, {"format": "peft"}, renamed


def _check_against_model(model: nn.Module, config: AdapterConfig, tensors: dict,
                          where: Path) -> dict[str, tuple[int, int]]:
    """{adapter path in the file: (in, out)}, after checking each exists in `model` with matching shapes and
    nothing is missing."""
    entries = []  # (module path, suffix, tensor) for every VeRA / LoRA tensor in the file
    for key, value in tensors.items():
        suffix = next((s for s in _ADAPTER_SUFFIXES if key.endswith(s)), None)
        if suffix is not None:
            entries.append((key[: -len(suffix)], suffix, value))
    # Report problems in the model's own module order (a file's key order is the writer's choice).
    modules = dict(walk(model))
    order = {path: i for i, path in enumerate(modules)}
    entries.sort(key=lambda e: (order.get(e[0], -1), e[0]))  # unknown paths first, by name
    # An r edited in the config (or tensors from another adapter): every tensor agrees on one other rank.
    ranks = {v.shape[0] if suffix in (".vera_lambda_d", ".lora_A.weight") else v.shape[-1]
             for _, suffix, v in entries if suffix != ".vera_lambda_b"}
    if len(ranks) == 1 and ranks != {config.r}:
        raise ValueError(f"adapter {str(where)!r}: r {config.r} in its config but the tensors have r {ranks.pop()} "
                         "(the config was edited, or the files come from two adapters); save the adapter again.")
    paths = {}
    for path, suffix, value in entries:
        key = path + suffix
        try:
            module = modules.get(path)
            in_f, out_f = layer_shape(getattr(module, "base_layer", module))
        except TypeError:
            raise ValueError(
                f"adapter {str(where)!r} was made for a different base model: it adapts module {path!r}, which this "
                "model does not have (or is not a linear layer)."
            ) from None
        expected = {".vera_lambda_b": (out_f,), ".vera_lambda_d": (config.r,), ".lora_A.weight": (config.r, in_f),
                    ".lora_B.weight": (out_f, config.r)}[suffix]
        if tuple(value.shape) != expected:
            raise ValueError(
                f"adapter {str(where)!r} was made for a different base model: {key} has shape {tuple(value.shape)}, "
                f"but module {path!r} here (in={in_f}, out={out_f}, r={config.r}) needs {expected}."
            )
        paths[path] = (in_f, out_f)
    if not paths:
        raise ValueError(f"adapter {str(where)!r} holds no VeRA or LoRA tensors; the file is empty or not an adapter.")
    needed = _needed_suffixes(config)
    extra = next((path + suffix for path, suffix, _ in entries if suffix not in needed), None)
    if extra is not None:
        raise ValueError(f"adapter {str(where)!r} holds {extra}, which its config does not train "
                         f"({_trains(config)}); the config was edited or the files come from two adapters.")
    needed = [f"{p}{s}" for p in paths for s in needed]
    for wanted in config.modules_to_save:
        for path, module in modules.items():
            if matches_suffix(path, wanted):  # a head already wrapped for another adapter: the original's keys
                module = module.original_module if isinstance(module, ModulesToSave) else module
                needed += [f"{path}.{k}" for k in module.state_dict()]
    missing = [k for k in needed if k not in tensors]
    if missing:
        raise ValueError(f"adapter {str(where)!r} lacks {len(missing)} tensors its config needs, first: {missing[0]}.")
    return paths


def _needed_suffixes(config: AdapterConfig) -> list[str]:
    """The per-layer tensor suffixes an adapter's file holds: LoRA's two matrices, or the VeRA vectors it trains."""
    if isinstance(config, LoraConfig):
        return [".lora_A.weight", ".lora_B.weight"]
    return [f".vera_lambda_{v}" for v in "bd" if config.train_vectors in ("both", v)]


def _trains(config: AdapterConfig) -> str:
    return f"train_vectors={config.train_vectors!r}" if isinstance(config, VeraConfig) else "LoRA"


def load_adapter(base_model: nn.Module, directory: str | os.PathLike, name: str = "default", *,
                 activate: bool = True) -> nn.Module:
    """Add the adapter saved in `directory` (VeRA Lab, or a PEFT VeRA / LoRA directory) to `base_model`, in place.

    VeRA projections are regenerated from the seed and must match the saved fingerprint (or come from the file); a
    further VeRA adapter must have the model's seed, r and projection shape, and shares its one (A, B).
    activate=False leaves the active adapter as it is (see add_adapter). Every check runs before the model is touched.
    """
    directory = Path(directory)
    config, meta, tensors = _read(directory)
    shapes = _check_against_model(base_model, config, tensors, directory)
    projections = _load_projections(base_model, config, meta, tensors, shapes, directory, name) \
        if isinstance(config, VeraConfig) else None
    load_config = dataclasses.replace(config, target_modules=list(shapes))
    add_adapter(base_model, load_config, name=name, activate=activate)
    adapter_configs(base_model)[name] = config
    _copy_into(base_model, name, tensors, projections, bool(config.modules_to_save))
    return base_model


def load_adapters(base_model: nn.Module, directories: dict[str, str | os.PathLike]) -> nn.Module:
    """load_adapter for each {name: directory}, e.g. to serve mixed batches (mixed.py); the last one is active.
    VeRA adapters share the model's one (A, B); every BANK_EVERY adapters their vectors go into a stack per layer
    (room kept for the ones still to come), so they end up held once, for the gathers."""
    for i, (name, directory) in enumerate(directories.items(), 1):
        load_adapter(base_model, directory, name=name, activate=False)
        if i % BANK_EVERY == 0 or i == len(directories):
            for _, layer in adapter_layers(base_model):
                if isinstance(layer, VeraLayer):
                    mixed.add_to_bank(layer, room=len(directories) - i)
    if directories:
        set_active_adapter(base_model, name)  # once: it walks every parameter
    for _, layer in adapter_layers(base_model):
        if isinstance(layer, VeraLayer):
            mixed.vector_bank(layer)  # checks every row, gives back free rows (layers some adapters did not adapt)
    return base_model


def _load_projections(model: nn.Module, config: VeraConfig, meta: dict, tensors: dict,
                      shapes: dict[str, tuple[int, int]], directory: Path,
                      name: str) -> VeraProjections | dict[str, VeraProjections]:
    """The (A, B) the adapter was trained with: the model's own pair when it has one (checked, never regenerated),
    else regenerated from the seed or taken from the file; either way proven by the saved fingerprint. With
    projections="unique", {path: that layer's pair}, proven together."""
    saved = meta.get("projection", {})
    other_name, other = next(iter(adapter_configs(model).items()), (name, config))
    if isinstance(other, VeraConfig) and "unique" in (config.projections, other.projections):  # no one shared pair
        check_shared_pair(name, pair_fields(config), other_name, pair_fields(other))
    if config.projections == "unique":
        modules = dict(walk(model))
        pairs = {path: layer_pair(model, config, path, modules[path]) for path in shapes}
        _check_fingerprint(layers_fingerprint(pairs), saved, meta, config, directory)
        return pairs
    max_in = saved.get("max_in", max(s[0] for s in shapes.values()))
    max_out = saved.get("max_out", max(s[1] for s in shapes.values()))
    if "vera_A" in tensors and "vera_B" in tensors:
        A, B = tensors.pop("vera_A"), tensors.pop("vera_B")
        max_in, max_out = A.shape[1], B.shape[0]
    else:
        A = B = None
    projections = shared_projections(
        model, lambda: VeraProjections(config.r, max_in, max_out, config.projection_seed, A, B,
                                       init=config.projection_init))
    # A found pair must be the one this adapter needs (a new one is by construction): a pair of another shape is not
    # a slice of this one (the generator draws A row by row, then B).
    check_shared_pair(name, {"r": config.r, "projection_seed": config.projection_seed, "max_in": max_in,
                             "max_out": max_out, "projection_init": config.projection_init}, other_name,
                      {"r": projections.r, "projection_seed": projections.seed, "max_in": projections.max_in,
                       "max_out": projections.max_out, "projection_init": projections.init})
    if A is not None and fingerprint(A, B) != projections.fingerprint():
        raise ValueError(f"adapter {str(directory)!r} carries its own A and B, and they differ from the pair the "
                         "model's VeRA adapters share; load it onto another copy of the base model.")
    _check_fingerprint(projections.fingerprint(), saved, meta, config, directory)
    return projections


def _check_fingerprint(found: str, saved: dict, meta: dict, config: VeraConfig, directory: Path) -> None:
    """Refuse projections that differ from the ones the adapter was saved with, saying which side changed."""
    if "fingerprint" in saved and found != saved["fingerprint"]:
        seed = config.projection_seed
        if saved.get("seed", seed) != seed or meta.get("torch_version") == torch.__version__:
            # Same torch, same generator: the seed (or the fingerprint) in the file is not the one trained with.
            raise ValueError(
                f"adapter {str(directory)!r}: seed {seed} in {NATIVE_CONFIG} does not match the fingerprint "
                "saved with it (the adapter was trained with another seed, or the file was edited); restore "
                "the original file or save the adapter again."
            )
        raise ValueError(
            f"adapter {str(directory)!r}: the projections regenerated from seed {seed} do not match the saved "
            f"fingerprint (torch here {torch.__version__}, adapter saved with {meta.get('torch_version')}). The "
            "random generator changed; save the adapter with VeraConfig(save_projection=True) so A and B travel "
            "with it."
        )


def _copy_into(model: nn.Module, name: str, tensors: dict[str, torch.Tensor],
               projections: VeraProjections | dict[str, VeraProjections] | None,
               heads: bool) -> None:
    """The file's tensors become adapter `name`'s parameters (their storage, not a copy: the file was read into
    fresh memory), VeRA layers get the proven pair, and head copies are filled; one walk over the model."""
    def put(param: nn.Parameter, key: str) -> None:
        param.data = tensors[key].to(param.device, param.dtype)

    with torch.no_grad():
        for path, layer in adapter_layers(model):
            if isinstance(layer, VeraLayer):
                pair = projections.get(path) if isinstance(projections, dict) else projections
                if pair is not None and layer.projections is not pair:
                    layer.projections = pair
                if name in layer.adapter_names:  # the vectors it trains (an omitted one keeps its constant)
                    for v in "bd":
                        if layer.trains[name] in ("both", v):
                            put(getattr(layer, f"vera_lambda_{v}")[name], f"{path}.vera_lambda_{v}")
            elif isinstance(layer, LoraLayer) and name in layer.adapter_names:
                put(layer.lora_A[name], f"{path}.lora_A.weight")
                put(layer.lora_B[name], f"{path}.lora_B.weight")
        for path, module in head_wrappers(model) if heads else ():
            if name in module.modules_to_save:
                for key, target in module.modules_to_save[name].state_dict(keep_vars=True).items():
                    target.copy_(tensors[f"{path}.{key}"])

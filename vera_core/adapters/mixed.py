"""Mixed-adapter batches: every row of one batch uses its own adapter (PEFT's `adapter_names` convention).

    model(input_ids, adapter_names=["a", "b", "__base__"])      one name per row; "__base__": no adapter
    model.generate(input_ids, adapter_names=[...])               every decode step keeps each row's adapter
    with mixed_adapters(model, names): ...                       for code that cannot pass the argument

A forward pre-hook on the top model (installed with the first adapter) takes `adapter_names` out of the call and
tells every adapter layer which adapter each row uses until the call returns; how a layer then computes its rows
is the layer's own business (layers.py: rows that all name one adapter take the one-adapter path; VeRA layers get
their rows' vectors gathered here, once per call or block, so edit adapters between blocks, not inside one). Mixed batches are for inference: refused in training mode (dropout would
differ per sub-batch, and VeRA's gather reads the stacked vectors, so no gradient reaches the adapters).
"""
from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from .layers import AdapterLayer, ModulesToSave, RowAdapters, VeraLayer, gather_vectors, walk

BASE = "__base__"  # PEFT's name for "no adapter on this row"
_HOOKS = "_mixed_hooks"  # handles of the hooks on the top model
_SAVED = "_mixed_saved"  # the routing each hooked call replaced, restored when the call returns


def _routed(model: nn.Module) -> list[AdapterLayer | ModulesToSave]:
    return [m for _, m in walk(model) if isinstance(m, (AdapterLayer, ModulesToSave))]


def _check(model: nn.Module, names: Sequence[str], modules: list) -> tuple[str, ...]:
    """The names as a tuple, after the checks a user needs a clear message for."""
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"adapter_names must be a list of adapter names, one per row, got {names!r}.")
    loaded = sorted({n for m in modules for n in m.adapter_names})
    unknown = sorted(set(names) - set(loaded) - {BASE})
    if unknown:
        raise ValueError(f"unknown adapter names {unknown}; the model has {loaded} (and {BASE!r} for no adapter).")
    if any(isinstance(m, AdapterLayer) and m.merged_adapter for m in modules):
        raise ValueError("an adapter is merged into the weights, so rows cannot use different adapters; call "
                         "unmerge_adapter(model) before a mixed batch.")
    if model.training:
        raise ValueError("mixed-adapter batches are for inference (no dropout, no gradients to the adapters); call "
                         "model.eval() first, and train one adapter at a time with set_active_adapter.")
    return tuple(names)


def _set_rows(modules: list, names: tuple[str, ...] | None) -> None:
    """Give every layer its RowAdapters (None: back to the active adapter). Index tensors are built once per
    device and layer adapter order, not once per layer."""
    built: dict = {}
    for module in modules:
        if names is None:
            module.rows = None
            continue
        device = next(module.parameters()).device
        order = tuple(module.adapter_names)
        if (order, device) not in built:
            groups = {}
            for row, name in enumerate(names):
                groups.setdefault(name, []).append(row)
            position = {name: i for i, name in enumerate(order)}
            built[(order, device)] = RowAdapters(
                names,
                {name: torch.tensor(rows, device=device) for name, rows in groups.items()},
                torch.tensor([position.get(name, len(order)) for name in names], device=device),
            )
        module.rows = built[(order, device)]
    for rows in built.values():
        if rows.single is None:  # one name for every row takes the one-adapter path, which reads no gathered rows
            gather_vectors([m for m in modules if isinstance(m, VeraLayer) and m.rows is rows], rows)


def _current(modules: list) -> tuple[str, ...] | None:
    return next((m.rows.names for m in modules if m.rows is not None), None)


@contextmanager
def mixed_adapters(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """Inside the block every forward of `model` runs row i with adapter adapter_names[i] ("__base__": none)."""
    modules = _routed(model)
    if not modules:
        raise ValueError("the model has no adapter; load adapters (load_adapter / load_adapters) first.")
    names = _check(model, adapter_names, modules)
    previous = _current(modules)
    _set_rows(modules, names)
    try:
        yield model
    finally:
        _set_rows(modules, previous)


def _pre_hook(model: nn.Module, args: tuple, kwargs: dict):
    # Push before anything can raise: the always-called forward hook pops even when this hook fails. A call without
    # adapter_names (e.g. each step inside generate's mixed_adapters block) pushes None and changes nothing.
    names = kwargs.pop("adapter_names", None)
    saved = model.__dict__.setdefault(_SAVED, [])
    if names is None:
        saved.append(None)
        return args, kwargs
    modules = _routed(model)
    saved.append((_current(modules),))
    _set_rows(modules, _check(model, names, modules))
    return args, kwargs


def _post_hook(model: nn.Module, args: tuple, output):
    saved = model.__dict__[_SAVED].pop()
    if saved is not None:
        _set_rows(_routed(model), saved[0])


def _generate(model: nn.Module, *args, adapter_names: Sequence[str] | None = None, **kwargs):
    """The model's own generate; with adapter_names, every step (prefill and each cached decode step) runs mixed."""
    generate = type(model).generate.__get__(model)
    if adapter_names is None:
        return generate(*args, **kwargs)
    with mixed_adapters(model, adapter_names):
        return generate(*args, **kwargs)


def install(model: nn.Module) -> None:
    """Make `model(..., adapter_names=[...])` and `model.generate(..., adapter_names=[...])` work (once per model).
    generate needs its own wrapper: transformers rejects keyword arguments its forward signature does not name."""
    if hasattr(model, _HOOKS):
        return
    setattr(model, _HOOKS, [model.register_forward_pre_hook(_pre_hook, with_kwargs=True),
                            model.register_forward_hook(_post_hook, always_call=True)])
    if callable(getattr(type(model), "generate", None)):
        model.generate = types.MethodType(_generate, model)


def uninstall(model: nn.Module) -> None:
    """Undo install (remove_adapter gives back the plain model)."""
    for handle in getattr(model, _HOOKS, []):
        handle.remove()
    for attr in (_HOOKS, _SAVED, "generate"):
        model.__dict__.pop(attr, None)

"""Mixed-adapter batches: every row of one batch uses its own adapter (PEFT's `adapter_names` convention).

    model(input_ids, adapter_names=["a", "b", "__base__"])      one name per row; "__base__": no adapter
    model.generate(input_ids, adapter_names=[...])               every decode step keeps each row's adapter
    with mixed_adapters(model, names): ...                       for code that cannot pass the argument

A forward pre-hook on the top model (installed with the first adapter) takes `adapter_names` out of the call and
gives every adapter layer a `RowAdapters` until the call returns; the layers hand their rows back to it. Rows that
all name one adapter take the layer's one-adapter path. Otherwise LoRA layers and head copies run one sub-batch per
distinct adapter, and VeRA layers run the whole batch once with each row's b and d gathered from a stack of every
adapter's vectors (`VectorBank`), gathered once per call or block: edit adapters between blocks, not inside one.
Mixed batches are for inference: refused in training mode (dropout would differ per sub-batch, and the gather reads
the stacked vectors, so no gradient reaches the adapters).
"""
from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import AdapterLayer, ModulesToSave, VeraLayer, walk

BASE = "__base__"  # PEFT's name for "no adapter on this row"
_HOOKS = "_mixed_hooks"  # handles of the hooks on the top model
_SAVED = "_mixed_saved"  # the routing each hooked call replaced, restored when the call returns


@dataclass(frozen=True)
class RowAdapters:
    """Which adapter each row of a mixed batch uses: `names` per row ("__base__": none), `groups` the rows of each
    distinct name, `index` each row's position in the adapter order of the layers it serves (len(adapters): none)."""

    names: tuple[str, ...]
    groups: dict[str, torch.Tensor]  # name -> (rows,) long
    index: torch.Tensor  # (B,) long
    # VeRA layer -> its rows' (b, d), filled by gather_vectors when the mixed call or block starts; dies with it.
    vectors: dict = field(default_factory=dict, compare=False)

    @property
    def single(self) -> str | None:
        """The name every row uses, or None when rows differ."""
        return next(iter(self.groups)) if len(self.groups) == 1 else None

    def check_batch(self, x: torch.Tensor) -> None:
        if x.shape[0] != len(self.names):
            raise ValueError(
                f"adapter_names gives {len(self.names)} names but the batch has {x.shape[0]} rows; give one name per "
                "row (beam search and num_return_sequences > 1 multiply the rows and are not supported)."
            )

    def per_adapter(self, layer: AdapterLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Each row's own update added to W0 x, one sub-batch per distinct adapter (PEFT's way; no dropout)."""
        for name, index in self.groups.items():
            if name in layer.adapter_names:  # not "__base__", nor an adapter that does not adapt this layer
                result = result.index_add(0, index, layer.adapter_output(x[index], name).to(result.dtype))
        return result

    def vera(self, layer: VeraLayer, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """h_i + Λ_b[a_i] B_s Λ_d[a_i] A_s x_i: one A and one B product for the whole batch with each row's gathered
        b and d, so the cost does not grow with the number of distinct adapters."""
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (-1,)  # rows along dim 0, broadcast over the rest
        b, d = (v.view(shape) for v in self.vectors[layer])  # (B, 1.., out), (B, 1.., r)
        u = layer.projections.project_input(x, layer.in_features, b.dtype)  # (B, ..., r), shared as in one-adapter
        return h + (b * F.linear(d * u, layer.slices[1])).to(h.dtype)

    def per_head(self, module: ModulesToSave, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row through its adapter's copy (or the original), one sub-batch per distinct adapter, as PEFT does;
        the first argument and the output must be batch-first tensors."""
        result = None
        for name, index in self.groups.items():
            out = module.module_for(name)(x[index], *args, **kwargs)
            if result is None:
                result = out.new_empty((x.shape[0], *out.shape[1:]))
            result[index] = out
        return result


@dataclass
class VectorBank:
    """One VeRA layer's adapters' b and d stacked in adapter order, each adapter's parameters re-pointed to views of
    its row, so the vectors are held once and training or loading one adapter updates the stack in place. The last
    used row stays zero, for rows without an adapter here; rows past it are room for adapters still loading."""

    b: torch.Tensor  # (K + 1 + room, out)
    d: torch.Tensor  # (K + 1 + room, r)
    used: int = 0  # rows handed to adapters (the rest are zero)


def vector_bank(layer: VeraLayer) -> VectorBank:
    """The layer's bank with exactly K + 1 rows, built on first use and rebuilt when it no longer holds every
    adapter (one added, parameters moved or replaced, free rows left by add_to_bank)."""
    names, bank = layer.adapter_names, layer.bank
    if bank is None or len(bank.b) != len(names) + 1 or _rows_held(layer) < len(names):
        _restack(layer, room=0)
    return layer.bank


def add_to_bank(layer: VeraLayer, room: int) -> None:
    """Copy the adapters added since the bank was last built or extended into its free rows, rebuilding it with
    `room` more free rows when it has too few. load_adapters calls this every few adapters as they load, so the
    files' tensors are freed early rather than all held twice and then freed in scattered pieces. Only the new
    adapters are copied (checking every row each time would be quadratic in K); vector_bank checks them all."""
    names, bank = layer.adapter_names, layer.bank
    if (bank is None or not bank.used <= len(names) < len(bank.b)
            or any((layer.vera_lambda_b[n].device, layer.vera_lambda_b[n].dtype) != (bank.b.device, bank.b.dtype)
                   for n in names[bank.used:])):
        _restack(layer, room)
    elif bank.used < len(names):
        _fill(layer, bank.used)  # rows past the used ones are still zero: none was handed out


def _restack(layer: VeraLayer, room: int) -> None:
    first = layer.adapter_names[0]
    # Normal tensors even under inference_mode (generate): the parameters become views of the stack and must
    # still be trainable afterwards.
    with torch.inference_mode(False):
        layer.bank = VectorBank(*(params[first].new_zeros((len(layer.adapter_names) + 1 + room, params[first].shape[0]))
                                  for params in (layer.vera_lambda_b, layer.vera_lambda_d)))
    _fill(layer, 0)


def _fill(layer: VeraLayer, start: int) -> None:
    """Rows start.. of the bank get the adapters' vectors, one stack op per tensor (a copy per adapter and layer
    would dominate loading many adapters), and their parameters become views of their rows."""
    names, bank = layer.adapter_names[start:], layer.bank
    with torch.inference_mode(False), torch.no_grad():
        for stack, params in ((bank.b, layer.vera_lambda_b), (bank.d, layer.vera_lambda_d)):
            vectors = [params[name] for name in names]
            rows = stack[start : start + len(names)]
            torch.stack(vectors, out=rows)
            for param, row in zip(vectors, rows.unbind(0)):
                param.data = row  # the parameter object stays (optimizers, grads); its storage is the row
    bank.used = start + len(names)


def _rows_held(layer: VeraLayer) -> int:
    """How many leading adapters' parameters are still their rows of the bank, by address arithmetic (indexing
    the bank would make a view per adapter, once per layer and mixed call)."""
    bank = layer.bank
    for i, name in enumerate(layer.adapter_names):
        if not all(params[name].data_ptr() == stack.data_ptr() + i * stack.stride(0) * stack.element_size()
                   for stack, params in ((bank.b, layer.vera_lambda_b), (bank.d, layer.vera_lambda_d))):
            return i
    return len(layer.adapter_names)


def gather_vectors(layers: list[VeraLayer], rows: RowAdapters) -> None:
    """Each layer's rows' (b, d) into rows.vectors, once per mixed call or block (vectors edited inside a block are
    seen by the next one), since gathering in every forward costs a large share of a decode step. One buffer per
    dtype: one allocation, freed whole, where hundreds of separate gathers held across the call fragment the heap.
    Normal tensors even under inference_mode, so the block may also run with gradients on."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    with torch.inference_mode(False), torch.no_grad():
        banks = [vector_bank(layer) for layer in layers]
        for stack in (t for bank in banks for t in (bank.b, bank.d)):
            by_dtype.setdefault(stack.dtype, []).append(stack)
        n, gathered = len(rows.names), {}
        for dtype, group in by_dtype.items():
            flat = torch.empty(n * sum(b.shape[1] for b in group), dtype=dtype, device=group[0].device)
            for stack, out in zip(group, flat.split([n * b.shape[1] for b in group])):
                gathered[id(stack)] = torch.index_select(stack, 0, rows.index, out=out.view(n, -1))  # (B, width)
    for layer, bank in zip(layers, banks):
        rows.vectors[layer] = (gathered[id(bank.b)], gathered[id(bank.d)])


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

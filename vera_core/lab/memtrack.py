"""Tensor-level memory: the peak bytes of live tensor storage on one device, and what held them at the peak.

    tracker = MemoryTracker(model, optimizer)
    with tracker:                       # one or more training steps
        model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()
    tracker.peak_bytes, tracker.breakdown()   # {"weights", "adapter", ..., "total"} at the peak

"Live" is every storage the model and the optimizer own plus every storage allocated inside the tracked region and
not yet freed. New storages are seen in a `TorchDispatchMode` (an op output whose schema does not alias an input is
a fresh allocation), known by its C++ storage's address and sized from the tensor's extent, as the allocator sized
it. A storage is live while any tensor seen on it is (views register too): the tracker keeps Python weak references
to those tensors and sweeps out dead storages whenever the count could pass the peak, so the peak is exact without a
sweep per op; no Python storage object is made for a step's tensors. Each storage is counted once (VeRA's shared
A / B, tied embeddings) and labelled by what holds it: a model parameter or buffer ("weights", or "adapter" for
the adapter's own tensors), a `.grad` ("gradients"), optimizer state ("optimizer"), a tensor saved for backward
("activations"), else "temporaries". A label learned after the peak (a gradient or AdamW moment allocated before the
hook that names it) is carried back into the peak's breakdown when the storage was already live then. Fake tensors
(`FakeTensorMode`) are tracked the same way, which is how `estimate_memory` predicts a step without running it.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..adapters.inject import adapter_parameters
from ..adapters.projections import VeraProjections

CATEGORIES = ("weights", "adapter", "gradients", "optimizer", "activations", "temporaries")


def _same_device(a: torch.device, b: torch.device) -> bool:
    # "cuda" and "cuda:0" are one device when the index is left open.
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def extent_bytes(tensor: torch.Tensor) -> int:
    """The bytes a fresh tensor's storage holds: offset + its furthest element (torch's own storage sizing)."""
    if tensor.numel() == 0:
        return 0
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return (tensor.storage_offset() + last + 1) * tensor.element_size()


def _dead(entry: list) -> bool:
    """No tensor seen on this storage is alive (so neither is the storage)."""
    return entry[3]() is None and (entry[4] is None or all(ref() is None for ref in entry[4]))


def _also_on(entry: list, tensor: torch.Tensor) -> None:
    """Remember another tensor on an entry's storage (a view, a label's tensor), once; dead extras are dropped."""
    if entry[3]() is tensor or any(ref() is tensor for ref in entry[4] or ()):
        return
    entry[4] = [ref for ref in entry[4] or () if ref() is not None] + [weakref.ref(tensor)]


def _adapter_tensor_ids(model: nn.Module) -> set[int]:
    """Ids of the tensors an adapter added: its trainable ones (head copies too) and VeRA's shared projections."""
    owned = adapter_parameters(model)
    ids = {id(t) for key in ("adapter", "head") for t in owned[key]}
    ids |= {id(t) for m in model.modules() if isinstance(m, VeraProjections) for t in m.buffers(recurse=False)}
    return ids


class MemoryTracker(TorchDispatchMode):
    """Peak live tensor bytes on `device` (default: the model's) while entered; re-entering continues the count."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.model, self.optimizer = model, optimizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        # storage address -> [bytes, category, allocation number, weak ref to the first tensor seen on it, weak refs to
        # later ones (views) or None]; the first is checked alone in the common case, which keeps sweeps cheap.
        self._live: dict[int, list] = {}
        self._sums = dict.fromkeys(CATEGORIES, 0)
        self._total = 0
        self._count = 0  # storages registered so far: orders allocations against the peak
        self.peak_bytes = 0
        self._peak_sums = dict(self._sums)
        self._peak_count = 0
        self._handles: list = []
        self._saved_hooks = None

    # ------------------------------------------------------------------ bookkeeping
    def _key(self, tensor: torch.Tensor) -> int | None:
        if tensor.layout != torch.strided or not _same_device(tensor.device, self.device):
            return None
        return torch._C._storage_id(tensor)

    def _entry(self, key: int) -> list | None:
        """The live entry at `key`; a dead one (every tensor seen on it freed) is dropped first, as its address may
        now belong to a new storage."""
        entry = self._live.get(key)
        if entry is not None and _dead(entry):
            self._drop(key)
            return None
        return entry

    def _drop(self, key: int) -> None:
        nbytes, category = self._live.pop(key)[:2]
        self._sums[category] -= nbytes
        self._total -= nbytes

    def _add(self, key: int, tensor: torch.Tensor, category: str) -> None:
        nbytes = extent_bytes(tensor)
        self._count += 1
        self._live[key] = [nbytes, category, self._count, weakref.ref(tensor), None]
        self._sums[category] += nbytes
        self._total += nbytes
        if self._total > self.peak_bytes:
            self._sweep()  # the total still counts freed storages; only a sweep tells whether this is a new peak
            if self._total > self.peak_bytes:
                self.peak_bytes, self._peak_sums, self._peak_count = self._total, dict(self._sums), self._count

    def _sweep(self) -> None:
        """Forget the storages freed since the last sweep."""
        for key in [key for key, entry in self._live.items() if entry[3]() is None and _dead(entry)]:
            self._drop(key)

    def _seen(self, tensor: torch.Tensor, fresh: bool) -> None:
        """An op output: a view keeps its storage alive too; a fresh allocation is registered as a temporary."""
        key = self._key(tensor)
        if key is None:
            return
        entry = self._entry(key)
        if entry is not None:
            _also_on(entry, tensor)
        elif fresh:
            self._add(key, tensor, "temporaries")

    def label(self, tensor: torch.Tensor | None, category: str, only_from: str | None = None) -> None:
        """Say what holds `tensor`'s storage (registering it if it was never seen), unless it is labelled otherwise
        than `only_from`. A storage live at the peak moves between the peak's categories too."""
        key = self._key(tensor) if tensor is not None else None
        if key is None:
            return
        entry = self._entry(key)
        if entry is None:
            if only_from is None:
                self._add(key, tensor, category)
            return
        _also_on(entry, tensor)
        old = entry[1]
        if old == category or (only_from is not None and old != only_from):
            return
        entry[1] = category
        self._sums[old] -= entry[0]
        self._sums[category] += entry[0]
        if entry[2] <= self._peak_count:  # allocated before the peak and still live: it was held at the peak
            self._peak_sums[old] -= entry[0]
            self._peak_sums[category] += entry[0]

    def _label_owned(self) -> None:
        """The model's tensors, existing gradients and optimizer state (idempotent: run on every entry)."""
        adapter = _adapter_tensor_ids(self.model)
        for tensor in [*self.model.parameters(), *self.model.buffers()]:
            self.label(tensor, "adapter" if id(tensor) in adapter else "weights")
        for param in self.model.parameters():
            self.label(param.grad, "gradients")
        self._label_optimizer()

    def _label_optimizer(self, *_) -> None:
        for state in (self.optimizer.state.values() if self.optimizer is not None else ()):
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    self.label(value, "optimizer")

    # ------------------------------------------------------------------ the mode
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        values = out if isinstance(out, (tuple, list)) and len(returns) > 1 else (out,)
        for ret, value in zip(returns, values):
            fresh = ret.alias_info is None  # else a view or an in-place result: no new storage
            for tensor in pytree.tree_leaves(value):
                if isinstance(tensor, torch.Tensor):
                    self._seen(tensor, fresh)
        return out

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        # The graph keeps a detached alias, as torch's saved_tensors_hooks asks: returning the tensor itself would
        # tie a saved output to its own grad_fn in a reference cycle. The alias keeps the storage live for the tracker.
        saved = tensor.detach()
        self.label(saved, "activations", only_from="temporaries")  # weights saved for backward stay weights
        return saved

    def __enter__(self):
        self._label_owned()
        for param in self.model.parameters():
            if param.requires_grad:  # frozen parameters never get a gradient (and refuse the hook)
                self._handles.append(param.register_post_accumulate_grad_hook(
                    lambda p: self.label(p.grad, "gradients")))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_post_hook(self._label_optimizer))
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._saved_hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        self._saved_hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return result

    def close(self) -> None:
        """Drop the bookkeeping of live storages once tracking is over; the peak and its breakdown stay."""
        self._live.clear()
        self._sums, self._total = dict.fromkeys(CATEGORIES, 0), 0

    # ------------------------------------------------------------------ results
    def breakdown(self) -> dict[str, int]:
        """Bytes per category at the peak, and their "total" (= peak_bytes)."""
        return {**self._peak_sums, "total": self.peak_bytes}

    def current(self) -> dict[str, int]:
        """Bytes per category live now, and their "total"."""
        self._sweep()
        return {**self._sums, "total": self._total}

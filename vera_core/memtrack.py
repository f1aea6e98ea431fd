"""Tensor-level memory: the peak bytes of live tensor storage on one device, and what held them at the peak.

    tracker = MemoryTracker(model, optimizer)
    with tracker:                       # one or more training steps
        model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()
    tracker.peak_bytes, tracker.breakdown()   # {"weights", "adapter", ..., "total"} at the peak

"Live" is every storage the model and the optimizer own plus every storage allocated inside the tracked region and
not yet freed. New storages are seen in a `TorchDispatchMode` (an op output whose schema does not alias an input is
a fresh allocation). Each is held by a C++ weak reference (`StorageWeakRef`, no Python callback: a callback would
run inside whatever op frees the storage, and full test runs crashed that way); expired ones are swept out whenever
the count could pass the peak, so the peak is exact without a sweep per op. Each storage is counted once (VeRA's
shared A / B, tied embeddings) and labelled by what holds it: a model parameter or buffer ("weights", or "adapter" for
the adapter's own tensors), a `.grad` ("gradients"), optimizer state ("optimizer"), a tensor saved for backward
("activations"), else "temporaries". A label learned after the peak (a gradient or AdamW moment allocated before the
hook that names it) is carried back into the peak's breakdown when the storage was already live then. Fake tensors
(`FakeTensorMode`) are tracked the same way, which is how `estimate_memory` predicts a step without running it.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .inject import adapter_parameters
from .projections import VeraProjections

CATEGORIES = ("weights", "adapter", "gradients", "optimizer", "activations", "temporaries")


def _same_device(a: torch.device, b: torch.device) -> bool:
    # "cuda" and "cuda:0" are one device when the index is left open.
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


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
        # storage key -> [bytes, category, allocation number, weak ref]. The weak ref keeps the storage's C++ object
        # (not its data) alive, so a key is never reused by a new storage while its entry exists.
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
    def _key(self, tensor: torch.Tensor):
        if tensor.layout != torch.strided or not _same_device(tensor.device, self.device):
            return None, None
        storage = tensor.untyped_storage()
        return storage._cdata, storage

    def _add(self, key: int, storage, category: str) -> None:
        nbytes = storage.nbytes()
        self._count += 1
        self._live[key] = [nbytes, category, self._count, StorageWeakRef(storage)]
        self._sums[category] += nbytes
        self._total += nbytes
        if self._total > self.peak_bytes:
            self._sweep()  # the total still counts freed storages; only a sweep tells whether this is a new peak
            if self._total > self.peak_bytes:
                self.peak_bytes, self._peak_sums, self._peak_count = self._total, dict(self._sums), self._count

    def _sweep(self) -> None:
        """Forget the storages freed since the last sweep."""
        for key in [key for key, entry in self._live.items() if entry[3].expired()]:
            nbytes, category = self._live.pop(key)[:2]
            self._sums[category] -= nbytes
            self._total -= nbytes

    def label(self, tensor: torch.Tensor | None, category: str, only_from: str | None = None) -> None:
        """Say what holds `tensor`'s storage (registering it if it was never seen), unless it is labelled otherwise
        than `only_from`. A storage live at the peak moves between the peak's categories too."""
        key, storage = self._key(tensor) if tensor is not None else (None, None)
        if key is None:
            return
        entry = self._live.get(key)
        if entry is None:
            if only_from is None:
                self._add(key, storage, category)
            return
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
            if ret.alias_info is not None:  # a view or an in-place result: no new storage
                continue
            for tensor in pytree.tree_leaves(value):
                if isinstance(tensor, torch.Tensor):
                    key, storage = self._key(tensor)
                    if key is not None and key not in self._live:
                        self._add(key, storage, "temporaries")
        return out

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.label(tensor, "activations", only_from="temporaries")  # weights saved for backward stay weights
        return tensor

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

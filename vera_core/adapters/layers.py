"""Adapter layers. Each wraps a frozen layer, kept as `base_layer`, and adds a low-rank update beside it.

    VeRA:  h = base(x) + b * (B_s (d * (A_s x)))      A_s = A[:, :in], B_s = B[:out, :]  (shared, frozen)
    LoRA:  h = base(x) + (alpha / r) * B (A x)         A, B trained per layer

Several named adapters can live on one layer; exactly one (or none) is active, or, for a mixed batch, each row
names its own (`rows`, set by mixed.py): VeRA gathers every row's b and d from stacked vectors, LoRA and head copies
run one sub-batch per distinct adapter.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import fused
from .config import LoraConfig, VeraConfig
from .projections import VeraProjections


def is_quantized(module: nn.Module) -> bool:
    """bitsandbytes Linear4bit / Linear8bitLt (both subclass nn.Linear, so type names are checked, not isinstance)."""
    return type(module).__module__.startswith("bitsandbytes")


def keep_portable_4bit(model: nn.Module) -> nn.Module:
    """Keep every bitsandbytes 4-bit weight in its portable layout. On CPUs with AVX512-BF16, bitsandbytes 0.50.2
    repacks a Linear4bit's weight in place on its first eval forward without gradients; the repacked layout fails on
    small layers ("shape '[32, 0]' is invalid") and breaks training afterwards ("a view of a leaf Variable ...")."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, a bitsandbytes linear, or a GPT-2 Conv1D (weight stored in x out)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    raise TypeError(
        f"{type(module).__name__} is not supported as an adapter target; supported: nn.Linear, transformers Conv1D, "
        "bitsandbytes Linear4bit / Linear8bitLt."
    )


@dataclass(frozen=True)
class RowAdapters:
    """Which adapter each row of a mixed batch uses: `names` per row ("__base__": none), `groups` the rows of each
    distinct name, `index` each row's position in this layer's adapter order (len(adapters): none here)."""

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


class AdapterLayer(nn.Module):
    """What VeRA and LoRA layers share: the frozen `base_layer`, the active adapter, dropout, merge / unmerge."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = layer_shape(base_layer)
        self.adapter_names: list[str] = []  # in the order added (VeRA's stacked vectors use it)
        # Only adapters trained with dropout have a module here: one module per adapter and layer made loading
        # many adapters slow (a module costs ~0.1 ms to build) and every walk over the model longer.
        self.dropout = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        self.rows: RowAdapters | None = None  # set only for the duration of a mixed-batch call

    def _register(self, name: str, dropout: float) -> None:
        self.adapter_names.append(name)
        if dropout > 0:
            self.dropout[name] = nn.Dropout(dropout)

    def route(self, x: torch.Tensor) -> tuple[str | None, RowAdapters | None]:
        """(the adapter every row uses or None, None), or (None, rows) when rows use different adapters. A mixed call
        whose rows all name one adapter takes the one-adapter path (VeRA's fold included): exact for every row."""
        rows = self.rows
        if rows is None:
            return self.active_adapter, None
        rows.check_batch(x)
        if rows.single is None:
            return None, rows
        return (rows.single if rows.single in self.adapter_names else None), None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        name, rows = self.route(x)
        if rows is not None:
            return self.mixed_output(x, result, rows)
        if name is None or self.merged_adapter is not None:
            return result
        x = self.dropout[name](x) if name in self.dropout else x
        return result + self.adapter_output(x, name).to(result.dtype)

    def mixed_output(self, x: torch.Tensor, result: torch.Tensor, rows: RowAdapters) -> torch.Tensor:
        """Each row's own update, one sub-batch per distinct adapter (PEFT's way; no dropout: inference only)."""
        for name, index in rows.groups.items():
            if name in self.adapter_names:  # not "__base__", nor an adapter that does not adapt this layer
                result = result.index_add(0, index, self.adapter_output(x[index], name).to(result.dtype))
        return result

    def adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The tensors adapter `name` trains in this layer: training, counting, activation and saving ask here."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """The adapter's update as a dense (out, in) matrix, in fp32."""
        raise NotImplementedError

    def _apply_delta(self, name: str, sign: float) -> None:
        if is_quantized(self.base_layer):
            raise NotImplementedError(
                "merging into a 4-bit / 8-bit base is refused: re-quantizing the merged weight would lose the adapter's "
                "small update. Load the base in fp32/bf16, load the adapter, then merge."
            )
        weight = self.base_layer.weight
        delta = self.delta_weight(name).to(weight.device)
        if isinstance(self.base_layer, Conv1D):
            delta = delta.T
        with torch.no_grad():
            weight.copy_((weight.float() + sign * delta).to(weight.dtype))

    def merge(self) -> None:
        """Add the active adapter's update into the base weight (exact up to float rounding)."""
        if self.merged_adapter is not None or self.active_adapter is None:
            return
        self._apply_delta(self.active_adapter, +1.0)  # raises before any state changes on a quantized base
        self.merged_adapter = self.active_adapter

    def unmerge(self) -> None:
        if self.merged_adapter is None:
            return
        self._apply_delta(self.merged_adapter, -1.0)
        self.merged_adapter = None

    def _param_device(self) -> torch.device:
        # Every supported layer has a weight; parameters() walked the layer, once per adapter and layer (a fifth of
        # loading 64 adapters).
        return self.base_layer.weight.device


class VeraLayer(AdapterLayer):
    """VeRA on one layer: trainable b (out) and d (r) around the model's shared frozen (A, B)."""

    def __init__(self, base_layer: nn.Module, projections: VeraProjections):
        super().__init__(base_layer)
        self.projections = projections  # the same module object in every VeraLayer of the model
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self._bank: tuple[torch.Tensor, torch.Tensor] | None = None  # see vector_bank; not in the state dict
        self._bank_used = 0  # rows of the bank handed to adapters (the rest are zero)

    def add(self, name: str, config: VeraConfig) -> None:
        device = self._param_device()
        # b = 0 keeps the model unchanged at step 0; d = d_init (a small constant, per the paper's ablation).
        # Frozen until set_active_adapter trains them (as for LoRA below): adding many needs no second pass.
        self.vera_lambda_b[name] = nn.Parameter(torch.zeros(self.out_features, device=device), requires_grad=False)
        self.vera_lambda_d[name] = nn.Parameter(torch.full((config.r,), float(config.d_init), device=device),
                                                requires_grad=False)
        self._register(name, config.dropout)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name, rows = self.route(x)
        if (name is None or rows is not None or self.merged_adapter is not None or args or kwargs
                or not self._foldable(x, name)):
            return super().forward(x, *args, **kwargs)
        b, d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if isinstance(self.base_layer, Conv1D):
            weight = weight.T  # Conv1D stores (in, out)
        A_s = self.projections.A[:, : self.in_features]  # (r, in)
        B_s = self.projections.B[: self.out_features, :]  # (out, r)
        u = None
        if torch.is_grad_enabled() and (b.requires_grad or d.requires_grad):
            u = self.projections.project_input(x, self.in_features, b.dtype).detach()  # (..., r), shared
        keep = fused.keep_folded(x.numel() // self.in_features, self.in_features, self.out_features, A_s.shape[0])
        return fused.FoldedVera.apply(x, weight, bias, b, d, A_s, B_s, u, keep)

    def _foldable(self, x: torch.Tensor, name: str) -> bool:
        """Fold the update into the frozen weight when that is exact (fp32 without autocast, frozen plain Linear /
        Conv1D, no active dropout, no hooks on the base) and cheaper: N·(in + out) > in·out for N tokens (fused.py).
        Under bf16 autocast a folded W' would round the small update into W0's bf16 values, so it is not folded."""
        base = self.base_layer
        frozen = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
        fp32 = base.weight.dtype == x.dtype == self.vera_lambda_b[name].dtype == self.projections.A.dtype == torch.float32
        tokens = x.numel() // self.in_features
        return (fused.fast_path_enabled() and type(base) in (nn.Linear, Conv1D) and frozen and fp32
                and not torch.is_autocast_enabled(x.device.type)
                and not (base._forward_hooks or base._forward_pre_hooks)
                and (name not in self.dropout or not self.dropout[name].training)
                and tokens * (self.in_features + self.out_features) > self.in_features * self.out_features)

    def adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """b * (B_s (d * (A_s x))) with A_s x shared between layers that read the same input (fused.py)."""
        if not fused.fast_path_enabled():
            return self.plain_adapter_output(x, name)
        b, d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        u = self.projections.project_input(x, self.in_features, b.dtype)  # (..., r)
        return b * F.linear(d * u, self.projections.B[: self.out_features, :])  # (..., out)

    def mixed_output(self, x: torch.Tensor, result: torch.Tensor, rows: RowAdapters) -> torch.Tensor:
        """h_i = W0 x_i + b[a_i] * (B_s (d[a_i] * (A_s x_i))): one A and one B product for the whole batch and a
        row-wise gather of b and d (gather_vectors), so the cost does not grow with the number of distinct adapters."""
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (-1,)  # rows along dim 0, broadcast over the rest
        b, d = (v.view(shape) for v in rows.vectors[self])  # (B, 1.., out), (B, 1.., r)
        u = self.projections.project_input(x, self.in_features, b.dtype)  # (B, ..., r), shared like adapter_output
        return result + (b * F.linear(d * u, self.projections.B[: self.out_features, :])).to(result.dtype)

    def vector_bank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every adapter's b and d stacked in adapter order, (K + 1, out) and (K + 1, r), the last row zero for rows
        without an adapter here. Built on first use, then each adapter's parameters are re-pointed to views of their
        row, so the vectors are held once and training or loading one adapter updates the stack in place. Rebuilt
        when that no longer holds (an adapter added, parameters moved or replaced, free rows left by add_to_bank)."""
        names = self.adapter_names
        if self._bank is None or len(self._bank[0]) != len(names) + 1 or self._rows_held(names) < len(names):
            self._restack(room=0)
        return self._bank

    def add_to_bank(self, room: int) -> None:
        """Copy the adapters added since the stack was last built or extended into its free rows, rebuilding it with
        `room` more free rows when it has too few. load_adapters calls this every few adapters as they load, so the
        files' tensors are freed early: stacking all of them at the end held every vector twice and left the freed
        copies scattered over the heap (1,000 SmolLM2 adapters took 1.75 GB of RSS for 0.84 GB of vectors). Only
        the new adapters are copied (checking every row each time is quadratic in K); vector_bank checks them all."""
        names, used = self.adapter_names, self._bank_used
        if (self._bank is None or not used <= len(names) < len(self._bank[0])
                or any((self.vera_lambda_b[n].device, self.vera_lambda_b[n].dtype)
                       != (self._bank[0].device, self._bank[0].dtype) for n in names[used:])):
            self._restack(room)
        elif used < len(names):
            self._fill(used)  # rows past the used ones are still zero: none was handed out

    def _restack(self, room: int) -> None:
        names = self.adapter_names
        # Normal tensors even under inference_mode (generate): the parameters become views of the stack and must
        # still be trainable afterwards.
        with torch.inference_mode(False):
            self._bank = tuple(params[names[0]].new_zeros((len(names) + 1 + room, params[names[0]].shape[0]))
                               for params in (self.vera_lambda_b, self.vera_lambda_d))
        self._fill(0)

    def _fill(self, start: int) -> None:
        """Rows start.. of the stack get the adapters' vectors, one stack op per tensor (a copy per adapter and
        layer was most of load_adapters' time), and their parameters become views of their rows."""
        names = self.adapter_names[start:]
        with torch.inference_mode(False), torch.no_grad():
            for bank, params in zip(self._bank, (self.vera_lambda_b, self.vera_lambda_d)):
                vectors = [params[name] for name in names]
                rows = bank[start : start + len(names)]
                torch.stack(vectors, out=rows)
                for param, row in zip(vectors, rows.unbind(0)):
                    param.data = row  # the parameter object stays (optimizers, grads); its storage is the row
        self._bank_used = start + len(names)

    def _rows_held(self, names: list[str]) -> int:
        """How many leading adapters' parameters are still their rows of the bank. Addresses by arithmetic:
        indexing the bank made a view per adapter, once per layer and mixed call."""
        if self._bank is None:
            return 0
        for i, name in enumerate(names):
            if not all(params[name].data_ptr() == bank.data_ptr() + i * bank.stride(0) * bank.element_size()
                       for bank, params in zip(self._bank, (self.vera_lambda_b, self.vera_lambda_d))):
                return i
        return len(names)

    def plain_adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The formula as written, nothing shared or folded: the reference the fast path is tested against."""
        b, d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        A = self.projections.A[:, : self.in_features]  # (r, in)
        B = self.projections.B[: self.out_features, :]  # (out, r)
        h = F.linear(x.to(b.dtype), A)  # (..., r)
        return b * F.linear(d * h, B)  # (..., out)

    def delta_weight(self, name: str) -> torch.Tensor:
        b, d = self.vera_lambda_b[name].float(), self.vera_lambda_d[name].float()
        A = self.projections.A[:, : self.in_features].float()
        B = self.projections.B[: self.out_features, :].float()
        return (b[:, None] * B) @ (d[:, None] * A)  # (out, in)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.vera_lambda_b[name], self.vera_lambda_d[name]]


def gather_vectors(layers: list[VeraLayer], rows: RowAdapters) -> None:
    """Each layer's rows' (b, d) into rows.vectors, once per mixed call or block (vectors edited inside a block are
    seen by the next one). Measured on SmolLM2: gathering in every forward was a fifth of a decode step, and 420
    separate gathers kept alive across the call fragmented the heap (RSS doubled after two calls, malloc_trim gave
    it back); one buffer per dtype is one allocation, freed whole. Normal tensors even under inference_mode, so the
    block may also run with gradients on."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    with torch.inference_mode(False), torch.no_grad():
        banks = [layer.vector_bank() for layer in layers]
        for bank in (t for pair in banks for t in pair):
            by_dtype.setdefault(bank.dtype, []).append(bank)
        n, gathered = len(rows.names), {}
        for dtype, group in by_dtype.items():
            flat = torch.empty(n * sum(b.shape[1] for b in group), dtype=dtype, device=group[0].device)
            for bank, out in zip(group, flat.split([n * b.shape[1] for b in group])):
                gathered[id(bank)] = torch.index_select(bank, 0, rows.index, out=out.view(n, -1))  # (B, width)
    for layer, (b_bank, d_bank) in zip(layers, banks):
        rows.vectors[layer] = (gathered[id(b_bank)], gathered[id(d_bank)])


class LoraLayer(AdapterLayer):
    """LoRA on one layer: trainable A (r, in) and B (out, r), update scaled by alpha / r."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}

    def add(self, name: str, config: LoraConfig) -> None:
        device = self._param_device()
        A = torch.empty(config.r, self.in_features, device=device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # as PEFT (and nn.Linear's default init)
        self.lora_A[name] = nn.Parameter(A, requires_grad=False)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, config.r, device=device),  # B = 0: no change
                                         requires_grad=False)
        self.scaling[name] = config.scaling
        self._register(name, config.dropout)

    def adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        return F.linear(F.linear(x.to(A.dtype), A), B) * self.scaling[name]  # (..., r) -> (..., out)

    def delta_weight(self, name: str) -> torch.Tensor:
        return (self.lora_B[name].float() @ self.lora_A[name].float()) * self.scaling[name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.lora_A[name], self.lora_B[name]]


class ModulesToSave(nn.Module):
    """A module trained as full copies (one per adapter) while the original stays untouched, as PEFT does."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.rows: RowAdapters | None = None  # set only for the duration of a mixed-batch call

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def add(self, name: str) -> None:
        # deepcopy copies each tensor's own attributes too, and a fake tensor's (estimate_memory builds the head under
        # FakeTensorMode) include its mode: the copy's tensors would then live in a second FakeTensorMode that the
        # first converts as if they were real. Repeated estimates of a classifier with a head copy corrupted the heap
        # that way (a crash within 10-60 estimates; none in 1,000 with the one mode shared through the memo).
        modes = (getattr(t, "fake_mode", None) for t in [*self.original_module.parameters(),
                                                          *self.original_module.buffers()])
        memo = {id(mode): mode for mode in modes if mode is not None}
        self.modules_to_save[name] = copy.deepcopy(self.original_module, memo)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The head copy's tensors that adapter `name` trains."""
        return list(self.modules_to_save[name].parameters())

    def forward(self, *args, **kwargs):
        if self.rows is None:
            return self._module(self.active_adapter)(*args, **kwargs)
        self.rows.check_batch(args[0])
        if self.rows.single is not None:  # every row one adapter: its copy for the whole batch
            return self._module(self.rows.single)(*args, **kwargs)
        return self.mixed_forward(*args, **kwargs)

    def _module(self, name: str | None) -> nn.Module:
        return self.modules_to_save[name] if name in self.modules_to_save else self.original_module

    def mixed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row through its adapter's copy (or the original), one sub-batch per distinct adapter, as PEFT does;
        the first argument and the output must be batch-first tensors."""
        result = None
        for name, index in self.rows.groups.items():
            out = self._module(name)(x[index], *args, **kwargs)
            if result is None:
                result = out.new_empty((x.shape[0], *out.shape[1:]))
            result[index] = out
        return result


def walk(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) in named_modules() order, adapter wrappers included but not the modules inside them: every
    adapter adds modules to each wrapper (its dropout), so with many adapters a full walk grows with their number,
    and no verb needs what a wrapper holds."""
    seen, stack = set(), [("", model)]
    while stack:
        path, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield path, module
        if not isinstance(module, (AdapterLayer, ModulesToSave)):
            prefix = f"{path}." if path else ""
            stack += [(prefix + n, c) for n, c in reversed(module._modules.items()) if c is not None]
